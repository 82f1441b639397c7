"""The documentation site (mkdocs.yml, docs/) builds without a single warning, its API page shows
the docstrings, every page in its navigation exists, the results page links every stored result,
and the README stays a front page."""
from __future__ import annotations

import ast
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MAX_README_LINES = 300


def nav_pages(nav) -> list[str]:
    """Every page file named in an mkdocs ``nav`` (nested sections included)."""
    out = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        out += nav_pages(value) if isinstance(value, list) else [value]
    return out


CONFIG = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
NAV = nav_pages(CONFIG["nav"])


def words(text: str) -> str:
    """Text without markup (HTML tags, reST/Markdown backticks), whitespace collapsed."""
    return " ".join(re.sub(r"<[^>]+>|`", "", html.unescape(text)).split())


def docstring_start(path: Path, name: str) -> str:
    """The first words of the docstring of function ``name`` in ``path``."""
    tree = ast.parse(path.read_text())
    func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    return " ".join(words(ast.get_docstring(func)).split()[:6])


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"mkdocs build --strict failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    assert "WARNING" not in res.stderr, res.stderr[-6000:]
    return out


def test_the_site_builds_strictly_with_every_page(site):
    for page in NAV:
        built = site / ("index.html" if page == "index.md" else Path(page).with_suffix("") / "index.html")
        assert built.is_file(), f"{page} was not built"


def test_the_api_page_shows_rendered_docstrings(site):
    page = (site / "api" / "index.html").read_text()
    api = words(page)
    for module, func in [("visiontools/tome/merge.py", "bipartite_soft_matching"),
                         ("patches/timm.py", "apply_tome"),  # patches/ under its installed name
                         ("visiontools/tome/budget.py", "solve_schedule")]:
        assert docstring_start(ROOT / module, func) in api, f"{func}'s docstring is not on the API page"
    for name in ("visiontools.tome.merge.bipartite_soft_matching", "visiontools.patches.timm.apply_tome",
                 "visiontools.patches.transformers", "visiontools.patches.diffusers", "visiontools.layers.hyena",
                 "visiontools.models", "visiontools.models.checkpoint"):
        assert f'id="{name}"' in page, f"no API entry for {name}"


def test_every_nav_page_exists_and_every_page_is_in_the_nav():
    assert len(NAV) == len(set(NAV)) >= 15
    missing = [p for p in NAV if not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml nav names pages that do not exist: {missing}"
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if p.relative_to(DOCS).parts[0] != "results"}
    assert pages == set(NAV), f"pages missing from the nav: {sorted(pages - set(NAV))}"


def test_the_results_page_links_every_stored_result():
    text = (DOCS / "benchmarks-results.md").read_text()
    stored = [p.relative_to(DOCS / "results").as_posix() for p in sorted((DOCS / "results").rglob("*")) if p.is_file()]
    unlinked = [name for name in stored if f"](results/{name})" not in text]
    assert not unlinked, f"docs/benchmarks-results.md does not link {unlinked}"


def test_the_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= MAX_README_LINES
    assert "bash scripts/setup.sh --dev && .venv/bin/python -m pytest" in readme  # what .ci/run runs
    assert "mkdocs serve" in readme and "CHANGELOG.md" in readme
    unlinked = [p for p in NAV if f"](docs/{p})" not in readme and p != "changelog.md"]  # CHANGELOG.md itself is
    assert not unlinked, f"README does not link {unlinked}"
