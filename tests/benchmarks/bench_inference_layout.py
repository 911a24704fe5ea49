"""Benchmark: `inference_layout` (up factors stored column-major) against the factors as built, in one run.

1. Per shape: `F.linear` of a row-major d_out × d_in weight against the same weight stored column-major, at batch 1 and
   8, one thread, 60 copies of each weight so that they come from memory; GB/s read and their ratio (first quartile of
   15 runs). The shapes are SmolLM2-135M's at κ = 2.
2. Given a factorized causal LM (`CHECKPOINT`) and its dense original (`--baseline`): greedy decoding with the KV cache,
   the dense model, the factorized one as built and the factorized one re-laid, interleaved in one process
   (`measure.generation.time_generation`), at batch 1 and `--batch`; decode and prefill speedups over the dense model
   and the largest logit difference between the two layouts.

    python tests/benchmarks/bench_inference_layout.py smollm2-k2 --baseline smollm2-135m --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(576, 144), (1536, 164), (576, 164), (144, 576), (164, 1536), (576, 576), (1536, 576)]


def _quartile(fn, reps: int = 15) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 4]


def per_shape(copies: int = 60) -> None:
    for d_out, d_in in SHAPES:
        rows_major = [torch.randn(d_out, d_in) for _ in range(copies)]
        col_major = [w.t().contiguous().t() for w in rows_major]
        gb = d_out * d_in * 4 * copies / 1e9
        for batch in (1, 8):
            x = torch.randn(batch, d_in)
            a = _quartile(lambda: [F.linear(x, w) for w in rows_major])
            b = _quartile(lambda: [F.linear(x, w) for w in col_major])
            print(f"{d_out:5d} x {d_in:<5d} batch {batch}: row-major {gb / a:5.1f} GB/s, column-major {gb / b:5.1f} GB/s: {a / b:.2f}x", flush=True)


def generation(checkpoint: str, baseline: str, batch: int, new_tokens: int, repeats: int) -> None:
    from transformers import AutoModelForCausalLM

    from lowrank_cli.measure.generation import time_generation
    from lowrank_cli.models.build import build_model
    from lowrank_cli.models.generation import CachedDecoder
    from lowrank_cli.nn.lowrank import inference_layout

    built = build_model(checkpoint).model.float().eval()
    laid = build_model(checkpoint).model.float().eval()
    print(f"re-laid halves: {inference_layout(laid)}")
    dense = AutoModelForCausalLM.from_pretrained(baseline).eval()
    for rows in (1, batch):
        ids = torch.randint(0, 49152, (rows, 32), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            diff = (built(ids).logits - laid(ids).logits).abs().max().item()
        decoders = {"dense": CachedDecoder(dense), "as built": CachedDecoder(built), "re-laid": CachedDecoder(laid)}
        t = time_generation(decoders, ids, mask, new_tokens, repeats=repeats)
        for name, v in t.items():
            print(f"batch {rows} {name}: decode {v.decode.median_s * 1e3:.1f} ms a step (range {v.decode.min_s * 1e3:.1f}-"
                  f"{v.decode.max_s * 1e3:.1f}), {t['dense'].decode.median_s / v.decode.median_s:.2f}x; prefill "
                  f"{t['dense'].prefill.median_s / v.prefill.median_s:.2f}x", flush=True)
        print(f"batch {rows}: largest logit difference between the layouts {diff:.3g}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?", help="a factorized causal LM (section 2 is skipped without it)")
    ap.add_argument("--baseline", help="its dense original (a Hub folder)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    per_shape()
    if args.checkpoint:
        generation(args.checkpoint, args.baseline, args.batch, args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()
