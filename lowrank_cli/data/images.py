"""Training and validation images: an image folder in timm's layout, `digits`, or `synthetic`.

Every source is prepared the way the model's family says (`ImageConfig`: input size, mean/std,
resizing):

- A folder `root/train/<class>/*.png` and `root/val/<class>/*.png` (or `validation/`) is read
  with timm's `create_dataset` and `create_transform`, at the model's input size and with
  its mean/std (training transforms on the train split).
- `digits`: scikit-learn's 1797 real 8×8 handwritten digits, resized to the model's input
  size, split once and for all (seed 0) into 1437 train / 360 val images; the train split
  gets random shifts of up to ±2 pixels (`max_shift`, recipe key data.max_shift).
- `synthetic`: seeded random images and labels, for smoke tests.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import timm.data
import torch
import torch.nn.functional as F
from PIL import Image
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
    skipped: list[str] = field(default_factory=list)  # unreadable images left out (data.skip_unreadable)


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


DIGITS_SHIFT = 2  # pixels each way, the digits' training shifts unless data.max_shift says otherwise


def digits(cfg: ImageConfig, max_shift: int = DIGITS_SHIFT) -> ImageData:
    """scikit-learn's handwritten digits at the model's input size, normalized like its data; each training image
    shifted at random by up to `max_shift` pixels each way (0: as it is)."""
    x, y = digits_tensors(cfg)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = order[:DIGITS_TRAIN], order[DIGITS_TRAIN:]
    return ImageData("digits", TensorImages(x[train], y[train], max_shift=max_shift), TensorImages(x[val], y[val]), 10)


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


def _unreadable(path: Path) -> str | None:
    """Why `path` cannot be read as an image (None when it can): PIL opens and verifies it."""
    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a damaged file
        return f"{type(e).__name__}: {str(e).strip() or 'unreadable'}".splitlines()[0]


def _samples(split: Path, class_map: dict[str, int]) -> list[tuple[Path, int]]:
    return [(p, class_map[c]) for c in sorted(class_map) for p in sorted((split / c).rglob("*"))
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]


class ImageFiles(Dataset):
    """Images read from files with PIL (RGB) and transformed; a file that fails to decode later is a
    LowrankError naming it, or with `skip_unreadable` is replaced by the next readable one."""

    def __init__(self, samples: list[tuple[Path, int]], transform, skip_unreadable: bool = False):
        self.samples, self.transform, self.skip_unreadable = samples, transform, skip_unreadable

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        for k in range(len(self.samples)):
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                with Image.open(path) as im:
                    image = im.convert("RGB")
                return self.transform(image), label
            except Exception as e:  # noqa: BLE001
                if not self.skip_unreadable:
                    raise LowrankError(f"{path}: cannot be read as an image ({type(e).__name__}: {e}); "
                                       "fix or remove it, or set data.skip_unreadable: true") from None
        raise LowrankError(f"no image of this split can be read (the first: {self.samples[i][0]})")


def image_folder(root: Path, cfg: ImageConfig, skip_unreadable: bool = False) -> ImageData:
    """An image folder with the model's input size, mean/std and interpolation (timm's transforms).

    Every file is opened and verified first (in parallel): unreadable ones are a LowrankError
    naming the first few, or, with `skip_unreadable`, left out and counted in `skipped`.
    """
    train_dir, val_dir, classes = check_image_folder(root)
    common = dict(input_size=cfg.input_size, mean=cfg.mean, std=cfg.std, interpolation=cfg.interpolation)
    class_map = {c: i for i, c in enumerate(classes)}
    splits = {name: _samples(d, class_map) for name, d in (("train", train_dir), ("val", val_dir))}
    every = [p for samples in splits.values() for p, _ in samples]
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 4)) as pool:
        reasons = dict(zip(every, pool.map(_unreadable, every)))
    bad = [p for p in every if reasons[p] is not None]
    if bad and not skip_unreadable:
        shown = "; ".join(f"{p} ({reasons[p]})" for p in bad[:3]) + (f"; ... ({len(bad) - 3} more)" if len(bad) > 3 else "")
        raise LowrankError(f"data folder '{root}': {len(bad)} of {len(every)} images cannot be read: {shown}; "
                           "fix or remove them, or skip them (recipe key data.skip_unreadable: true)", param="data")
    for name, samples in splits.items():
        kept = [s for s in samples if reasons[s[0]] is None]
        if not kept:
            raise LowrankError(f"data folder '{root}': none of the {len(samples)} images of its {name} split can be read "
                               f"(the first: {samples[0][0]}: {reasons[samples[0][0]]})", param="data")
        splits[name] = kept
    train = ImageFiles(splits["train"], timm.data.create_transform(**common, is_training=True), skip_unreadable)
    val = ImageFiles(splits["val"], timm.data.create_transform(**common, crop_pct=cfg.crop_pct, is_training=False), skip_unreadable)
    return ImageData(str(root), train, val, len(classes), skipped=[str(p) for p in bad])


def load_image_data(source: str | None, cfg: ImageConfig, num_classes: int = 10, synthetic_size: int = 256,
                    skip_unreadable: bool = False, max_shift: int | None = None) -> ImageData:
    """Train/val data from `source`: a folder, `digits` or `synthetic` (see the module doc).

    `num_classes` sets the random labels of `synthetic` (the model's outputs); `max_shift` the digits' training
    shifts (None: 2 pixels; refused for other sources, whose training transforms are timm's or none).
    """
    if source is None:
        raise LowrankError("no data: give a folder (timm's train/<class>/ and val/<class>/ layout), 'digits' or 'synthetic' "
                           "(argument `data`, recipe key data.source)", param="data")
    if source == "pydoc" or source.endswith((".txt", ".jsonl")):
        raise LowrankError(f"data '{source}' is text, and this is an image model; give a folder of images, 'digits' or 'synthetic'", param="data")
    if max_shift is not None and source != "digits":
        raise LowrankError(f"data.max_shift {max_shift} shifts the digits' training images; data '{source}' takes none: "
                           "remove data.max_shift, or use data.source digits", param="data.max_shift")
    if source == "digits":
        return digits(cfg, DIGITS_SHIFT if max_shift is None else max_shift)
    if source == "synthetic":
        return synthetic(cfg, num_classes, synthetic_size)
    return image_folder(Path(source), cfg, skip_unreadable)
