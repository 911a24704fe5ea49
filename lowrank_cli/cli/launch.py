"""`--nproc N`: relaunching the command that was parsed under torchrun, less `--nproc`."""

from __future__ import annotations

import os
from typing import List, Optional

from lowrank_cli.cli.app import ARGV
from lowrank_cli.distill.distributed import launch_torchrun, under_torchrun
from lowrank_cli.errors import LowrankError


def argv_without_nproc(argv: List[str]) -> List[str]:
    """The command's arguments as given, less `--nproc N` / `--nproc=N`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def relaunch(nproc: Optional[int]) -> bool:
    """With `--nproc N` (N > 1) outside torchrun: run this command under torchrun; True when it did."""
    if nproc is None or nproc == 1 or under_torchrun():
        return False
    code = launch_torchrun(nproc, argv_without_nproc(ARGV))
    if code:
        raise LowrankError(f"torchrun with {nproc} processes failed (exit status {code}); see the messages above")
    return True


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
