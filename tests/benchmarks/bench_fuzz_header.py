"""Fuzzing at benchmark size: N seeded mutations of a small factorized checkpoint's header and manifest.

Each mutated file goes through `read_header` and `lowrank_cli.load`, as a user's would; the
outcomes are counted: a clean `LowrankError`, a load with the original weights (the mutation
changed nothing that matters), and the failures: another exception, a hang, or a load with
other weights. A sample also goes through the command line (`inspect`, `export --format dense`)
in fresh processes, counting tracebacks.

    python tests/benchmarks/bench_fuzz_header.py [--cases 10000] [--cli 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from header_fuzz import mutate, outcome  # noqa: E402

from lowrank_cli.models import load  # noqa: E402
from lowrank_cli.pipelines.factorize import factorize_checkpoint  # noqa: E402
from lowrank_cli.recipe import load_recipe  # noqa: E402

KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2, "num_classes": 10}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--cli", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        torch.manual_seed(0)
        save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS).state_dict(), str(d / "vit.safetensors"))
        ckpt = factorize_checkpoint(d / "vit.safetensors", load_recipe("deit"), d / "f.safetensors", "vit_tiny_patch16_224", KWARGS).out
        reference = {k: v.clone() for k, v in load(ckpt).state_dict().items()}
        data = ckpt.read_bytes()
        rng = random.Random(args.seed)
        counts, labels, failures = Counter(), Counter(), []
        t = time.perf_counter()
        for i in range(args.cases):
            mutated, label = mutate(data, rng)
            if mutated == data:
                counts["unchanged"] += 1
                continue
            (d / "case.safetensors").write_bytes(mutated)
            result, detail = outcome(d / "case.safetensors", reference)
            counts[result] += 1
            labels[(label, result)] += 1
            if result in ("crash", "hang", "different"):
                failures.append(f"case {i} ({label}): {result} {detail}")
        print(f"{args.cases} mutations in {time.perf_counter() - t:.0f} s (seed {args.seed}):")
        for key in ("error", "same", "crash", "hang", "different", "unchanged"):
            print(f"  {key:10s} {counts[key]}")
        for f in failures[:20]:
            print("  FAIL", f)
        tracebacks = codes = 0
        code_counts: Counter = Counter()
        for i in range(args.cli):
            mutated, label = mutate(data, rng)
            case = d / f"cli{i}.safetensors"
            case.write_bytes(mutated)
            for cmd in (["inspect", str(case), "--json"], ["export", str(case), "--format", "dense", "--out", str(d / f"o{i}.safetensors")]):
                p = subprocess.run([sys.executable, "-m", "lowrank_cli", *cmd], capture_output=True, text=True)
                codes += 1
                code_counts[p.returncode] += 1
                tracebacks += "Traceback" in p.stderr
        print(f"command line: {codes} runs on {args.cli} mutated files, exit codes {dict(code_counts)}, {tracebacks} tracebacks")


if __name__ == "__main__":
    main()
