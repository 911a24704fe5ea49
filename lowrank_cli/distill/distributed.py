"""torch.distributed set-up for `torchrun` (and `--nproc N`, which launches it).

Under `torchrun` every process reads RANK / WORLD_SIZE / LOCAL_RANK from its environment;
CUDA processes use NCCL on their own GPU, CPU processes use gloo. Only rank 0 writes files
and prints progress. The teacher is never wrapped in DDP: it has no gradients to reduce.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

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
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=collective_timeout())
    return DistEnv(rank, world, local, device)


def collective_timeout() -> datetime.timedelta:
    """How long a process waits in a collective: while rank 0 alone calibrates, factorizes, evaluates and runs the local
    stage (minutes to hours on a large model) the others wait in one, so 12 hours rather than torch's 10 (NCCL) or 30 (gloo)
    minutes; `LOWRANK_COLLECTIVE_TIMEOUT_MIN` sets another. A process that fails ends the others through torchrun."""
    try:
        minutes = float(os.environ.get("LOWRANK_COLLECTIVE_TIMEOUT_MIN", "720"))
    except ValueError:
        minutes = 720.0
    return datetime.timedelta(minutes=max(1.0, minutes))


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


def from_main(env: DistEnv, value: str) -> str:
    """Rank 0's `value` on every process (the other processes' values are not used)."""
    if not env.distributed:
        return value
    box = [value if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def on_main_alone(env: DistEnv, what: str) -> Iterator[None]:
    """For work that rank 0 does alone inside the block while the others wait after it: an exception on rank 0 is raised
    on every process (the same message for a LowrankError; else naming `what` and the exception), not a hang."""
    if not env.distributed:
        yield
        return
    try:
        yield
    except BaseException as e:
        if env.is_main:
            text = str(e) if isinstance(e, LowrankError) else f"process 0 failed during {what}: {type(e).__name__}: {e}"
            from_main(env, json.dumps({"error": text, "param": getattr(e, "param", None)}))
        raise
    got = json.loads(from_main(env, json.dumps({"ok": True}) if env.is_main else ""))
    if "error" in got:
        raise LowrankError(got["error"], param=got["param"])


@torch.no_grad()
def broadcast_module(env: DistEnv, module: nn.Module) -> None:
    """Every process's `module` gets rank 0's parameters and buffers, one tensor at a time (tied ones once), in tensors of
    the standard strides on every process (rank 0's too).

    The processes must hold the same structure: names, shapes and dtypes are compared first (a LowrankError otherwise)."""
    if not env.distributed:
        return
    tensors = [(n, t) for n, t in list(module.named_parameters()) + list(module.named_buffers())]
    layout = ";".join(f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in tensors)
    layouts = [""] * env.world
    dist.all_gather_object(layouts, layout)
    if len(set(layouts)) != 1:
        bad = next(r for r, x in enumerate(layouts) if x != layouts[0])
        raise LowrankError(f"process {bad} holds another structure of the student than process 0; they cannot share its weights")
    wire = env.device if env.device.type == "cuda" else torch.device("cpu")  # NCCL sends from the GPU, gloo from the host
    for _name, t in tensors:
        # a fresh tensor of the standard strides on every process (DDP compares them; an SVD factor's may differ in size-1 dims)
        buf = torch.empty(t.shape, dtype=t.dtype, device=wire)
        if env.is_main:
            buf.copy_(t.data)
        dist.broadcast(buf, src=0)
        t.data = buf.to(t.device)


def slowest(env: DistEnv, *seconds: float) -> tuple[float, ...]:
    """Each of `seconds` as the largest over every process (a step count planned from them is the same on all of them)."""
    if not env.distributed:
        return tuple(seconds)
    t = torch.tensor([float(x) for x in seconds], dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(float(x) for x in t.tolist())


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[IPv6]:PORT`) -> (host, port), or a LowrankError naming `rdzv_endpoint`."""
    host, sep, port = str(endpoint).rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise LowrankError(f"rdzv_endpoint '{endpoint}' is not HOST:PORT (e.g. 10.0.0.1:29500, a port from 1 to 65535)", param="rdzv_endpoint")
    return host, int(port)


def check_launch(nproc: int, device: torch.device, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None,
                 resume: bool = False) -> None:
    """Refuse, before any process starts, a launch that cannot run: `nproc` processes on this node
    (one per GPU on CUDA), `nnodes` nodes of which this is `node_rank`, meeting at `rdzv_endpoint`;
    `resume` on one node only (the run folder, its checkpoints and its lock are node 0's)."""
    if nproc < 1:
        raise LowrankError(f"nproc must be at least 1 (got {nproc})", param="nproc")
    if nnodes < 1:
        raise LowrankError(f"nnodes must be at least 1 (got {nnodes})", param="nnodes")
    if not 0 <= node_rank < nnodes:
        raise LowrankError(f"node_rank {node_rank} is outside 0..{nnodes - 1} ({nnodes} node{'s' if nnodes > 1 else ''})", param="node_rank")
    if rdzv_endpoint is not None:
        parse_endpoint(rdzv_endpoint)
    elif nnodes > 1:
        raise LowrankError(f"rdzv_endpoint is needed with {nnodes} nodes: HOST:PORT of node 0 and a free port there, the same on every node",
                           param="rdzv_endpoint")
    if resume and nnodes > 1:
        raise LowrankError(f"resume with {nnodes} nodes is not supported: only node 0 holds the run's checkpoints; resume on one node "
                           "(any number of processes)", param="resume")
    if device.type == "cuda" and (nproc > 1 or nnodes > 1):
        visible = torch.cuda.device_count()
        if nproc > visible:
            raise LowrankError(f"nproc {nproc} but {visible} CUDA device(s) (GPUs) are visible; start at most {visible} processes per node "
                               "(one per GPU), or train on the CPU", param="nproc")


def torchrun_command(nproc: int, argv: list[str], nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None) -> list[str]:
    """`python -m torch.distributed.run ... -m lowrank_cli ARGV`: `--standalone` on one node without an
    endpoint, else a static rendezvous at `rdzv_endpoint` (node 0's address: its processes take ranks
    0..nproc-1 and rank 0 writes the run) with this node's `node_rank`."""
    if rdzv_endpoint is None and nnodes == 1:
        where = ["--standalone"]
    else:
        host, port = parse_endpoint(rdzv_endpoint or "")
        where = [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={host}", f"--master_port={port}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={nproc}", "-m", "lowrank_cli", *argv]


def launch_torchrun(nproc: int, argv: list[str], nnodes: int = 1, node_rank: int = 0, rdzv_endpoint: str | None = None) -> int:
    """Run `argv` (the command line without the launch options) under torchrun (`torchrun_command`).

    Returns torchrun's exit status. The launch is checked first (`check_launch`, CPU rules:
    the GPU count is the caller's to check against its device).
    """
    check_launch(nproc, torch.device("cpu"), nnodes, node_rank, rdzv_endpoint)
    cmd = torchrun_command(nproc, argv, nnodes, node_rank, rdzv_endpoint)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    return subprocess.call(cmd, env=env)
