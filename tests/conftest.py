"""Shared test fixtures: where the real datasets live, a few training steps on real CIFAR-10, and a
shipped checkpoint's predictions on the test images its card recorded."""
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


@pytest.fixture(scope="session")
def cifar_batch(datasets_dir):
    """64 real CIFAR-10 training images (the first 7 of every class, 64 of those), normalised, and labels."""
    from visiontools.data import CIFAR_STATS, load_cifar, normalize

    ds = load_cifar("cifar10", "train", datasets_dir / "cifar10", max_per_class=7).subset(range(64))
    return normalize(ds.images, *CIFAR_STATS["cifar10"]), ds.labels


@pytest.fixture
def fit_losses(cifar_batch):
    """``fit(model, steps=15, lr=3e-3) -> losses``: full-batch AdamW steps on :func:`cifar_batch`
    (seeded), for the "a tiny model learns real data" tests."""
    import torch
    import torch.nn.functional as F

    def fit(model, steps: int = 15, lr: float = 3e-3) -> list[float]:
        x, y = cifar_batch
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        losses = []
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    return fit


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: on a shared 2-core machine more threads oversubscribe
    and crawl (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def recorded_subset(datasets_dir):
    """``predict(model, meta) -> (top1, pred, labels)``: a shipped checkpoint's predictions on the CIFAR-10
    test subset its card recorded (``meta["subset_accuracy"]``), normalised with the card's mean/std."""
    import torch

    from visiontools.data import load_cifar, normalize

    def predict(model, meta):
        rec = meta["subset_accuracy"]  # recorded when the checkpoint was shipped
        ds = load_cifar("cifar10", "test", datasets_dir / "cifar10", max_per_class=rec["per_class"])
        assert len(ds) == rec["n"], (len(ds), rec)
        with torch.no_grad():
            pred = model(normalize(ds.images, meta["mean"], meta["std"])).argmax(1)
        return 100.0 * (pred == ds.labels).float().mean().item(), pred, ds.labels

    return predict


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
