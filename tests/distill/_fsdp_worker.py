"""One process of a `torch.distributed.run` launch in tests/distill/test_fsdp.py: `compress_checkpoint` on the CPU.

Usage: python _fsdp_worker.py CHECKPOINT RECIPE OUT [--stop K] [--resume]. `--stop K` interrupts every process after
optimizer step K, as a kill would (exit status 130); the run keeps its last checkpoint.
"""

import argparse
import sys

from lowrank_cli.pipelines.compress import compress_checkpoint
from lowrank_cli.recipe import load_recipe


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("recipe")
    parser.add_argument("out")
    parser.add_argument("--stop", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    def stop(pos):
        if pos.step == args.stop:
            raise KeyboardInterrupt

    try:
        compress_checkpoint(args.checkpoint, load_recipe(args.recipe), out=args.out, device="cpu", resume=args.resume,
                            step_hook=stop if args.stop else None)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
