"""Benchmark: the whole compression matrix of issue 17 at `--nproc 1` (tests/test_matrix.py runs its all-pairs cells).

Every cell of family × factorization method × rank rule × distillation × embeddings × export × checkpoint dtype ×
export dtype (tests/matrix_cells.py), on the tiny checkpoints shaped like real ones (tests/fixtures_real.py), each
run through the command line in this process and checked: ranks, strict reloads, written dtypes, export outputs
relative to their scale. Prints each cell's status and time, then passed / failed / refused / skipped and the total.

Run: python tests/benchmarks/bench_matrix.py [--family llama gpt2 ...] [--only ckpt_dtype=bf16 ...] [--limit N] [--every K]
     [--part I/N]
     [--nproc2] [--json out.json]
     (--every K runs every K-th cell of the product, for a quick sample; --part I/N one of N interleaved parts; --nproc2 adds the two-process cells)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from fixtures_real import CheckpointCache  # noqa: E402
from matrix_cells import CellResult, cell_id, product, run_cell, verdict  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="*", help="only these families")
    ap.add_argument("--only", nargs="*", default=[], metavar="FACTOR=VALUE", help="only cells with these values (e.g. ckpt_dtype=bf16)")
    ap.add_argument("--every", type=int, default=1, help="every K-th meaningful cell of the product")
    ap.add_argument("--limit", type=int, help="at most N cells")
    ap.add_argument("--part", default="0/1", metavar="I/N", help="the I-th of N interleaved parts (run the N parts side by side)")
    ap.add_argument("--nproc2", action="store_true", help="the --nproc 2 cells too (a torchrun launch each)")
    ap.add_argument("--json", type=Path, help="write every cell's result here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cells = [c for c in product() if (args.nproc2 or c["nproc"] == "1") and (not args.family or c["family"] in args.family)
             and verdict(c).kind != "skip" and all(c[k] == v for k, v in (o.split("=", 1) for o in args.only))]
    cells = cells[:: args.every][: args.limit]
    part, parts = (int(x) for x in args.part.split("/"))
    cells = cells[part::parts]
    results: list[CellResult] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoints = CheckpointCache(root / "checkpoints")
        for i, cell in enumerate(cells):
            work = root / f"cell{i}"
            work.mkdir()
            t = time.perf_counter()
            try:
                result = run_cell(cell, checkpoints, work)
            except Exception as e:  # noqa: BLE001 - a failing cell is reported, and the others still run
                result = CellResult(cell, "failed", time.perf_counter() - t, f"{type(e).__name__}: {e}"[:400])
                if not isinstance(e, AssertionError):
                    traceback.print_exc(limit=3)
            results.append(result)
            print(f"{i + 1:5d}/{len(cells)} {result.seconds:6.1f} s  {result.status:8s} {cell_id(cell)}  "
                  f"{result.detail[:200] if result.status == 'failed' else ''}", flush=True)
    total = time.perf_counter() - start
    counts = Counter(r.status for r in results)
    print(f"\n{len(results)} cells in {total:.0f} s ({total / max(1, len(results)):.2f} s a cell): "
          + ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "refused")))
    for r in results:
        if r.status == "failed":
            print(f"FAILED {cell_id(r.cell)}: {r.detail}")
    if args.json:
        args.json.write_text(json.dumps([{"cell": r.cell, "status": r.status, "seconds": r.seconds, "detail": r.detail,
                                          "figures": r.figures} for r in results], indent=1))


if __name__ == "__main__":
    main()
