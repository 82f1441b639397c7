"""Shared test fixtures: where the real datasets live."""
from pathlib import Path

import pytest

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    """../shared/datasets (real CIFAR-10 and ImageNet sample images); required, never skipped."""
    assert DATASETS.is_dir(), f"real test images expected at {DATASETS} (see the README)"
    return DATASETS


@pytest.fixture(scope="session")
def imagenet_image(datasets_dir):
    """One real ImageNet photo as a PIL RGB image."""
    from PIL import Image
    path = sorted((datasets_dir / "imagenet-samples").glob("*/*.JPEG"))[0]
    return Image.open(path).convert("RGB")


# In CI (CI=true, as .ci/run sets it) every test must run: a skipped test fails the session, so a
# broken or partial dev install cannot pass quietly.
_SKIPPED: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append(f"{report.nodeid}: {report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr}")


def pytest_sessionfinish(session, exitstatus):
    import os

    if _SKIPPED and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        print(f"\nCI: {len(_SKIPPED)} test(s) skipped; every test must run in CI:\n  " + "\n  ".join(_SKIPPED))
        session.exitstatus = 1
