"""The CI rule of tests/conftest.py: with CI=true a skipped test fails the run (.ci/run sets it)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path


def test_a_skip_fails_the_run_under_ci_only(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_one.py").write_text(
        "import pytest\n\ndef test_runs():\n    pass\n\n"
        "@pytest.mark.skipif(True, reason='optional thing missing')\ndef test_skipped():\n    pass\n")

    def pytest_rc(ci: str) -> tuple[int, str]:
        env = {**os.environ, "CI": ci}
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        return p.returncode, p.stdout

    assert pytest_rc("")[0] == 0
    rc, out = pytest_rc("true")
    assert rc == 1 and "test_one.py::test_skipped: Skipped: optional thing missing" in out
    (tmp_path / "test_one.py").write_text("def test_runs():\n    pass\n")
    assert pytest_rc("true")[0] == 0
    assert "export CI=true" in Path(__file__).resolve().parents[1].joinpath(".ci", "run").read_text()
