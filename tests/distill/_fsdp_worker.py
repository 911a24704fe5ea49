"""One process of a `torch.distributed.run` launch in tests/distill/test_fsdp.py: `compress_checkpoint` on the CPU.

Usage: python _fsdp_worker.py CHECKPOINT RECIPE OUT [--resume].
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
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    compress_checkpoint(args.checkpoint, load_recipe(args.recipe), out=args.out, device="cpu", resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
