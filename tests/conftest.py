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
