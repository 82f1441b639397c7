"""Griffe extension for the API pages: the repository's ``patches/`` and ``demos/`` folders install as
``visiontools.patches`` and ``visiontools.demos`` (pyproject.toml's ``package-dir``), so when Griffe
loads ``visiontools`` from the checkout (``paths: [.]`` in mkdocs.yml) this adds them as its
subpackages, read from their own folders. Only public Griffe API is used (``griffe.visit``).

A second extension, ``SphinxRoles``, turns the docstrings' Sphinx roles into cross-references and
keeps their bullet lists lists (see ``markdown_of``)."""
from __future__ import annotations

import re
from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"patches": ROOT / "patches", "demos": ROOT / "demos"}


def _visit(name: str, path: Path, parent: griffe.Module, loader: griffe.GriffeLoader) -> griffe.Module:
    module = griffe.visit(name, path, path.read_text(encoding="utf-8"), parent=parent,
                          extensions=loader.extensions, docstring_parser=loader.docstring_parser,
                          docstring_options=loader.docstring_options, lines_collection=loader.lines_collection,
                          modules_collection=loader.modules_collection)
    parent.set_member(name, module)
    return module


class InstalledLayout(griffe.Extension):
    """Attach ``patches/`` and ``demos/`` to the ``visiontools`` package as Python sees it when installed."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if pkg.name != "visiontools":
            return
        for name, folder in SUBPACKAGES.items():
            if name in pkg.members:
                continue
            package = _visit(name, folder / "__init__.py", pkg, loader)
            for path in sorted(folder.glob("*.py")):
                if path.name != "__init__.py":
                    _visit(path.stem, path, package, loader)


# ----------------------------------------------------------------------------- Sphinx roles -> cross-references

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`(?P<tilde>~?)(?P<target>[^`<>]+?)(?:\(\))?`")
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s")


def _lookup(collection, path: str):
    try:
        return collection.get_member(path)
    except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _identifier(obj: griffe.Object, target: str, collection) -> str:
    """The full path ``target`` names as seen from ``obj``'s docstring: itself when it is a full path,
    else the first of obj's own members, its class's, its module's (imports included) that exists;
    the canonical path of what is found (where mkdocstrings renders it); ``target`` when none does."""
    scopes = [obj, obj.parent, obj.module] if obj.parent is not None else [obj]
    candidates = [target] + [f"{scope.path}.{target}" for scope in scopes if scope is not None]
    for path in candidates:
        found = _lookup(collection, path)
        if found is not None:
            try:
                return found.canonical_path if not found.is_alias else found.final_target.path
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                return found.path
    return target


def markdown_of(text: str, obj: griffe.Object, collection) -> str:
    """A docstring's text for the API page: every Sphinx role (``:func:`x```, ``:class:`~a.B```, ...)
    becomes an mkdocstrings cross-reference (a link when the object is on a page, code otherwise), and
    a blank line goes before a bullet list that follows a paragraph line, so that it renders as a list."""
    def role(match: re.Match) -> str:
        target = match["target"].strip()
        shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
        ident = _identifier(obj, target, collection)
        return f'<autoref identifier="{ident}" optional><code>{shown}</code></autoref>'

    out: list[str] = []
    in_list = False
    for line in ROLE.sub(role, text).splitlines():
        if LIST_ITEM.match(line):
            if not in_list and out and out[-1].strip():
                out.append("")
            in_list = True
        elif not line.strip():
            in_list = False
        out.append(line)
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """Rewrite the docstrings of ``visiontools`` (every module, class, function and attribute) with
    :func:`markdown_of` once the package is loaded; list it after :class:`InstalledLayout`."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs) -> None:
        if pkg.name != "visiontools":
            return
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = markdown_of(obj.docstring.value, obj, loader.modules_collection)
            stack.extend(m for m in obj.members.values() if not m.is_alias)
