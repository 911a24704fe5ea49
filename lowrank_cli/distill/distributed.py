"""torch.distributed set-up for `torchrun` (and `--nproc N`, which launches it).

Under `torchrun` every process reads RANK / WORLD_SIZE / LOCAL_RANK from its environment;
CUDA processes use NCCL on their own GPU, CPU processes use gloo. Only rank 0 writes files
and prints progress. The teacher is never wrapped in DDP: it has no gradients to reduce.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lowrank_cli.errors import LowrankError


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: `rank` of `world` processes, on `device`."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> DistEnv:
    """Join the process group when started by torchrun; a single process otherwise."""
    if not under_torchrun():
        return DistEnv(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, local, device)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_gather_strings(env: DistEnv, value: str) -> list[str]:
    """Every process's `value`, in rank order (one string per process)."""
    if not env.distributed:
        return [value]
    out: list[str] = [""] * env.world
    dist.all_gather_object(out, value)
    return out


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run `python -m torch.distributed.run --standalone --nproc_per_node N -m lowrank_cli ARGV`.

    `argv` is the command line without `--nproc`. Returns torchrun's exit status.
    """
    if nproc < 1:
        raise LowrankError(f"nproc must be at least 1 (got {nproc})", param="nproc")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "lowrank_cli", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    return subprocess.call(cmd, env=env)
