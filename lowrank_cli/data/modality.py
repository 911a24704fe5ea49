"""A model's data, loaded the way its inputs say: images or text, behind one lookup.

The family's `data_config(model)` describes the inputs (`ImageConfig`, `TextConfig`); its
`modality` names the entry of `MODALITIES` that loads them, for training and evaluation
(`load_data`) and for calibration (`calibration_for`). The pipelines call these two and never
ask which kind of data a model takes. This registry sits in `data/` (layer 5) because loading
needs `data/`'s readers, which `models/` (layer 4) may not import; the task (`models.tasks`)
does not decide it, as a model without a head may take images or text.

Adding a modality: a config class in `models/family.py` with its `modality`, and an entry here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import nn

from lowrank_cli.data.calibration import calibration_batches, text_calibration_batches
from lowrank_cli.data.images import ImageData, load_image_data
from lowrank_cli.data.text import Reading, StreamOptions, TextData, load_text_data
from lowrank_cli.errors import LowrankError
from lowrank_cli.models.family import ModelFamily, model_classes
from lowrank_cli.recipe import Recipe


class Modality(Protocol):
    """How one kind of input is loaded for a model."""

    needs_tokenizer: bool  # the model's Hub folder (or its teacher's) must hold a tokenizer

    def load(self, recipe: Recipe, family: ModelFamily, model: nn.Module, cfg: Any, folder: Path | None, all_held_out: bool) -> ImageData | TextData:
        ...

    def calibration(self, source: str, cfg: Any, folder: Path | None, n_samples: int, batch_size: int, max_length: int | None,
                    reading: Reading) -> list:
        ...


class Images:
    """Images prepared by the model's `ImageConfig`; labels as many classes as the model has (10 for a model without)."""

    needs_tokenizer = False

    def load(self, recipe, family, model, cfg, folder, all_held_out):
        d = recipe.data
        return load_image_data(d.source, cfg, model_classes(model) or 10, d.synthetic_size, d.skip_unreadable, d.max_shift)

    def calibration(self, source, cfg, folder, n_samples, batch_size, max_length, reading):
        return calibration_batches(source, cfg, n_samples, batch_size)


class Text:
    """Text tokenized by the tokenizer of the model's Hub `folder`, at `data.max_length` tokens (else the length the documents
    call for within the model's positions: `data.text.default_length`), the text from `data.text_field`."""

    needs_tokenizer = True

    def load(self, recipe, family, model, cfg, folder, all_held_out):
        if recipe.data.max_shift is not None:
            raise LowrankError(f"data.max_shift {recipe.data.max_shift} shifts the digits' training images; this model's data is text: "
                               "remove data.max_shift", param="data.max_shift")
        length = recipe.data.max_length
        limit = family.max_positions(model)
        if length is not None and limit is not None and length > limit:
            raise LowrankError(f"data.max_length {length} is above the model's {limit} positions")
        d = recipe.data  # large text streams (`data.streaming`); a language model's is packed into full-length sequences
        stream = StreamOptions(d.streaming, family.task(model).language_model, recipe.distill.seed, d.shuffle_window, d.val_documents)
        return load_text_data(d.source, folder, length, all_held_out=all_held_out, stream=stream, reading=Reading(d.text_field, limit))

    def calibration(self, source, cfg, folder, n_samples, batch_size, max_length, reading):
        return text_calibration_batches(source, folder, max_length, n_samples, batch_size, reading=reading)


MODALITIES: dict[str, Modality] = {"images": Images(), "text": Text()}


def load_data(recipe: Recipe, family: ModelFamily, model: nn.Module, folder: Path | None, all_held_out: bool = False) -> ImageData | TextData:
    """The training and held-out data of `recipe.data` for this model: images, or text tokenized by its own tokenizer
    (`all_held_out`: a text file or a folder without train/val parts is all held out, for evaluation)."""
    cfg = family.data_config(model)
    return MODALITIES[cfg.modality].load(recipe, family, model, cfg, folder, all_held_out)


def calibration_for(source: str, family: ModelFamily, model: nn.Module, folder: Path | None, n_samples: int, batch_size: int,
                    max_length: int | None, text_field: str | None = None) -> list:
    """Calibration batches in the model's own form: images at its input size, or its tokenizer's text (`max_length` None:
    the length its documents call for; `text_field`: recipe key data.text_field)."""
    cfg = family.data_config(model)
    reading = Reading(text_field, family.max_positions(model))
    return MODALITIES[cfg.modality].calibration(source, cfg, folder, n_samples, batch_size, max_length, reading)


def needs_tokenizer(family: ModelFamily, model: nn.Module) -> bool:
    """Whether the model's data (text) is read through the tokenizer of a Hub folder."""
    return MODALITIES[family.data_config(model).modality].needs_tokenizer


def split_record(data: ImageData | TextData) -> dict[str, Any]:
    """`{"split": ..., "max_length": ..., "max_length_rule": ...}`: how text data was split into training and held-out parts,
    and the tokens per document and why (and `notice`, where the built-in text stood in for the user's); images: their
    folders say, nothing."""
    if not isinstance(data, TextData):
        return {}
    notice = {"notice": data.notice} if data.notice else {}
    return {"split": data.split, "max_length": data.max_length, "max_length_rule": data.length_rule, **notice}


def data_notice(data: ImageData | TextData) -> str | None:
    """The line to say before the data is used, where there is one: the built-in text (`pydoc`) stands in for the user's."""
    return data.notice if isinstance(data, TextData) else None
