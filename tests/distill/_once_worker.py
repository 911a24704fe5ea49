"""One process of a `torch.distributed.run` launch in tests/distill/test_factorize_once.py: `compress_checkpoint` on the CPU,
counting how often this process calibrates, factorizes and runs the local stage (written to COUNTS-<rank>.json).

Usage: python _once_worker.py CHECKPOINT RECIPE OUT COUNTS
"""

import json
import os
import sys
from pathlib import Path

import lowrank_cli.pipelines.common.prepare as prepare
import lowrank_cli.pipelines.common.run_loop as run_loop
from lowrank_cli.pipelines.compress import compress_checkpoint
from lowrank_cli.recipe import load_recipe

counts = {"calibrate": 0, "factorize": 0, "local": 0}


def counted(name, fn):
    def wrapper(*args, **kwargs):
        counts[name] += 1
        return fn(*args, **kwargs)
    return wrapper


def main() -> int:
    checkpoint, recipe, out, where = sys.argv[1:5]
    prepare.calibration_for = counted("calibrate", prepare.calibration_for)
    prepare.factorize_model = counted("factorize", prepare.factorize_model)
    run_loop.local_distill = counted("local", run_loop.local_distill)
    compress_checkpoint(checkpoint, load_recipe(recipe), out=out, device="cpu")
    Path(where, f"counts-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
