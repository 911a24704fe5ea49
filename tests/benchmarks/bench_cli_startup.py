"""Benchmark: how long the command line takes before it does anything, against `import torch`.

Times, in fresh processes, interleaved, median of `--repeats` runs each:
`python -c "import torch"` (the baseline), `lowrank --version`, `lowrank --help`, and
`lowrank inspect FILE.safetensors --json` without an architecture on a ~300 MB checkpoint
(deit_base-sized random tensors, written once to a temporary folder). Prints each as a ratio
to the baseline measured in the same run (goal: --version and --help ≤ 0.3×).

    python tests/benchmarks/bench_cli_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def checkpoint(path: Path, megabytes: int = 300) -> Path:
    """A ViT-B-like state dict of random fp32 tensors of about `megabytes` MB (12 blocks of 768-wide layers)."""
    tensors, size, i = {}, 0, 0
    gen = torch.Generator().manual_seed(0)
    while size < megabytes * 1e6:
        for name, shape in ((f"blocks.{i}.attn.qkv.weight", (2304, 768)), (f"blocks.{i}.attn.proj.weight", (768, 768)),
                            (f"blocks.{i}.mlp.fc1.weight", (3072, 768)), (f"blocks.{i}.mlp.fc2.weight", (768, 3072)),
                            (f"blocks.{i}.norm1.weight", (768,))):
            tensors[name] = torch.randn(*shape, generator=gen)
            size += tensors[name].numel() * 4
        i += 1
    save_file(tensors, str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    lowrank = shutil.which("lowrank") or f"{sys.executable} -m lowrank_cli"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint(Path(tmp) / "vitb.safetensors")
        commands = {
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "lowrank --version": [*lowrank.split(), "--version"],
            "lowrank --help": [*lowrank.split(), "--help"],
            f"lowrank inspect ({ckpt.stat().st_size / 1e6:.0f} MB, no --model)": [*lowrank.split(), "inspect", str(ckpt), "--json"],
        }
        times: dict[str, list[float]] = {k: [] for k in commands}
        for cmd in commands.values():  # warm the page cache and .pyc files
            subprocess.run(cmd, capture_output=True, check=True)
        for i in range(args.repeats):
            for key in (list(commands) if i % 2 == 0 else reversed(list(commands))):
                t = time.perf_counter()
                subprocess.run(commands[key], capture_output=True, check=True)
                times[key].append(time.perf_counter() - t)
    base = statistics.median(times["python -c 'import torch'"])
    print(f"median of {args.repeats} runs each, interleaved; ratio to `import torch` in the same run")
    for key, samples in times.items():
        med = statistics.median(samples)
        print(f"  {key:45s} {med:6.2f} s  (range {min(samples):.2f}–{max(samples):.2f})  {med / base:5.2f}×")


if __name__ == "__main__":
    main()
