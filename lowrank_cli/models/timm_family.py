"""timm models behind the family seam: ViT, DeiT, Swin and the rest of `timm.list_models()`."""

from __future__ import annotations

import difflib
import re
from typing import Any, ContextManager

import timm
import timm.data
import timm.layers
import torch
from torch import nn

from lowrank_cli.errors import LowrankError
from lowrank_cli.io.safetensors import CheckpointHeader
from lowrank_cli.models.family import ImageConfig, ModelFamily

# A transformer block is a module named `...blocks.<i>`: `blocks.3` in ViT/DeiT,
# `layers.2.blocks.5` in Swin. Factorization never changes these names.
_BLOCK_NAME = re.compile(r"(^|\.)blocks\.\d+$")


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for: its patch embedding's image size, else its data config."""
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    if img is not None:
        proj = getattr(pe, "proj", None)
        chans = getattr(proj, "in_channels", 3)
        h, w = (img, img) if isinstance(img, int) else tuple(img)
        return (chans, int(h), int(w))
    return tuple(timm.data.resolve_model_data_config(model)["input_size"])


class TimmFamily(ModelFamily):
    name = "timm"

    def create(self, architecture: str, kwargs: dict[str, Any]) -> nn.Module:
        if not timm.is_model(architecture):
            close = difflib.get_close_matches(architecture, timm.list_models(), n=3, cutoff=0.7)
            hint = f" (did you mean {', '.join(close)}?)" if close else "; see timm.list_models()"
            raise LowrankError(f"unknown timm architecture '{architecture}'{hint}", param="model")
        try:
            return timm.create_model(architecture, pretrained=False, **kwargs)
        except TypeError as e:
            raise LowrankError(f"architecture '{architecture}' does not accept these settings {kwargs}: {e}", param="model_kwargs") from None
        except Exception as e:  # noqa: BLE001 - a model constructor fails in many ways for bad settings (embed_dim=0: ZeroDivisionError)
            raise LowrankError(f"architecture '{architecture}' cannot be built with {kwargs}: {type(e).__name__}: {e}", param="model_kwargs") from None

    def complete_kwargs(self, architecture: str, header: CheckpointHeader | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Add `num_classes` from the checkpoint's classifier weight when it is not given.

        A model fine-tuned on 10 classes has `head.weight` of shape (10, D); building the stock
        1000-class model would only fail the strict load.
        """
        kwargs = dict(kwargs)
        if "num_classes" in kwargs or header is None:
            return kwargs
        cfg = timm.models.get_pretrained_cfg(architecture)
        classifier = getattr(cfg, "classifier", None) if cfg is not None else None
        if isinstance(classifier, str):
            names = {k.removeprefix("module."): v for k, v in header.tensors.items()}
            for key in (f"{classifier}.weight", f"{classifier}.up.weight"):
                if key in names and len(names[key].shape) == 2:
                    kwargs["num_classes"] = names[key].shape[0]
                    break
        return kwargs

    def recorded_kwargs(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        num_classes = getattr(model, "num_classes", None)
        if isinstance(num_classes, int):
            kwargs["num_classes"] = num_classes
        return kwargs

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        blocks = [(name, m) for name, m in model.named_modules() if _BLOCK_NAME.search(name)]
        if not blocks:
            raise LowrankError(
                f"{type(model).__name__}: no transformer blocks found (modules named 'blocks.<i>'); "
                "feature distillation supports timm ViT/DeiT/Swin-style models"
            )
        return blocks

    def example_inputs(self, model: nn.Module, batch: int = 1, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(batch, *input_size(model), generator=generator)

    def data_config(self, model: nn.Module) -> ImageConfig:
        """The model's input size, mean/std (one value per input channel) and resizing, from timm's data config."""
        cfg = timm.data.resolve_data_config({}, model=model)
        size = input_size(model)
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        if len(mean) != size[0]:  # e.g. a 1-channel model with an RGB default config
            mean, std = (sum(mean) / len(mean),) * size[0], (sum(std) / len(std),) * size[0]
        return ImageConfig(size, mean, std, cfg.get("interpolation", "bilinear"), cfg.get("crop_pct"))

    def exportable(self) -> ContextManager[None]:
        return timm.layers.set_exportable(True)


FAMILY = TimmFamily()
