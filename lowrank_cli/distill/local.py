"""Local (block-wise) distillation: each student block trained alone to reproduce its teacher block.

Before end-to-end distillation, the factorized student is mended one transformer block at a
time (docs/algorithms.md §9), as block reconstruction does in post-training quantization:

1. Cache, for `examples` training examples, the first block's input of both models and the
   arguments every block is called with (`models.blocks.BlockRunner`: only the embeddings run).
2. For block i: the teacher block's output on the teacher's input is the target; the student
   block is trained by Adam for `steps` steps, on random cached batches, to reproduce it from
   the *student's own* input (the output of its blocks already trained, so that errors do not
   pile up) or, with `inputs: teacher`, from the teacher's input (blocks independent). The
   loss is the squared error on real tokens normalized by the target's energy.
3. Both chains move one block on (no gradient), and the next block is trained.

No end-to-end backward, and memory for four activation sets of the cached examples (the
inputs and outputs of one block, for student and teacher), never the whole model's.
`rounds` > 1 goes over the blocks again from the cached first inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from lowrank_cli.data.stream import TextStream
from lowrank_cli.distill.budget import StepPlanner
from lowrank_cli.errors import LowrankError
from lowrank_cli.models.blocks import BlockCall, BlockRunner
from lowrank_cli.models.family import Inputs, ModelFamily, inputs_to
from lowrank_cli.recipe import LocalConfig


@dataclass
class LocalResult:
    """What the local stage did: per block, the normalized error before and after its training."""

    blocks: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    examples: int = 0
    tokens: int = 0
    untrained: list[str] = field(default_factory=list)  # blocks left as they were: the stage's deadline had passed

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "seconds": self.seconds, "examples": self.examples, "tokens": self.tokens,
                **({"untrained": self.untrained} if self.untrained else {})}


@dataclass
class _Batch:
    call: BlockCall
    mask: torch.Tensor | None  # (B, N) real tokens of a text batch; None for images


def local_batches(dataset: Dataset, cfg: LocalConfig, seed: int, group_by_length: bool = True) -> list[Inputs]:
    """`cfg.examples` training examples (a seeded draw; a stream's first ones) in batches of `cfg.batch_size`, as the model takes them.

    `group_by_length` (text in memory): the drawn documents are sorted by length before they are batched, so that a
    batch padded to its longest holds little padding (the stage draws its batches at random, so their order does not matter).
    """
    if isinstance(dataset, TextStream):
        items = dataset.head(cfg.examples)
        return [dataset.collate(items[i:i + cfg.batch_size])[0] for i in range(0, len(items), cfg.batch_size)]
    n = min(cfg.examples, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 7919))[:n].tolist()
    if group_by_length and hasattr(dataset, "lengths"):
        lengths = dataset.lengths()
        order.sort(key=lambda i: -lengths[i])
    collate = getattr(dataset, "collate", default_collate)
    out = []
    for i in range(0, n, cfg.batch_size):
        inputs, _labels = collate([dataset[j] for j in order[i:i + cfg.batch_size]])
        out.append(inputs)
    return out


def normalized_error(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """‖out − target‖² / ‖target‖² over the real tokens (every element for images), in fp32."""
    diff, ref = (out.float() - target.float()).square(), target.float().square()
    if mask is not None and diff.dim() == 3 and tuple(diff.shape[:2]) == tuple(mask.shape):
        m = mask.to(diff.dtype).unsqueeze(-1)
        diff, ref = diff * m, ref * m
    return diff.sum() / ref.sum().clamp_min(1e-12)


@dataclass
class StageDeadline:
    """A wall-time end for the local stage (`distill.budget`): each block gets an equal part of what is left when it starts,
    and its step count (at least `local.min_steps`, at most `local.steps`) from its first steps timed; none past `until`."""

    until: float  # a time.perf_counter() time


def local_distill(student: nn.Module, teacher: nn.Module, family: ModelFamily, batches: list[Inputs], cfg: LocalConfig,
                  device: torch.device, seed: int = 0, log: Callable[[dict[str, Any]], None] | None = None,
                  deadline: StageDeadline | None = None) -> LocalResult:
    """Train each block of `student` (in place) to reproduce the same block of the frozen `teacher` (see the module docstring).

    `log(record)` is called after each block with its name, index, errors and steps. Each block trains `cfg.steps` steps, or
    with a `deadline` as many (at most `cfg.steps`) as end it in its part of the time left.
    """
    t0 = time.perf_counter()
    student.to(device).eval()
    teacher.to(device).eval()
    s_run, t_run = BlockRunner(family, student), BlockRunner(family, teacher)
    if s_run.names != t_run.names:
        raise LowrankError(f"the student's blocks ({len(s_run.names)}) are not the teacher's ({len(t_run.names)}); local distillation "
                           "pairs them one by one (recipe key distill.local)", param="distill.local")
    student_chain = cfg.inputs == "student"  # with inputs: teacher, the student's own activations are never needed
    first = inputs_to(batches[0], device)
    t_run.check(first)
    meta: list[_Batch] = []
    t_first: list[torch.Tensor] = []
    s_first: list[torch.Tensor] = []
    for inputs in batches:
        inputs = inputs_to(inputs, device)
        hidden, call = t_run.first_input(inputs)
        t_first.append(hidden)
        if student_chain:
            s_first.append(s_run.first_input(inputs)[0])
        meta.append(_Batch(call, inputs.get("attention_mask") if isinstance(inputs, dict) else None))
    result = LocalResult(examples=sum(h.shape[0] for h in t_first),
                         tokens=sum(int(b.mask.sum()) if b.mask is not None else h[..., 0].numel() for h, b in zip(t_first, meta)))
    gen = torch.Generator().manual_seed(seed)
    blocks_left = len(s_run.names) * cfg.rounds
    for rnd in range(cfg.rounds):
        t_in, s_in = list(t_first), list(s_first)
        for i, name in enumerate(s_run.names):
            if deadline is not None and time.perf_counter() >= deadline.until:  # out of time: the rest stay as they are
                result.untrained = [f"{n} (round {r + 1})" if cfg.rounds > 1 else n
                                    for r in range(rnd, cfg.rounds) for n in s_run.names[(i if r == rnd else 0):]]
                break
            if i:
                with torch.no_grad():
                    t_in = [t_run.link(i, h) for h in t_in]
                    s_in = [s_run.link(i, h) for h in s_in]
            t_block, s_block = t_run.block(i), s_run.block(i)
            until = None
            if deadline is not None:  # an equal part of what the stage has left, this block's overheads included
                now = time.perf_counter()
                until = now + max(0.0, deadline.until - now) / blocks_left
            blocks_left -= 1
            with torch.no_grad():
                target = [b.call(t_block, h) for h, b in zip(t_in, meta)]
            clock = None if until is None else (until, deadline.until)
            before, after, outputs, steps, reverted = train_block(s_block, s_in if student_chain else t_in, target, meta, cfg, gen, clock)
            s_in = outputs if student_chain else []
            t_in = target
            record = {"block": name, "index": i, "round": rnd + 1, "error_before": before, "error_after": before if reverted else after,
                      "steps": steps, "seconds": time.perf_counter() - t0, **({"reverted": True, "error_trained": after} if reverted else {})}
            result.blocks.append(record)
            if log is not None:
                log(record)
        if result.untrained:
            break
    result.seconds = time.perf_counter() - t0
    return result


def train_block(block: nn.Module, source: list[torch.Tensor], target: list[torch.Tensor], meta: list[_Batch], cfg: LocalConfig,
                 gen: torch.Generator, until: tuple[float, float] | None = None) -> tuple[float, float, list[torch.Tensor], int, bool]:
    """Adam on the block's trainable parameters for `cfg.steps` steps (with `until`, the block's end and the stage's deadline:
    as many, at least `cfg.min_steps` and at most `cfg.steps`, as end by the block's end, the final evaluation included,
    and none past the stage's deadline); (mean error before, mean error after training, the block's outputs on `source`,
    the steps taken, whether the block went back) over every batch. A block whose error rose goes back to its weights
    before the steps (its outputs too). No gradient is left on the block's parameters."""
    params = [p for p in block.parameters() if p.requires_grad]
    t_eval = time.perf_counter()

    @torch.no_grad()
    def outputs_and_error() -> tuple[list[torch.Tensor], float]:
        outs = [b.call(block, h) for h, b in zip(source, meta)]
        return outs, sum(float(normalized_error(o, y, b.mask)) for o, y, b in zip(outs, target, meta)) / len(source)

    outs, before = outputs_and_error()
    if not params:
        return before, before, outs, 0, False
    del outs
    start = [p.detach().clone() for p in params]  # kept if training makes the block worse on its examples
    planner = None
    if until is not None:  # the evaluation after the steps costs what the one before did
        planner = StepPlanner(until[0] - (time.perf_counter() - t_eval), cfg.steps, lower=cfg.min_steps, hard_until=until[1])
        planner.start()
    total = cfg.steps
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    step = 0
    while step < total:
        lr = cfg.lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / total)).item())  # cosine to 0 over the block's steps
        for group in optimizer.param_groups:
            group["lr"] = lr
        k = int(torch.randint(len(source), (1,), generator=gen))
        loss = normalized_error(meta[k].call(block, source[k]), target[k], meta[k].mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if planner is not None and planner.tick(step):
            total = planner.total
    optimizer.zero_grad(set_to_none=True)  # the end-to-end stage starts from clean gradients
    outs, after = outputs_and_error()
    if not after <= before:  # a few steps at the full rate can overshoot (or diverge to NaN): the block goes back to where it started
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        outs, _ = outputs_and_error()
        return before, after, outs, step, True
    return before, after, outs, step, False
