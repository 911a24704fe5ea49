"""Benchmark: finding a checkpoint's timm architecture from its tensors alone (no --model).

Writes checkpoints of random weights for a few architectures and settings, then times
`lowrank_cli.models.build.resolve_architecture` with a recipe's hint whose `model` does not fit
(so that the search runs), reporting what it found, the settings, how many candidates it built
on the meta device, and the seconds (goal: under 10 s for a ViT-B-sized checkpoint on 2 cores).

    python tests/benchmarks/bench_arch_search.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from lowrank_cli.io import read_header
from lowrank_cli.models.build import ArchitectureHint, resolve_architecture

CASES = [
    ("deit_base_patch16_224", {}, ArchitectureHint("deit_small_patch16_224", {}, ("deit_*", "vit_*"))),
    ("vit_small_patch16_224", {"num_classes": 10, "img_size": 384}, ArchitectureHint("deit_base_patch16_224", {}, ("deit_*", "vit_*"))),
    ("deit_tiny_patch16_224", {"num_classes": 0}, ArchitectureHint("deit_base_patch16_224", {}, ("deit_*", "vit_*"))),
    ("swin_base_patch4_window7_224", {"num_classes": 100}, ArchitectureHint("swin_tiny_patch4_window7_224", {}, ("swin_*",))),
]


def main() -> None:
    print(f"torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        for arch, kwargs, hint in CASES:
            path = Path(tmp) / f"{arch}.safetensors"
            torch.manual_seed(0)
            save_file(timm.create_model(arch, pretrained=False, **kwargs).state_dict(), str(path))
            header = read_header(path)
            t = time.perf_counter()
            found = resolve_architecture(path, header, {}, hint)
            seconds = time.perf_counter() - t
            params = sum(v.numel for v in header.tensors.values()) / 1e6
            print(f"{arch} {kwargs} ({params:.1f} M params) -> {found.architecture} {found.kwargs} [{found.source}] in {seconds:.1f} s")
            print(f"    {found.note}")
            path.unlink()


if __name__ == "__main__":
    main()
