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


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; `cuda` without CUDA is an error."""
    if name not in ("auto", "cpu", "cuda"):
        raise LowrankError(f"--device '{name}': expected auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise LowrankError(f"--device cuda: CUDA is not available on this machine ({why}); use --device cpu or --device auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def broadcast_flag(env: DistEnv, flag: bool) -> bool:
    """Rank 0's `flag` on every process (e.g. 'stop now')."""
    if not env.distributed:
        return flag
    t = torch.tensor([int(flag)], device=env.device if env.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run `python -m torch.distributed.run --standalone --nproc_per_node N -m lowrank_cli ARGV`.

    `argv` is the command line without `--nproc`. Returns torchrun's exit status.
    """
    if nproc < 1:
        raise LowrankError(f"--nproc must be at least 1 (got {nproc})")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "lowrank_cli", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    return subprocess.call(cmd, env=env)


def strip_nproc(argv: list[str]) -> list[str]:
    """The command line with `--nproc N` / `--nproc=N` removed."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out
