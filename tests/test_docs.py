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


# ----------------------------------------------------------------------------- the API reference reads (issue 47)

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):(?:`|<code>)")  # as text, or as Markdown made it
# not in the API reference: the command line and its bench targets, and the demo app (described on their pages)
NOT_IN_REFERENCE = ("visiontools.cli", "visiontools.demos", "visiontools.bench")


def public_modules() -> list[str]:
    """Every module of the installed package (tests/test_imports.py's list) that the API reference covers."""
    from test_imports import MODULES

    return sorted(m for m in MODULES if not m.rpartition(".")[2].startswith("_")
                  and not any(m == p or m.startswith(p + ".") for p in NOT_IN_REFERENCE))


def test_no_page_shows_a_literal_sphinx_role_and_roles_are_links(site):
    """docs/griffe_layout.py turns :func:`x`, :class:`~a.B`, ... into cross-references: none is left as
    text on any built page, and those naming a documented object are links to it."""
    pages = sorted(site.rglob("*.html"))
    assert pages
    literal = {str(p.relative_to(site)): ROLE.findall(html.unescape(p.read_text())) for p in pages}
    assert not any(literal.values()), {k: len(v) for k, v in literal.items() if v}
    api = (site / "api" / "index.html").read_text()
    links = re.findall(r'<a class="autorefs autorefs-internal"[^>]*href="([^"]*)"', api)
    assert len(links) >= 100, len(links)
    for target in ("visiontools.patches.diffusers_dit.apply_tome_dit", "visiontools.patches.timm.apply_tome",
                   "visiontools.tome.merge.bipartite_soft_matching", "visiontools.tome.merge.parse_r"):
        assert f"#{target}" in links, f"no link to {target}"


def test_docstring_lists_stay_lists(site):
    """A bullet list straight after a paragraph line ("Supported:" then "- timm ...") renders as a list."""
    api = (site / "api" / "index.html").read_text()
    start = api.index('id="visiontools.patches.timm"')
    section = api[start:api.index('id="visiontools.patches.timm.', start)]
    assert re.search(r"<li>\s*timm <code>VisionTransformer</code>", section), words(section)[:800]


def test_every_public_module_is_in_the_api_reference(site):
    api = (site / "api" / "index.html").read_text()
    modules = public_modules()
    assert "visiontools.patches.diffusers_dit" in modules and "visiontools.pictures" in modules
    missing = [m for m in modules if f'id="{m}"' not in api]
    assert not missing, f"public modules missing from docs/api.md: {missing}"


def test_apply_tome_documents_every_keyword_of_every_host_in_one_table():
    """The front door's table has one row per keyword and one column per host; a cell is filled exactly
    when that host's adapter takes the keyword (so the table stays true when an adapter changes)."""
    import inspect

    import visiontools
    from visiontools.patches import diffusers, diffusers_dit, timm, transformers

    hosts = {"timm": timm.apply_tome, "transformers": transformers.apply_tome,
             "SD UNet": diffusers.apply_tome_sd, "DiT": diffusers_dit.apply_tome_dit}
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in inspect.getdoc(visiontools.apply_tome).splitlines() if line.strip().startswith("| ")]
    header, body = rows[0], rows[1:]
    assert header == ["keyword", "meaning", *hosts]
    taken = {host: set() for host in hosts}
    for row in body:
        names = [n.strip().strip("`") for n in row[0].split(",")]
        for host, cell in zip(hosts, row[2:6]):
            if cell:
                taken[host].update(names)
    for host, adapter in hosts.items():
        params = set(list(inspect.signature(adapter).parameters)[1:])
        assert taken[host] == params, (host, sorted(taken[host] ^ params))
    assert inspect.getdoc(visiontools.remove_tome).count("remove_tome(") >= 4  # every host's call, in its table


def test_the_index_lists_every_page_and_one_line_per_host():
    """docs/index.md's page table links every page of the nav, and "One line per host" has a line for
    every host apply_tome dispatches to, diffusion transformers included."""
    index = (DOCS / "index.md").read_text()
    table = [line for line in index.splitlines() if line.startswith("| [")]
    linked = {m for line in table for m in re.findall(r"\]\(([^)#]+)\)", line.split("|")[1])}
    assert linked == set(NAV) - {"index.md"}, sorted(set(NAV) - {"index.md"} ^ linked)
    hosts = index.split("## One line per host", 1)[1].split("```", 2)[1]
    for call in ("apply_tome(timm_vit, r=", "apply_tome(hf_vision_model, r=", "apply_tome(sd_pipeline, ratio=",
                 "apply_tome(dit_pipeline, ratio=", "remove_tome(model)"):
        assert call in hosts, call
    assert "SD3, PixArt or Flux" in hosts


# ----------------------------------------------------------------------------- no build-machine paths

# A path of the machines this project was built on (/work/..., /root/..., its wip-* scratch folders, a lock
# file under /tmp, the `flock` that serialised heavy jobs there) means nothing to a user; a path after a word
# character or a dot is part of a URL or a relative path, not an absolute one.
BUILD_MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root|mnt|scratch|home/\w+|opt/pypi\S*)(?:/|\b)"
                                r"|(?<![\w.~-])/tmp/\S*\.lock\b|\bflock\b|\bwip-\w+")  # and its scratch folders
USER_FACING = ["README.md", "CHANGELOG.md", "mkdocs.yml", "docs/**/*.md", "docs/**/*.json", "docs/**/*.yaml",
               "configs/*", "visiontools/checkpoints/*.json", "visiontools/checkpoints/*.yaml",
               "visiontools/checkpoints/*.md", "visiontools/checkpoints/*.jsonl", "visiontools/assets/*.md"]


def build_machine_paths(text: str) -> list[str]:
    """The lines of ``text`` that name a build machine's absolute path or its lock files."""
    return [line.strip() for line in text.splitlines() if BUILD_MACHINE_PATH.search(line)]


def test_no_user_facing_file_names_a_build_machine_path():
    files = sorted({p for pattern in USER_FACING for p in ROOT.glob(pattern) if p.is_file()})
    assert len(files) > 50 and ROOT / "configs" / "README.md" in files
    found = {str(p.relative_to(ROOT)): hits for p in files if (hits := build_machine_paths(p.read_text()))}
    assert not found, found
    # what the pattern catches, and what it leaves alone
    assert build_machine_paths("run it under `flock /work/heavy.lock visiontools train`")
    assert build_machine_paths("data_dir: /root/data") and build_machine_paths("see /tmp/vt-heavy.lock")
    assert build_machine_paths('"out_dir": "wip-cct-run/run"')
    assert not build_machine_paths("data_dir: ../shared/datasets/cifar10, ~/.cache/visiontools, /tmp/vt-site, "
                                   "https://github.com/org/work/root/x")
