"""`--nproc N` and the multi-node options: relaunching the command that was parsed under torchrun, less those options."""

from __future__ import annotations

import contextlib
import os
from typing import ContextManager, List, Optional

from lowrank_cli.cli.app import ARGV, STARTED_ENV, command_started_unix
from lowrank_cli.device import resolve_device
from lowrank_cli.distill.distributed import check_launch, launch_torchrun, under_torchrun
from lowrank_cli.errors import LowrankError

LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint")  # options torchrun's processes must not see again


def argv_without_launch(argv: List[str]) -> List[str]:
    """The command's arguments as given, less `--nproc N`, `--nnodes N`, `--node-rank K`, `--rdzv-endpoint H:P` (or `--flag=value`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{f}=" for f in LAUNCH_FLAGS)):
            out.append(arg)
    return out


def launches(nproc: Optional[int], nnodes: int = 1) -> bool:
    """Whether this command, outside torchrun, starts torchrun: more than one process or more than one node."""
    return not under_torchrun() and ((nproc or 1) > 1 or nnodes > 1)


def check(nproc: Optional[int], device: str, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: Optional[str] = None, resume: bool = False) -> None:
    """The launch options checked before anything is read, written or started (a LowrankError naming the option)."""
    if under_torchrun():
        return
    check_launch(nproc or 1, resolve_device(device), nnodes, node_rank, rdzv_endpoint, resume)


def lock_for_launch(run, node_rank: int = 0) -> ContextManager:
    """The run folder's lock, held by node 0 for the processes torchrun starts (other nodes' processes never write)."""
    return run.locked() if node_rank == 0 else contextlib.nullcontext()


def relaunch(nproc: Optional[int], nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: Optional[str] = None) -> bool:
    """Outside torchrun, with more than one process or node: run this command under torchrun; True when it did."""
    if not launches(nproc, nnodes):
        return False
    n = nproc or 1
    before = os.environ.get(STARTED_ENV)
    os.environ[STARTED_ENV] = repr(command_started_unix())  # the processes' time budget counts from this command's start
    try:
        code = launch_torchrun(n, argv_without_launch(ARGV), nnodes, node_rank, rdzv_endpoint)
    finally:
        if before is None:
            os.environ.pop(STARTED_ENV, None)
        else:
            os.environ[STARTED_ENV] = before
    if code:
        where = f" on node {node_rank} of {nnodes}" if nnodes > 1 else ""
        raise LowrankError(f"torchrun with {n} processes{where} failed (exit status {code}); see the messages above")
    return True


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
