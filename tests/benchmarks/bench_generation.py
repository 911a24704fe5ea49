"""Benchmark: generation with a KV cache, factorized vs dense, in one run (`lowrank bench --generate` for several settings).

For each factorized checkpoint, thread count and runtime, `lowrank_cli.pipelines.bench.bench_generation` times greedy
generation of `--new-tokens` after `--prompt-len` random prompt tokens at batch 1 and `--batch`, the dense model (the
factorized one merged back, W = up·down, or `--baseline`) and the factorized one interleaved in the same process. It
prints decode and prefill tokens per second, the measured speedups, the ideals (decode: weight bytes read per token;
prefill: MACs) and efficiency = measured / ideal, and the memory loading and generating add to a fresh process against
the factorized weights plus the KV cache. `--out` keeps every result as JSON.

Checkpoints (the time does not depend on the factors' values, so plain SVD at uniform κ is enough):

    lowrank factorize /work/assets/smollm2-135m/model.safetensors --recipe uniform-svd.yaml --kappa 2 --out smollm2-k2
    python tests/benchmarks/bench_generation.py smollm2-k2 --threads 1 2 --batch 8 --out gen-smollm2.json

where `uniform-svd.yaml` is the `causal-lm` recipe with `method: svd` and `allocation: uniform`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowrank_cli.pipelines.bench import GenerationSettings, bench_generation


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+", type=Path, help="factorized causal LMs (files or folders)")
    ap.add_argument("--baseline", type=Path, help="the dense original (default: each model merged dense)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    ap.add_argument("--out", type=Path, help="write every result here as JSON")
    args = ap.parse_args()

    results = []
    for ckpt in args.checkpoints:
        for compiled in (False, True) if args.compile else (False,):
            for i, threads in enumerate(args.threads):
                settings = GenerationSettings(args.new_tokens, args.batch, args.prompt_len, threads, compile=compiled,
                                              repeats=args.repeats, memory=i == 0 and not compiled)
                r = bench_generation(ckpt, args.baseline, settings)
                results.append(r.to_dict())
                print(f"{ckpt.name} threads {r.threads}{' compiled' if compiled else ''}: ideal decode {r.ideal_decode_speedup:.2f}x "
                      f"(weight bytes/token {r.bytes_per_token_dense / 1e6:.1f} -> {r.bytes_per_token_factorized / 1e6:.1f} MB), "
                      f"ideal prefill {r.ideal_prefill_speedup:.2f}x", flush=True)
                for row in r.rows:
                    print(f"  batch {row.batch}: decode {row.dense.decode_tokens_per_s:7.1f} -> {row.factorized.decode_tokens_per_s:7.1f} tok/s "
                          f"= {row.speedup('decode'):.2f}x ({r.efficiency(row, 'decode'):.0%} of ideal); prefill "
                          f"{row.dense.prefill_tokens_per_s:7.0f} -> {row.factorized.prefill_tokens_per_s:7.0f} tok/s = "
                          f"{row.speedup('prefill'):.2f}x ({r.efficiency(row, 'prefill'):.0%}); first token "
                          f"{row.dense.ttft.median_s * 1e3:.0f} -> {row.factorized.ttft.median_s * 1e3:.0f} ms", flush=True)
                for name, m in (r.memory or {}).items():
                    print(f"  memory {name}: {m.added / 1e6:.0f} MB added (peak {m.peak / 1e6:.0f} over {m.after_imports / 1e6:.0f} MB after "
                          f"imports) for {m.weights / 1e6:.0f} MB of weights + {m.kv_cache / 1e6:.1f} MB of KV cache: {m.ratio:.2f}x", flush=True)
                for note in r.notes:
                    print(f"  note: {note}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
