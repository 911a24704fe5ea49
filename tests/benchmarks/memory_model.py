"""The memory model of docs/memory.md: the bytes each stage of `compress` holds at its peak, per process, for SmolLM2-135M
(fp32, as the benchmarks run it), and 7 B and 70 B Llama shapes in bf16, on one process and on eight, from
`lowrank_cli.plan.memory` (the accounting the block-by-block path decides with). Prints markdown tables.

Run: python tests/benchmarks/memory_model.py [--processes 8]
"""

from __future__ import annotations

import argparse

from lowrank_cli.plan.memory import LLAMA_7B, LLAMA_70B, SMOLLM2_135M, Work, stage_peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=8)
    args = ap.parse_args()
    work = Work()
    print(f"work: {work.calib} calibration, {work.local} local-stage and {work.val} held-out sequences of {work.tokens} tokens, "
          f"batch {work.batch}, student blocks at {work.kept:.0%} of the teacher's parameters\n")
    for name, shape in (("SmolLM2-135M (fp32)", SMOLLM2_135M), ("Llama 7 B (bf16)", LLAMA_7B), ("Llama 70 B (bf16)", LLAMA_70B)):
        print(f"**{name}**: {shape.params / 1e9:.2f} B parameters, {shape.params * shape.dtype_bytes / 1e9:.1f} GB of weights\n")
        print("| path | stage | GB per process |")
        print("| --- | --- | ---: |")
        for path, stages in stage_peaks(shape, work, args.processes).items():
            for stage, nbytes in stages.items():
                print(f"| {path} | {stage} | {nbytes / 1e9:.2f} |")
        print()


if __name__ == "__main__":
    main()
