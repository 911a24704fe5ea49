"""Whether an exported model's outputs match the model it came from, relative to the outputs' own scale.

Every export check goes through `compare_outputs` and `require_match`:

- float32 exports: max |Δ| ≤ 5e-4 · max |y| (y: the reference outputs);
- float16 / bfloat16 exports: max |Δ| ≤ 3e-2 · max |y|, and the top-1 (argmax over the last
  dimension) of at least 99 % of the outputs the same as the reference's, among the outputs whose
  top-1 the reference decides by more than bfloat16's resolution at the outputs' scale
  (2⁻⁷ · max |y|): a near-tie closer than that is flipped by rounding the weights alone, whatever
  the export does. A real causal LM (SmolLM2-135M factorized at κ = 1.25) exported to bf16 kept
  98.4 % of all its argmaxes on random tokens, most of the rest at such near-ties.

An absolute tolerance fails real models whose outputs are large (a causal LM's logits of ~20
after 30 layers differ by a few 1e-3 in fp32 at random), and passes tiny outputs that are wrong.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from lowrank_cli.errors import LowrankError

FP32_RELATIVE = 5e-4  # max |Δ| / max |y| of a float32 export
LOW_PRECISION_RELATIVE = 3e-2  # of a float16 / bfloat16 export
MIN_TOP1 = 0.99  # the share of outputs whose argmax a low-precision export must keep
TIE_RESOLUTION = torch.finfo(torch.bfloat16).eps  # a top-1 margin below this · max |y| is a tie at low precision
LOW_PRECISION = (torch.float16, torch.bfloat16)


def is_low_precision(dtype: torch.dtype | None) -> bool:
    return dtype in LOW_PRECISION


def compare_outputs(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], *, low_precision: bool = False) -> dict[str, Any]:
    """`(got, want)` output pairs (compared in fp32) → max_abs_diff, scale (max |want|), relative_diff
    (their ratio), tolerance, top1_agreement (argmax over the last dimension), min_top1_agreement
    (None for fp32: not required) and passed."""
    diffs, scales, kept = [], [], []
    for got, want in pairs:
        got, want = got.detach().float(), want.detach().float()
        if tuple(got.shape) != tuple(want.shape):
            raise LowrankError(f"the exported model's output shape {list(got.shape)} differs from the reference's {list(want.shape)}")
        diffs.append((got - want).abs().max())
        scales.append(want.abs().max())
        top2 = want.topk(min(2, want.shape[-1]), dim=-1).values
        margin = (top2[..., 0] - top2[..., -1]).flatten() if want.shape[-1] > 1 else torch.full((want[..., 0].numel(),), math.inf)
        kept.append(((got.argmax(-1) == want.argmax(-1)).flatten(), margin))
    if not diffs:
        raise ValueError("compare_outputs needs at least one pair of outputs")
    diff, scale = torch.stack(diffs).max().item(), torch.stack(scales).max().item()  # torch's max keeps a NaN
    same, margins = torch.cat([k[0] for k in kept]), torch.cat([k[1] for k in kept])
    all_top1 = same.float().mean().item() if len(same) else 1.0
    decided = margins > TIE_RESOLUTION * scale if low_precision and not math.isnan(scale) else torch.ones_like(same)
    agree, total = int(same[decided].sum()), int(decided.sum())
    if math.isnan(diff) or math.isnan(scale):
        relative = math.nan
    else:
        relative = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    tolerance = LOW_PRECISION_RELATIVE if low_precision else FP32_RELATIVE
    top1 = agree / total if total else 1.0
    required = MIN_TOP1 if low_precision else None
    passed = relative <= tolerance and (required is None or top1 >= required)  # `<=` is False for NaN
    return {"max_abs_diff": diff, "scale": scale, "relative_diff": relative, "tolerance": tolerance,
            "top1_agreement": top1, "min_top1_agreement": required, "top1_all": all_top1,
            "top1_ties": int(len(same) - total), "passed": bool(passed)}


def describe(v: dict[str, Any]) -> str:
    """`max |Δ| 0.0031 = 1.5e-04 of max |y| 20.1 (tolerance 5e-04), top-1 agreement 100.0 %`."""
    return (f"max |Δ| {v['max_abs_diff']:.3g} = {v['relative_diff']:.2g} of max |y| {v['scale']:.3g} "
            f"(tolerance {v['tolerance']:g}), top-1 agreement {100 * v['top1_agreement']:.1f} %")


def require_match(v: dict[str, Any], what: str, reference: str) -> None:
    """A LowrankError naming `what` (the export) and why it fails, unless `v` (from `compare_outputs`) passed."""
    if v["passed"]:
        return
    if not v["relative_diff"] <= v["tolerance"]:
        why = (f"by {v['max_abs_diff']:.3g} (max abs), {v['relative_diff']:.3g} of the outputs' scale {v['scale']:.3g}, "
               f"above the relative tolerance {v['tolerance']:g}")
    else:
        why = (f"in its top-1: {100 * v['top1_agreement']:.1f} % of the argmaxes agree (near-ties left out), below the "
               f"{100 * v['min_top1_agreement']:g} % a low-precision export needs")
    raise LowrankError(f"{what} differs from {reference} {why}; nothing was written")
