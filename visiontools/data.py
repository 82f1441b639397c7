"""Datasets for training and evaluation: CIFAR-10/100 held in memory as uint8 tensors (with batched
tensor augmentation), and ImageNet validation-style folders labelled by WordNet id.

CIFAR comes either from an ImageFolder tree (``<root>/{train,test}/<class>/*.jpg``) or from
torchvision's own dataset files (``download=True`` for users with a network). Images are decoded
once into an ``(N, 3, H, W)`` uint8 tensor, so an epoch on a CPU costs no JPEG decoding.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the CIFAR training sets (0-1 scale).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CIFAR_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
# Where `visiontools train` and `visiontools eval` look for CIFAR when no --data-dir is given: the
# ImageFolder copy of CIFAR-10 beside a checkout of this repository (relative to the current directory).
DEFAULT_DATA_DIR = "../shared/datasets/cifar10"
SPLITS = ("train", "test")


@dataclass
class TensorImageDataset:
    """A whole image-classification split in memory: ``images`` (N, 3, H, W) uint8, ``labels`` (N,)
    int64, and the class names in index order."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    files: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be an (N, 3, H, W) uint8 tensor, got {tuple(self.images.shape)} "
                             f"{self.images.dtype}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "TensorImageDataset":
        """The images at ``indices`` (same class list)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        files = [self.files[i] for i in idx.tolist()] if self.files else []
        return TensorImageDataset(self.images[idx], self.labels[idx], self.classes, files)


def _list_image_folder(split_dir: Path, max_per_class: int | None) -> tuple[list[str], list[tuple[str, int]]]:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{split_dir} has no class sub-folders; expected the ImageFolder layout "
                         f"{split_dir}/<class>/<image>.jpg")
    samples = []
    for ci, c in enumerate(classes):
        files = sorted(f for f in os.listdir(split_dir / c) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f"class folder {split_dir / c} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        if max_per_class is not None:
            files = files[:max_per_class]
        samples += [(str(split_dir / c / f), ci) for f in files]
    return classes, samples


def load_image_folder_tensor(split_dir: str | os.PathLike, max_per_class: int | None = None,
                             progress: bool = False) -> TensorImageDataset:
    """Decode an ImageFolder split (``<split_dir>/<class>/<image>``) of equally sized images into
    memory. ``max_per_class`` keeps only the first images (sorted by file name) of every class."""
    from PIL import Image

    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"dataset folder {split_dir} does not exist; expected an ImageFolder "
                                f"split laid out as {split_dir}/<class>/<image>.jpg")
    classes, samples = _list_image_folder(split_dir, max_per_class)
    it = samples
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(samples, desc=f"decoding {split_dir.name}", unit="img", mininterval=2)
    arrays = []
    size = None
    for path, _ in it:
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"))
        if size is None:
            size = a.shape
        elif a.shape != size:
            raise ValueError(f"{path} is {a.shape[1]}x{a.shape[0]} but the first image was {size[1]}x{size[0]}; "
                             "an in-memory dataset needs images of one size")
        arrays.append(a)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([c for _, c in samples], dtype=torch.long)
    return TensorImageDataset(images, labels, classes, [p for p, _ in samples])


def load_cifar(name: str, split: str, data_dir: str | os.PathLike | None = None, download: bool = False,
               max_per_class: int | None = None, progress: bool = False) -> TensorImageDataset:
    """CIFAR-10 or CIFAR-100 ``split`` ("train" or "test") in memory.

    With ``data_dir`` holding ``train/`` and ``test/`` ImageFolder trees, those are read (class folders
    in sorted order must be the official class order, as for CIFAR-10). With ``data_dir`` holding
    torchvision's files (or ``download=True``), torchvision's dataset is used.
    """
    name = name.lower()
    if name not in CIFAR_NUM_CLASSES:
        raise ValueError(f"unknown CIFAR dataset {name!r}; expected one of {sorted(CIFAR_NUM_CLASSES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if data_dir is not None and (Path(data_dir) / split).is_dir():
        ds = load_image_folder_tensor(Path(data_dir) / split, max_per_class, progress)
        if len(ds.classes) != CIFAR_NUM_CLASSES[name]:
            raise ValueError(f"{Path(data_dir) / split} has {len(ds.classes)} class folders, but {name} has "
                             f"{CIFAR_NUM_CLASSES[name]}")
        return ds
    return _load_torchvision_cifar(name, split, data_dir, download, max_per_class)


def _load_torchvision_cifar(name, split, data_dir, download, max_per_class) -> TensorImageDataset:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root = Path(data_dir) if data_dir is not None else Path.home() / ".cache" / "visiontools" / "data"
    try:
        ds = cls(str(root), train=(split == "train"), download=download)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted."
        where = "does not exist" if not root.exists() else "holds no data"
        raise FileNotFoundError(
            f"no {name} {split} data: {root} {where}; expected either an ImageFolder tree "
            f"{root}/{split}/<class>/<image> or torchvision's {name} files. Pass --data-dir FOLDER "
            f"(a checkout of this project uses {DEFAULT_DATA_DIR}) or --download to fetch {name} "
            f"with torchvision") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(ds.targets, dtype=torch.long)
    out = TensorImageDataset(images, labels, list(ds.classes))
    if max_per_class is not None:
        keep = torch.cat([torch.nonzero(labels == c).flatten()[:max_per_class] for c in range(len(ds.classes))])
        out = out.subset(keep)
    return out


# ----------------------------------------------------------------------------- tensor augmentation

def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalised with per-channel ``mean``/``std`` (0-1 scale)."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float().div_(255.0) - m) / s


def random_crop_flip(images: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Standard CIFAR augmentation on a uint8 batch: zero-pad by ``padding``, crop back to the original
    size at a random offset per image, and flip half of the images horizontally."""
    n, c, h, w = images.shape
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(images.device)  # (n, h)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(images.device)  # (n, w)
        idx_r = rows.view(n, 1, h, 1).expand(n, c, h, padded.shape[3])
        images = padded.gather(2, idx_r)
        idx_c = cols.view(n, 1, 1, w).expand(n, c, h, w)
        images = images.gather(3, idx_c)
    if hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        images = torch.where(flip.view(n, 1, 1, 1), images.flip(3), images)
    return images


def rand_augment(images: torch.Tensor, num_ops: int, magnitude: int, generator: torch.Generator) -> torch.Tensor:
    """torchvision RandAugment applied independently to every uint8 image of a batch."""
    from torchvision.transforms import v2

    ra = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
    # torchvision draws from the global RNG: seed it from our generator so the result is reproducible.
    state = torch.random.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    try:
        out = torch.stack([ra(img) for img in images])
    finally:
        torch.random.set_rng_state(state)
    return out


def mixup(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float, label_smoothing: float,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup on a float batch: returns mixed images and soft targets (with label smoothing)."""
    lam = float(np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator))).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    off = label_smoothing / num_classes
    onehot = torch.full((y.shape[0], num_classes), off, device=x.device)
    onehot.scatter_(1, y.view(-1, 1), 1.0 - label_smoothing + off)
    return lam * x + (1 - lam) * x[perm], lam * onehot + (1 - lam) * onehot[perm]


# ----------------------------------------------------------------------------- batching / sharding

def shard_indices(n: int, rank: int, world_size: int, shuffle: bool, seed: int, epoch: int,
                  drop_last: bool = False) -> list[int]:
    """The indices this rank visits in ``epoch``: torch's DistributedSampler (deterministic in
    ``seed`` and ``epoch``, so a resumed run sees the same order)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    sampler.set_epoch(epoch)
    return list(sampler)


def eval_shard(n: int, rank: int, world_size: int) -> list[int]:
    """Every index exactly once over all ranks (no padding duplicates), for exact evaluation."""
    return list(range(rank, n, world_size))


def iterate_batches(ds: TensorImageDataset, indices: Sequence[int], batch_size: int,
                    drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images, labels) batches of ``ds`` in the order of ``indices``."""
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    nb = len(idx) // batch_size if drop_last else math.ceil(len(idx) / batch_size)
    for b in range(nb):
        j = idx[b * batch_size:(b + 1) * batch_size]
        yield ds.images[j], ds.labels[j]


# ----------------------------------------------------------------------------- ImageNet folders

class ImageNetFolder(torch.utils.data.Dataset):
    """An ImageNet validation-style folder ``<root>/<wnid>/<image>``, possibly with only some classes.
    Labels are the ImageNet-1k indices of the WordNet ids (from ``timm.data.ImageNetInfo``), not the
    position of the folder in sorted order."""

    def __init__(self, root: str | os.PathLike, transform=None, max_per_class: int | None = None):
        from timm.data import ImageNetInfo

        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"ImageNet folder {root} does not exist; expected {root}/<wnid>/<image>.JPEG "
                                    "with one sub-folder per WordNet id (e.g. n01440764)")
        info = ImageNetInfo()
        wnid_to_index = {w: i for i, w in enumerate(info.label_names())}
        folders = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not folders:
            raise ValueError(f"{root} has no sub-folders; expected one sub-folder per WordNet id "
                             f"(e.g. {root}/n01440764/<image>.JPEG)")
        unknown = [f for f in folders if f not in wnid_to_index]
        if unknown:
            raise ValueError(f"{root}: sub-folder(s) {unknown[:5]} are not ImageNet-1k WordNet ids "
                             "(expected names like n01440764)")
        _, samples = _list_image_folder(root, max_per_class)
        # _list_image_folder numbers folders in sorted order; map them to ImageNet indices.
        self.samples = [(p, wnid_to_index[folders[ci]]) for p, ci in samples]
        self.classes = list(info.label_names())
        self.descriptions = [info.index_to_description(i) for i in range(info.num_classes())]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            img = im.convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, label


def timm_eval_transform(model: torch.nn.Module):
    """The model's own evaluation preprocessing (timm's resolve_data_config + create_transform)."""
    from timm.data import create_transform, resolve_data_config

    return create_transform(**resolve_data_config({}, model=model), is_training=False)
