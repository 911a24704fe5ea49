"""`export.verify`: every export check is relative to the outputs' scale, with a top-1 rule for fp16/bf16."""

import math

import pytest
import torch

from lowrank_cli.errors import LowrankError
from lowrank_cli.export.verify import compare_outputs, require_match


def test_fp32_tolerance_is_relative_to_the_outputs_scale():
    gen = torch.Generator().manual_seed(0)
    logits = 20 * torch.randn(2, 16, 50, generator=gen)  # a causal LM's logits after 30 layers
    big = compare_outputs([(logits + 0.0025, logits)])  # failed the old absolute 1e-3 check
    assert big["passed"] and big["max_abs_diff"] == pytest.approx(0.0025, rel=1e-3)
    assert big["scale"] == pytest.approx(logits.abs().max().item()) and big["relative_diff"] == pytest.approx(0.0025 / big["scale"], rel=1e-3)
    assert big["tolerance"] == 5e-4 and big["top1_agreement"] == 1.0 and big["min_top1_agreement"] is None
    small = logits / 1000  # outputs of ~0.02: a 1e-4 error is 1/200 of them, passed by the old check
    v = compare_outputs([(small + 1e-4, small)])
    assert not v["passed"] and v["relative_diff"] == pytest.approx(1e-4 / small.abs().max().item(), rel=1e-3)
    with pytest.raises(LowrankError, match=r"^the export differs from the model by 0\.0001 \(max abs\), .* above the relative tolerance 0\.0005; nothing was written$"):
        require_match(v, "the export", "the model")
    nan = logits.clone()
    nan[0, 0, 0] = math.nan
    assert not compare_outputs([(nan, logits)])["passed"]


def test_low_precision_needs_the_relative_bound_and_99_percent_top1():
    gen = torch.Generator().manual_seed(0)
    want = torch.randn(4, 50, 10, generator=gen)  # 200 predictions
    noisy = want + 0.02 * want.abs().max() * (2 * torch.rand(want.shape, generator=gen) - 1)  # within 3e-2 · max |y|
    v = compare_outputs([(noisy, want)], low_precision=True)
    assert v["tolerance"] == 3e-2 and v["min_top1_agreement"] == 0.99 and v["relative_diff"] <= 0.02
    assert not compare_outputs([(noisy, want)])["passed"]  # too far for an fp32 export
    close = torch.zeros(4, 50, 10)
    close[..., 0], close[..., 1] = 1.0, 0.98  # 200 predictions, each of class 0 by a margin of 2e-2 (above bf16's 2^-7)
    flips = close.clone()
    flips.view(-1, 10)[:3, 1] = 1.001  # 3 of 200 argmaxes change (98.5 %), by a change under the relative bound
    v = compare_outputs([(flips, close)], low_precision=True)
    assert v["relative_diff"] == pytest.approx(2.1e-2, rel=1e-3) and v["top1_agreement"] == pytest.approx(197 / 200) and not v["passed"]
    with pytest.raises(LowrankError, match=r"in its top-1: 98\.5 % of the argmaxes agree \(near-ties left out\), below the 99 %"):
        require_match(v, "the export", "the model")
    v = compare_outputs([(flips, close), (close, close), (close, close)], low_precision=True)  # 3 of 600: 99.5 %
    assert v["passed"] and v["top1_agreement"] == pytest.approx(597 / 600)


def test_near_ties_at_low_precision_resolution_do_not_count_but_decided_flips_do():
    """A top-1 margin below bfloat16's resolution at the outputs' scale (2^-7 · max |y|) is a tie rounding alone flips."""
    ties = torch.zeros(200, 10)
    ties[:, 0], ties[:, 1] = 1.0, 0.995  # every prediction decided by 5e-3 < 2^-7
    flipped = ties.clone()
    flipped[:20, 1] = 1.004  # 10 % flipped, all near-ties
    v = compare_outputs([(flipped, ties)], low_precision=True)
    assert v["passed"] and v["top1_ties"] == 200 and v["top1_all"] == pytest.approx(0.9)
    ties[100:, 1] = 0.98  # half decided by 2e-2 > 2^-7: flipping 3 of them (within the relative bound) fails on top-1
    flipped = ties.clone()
    flipped[100:103, 1] = 1.001
    v = compare_outputs([(flipped, ties)], low_precision=True)
    assert v["relative_diff"] <= v["tolerance"] and v["top1_ties"] == 100
    assert v["top1_agreement"] == pytest.approx(97 / 100) and not v["passed"]
