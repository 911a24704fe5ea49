"""16-bit copies of factorized models: factor pairs balanced by powers of two, float16's range checked, and the
real-text inputs that a 16-bit copy of a text model is checked on (docs/precision.md).

What was measured on SmolLM2-135M (docs/precision.md, "16-bit copies"):

- Rounding the weights to bf16 moves the logits by 1-2 % of their scale, whether the factors are cast or their merged
  products: no layer, block or factor pair stands out, whitened factors come out of the factorization balanced
  (`‖down_i‖ = ‖up_i‖` for every component, also after distillation), and nothing reaches float16's limit.
- What failed the check was its input: random token ids put a partial "attention sink" (the massive activation of
  channel 507, ~2·10⁴ at the first token) on a few positions, where the output depends on the residual stream 10-100
  times more than on real text. There, any rounding anywhere (the embeddings alone) moves the logits by up to 40 % of
  their scale; the original dense SmolLM2 rounded to bf16 fails 1 of 12 random-token draws too. On text no draw fails.

So a 16-bit copy of a text model with a tokenizer is checked on real text (`text_inputs`); the factors themselves
are cast after `balance_factors`, which keeps each pair's two halves within a factor of two of each other by powers of
two, so float16 neither overflows nor flushes a small half to subnormals (bf16 has float32's range and is unaffected),
and `require_representable` refuses, in one line, a tensor that float16 cannot hold.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from lowrank_cli.data.text import pydoc_documents
from lowrank_cli.errors import LowrankError

HALVES = {"embedding": ("lookup", "proj")}  # a layer kind's two halves (rank along dim 1 of both); else down/up
FP16_MAX = torch.finfo(torch.float16).max
ROW_SPREAD = 97  # paragraphs between two rows' first paragraphs: the rows of one batch come from different topics


def _pair(name: str, kind: str) -> tuple[str, str, int]:
    """The keys of a layer's two halves and the dimension of the first that runs along the rank: (first, second, dim)."""
    first, second = HALVES.get(kind, ("down", "up"))
    return f"{name}.{first}.weight", f"{name}.{second}.weight", 1 if kind in HALVES else 0


def balance_factors(tensors: dict[str, torch.Tensor], layers: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors with each factorized layer's rank-1 components rescaled so that their two halves have about equal
    norms: `up[:, i]·sᵢ` and `down[i, :]/sᵢ` (an embedding's `lookup[:, i]·sᵢ`, `proj[:, i]/sᵢ`), sᵢ the power of two
    nearest to `√(‖down_i‖/‖up_i‖)`. A power of two changes no bit of any product, so the float32 outputs are exactly
    the same; the halves end up within a factor of two of each other, so a 16-bit cast rounds neither to its range's
    ends. `layers`: the manifest's entries; other tensors are returned unchanged (the same objects)."""
    out = dict(tensors)
    for name, entry in layers.items():
        first, second, dim = _pair(name, getattr(entry, "kind", "linear"))
        if first not in tensors or second not in tensors:
            continue
        a, b = tensors[first], tensors[second]  # a: down (r × d_in) or lookup (V × r); b: up (d_out × r) or proj (d × r)
        norm_a = a.float().norm(dim=1) if dim == 0 else a.float().norm(dim=0)
        norm_b = b.float().norm(dim=0)
        ok = (norm_a > 0) & (norm_b > 0) & torch.isfinite(norm_a) & torch.isfinite(norm_b)
        exponent = torch.where(ok, torch.round(0.5 * (torch.log2(norm_a.clamp_min(1e-38)) - torch.log2(norm_b.clamp_min(1e-38)))),
                               torch.zeros_like(norm_a))
        if not bool(exponent.any()):
            continue
        scale = torch.pow(2.0, exponent)  # exact powers of two
        out[first] = (a.float() / (scale[:, None] if dim == 0 else scale[None, :])).to(a.dtype)
        out[second] = (b.float() * scale[None, :]).to(b.dtype)
    return out


def require_representable(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None, what: str) -> None:
    """A LowrankError naming the first floating-point tensor that `dtype` (float16) cannot hold: finite, but beyond
    float16's largest value (65504), so that its cast would be infinite. bfloat16 and float32 hold float32's range."""
    if dtype != torch.float16:
        return
    for key, value in tensors.items():
        if value.is_floating_point() and value.numel():
            big = float(value.detach().abs().float().masked_fill(~torch.isfinite(value), 0).max())
            if big > FP16_MAX:
                raise LowrankError(f"{what}: tensor '{key}' holds values up to {big:.4g}, beyond float16's largest "
                                   f"({FP16_MAX:g}); accepted for this checkpoint: bfloat16 or float32", param="dtype")


def text_rows(tokenizer: Any, batch: int, length: int, seed: int = 0) -> torch.Tensor | None:
    """`batch` rows of `length` token ids of real text (CPython's help topics, `data.text.pydoc_documents`, tokenized
    by the model's own tokenizer with its special tokens): each row starts at a paragraph's beginning and runs on
    through the next paragraphs; None if the text is too short for that."""
    docs = pydoc_documents().texts
    rows = []
    for i in range(batch):
        start = (seed * batch + i) * ROW_SPREAD % max(len(docs), 1)
        ids: list[int] = []
        for text in docs[start:] + docs[:start]:
            ids += tokenizer(text + "\n\n", add_special_tokens=not ids)["input_ids"]
            if len(ids) >= length:
                break
        if len(ids) < length:
            return None
        rows.append(ids[:length])
    return torch.tensor(rows, dtype=torch.long)


def text_inputs(example: Any, tokenizer: Any, seed: int = 0) -> Any:
    """`example` (a text model's example inputs: a mapping with `input_ids` of shape batch × length) with real text's
    ids instead of random ones (`text_rows`) and every position attended; None when `example` is no such mapping or the
    text is too short."""
    if not isinstance(example, Mapping) or "input_ids" not in example or example["input_ids"].dim() != 2:
        return None
    batch, length = example["input_ids"].shape
    ids = text_rows(tokenizer, batch, length, seed)
    if ids is None:
        return None
    out = dict(example)
    out["input_ids"] = ids
    if "attention_mask" in out:
        out["attention_mask"] = torch.ones_like(ids)
    return out


def pair_balance(tensors: dict[str, torch.Tensor], layers: Mapping[str, Any]) -> float:
    """The largest ratio, over every factorized component, between its two halves' norms (1: balanced); for reports."""
    worst = 1.0
    for name, entry in layers.items():
        first, second, dim = _pair(name, getattr(entry, "kind", "linear"))
        if first in tensors and second in tensors:
            a, b = tensors[first].float(), tensors[second].float()
            norm_a, norm_b = (a.norm(dim=1) if dim == 0 else a.norm(dim=0)), b.norm(dim=0)
            ok = (norm_a > 0) & (norm_b > 0)
            if bool(ok.any()):
                ratio = (norm_a[ok] / norm_b[ok]).log2().abs().max().item()
                worst = max(worst, math.pow(2.0, ratio))
    return worst
