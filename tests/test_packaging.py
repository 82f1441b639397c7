"""The built wheel installs exactly one top-level package, ``visiontools`` (issue 13, part 4)."""
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of this checkout, built without network or build isolation, from a copy of the
    sources (setuptools writes build/ and *.egg-info beside them)."""
    out = tmp_path_factory.mktemp("wheel")
    src = tmp_path_factory.mktemp("src") / "visiontools"
    skip = shutil.ignore_patterns(".git", ".venv", "runs", "artifacts", "build", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, src, ignore=skip)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src)], check=True, capture_output=True, text=True)
    (whl,) = out.glob("visiontools-*.whl")
    return whl


def test_wheel_has_one_top_level_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"visiontools"}
    for module in ("visiontools/patches/timm.py", "visiontools/patches/diffusers.py",
                   "visiontools/demos/app.py", "visiontools/demos/state.py", "visiontools/demos/merge_tab.py",
                   "visiontools/models/vit.py", "visiontools/models/shipped.py",
                   "visiontools/checkpoints/cifar10_vit.safetensors", "visiontools/checkpoints/cifar10_cct.safetensors"):
        assert module in names


def test_wheel_in_clean_venv_imports_as_visiontools_only(wheel, tmp_path):
    """In a fresh venv (no torch: nothing is imported that needs it), the adapters resolve inside
    visiontools and no top-level ``patches``/``demos`` module exists."""
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    py = env / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with zipfile.ZipFile(wheel) as z:  # what `pip install --no-deps` does for a pure wheel
        z.extractall(site)
    check = ("import importlib.util as u, sys; "
             "assert u.find_spec('patches') is None and u.find_spec('demos') is None; "
             "s = u.find_spec('visiontools.patches.timm'); assert s and s.origin.startswith(sys.prefix), s; "
             "assert u.find_spec('visiontools.demos.app') is not None; print('ok')")
    out = subprocess.run([py, "-c", check], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_license_is_an_spdx_string():
    import tomllib
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0"


def test_editable_install_as_the_setup_script_runs_it_prints_no_setuptools_warning(tmp_path):
    """``scripts/setup.sh``'s editable install (its environment included) prints no setuptools
    warning: no "absent from packages" notices, and the generic notice about folders named like the
    package (patches/ and demos/ are mapped into visiontools) is silenced."""
    import os
    import re

    setup = (ROOT / "scripts/setup.sh").read_text()
    env_vars = dict(re.findall(r'(\w+)="([^"]*)" \.venv/bin/python -m pip install -q -e', setup))
    assert env_vars, "setup.sh's editable install line changed"
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".git", ".venv", "runs", "artifacts", "build", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, src, ignore=skip)
    # --ignore-installed: install beside, never uninstall, the visiontools this test runs from
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--ignore-installed",
                          "-e", str(src),
                          "--prefix", str(tmp_path / "prefix")],
                         capture_output=True, text=True, env={**os.environ, **env_vars}, timeout=300)
    assert res.returncode == 0, res.stderr
    noise = [line for line in (res.stdout + res.stderr).splitlines()
             if re.search(r"(Setuptools|BuildBackend)\w*Warning|absent from|Please be careful", line)]
    assert noise == []
