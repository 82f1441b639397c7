"""Imports flow one way: algorithms at the bottom, adapters above them, tools above those.

Checked on the source (every ``import``, including those inside functions), so a lazy import that
closes a circle is caught too.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = {"visiontools.patches": ROOT / "patches", "visiontools.demos": ROOT / "demos"}
HOSTS = ["timm", "diffusers", "transformers"]

# module -> module prefixes it must never import
RULES = {
    "visiontools.merge": HOSTS + ["visiontools.patches", "visiontools.models"],
    "visiontools.merge2d": HOSTS + ["visiontools.patches"],
    "visiontools.merge_methods": HOSTS + ["visiontools.patches", "visiontools.models", "visiontools.evaluate"],
    "visiontools.budget": HOSTS + ["visiontools.patches", "visiontools.models", "visiontools.evaluate"],
    "visiontools.hyena": HOSTS + ["visiontools.patches"],
    "visiontools.grid": HOSTS + ["visiontools.patches", "visiontools.models"],
    "visiontools.merge_grid": HOSTS + ["visiontools.patches", "visiontools.models", "visiontools.grid"],
    "visiontools.conformer": HOSTS + ["visiontools.patches", "visiontools.models"],
    "visiontools.patches.timm_grid": ["visiontools.models", "visiontools.checkpoint", "visiontools.train",
                                      "visiontools.evaluate"],
    "visiontools.patches.timm_conformer": ["visiontools.models", "visiontools.checkpoint", "visiontools.train"],
    "visiontools.checkpoint": HOSTS + ["visiontools.models", "visiontools.train"],
    "visiontools.patches.timm_hyena": ["visiontools.models", "visiontools.checkpoint", "visiontools.train"],
    "visiontools.patches.timm": ["visiontools.models", "visiontools.train", "visiontools.evaluate"],
    "visiontools.lsh": HOSTS + ["visiontools.patches", "visiontools.models"],
    "visiontools.reversible": HOSTS + ["visiontools.patches", "visiontools.models"],
    "visiontools.patches.timm_lsh": ["visiontools.models", "visiontools.checkpoint", "visiontools.train"],
    "visiontools.patches.timm_reversible": ["visiontools.models", "visiontools.checkpoint", "visiontools.train"],
    "visiontools.patches.transformers": ["timm", "diffusers", "visiontools.models", "visiontools.train",
                                         "visiontools.evaluate", "visiontools.export"],
}


def source_of(module: str) -> Path:
    for prefix, folder in FILES.items():
        if module.startswith(prefix + "."):
            return folder / (module[len(prefix) + 1:] + ".py")
    return ROOT / (module.replace(".", "/") + ".py")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("module", sorted(RULES))
def test_module_does_not_import_higher_layers(module):
    imported = imported_modules(source_of(module))
    bad = sorted(m for m in imported for banned in RULES[module] if m == banned or m.startswith(banned + "."))
    assert not bad, f"{module} imports {bad}"
