"""visiontools.data: CIFAR in memory from real JPEGs, tensor augmentation, sharding, ImageNet folders."""
import numpy as np
import pytest
import torch
from PIL import Image

from visiontools.data import (
    CIFAR10_CLASSES, ImageNetFolder, TensorImageDataset, eval_shard, iterate_batches, load_cifar, normalize,
    random_crop_flip, shard_indices, timm_eval_transform,
)


@pytest.fixture(scope="module")
def cifar_small(datasets_dir):
    return load_cifar("cifar10", "test", datasets_dir / "cifar10", max_per_class=3)


def test_cifar_folder_decodes_real_images_with_official_labels(cifar_small, datasets_dir):
    ds = cifar_small
    assert ds.images.shape == (30, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert tuple(ds.classes) == CIFAR10_CLASSES
    assert ds.labels.tolist() == [c for c in range(10) for _ in range(3)]
    # the tensor is the decoded JPEG, pixel for pixel
    ref = np.array(Image.open(datasets_dir / "cifar10/test/cat/0001.jpg").convert("RGB"))
    i = ds.files.index(str(datasets_dir / "cifar10/test/cat/0001.jpg"))
    assert ds.labels[i] == 3
    assert torch.equal(ds.images[i], torch.from_numpy(ref).permute(2, 0, 1))


def test_missing_or_malformed_paths_give_clear_errors(tmp_path, datasets_dir):
    with pytest.raises(FileNotFoundError, match=r"expected either an ImageFolder tree .*test/<class>/<image>"):
        load_cifar("cifar10", "test", tmp_path / "nowhere")
    (tmp_path / "test").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_cifar("cifar10", "test", tmp_path)
    (tmp_path / "test" / "cat").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_cifar("cifar10", "test", tmp_path)
    # a CIFAR-10 tree is not CIFAR-100
    with pytest.raises(ValueError, match="has 10 class folders, but cifar100 has 100"):
        load_cifar("cifar100", "test", datasets_dir / "cifar10", max_per_class=1)
    with pytest.raises(ValueError, match="unknown CIFAR dataset"):
        load_cifar("cifar11", "test", datasets_dir / "cifar10")
    with pytest.raises(ValueError, match="unknown split"):
        load_cifar("cifar10", "val", datasets_dir / "cifar10")
    with pytest.raises(FileNotFoundError, match="one sub-folder per WordNet id"):
        ImageNetFolder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not ImageNet-1k WordNet ids"):
        ImageNetFolder(datasets_dir / "cifar10" / "test")


def test_imagenet_labels_come_from_wordnet_ids(datasets_dir):
    folder = ImageNetFolder(datasets_dir / "imagenet-samples")
    assert len(folder) == 100
    by_wnid = {path.split("/")[-2]: label for path, label in folder.samples}
    # known ImageNet-1k indices: 0 tench, 10 brambling, 990 buckeye
    assert by_wnid["n01440764"] == 0 and folder.descriptions[0].startswith("tench")
    assert by_wnid["n01530575"] == 10 and folder.descriptions[10].startswith("brambling")
    assert by_wnid["n12768682"] == 990 and folder.descriptions[990].startswith("buckeye")
    # the samples are every 10th class: sorted folder k has ImageNet index 10*k (not k)
    assert sorted(by_wnid.values()) == list(range(0, 1000, 10))


def test_imagenet_folder_uses_the_models_transform(datasets_dir):
    import timm
    model = timm.create_model("vit_tiny_patch16_224", num_classes=1000)
    folder = ImageNetFolder(datasets_dir / "imagenet-samples", transform=timm_eval_transform(model),
                            max_per_class=1)
    x, y = folder[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 0


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image(cifar_small):
    x = cifar_small.images[:8]
    g = torch.Generator().manual_seed(1)
    assert torch.equal(random_crop_flip(x, 0, False, g), x)
    out = random_crop_flip(x, 4, False, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    dy = torch.randint(0, 9, (8,), generator=g)
    dx = torch.randint(0, 9, (8,), generator=g)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(8):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32])
    flipped = random_crop_flip(x, 0, True, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    flip = torch.rand(8, generator=g) < 0.5
    assert 0 < flip.sum() < 8
    for i in range(8):
        assert torch.equal(flipped[i], x[i].flip(2) if flip[i] else x[i])


def test_normalize_matches_manual():
    x = torch.tensor([[[[0, 255]], [[51, 102]], [[255, 0]]]], dtype=torch.uint8)
    out = normalize(x, (0.5, 0.2, 0.0), (0.5, 0.1, 1.0))
    assert torch.allclose(out, torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]], [[1.0, 0.0]]]]), atol=1e-6)


def test_shards_cover_every_index_and_depend_on_epoch():
    a0 = shard_indices(10, 0, 2, True, seed=0, epoch=0)
    a1 = shard_indices(10, 1, 2, True, seed=0, epoch=0)
    assert sorted(a0 + a1) == list(range(10))
    assert a0 == shard_indices(10, 0, 2, True, seed=0, epoch=0)  # reproducible (resume)
    assert a0 != shard_indices(10, 0, 2, True, seed=0, epoch=1)
    assert sorted(eval_shard(7, 0, 2) + eval_shard(7, 1, 2)) == list(range(7))


def test_iterate_batches_and_dataset_validation(cifar_small):
    batches = list(iterate_batches(cifar_small, range(30), 8))
    assert [b[0].shape[0] for b in batches] == [8, 8, 8, 6]
    assert [b[0].shape[0] for b in iterate_batches(cifar_small, range(30), 8, drop_last=True)] == [8, 8, 8]
    with pytest.raises(ValueError, match="uint8"):
        TensorImageDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), ["a"])
