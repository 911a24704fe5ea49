"""timm models behind the family seam: ViT, DeiT, Swin and the rest of `timm.list_models()`."""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from dataclasses import dataclass
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
            else:
                if not any(k.startswith(f"{classifier}.") for k in names):
                    kwargs["num_classes"] = 0  # a checkpoint without a classifier (features only)
        return kwargs

    # -- finding the architecture from the tensors ---------------------------------------------

    def fits(self, architecture: str, header: CheckpointHeader, kwargs: dict[str, Any]) -> list[str]:
        """How the state dict of `architecture` built with `kwargs` differs from the checkpoint's tensors ([] when it fits)."""
        model = _meta_model(architecture, kwargs)
        if model is None:
            return [f"'{architecture}' cannot be built with {kwargs}"]
        return _differences(_shapes_of(header), _shapes(model))

    def misfit(self, architecture: str, header: CheckpointHeader, kwargs: dict[str, Any]) -> str | None:
        """Why `architecture` built with `kwargs` is not the checkpoint's, in words (None when it fits):
        not a timm architecture, not buildable with these settings, or the tensors that differ."""
        if not timm.is_model(architecture):
            close = difflib.get_close_matches(architecture, timm.list_models(), n=3, cutoff=0.7)
            return "is not a timm architecture" + (f" (did you mean {', '.join(close)}?)" if close else "")
        if _meta_model(architecture, kwargs) is None:
            try:
                with torch.device("meta"):
                    timm.create_model(architecture, pretrained=False, **kwargs)
                reason = ""
            except Exception as e:  # noqa: BLE001 - the constructor's own words for bad settings
                reason = f" ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
            return f"cannot be built with these settings{reason}"
        diff = self.fits(architecture, header, kwargs)
        if not diff:
            return None
        return f"does not fit the tensors ({len(diff)} differences: {', '.join(diff[:3])}{', ...' if len(diff) > 3 else ''})"

    def find_architecture(self, header: CheckpointHeader, patterns: list[str], prefer: str | None = None) -> Found:
        """The timm architecture among `patterns` whose state dict has the checkpoint's keys and shapes, with the settings it needs.

        Every candidate is built on the meta device (no weights allocated), first one block deep
        to compare everything but the repeated blocks, then whole for those that agree. Settings
        come from the tensors: `num_classes` from the classifier, `img_size` from the position
        embedding. Several fitting architectures (identical structures, e.g. DeiT-B and ViT-B) are
        ranked by pattern order, then by sharing `prefer`'s prefix; none fitting is a LowrankError
        naming the closest candidates and their differences.
        """
        target = _shapes_of(header)
        shallow_target = _first_block_only(target)
        names = list(dict.fromkeys(n for p in patterns for n in timm.list_models(p)))
        if not names:
            raise LowrankError(f"no timm architecture matches the patterns {patterns}", param="architectures")
        scored: list[tuple[int, str, dict[str, Any], list[str]]] = []
        for name in names:
            kwargs = self.complete_kwargs(name, header, {})
            shallow = _meta_model(name, kwargs, shallow=True)
            if shallow is None:
                continue
            if "pos_embed" in target and "pos_embed" in _shapes(shallow) and _shapes(shallow)["pos_embed"] != target["pos_embed"]:
                size = _img_size_for(shallow, target["pos_embed"])
                if size is not None:
                    kwargs["img_size"] = size
                    shallow = _meta_model(name, kwargs, shallow=True) or shallow
            diff = _differences(shallow_target, _first_block_only(_shapes(shallow)))
            scored.append((len(diff), name, kwargs, diff))
        found = []
        for n_diff, name, kwargs, _ in scored:
            if n_diff == 0:
                full = self.fits(name, header, kwargs)
                if not full:
                    found.append((name, kwargs))
        if not found:
            closest = sorted(scored, key=lambda s: (s[0], s[1]))[:3]
            shown = "; ".join(f"{name} ({n} differences: {', '.join(diff[:2])})" for n, name, _, diff in closest)
            raise LowrankError(f"{header.path}: no timm architecture among {', '.join(patterns)} has its tensors "
                               f"({len(names)} tried on the meta device); closest: {shown}", param="model")
        prefix = (prefer or "").split("_")[0]

        def rank(item):
            name = item[0]
            pattern = next(i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(name, p))
            return (pattern, not (prefix and name.startswith(prefix + "_")), len(name), name)

        found.sort(key=rank)
        return Found(found[0][0], found[0][1], [n for n, _ in found[1:]], len(names))

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

    def block_links(self, model: nn.Module) -> list[nn.Module | None]:
        """Swin-style stages merge patches (`downsample`) before their first block; ViT's blocks follow one another."""
        links: list[nn.Module | None] = []
        for name, _ in self.blocks(model):
            stage_name, _, index = name.rpartition(".blocks.")
            stage = model.get_submodule(stage_name) if stage_name else model
            down = getattr(stage, "downsample", None)
            links.append(down if index == "0" and isinstance(down, nn.Module) and not isinstance(down, nn.Identity) else None)
        return links

    def example_inputs(self, model: nn.Module, batch: int = 1, *, generator: torch.Generator | None = None, seq_len: int | None = None) -> torch.Tensor:
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

    def load_instructions(self, architecture: str, where: str, model_kwargs: dict[str, Any]) -> str:
        return f"load with timm.create_model('{architecture}', pretrained=False, checkpoint_path='{where}', **{model_kwargs})"


@dataclass
class Found:
    """An architecture found from a checkpoint's tensors: its name, the settings it needs, and the others that fit too."""

    architecture: str
    kwargs: dict[str, Any]
    also_fit: list[str]
    tried: int


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _shapes_of(header: CheckpointHeader) -> dict[str, tuple[int, ...]]:
    return {k.removeprefix("module."): tuple(v.shape) for k, v in header.tensors.items()}


_BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)(?:\.|$)")


def _first_block_only(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The entries outside the repeated blocks, and those of each stage's first block."""
    return {k: v for k, v in shapes.items() if all(i == "0" for i in _BLOCK_INDEX.findall(k))}


def _differences(expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]]) -> list[str]:
    missing = [f"missing {k}" for k in expected if k not in got]
    unexpected = [f"unexpected {k}" for k in got if k not in expected]
    shapes = [f"{k} {list(got[k])} vs {list(v)}" for k, v in expected.items() if k in got and got[k] != v]
    return shapes + missing + unexpected


def _meta_model(name: str, kwargs: dict[str, Any], shallow: bool = False) -> nn.Module | None:
    """`name` built on the meta device (no memory, no init) with `kwargs`; one block deep when `shallow`; None if it cannot be."""
    tries = [{"depth": 1}, {"depths": (1, 1, 1, 1)}, {}] if shallow else [{}]
    with torch.device("meta"):
        for extra in tries:
            for init in ({"weight_init": "skip"}, {}):
                try:
                    return timm.create_model(name, pretrained=False, **kwargs, **extra, **init)
                except TypeError:
                    continue
                except Exception:  # noqa: BLE001 - a candidate that does not build with these settings is not a fit
                    break
    return None


def _img_size_for(model: nn.Module, pos_embed: tuple[int, ...]) -> int | None:
    """The square image size at which a ViT's position embedding has `pos_embed`'s token count, if any."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None or len(pos_embed) != 3:
        return None
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    grid = math.isqrt(max(pos_embed[1] - prefix, 0))
    if grid * grid != pos_embed[1] - prefix or grid == 0:
        return None
    return grid * (patch[0] if isinstance(patch, (tuple, list)) else int(patch))


FAMILY = TimmFamily()
