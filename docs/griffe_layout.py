"""Griffe extension for the API pages: the repository's ``patches/`` and ``demos/`` folders install as
``visiontools.patches`` and ``visiontools.demos`` (pyproject.toml's ``package-dir``), so when Griffe
loads ``visiontools`` from the checkout (``paths: [.]`` in mkdocs.yml) this adds them as its
subpackages, read from their own folders. Only public Griffe API is used (``griffe.visit``)."""
from __future__ import annotations

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
