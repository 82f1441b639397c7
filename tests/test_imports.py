"""Imports flow one way, and the package shows its layers.

Checked on the source (every ``import``, including those inside functions), so a lazy import that
closes a circle is caught too. Layers, bottom to top: utilities; algorithms (``tome/``, ``layers/``);
adapters (``patches/``); the model registry (``models/``); benchmarks (``bench/``); tools (data,
train, evaluate, export, video, CLI); the demo. A module may import its own layer or lower ones.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"visiontools.patches": ROOT / "patches", "visiontools.demos": ROOT / "demos",
           "visiontools": ROOT / "visiontools"}
HOSTS = ("timm", "diffusers", "transformers")

# layer of each module, by its longest matching prefix
LAYERS = {
    "visiontools.errors": 0, "visiontools.defaults": 0, "visiontools.timing": 0, "visiontools.data": 0,
    "visiontools.distributed": 0,
    "visiontools.tome": 1, "visiontools.layers": 1,
    "visiontools.patches": 2,
    "visiontools.models": 3,
    "visiontools.export": 4,  # the exporter is library code too: `bench onnx` measures what it writes
    "visiontools.bench": 5,
    "visiontools": 6,  # the package's front door (apply_tome) and the tools: train, evaluate, video, cli
    "visiontools.demos": 7,
}
# Algorithms never import a model library.
NO_HOSTS = ("visiontools.tome", "visiontools.layers", "visiontools.errors", "visiontools.defaults",
            "visiontools.timing")


def all_modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name, from the source tree."""
    out = {}
    for prefix, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if prefix == "visiontools" and parts[:1] in (["patches"], ["demos"]):
                continue
            out[name] = path
    return out


MODULES = all_modules()


def imports_of(module: str) -> set[str]:
    """Modules (of this package, or top-level names of others) that ``module`` imports anywhere."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                names.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return names


def internal(name: str) -> str | None:
    """The package module ``name`` refers to (a module, or the package that defines the attribute)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def layer(module: str) -> int:
    return LAYERS[max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)]


def graph() -> dict[str, set[str]]:
    return {m: {t for n in imports_of(m) if (t := internal(n)) and t != m} for m in MODULES}


def test_the_source_tree_is_found():
    assert {"visiontools.tome.merge", "visiontools.patches.timm", "visiontools.demos.app",
            "visiontools.models.registry", "visiontools.bench.vit"} <= set(MODULES)


def test_at_most_twelve_modules_at_the_top_of_visiontools():
    top = sorted(p.name for p in (ROOT / "visiontools").glob("*.py"))
    assert len(top) <= 12, top


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_only_its_layer_or_lower(module):
    bad = sorted(t for t in graph()[module] if layer(t) > layer(module) and t != "visiontools")
    assert not bad, f"{module} (layer {layer(module)}) imports higher layers: {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith(NO_HOSTS)))
def test_algorithms_import_no_model_library(module):
    bad = sorted(n for n in imports_of(module) if n.split(".")[0] in HOSTS)
    assert not bad, f"{module} imports {bad}"


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    g = graph()
    for m in g:  # a package importing its own submodules is how packages re-export, not a cycle
        if MODULES[m].name == "__init__.py":
            g[m] = {t for t in g[m] if not t.startswith(m + ".")}
    assert cycles(g) == []


def test_cycle_check_finds_a_lazy_cycle():
    """Guards the check: a circle through imports inside functions is found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
