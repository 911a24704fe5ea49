"""Training and validation images: an image folder in timm's layout, `digits`, or `synthetic`.

Every source is prepared the way the model's family says (`ImageConfig`: input size, mean/std,
resizing):

- A folder `root/train/<class>/*.png` and `root/val/<class>/*.png` (or `validation/`) is read
  with timm's `create_dataset` and `create_transform`, at the model's input size and with
  its mean/std (training transforms on the train split).
- `digits`: scikit-learn's 1797 real 8×8 handwritten digits, resized to the model's input
  size, split once and for all (seed 0) into 1437 train / 360 val images; the train split
  gets ±2 pixel random shifts.
- `synthetic`: seeded random images and labels, for smoke tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm.data
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lowrank_cli.errors import LowrankError
from lowrank_cli.models.family import ImageConfig

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DIGITS_TRAIN = 1437  # of 1797: an 80/20 split


@dataclass
class ImageData:
    """A train and a val split; `num_classes` is the number of label classes."""

    source: str
    train: Dataset
    val: Dataset
    num_classes: int


class TensorImages(Dataset):
    """Images held in memory as a float tensor (N, C, H, W), with optional random shifts."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, max_shift: int = 0):
        self.images, self.labels, self.max_shift = images, labels, max_shift

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if self.max_shift:
            dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(1, 2))
        return x, self.labels[i]


def digits_tensors(cfg: ImageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 of scikit-learn's 8×8 handwritten digits as (images, labels): grey levels
    0..16 scaled to 0..1, resized bilinearly to the model's input size, repeated over its
    channels and normalized with its mean and std."""
    from sklearn.datasets import load_digits

    d = load_digits()
    c, h, w = cfg.input_size
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).repeat(1, c, 1, 1)
    x = (x - torch.tensor(cfg.mean).view(1, -1, 1, 1)) / torch.tensor(cfg.std).view(1, -1, 1, 1)
    return x, torch.tensor(d.target, dtype=torch.long)


def digits(cfg: ImageConfig) -> ImageData:
    """scikit-learn's handwritten digits at the model's input size, normalized like its data."""
    x, y = digits_tensors(cfg)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = order[:DIGITS_TRAIN], order[DIGITS_TRAIN:]
    return ImageData("digits", TensorImages(x[train], y[train], max_shift=2), TensorImages(x[val], y[val]), 10)


def synthetic(cfg: ImageConfig, num_classes: int = 10, size: int = 256, seed: int = 0) -> ImageData:
    """Seeded standard-normal images with random labels over `num_classes` classes."""
    gen = torch.Generator().manual_seed(seed)
    classes = max(int(num_classes or 10), 1)
    n_val = max(size // 4, 8)
    x = torch.randn(size + n_val, *cfg.input_size, generator=gen)
    y = torch.randint(0, classes, (size + n_val,), generator=gen)
    return ImageData("synthetic", TensorImages(x[:size], y[:size]), TensorImages(x[size:], y[size:]), classes)


def _class_folders(split: Path) -> list[str]:
    classes = sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = sum(1 for p in split.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        found = f" ({loose} images lie directly in it)" if loose else ""
        raise LowrankError(f"{split}: no class folders{found}; expected {split}/<class>/<image>.png, one folder per class")
    n_images = sum(1 for c in classes for p in (split / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if n_images == 0:
        raise LowrankError(f"{split}: its {len(classes)} class folders hold no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return classes


def check_image_folder(root: Path) -> tuple[Path, Path, list[str]]:
    """(train dir, val dir, class names) of a folder in timm's layout, or a LowrankError saying what is wrong."""
    layout = "expected timm's layout ROOT/train/<class>/*.png and ROOT/val/<class>/*.png"
    if not root.exists():
        raise LowrankError(f"data folder '{root}': no such folder (or give 'digits' or 'synthetic'); {layout}")
    if not root.is_dir():
        raise LowrankError(f"data '{root}': is a file, not a folder; {layout}")
    if not any(root.iterdir()):
        raise LowrankError(f"data folder '{root}': is empty; {layout}")
    train = root / "train"
    val = next((root / n for n in ("val", "validation", "valid") if (root / n).is_dir()), None)
    if not train.is_dir() or val is None:
        missing = "train" if not train.is_dir() else "val"
        raise LowrankError(f"data folder '{root}': no '{missing}' folder; {layout}")
    classes = _class_folders(train)
    val_classes = _class_folders(val)
    if val_classes != classes:
        only = sorted(set(val_classes) ^ set(classes))
        raise LowrankError(f"data folder '{root}': train and {val.name} have different class folders ({', '.join(only[:5])})")
    return train, val, classes


def image_folder(root: Path, cfg: ImageConfig) -> ImageData:
    """An image folder read by timm, with the model's input size, mean/std and interpolation."""
    train_dir, val_dir, classes = check_image_folder(root)
    common = dict(input_size=cfg.input_size, mean=cfg.mean, std=cfg.std, interpolation=cfg.interpolation)
    class_map = {c: i for i, c in enumerate(classes)}
    train = timm.data.create_dataset("", root=str(train_dir), search_split=False, class_map=class_map,
                                     transform=timm.data.create_transform(**common, is_training=True))
    val = timm.data.create_dataset("", root=str(val_dir), search_split=False, class_map=class_map,
                                   transform=timm.data.create_transform(**common, crop_pct=cfg.crop_pct, is_training=False))
    return ImageData(str(root), train, val, len(classes))


def load_image_data(source: str | None, cfg: ImageConfig, num_classes: int = 10, synthetic_size: int = 256) -> ImageData:
    """Train/val data from `source`: a folder, `digits` or `synthetic` (see the module doc).

    `num_classes` sets the random labels of `synthetic` (the model's outputs).
    """
    if source is None:
        raise LowrankError("no data: give a folder (timm's train/<class>/ and val/<class>/ layout), 'digits' or 'synthetic' "
                           "(argument `data`, recipe key data.source)", param="data")
    if source == "digits":
        return digits(cfg)
    if source == "synthetic":
        return synthetic(cfg, num_classes, synthetic_size)
    return image_folder(Path(source), cfg)
