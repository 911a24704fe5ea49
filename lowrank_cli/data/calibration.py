"""Calibration data for data-aware factorization: images (a folder, sklearn's `digits`, `synthetic` noise),
or text for a text model (the training part of any text source `data.text` reads)."""

from __future__ import annotations

from pathlib import Path

import timm.data
import torch

from lowrank_cli.data.images import IMAGE_EXTENSIONS, ImageFiles, digits
from lowrank_cli.data.stream import first_documents
from lowrank_cli.data.formats import Chat
from lowrank_cli.data.text import Documents, Reading, load_text_data, stream_shards, streams, tokenize, tokenize_measured, tokenizer_of
from lowrank_cli.errors import LowrankError
from lowrank_cli.models.family import ImageConfig

CALIBRATION_SOURCES = "a folder of images, 'digits' or 'synthetic'"


def calibration_batches(source: str, cfg: ImageConfig, n_samples: int = 256, batch_size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """`n_samples` images for calibration, in batches of `batch_size`, at the model's input size.

    `source`: `synthetic` (standard normal images, seeded), `digits` (a seeded random subset
    of the training split of sklearn's digits, the images distillation trains on: `evaluate`
    reports on the others), or a folder of images that timm's `create_dataset` reads (class
    sub-folders), with the model's eval transforms. Returned as a list so that it can be
    passed over more than once; it holds `n_samples·C·H·W` floats (256 images at 224² take 154 MB).
    """
    gen = torch.Generator().manual_seed(seed)
    if source == "synthetic":
        images = torch.randn(n_samples, *cfg.input_size, generator=gen)
    elif source == "digits":
        x = digits(cfg).train.images
        images = x[torch.randperm(len(x), generator=gen)[:n_samples]]
    else:
        images = _folder_images(Path(source), cfg, n_samples, gen)
    return list(images.split(batch_size))


def _folder_images(root: Path, cfg: ImageConfig, n_samples: int, gen: torch.Generator) -> torch.Tensor:
    """`n_samples` images drawn (seeded) from every image under `root`, with the model's eval transforms."""
    if not root.is_dir():
        raise LowrankError(f"calibration data '{root}': not {CALIBRATION_SOURCES}", param="calib_data")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise LowrankError(f"calibration data '{root}': no images found ({', '.join(sorted(IMAGE_EXTENSIONS))})", param="calib_data")
    transform = timm.data.create_transform(input_size=cfg.input_size, mean=cfg.mean, std=cfg.std, interpolation=cfg.interpolation,
                                           crop_pct=cfg.crop_pct, is_training=False)
    chosen = [files[i] for i in torch.randperm(len(files), generator=gen)[:n_samples].tolist()]
    dataset = ImageFiles([(p, 0) for p in chosen], transform)  # an unreadable one is a LowrankError naming it
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def text_calibration_batches(source: str, folder: Path | None, max_length: int | None, n_samples: int = 256, batch_size: int = 32,
                             seed: int = 0, reading: Reading | None = None) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """`n_samples` documents of the training part of a text source, tokenized by the checkpoint's tokenizer and
    padded per batch (with their attention mask, so that Grams count real tokens only): a seeded draw, or a
    large (streamed) source's first `n_samples` training documents, read without the rest. `max_length` None: the
    default length (`data.text.default_length`) of the training documents (a streamed source: of those drawn);
    `reading`: the text field and the model's positions."""
    reading = reading or Reading()
    if streams(source, "auto"):
        tokenizer = tokenizer_of(folder)
        shards, val_shards = stream_shards(source, reading.text_field, Chat(lambda: tokenizer))
        texts, labels = first_documents(shards, n_samples, None if val_shards is not None else (seed, 0.2), False)
        docs = Documents(texts, labels, bool(shards.chat_docs))
        if max_length is None:
            train = tokenize_measured(docs, tokenizer, reading.positions)[0]
        else:
            train = tokenize(docs, tokenizer, max_length)
        order = list(range(len(train)))
    else:
        train = load_text_data(source, folder, max_length, seed, reading=reading).train
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n_samples].tolist()
    items = [train[i] for i in order]
    return [train.collate(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
