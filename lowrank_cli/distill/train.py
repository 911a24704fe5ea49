"""The training loop, in the manner of timm's `train.py` and torchtune's recipes.

AdamW (no weight decay on biases, norms and embeddings), linear warm-up then cosine decay,
gradient clipping, gradient accumulation, and a learning rate computed once from the
global batch size. On CUDA: bf16 autocast (or fp16 with a grad scaler), pinned memory and
non-blocking copies. Loss terms stay on the device and are read only at log steps, so the
loop never waits on the device between them.

The data order is a function of (seed, epoch, batch) and the RNG state is saved with each
checkpoint, so a resumed run on CPU reproduces an uninterrupted one. Streamed text
(`data/stream.py`) has no length: a run on it lasts `distill.max_steps`, passing over the stream as
often as that takes (`distill.epochs` does not apply), and its position in the stream is saved with each checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from lowrank_cli.data.loaders import EpochSampler, train_loader
from lowrank_cli.data.stream import StreamState, TextStream
from lowrank_cli.distill.budget import StepPlanner
from lowrank_cli.distill.distributed import DistEnv
from lowrank_cli.distill.fsdp import Sharded, load_optimizer_state, mixed_precision
from lowrank_cli.errors import LowrankError
from lowrank_cli.io.rundir import Position, TrainingState
from lowrank_cli.models.family import Inputs, inputs_to
from lowrank_cli.nn.lowrank import LowRankEmbedding
from lowrank_cli.recipe import DistillConfig


class Objective(Protocol):
    def __call__(self, model: nn.Module, inputs: Inputs, labels: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass
class TrainResult:
    steps: int
    total_steps: int
    lr: float
    global_batch: int
    seconds: float
    images: int
    last_terms: dict[str, float]
    untrained: list[str] = field(default_factory=list)  # trainable parameters no gradient reaches (left as they were)
    # this process's bytes of parameters, gradients and optimizer state after the first step (FSDP: its shards)
    state_bytes: dict[str, int] = field(default_factory=dict)
    student: nn.Module | None = None  # the trained student: the one given, or under FSDP a plain copy holding the gathered weights
    teacher: nn.Module | None = None  # the teacher given, likewise


def learning_rate(cfg: DistillConfig, global_batch: int) -> float:
    """`cfg.lr` if given, else `lr_base · (global_batch / lr_base_size)` (or its square root)."""
    if cfg.lr is not None:
        return cfg.lr
    scale = global_batch / cfg.lr_base_size
    return cfg.lr_base * (scale if cfg.lr_base_scale == "linear" else math.sqrt(scale))


def lr_at(step: int, total: int, warmup: int, peak: float, min_lr: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from `peak` to `min_lr` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))


def train_examples(dataset) -> int | None:
    """How many training examples `dataset` holds; None for a stream (not known before it is read)."""
    return None if isinstance(dataset, TextStream) else len(dataset)


def total_steps(n_images: int | None, cfg: DistillConfig, world: int = 1) -> int:
    """Optimizer steps of a run on `n_images` training images (what `train` will take), ≥ 0; a stream's (None): `cfg.max_steps`."""
    if n_images is None:
        return cfg.max_steps or 0
    per_epoch = ((n_images // world) // cfg.batch_size) // cfg.accum_steps
    return per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)


def check_steps(n_images: int | None, cfg: DistillConfig, world: int = 1) -> None:
    """A LowrankError unless `n_images` make at least one optimizer step (checked before a run writes anything); a
    stream (None) needs `distill.max_steps`, its length being unknown (a stream too short for one step is found when read)."""
    if n_images is None:
        if cfg.max_steps is None:
            raise LowrankError("streamed text data has no length known in advance: set distill.max_steps (and distill.warmup_steps for a warm-up)")
        return
    if ((n_images // world) // cfg.batch_size) // cfg.accum_steps == 0:
        global_batch = cfg.batch_size * world * cfg.accum_steps
        raise LowrankError(f"the training split has {n_images} examples, fewer than one step of {global_batch} (distill.batch_size × processes × distill.accum_steps)")


def create_optimizer(model: nn.Module, cfg: DistillConfig, lr: float, names: list[str] | None = None) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (timm's `param_groups_weight_decay` rule), none on embedding tables; fused on CUDA.

    Over the parameters that require grad, or those `names` (the same set, whatever a probe froze since: so the
    optimizer's indices, and a checkpoint's state, do not depend on the number of processes).

    Embedding tables are found by module type, not by name: every `nn.Embedding`'s weight and
    both factors of a `LowRankEmbedding` (a table tied to an LM head is the same parameter, so it too).
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    tables = {id(p) for m in model.modules() if isinstance(m, (nn.Embedding, LowRankEmbedding)) for p in m.parameters()}
    decay, no_decay = [], []
    chosen = None if names is None else set(names)
    for name, p in model.named_parameters():
        if (p.requires_grad if chosen is None else name in chosen):
            (no_decay if p.ndim <= 1 or name in skip or name.endswith(".bias") or id(p) in tables else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, **adamw_implementation(decay + no_decay))


def adamw_implementation(params: list[torch.Tensor]) -> dict[str, bool]:
    """AdamW's fused CUDA kernel when every parameter is on a GPU (one launch per step); the multi-tensor `foreach` one otherwise."""
    return {"fused": True} if params and all(p.is_cuda for p in params) else {"foreach": True}


def _no_gradient(student: nn.Module) -> list[str]:
    """The names of `student`'s trainable parameters that the last backward left without a gradient."""
    return [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]


def probe_unused(student: nn.Module, objective: Objective, inputs: Inputs, labels: torch.Tensor | None, env: DistEnv, amp: str) -> tuple[list[str], bool]:
    """Which trainable parameters get no gradient: one forward/backward of `objective` on a batch, undone afterwards.

    Returns the names unused on every process, and whether some parameter is used on some
    processes only (then the set depends on the batch, and DDP needs `find_unused_parameters`).
    RNG states, buffers and gradients are restored, so the run continues as if no probe was made.
    """
    rng = rng_state(env.device)
    buffers = {n: b.detach().clone() for n, b in student.named_buffers()}
    with _autocast(env.device, amp):
        loss, _ = objective(student, inputs, labels)
    loss.backward()
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    used = torch.tensor([0.0 if p.grad is None else 1.0 for _, p in params], device=env.device)
    for _, p in params:
        p.grad = None
    with torch.no_grad():
        for n, b in student.named_buffers():
            b.copy_(buffers[n])
    set_rng_state(rng, env.device)
    if env.distributed:
        anywhere, everywhere = used.clone(), used.clone()
        torch.distributed.all_reduce(anywhere, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(everywhere, op=torch.distributed.ReduceOp.MIN)
        return [n for (n, _), a in zip(params, anywhere.tolist()) if not a], bool((anywhere != everywhere).any())
    return [n for (n, _), u in zip(params, used.tolist()) if not u], False


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG the loop's data and model may draw from; on CUDA, this process's GPU only (`device`,
    default the current one), so that a run resumes on any number of GPUs."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if (device is None or device.type == "cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [torch.cuda.get_rng_state(_cuda_index(device))]
    return state


def _cuda_index(device: torch.device | None) -> int:
    return device.index if device is not None and device.index is not None else torch.cuda.current_device()


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore `rng_state`'s RNGs; the CUDA state goes to this process's GPU (`device`, default the current one).

    A state saved before one GPU's state was kept (one per visible GPU) gives this GPU its own
    entry when it has one, else the first.
    """
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    saved = state.get("cuda") or []
    if saved and (device is None or device.type == "cuda") and torch.cuda.is_available():
        index = _cuda_index(device)
        torch.cuda.set_rng_state(saved[index] if len(saved) > 1 and index < len(saved) else saved[0], index)


def _autocast(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def without_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout of `model` to 0 (`nn.Dropout` modules, and the attention dropout rate transformers' attention
    modules keep as a float), in place: a student that only has to match its teacher learns faster without noise."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return model


def warmup_steps(cfg: DistillConfig, steps_per_epoch: int | None, total: int) -> int:
    """`cfg.warmup_steps` when given, else `warmup_epochs` epochs (none for a stream, whose epoch length is unknown); below `total`."""
    steps = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch) if steps_per_epoch else 0
    return max(0, min(steps, total - 1))


StreamStep = tuple[list[tuple[Inputs, torch.Tensor]], StreamState, bool]


def stream_steps(stream: TextStream, pos: Position, cfg: DistillConfig, env: DistEnv) -> Iterator[StreamStep]:
    """The optimizer steps left in `pos.epoch` of a stream: (`accum_steps` micro-batches, the stream's state after them,
    whether it is the epoch's last whole step). One step is read ahead, to know the last."""
    batches = stream.batches(pos.epoch, StreamState.from_dict(pos.stream), cfg.batch_size, env.rank, env.world)

    def step() -> StreamStep | None:
        group = list(islice(batches, cfg.accum_steps))
        return ([b for b, _ in group], group[-1][1], False) if len(group) == cfg.accum_steps else None

    current = step()
    while current is not None:
        following = step()
        yield current[0], current[1], following is None
        current = following


def _too_short(cfg: DistillConfig, env: DistEnv) -> LowrankError:
    """A stream whose epoch holds not one whole step (else the loop would pass over it forever)."""
    return LowrankError(f"the streamed training text holds fewer than one step of {cfg.batch_size * env.world * cfg.accum_steps} sequences "
                        "(distill.batch_size × processes × distill.accum_steps); give more text or lower distill.batch_size")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: its shard under FSDP, the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This process's bytes of `model`'s parameters, their gradients and `optimizer`'s state (under FSDP: its shards)."""
    size = lambda t: _local(t).numel() * _local(t).element_size()  # noqa: E731
    params = list(model.parameters())
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"params": sum(size(p) for p in params), "grads": sum(size(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(size(v) for v in states)}


def _checks_every_step(device: torch.device, env: DistEnv) -> bool:
    """Whether the loss is checked at every step: on one CPU process it is free; elsewhere it would wait on the
    device each step, so it is checked at log steps and before each checkpoint (`_nonfinite_since`)."""
    return device.type == "cpu" and not env.distributed


def _nonfinite_since(bad_losses: torch.Tensor, params: list[torch.Tensor], env: DistEnv) -> bool:
    """Whether any process saw a non-finite loss (counted in `bad_losses`) or holds a non-finite weight: one sync."""
    flags = torch.stack([bad_losses.float().reshape(()), *[(~torch.isfinite(_local(p))).any().float() for p in params]]).max().reshape(1)
    if env.distributed:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return bool(flags.item())


def _mean_over_processes(values: list[torch.Tensor], env: DistEnv) -> list[torch.Tensor]:
    """Each value averaged over the processes (the global batch's loss terms, as one process of that batch would log them)."""
    if not env.distributed or not values:
        return values
    stacked = torch.stack([v.float().reshape(()) for v in values])
    torch.distributed.all_reduce(stacked)
    return list(stacked / env.world)


Checkpoint = Callable[[Position, torch.optim.Optimizer, Any], str]


def train(
    student: nn.Module,
    objective: Objective,
    dataset,
    cfg: DistillConfig,
    env: DistEnv,
    *,
    num_workers: int = 0,
    resume: TrainingState | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    checkpoint: Checkpoint | None = None,
    step_hook: Callable[[Position], None] | None = None,
    schedule: Callable[[int], dict[str, float]] | None = None,
    teacher: nn.Module | None = None,
    blocks: Callable[[nn.Module], list[tuple[str, nn.Module]]] | None = None,
    planner: StepPlanner | None = None,
) -> TrainResult:
    """Train `student` in place on `dataset` to minimise `objective` for `cfg.epochs` epochs.

    `log(record)` is called every `cfg.log_every` steps (and at the last) with the step,
    lr, loss terms and examples/s (`examples_per_s`; `images_per_s` is the same figure, its
    older name); `checkpoint(position, optimizer, scaler)` every `cfg.checkpoint_every`
    steps (0: at each epoch's end) and at the end, returning the path it wrote. `step_hook(position)` runs after each optimizer step (tests interrupt there).
    `schedule(steps_done)` sets per-step state of the model (PC-LoRA's λ) before the first
    step and after each one, from the step alone, so a resumed run continues it exactly; the
    values it returns are logged with the step.
    Parameters no gradient reaches are left as they are and named in `TrainResult.untrained`;
    under DDP they are found by a probe of the first batch and frozen for the run.
    With `cfg.strategy` fsdp on several processes, `student` and the frozen `teacher` the objective runs (when
    given) are sharded per block of `blocks(model)` (the family's) for the run; the result's `student` and
    `teacher` are then plain copies holding the gathered weights (every process gets them), to use from
    here on in place of the ones given. The checkpoint callback gets the optimizer: `fsdp.full_state` gathers it.
    A `planner` (`distill.budget`) times the steps and sets the step count (at most the epochs' and `max_steps`'), the
    learning-rate schedule following it.
    Raises LowrankError, after a checkpoint of the last good weights, if the loss is NaN/inf.
    """
    device, cuda = env.device, env.device.type == "cuda"
    student.to(device).train()
    if not cfg.dropout:
        without_dropout(student)

    stream = isinstance(dataset, TextStream)
    lengths = dataset.lengths() if cfg.group_by_length and hasattr(dataset, "lengths") else None
    sampler = None if stream else EpochSampler(len(dataset), cfg.batch_size, env.rank, env.world, cfg.seed, lengths=lengths)
    steps_per_epoch = None if stream else sampler.batches // cfg.accum_steps
    global_batch = cfg.batch_size * env.world * cfg.accum_steps
    check_steps(train_examples(dataset), cfg, env.world)
    total = total_steps(train_examples(dataset), cfg, env.world)
    warmup = warmup_steps(cfg, steps_per_epoch, total)
    peak = learning_rate(cfg, global_batch)
    optimized = [n for n, p in student.named_parameters() if p.requires_grad]  # before a probe freezes any
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and cfg.amp == "fp16")
    pos = Position()
    if resume is not None:
        if resume.scaler:
            scaler.load_state_dict(resume.scaler)
        pos = Position(**vars(resume.position))
        set_rng_state(resume.rng, device)
        if not stream and pos.batch and pos.batch + cfg.accum_steps > sampler.batches:  # resumed on more processes: this epoch's rest is shorter than a step
            pos.epoch, pos.batch = pos.epoch + 1, 0
    scheduled = schedule(pos.step) if schedule is not None else {}
    untrained: list[str] | None = None
    model: nn.Module = student
    sharded: list[Sharded] = []
    if env.distributed:
        # DDP waits for a gradient of every parameter it reduces: find those no gradient reaches (an unused
        # pooler, a head the loss never reads) on the first batch, and freeze them before wrapping. The
        # optimizer was built with them (they stay in its state, never stepped), so a resume at any world size loads it.
        if stream:
            got = next(stream_steps(dataset, pos, cfg, env), None)
            if got is None:
                raise _too_short(cfg, env)
            inputs, labels = got[0][0]
        else:
            sampler.set_epoch(pos.epoch, pos.batch)
            inputs, labels = next(iter(train_loader(dataset, sampler, num_workers, pin_memory=cuda)))
        untrained, varies = probe_unused(student, objective, inputs_to(inputs, device), labels.to(device), env, cfg.amp)
        named = dict(student.named_parameters())
        for name in untrained:
            named[name].requires_grad_(False)
        if cfg.strategy == "fsdp":
            if blocks is None:
                raise ValueError("distill.strategy 'fsdp' shards the models per block: give train() their `blocks`")
            policy = mixed_precision(device, cfg.amp)
            sharded.append(Sharded(student, [m for _, m in blocks(student)], policy))
            if teacher is not None:
                sharded.append(Sharded(teacher, [m for _, m in blocks(teacher)], policy, frozen=True))
            if varies:  # a parameter some processes use and others not: reduce-scatter zeros for it, as DDP's find_unused_parameters
                if not hasattr(student, "set_reduce_scatter_unused_params"):
                    raise LowrankError(f"some parameters get a gradient on some processes only, which FSDP in torch {torch.__version__} "
                                       "cannot reduce; set distill.strategy to ddp, or use a newer torch")
                student.set_reduce_scatter_unused_params(True)
        else:
            model = DistributedDataParallel(student, device_ids=[device.index] if cuda else None, find_unused_parameters=varies)
    # the optimizer is built over the model as it trains (FSDP's sharded parameters), with what a probe froze
    # (it stays in its state, never stepped), so that a resume at any world size loads it
    optimizer = create_optimizer(student, cfg, peak, optimized)
    if resume is not None:
        load_optimizer_state(student, optimizer, resume.optimizer)
    trainable = [p for p in student.parameters() if p.requires_grad]
    measured: dict[str, int] = {}
    optimizer.zero_grad(set_to_none=True)  # whatever came before (a local stage) leaves no gradient in the first step
    check_every_step = _checks_every_step(device, env)
    bad_losses = torch.zeros((), device=device)  # non-finite losses since the last checkpoint, counted without a sync
    last_saved, checked_step = None, pos.step

    t_start = t_log = time.perf_counter()
    if planner is not None:
        planner.upper = planner.total = min(planner.upper, total)
        total = planner.total
        planner.start(pos.step)
    images_seen, images_since_log, last_terms = 0, 0, {}
    while pos.step < total:
        if stream:
            steps = stream_steps(dataset, pos, cfg, env)
        else:
            sampler.set_epoch(pos.epoch, pos.batch)
            batches = iter(train_loader(dataset, sampler, num_workers, pin_memory=cuda))
        while pos.step < total and (stream or pos.batch + cfg.accum_steps <= sampler.batches):
            if stream:
                got = next(steps, None)
                if got is None and pos.stream is None:
                    raise _too_short(cfg, env)
                if got is None:  # resumed on more processes where this epoch's rest is shorter than a step
                    pos.epoch, pos.batch, pos.stream = pos.epoch + 1, 0, None
                    break
                micro_batches, stream_after, last = got
                batches, stream_before = iter(micro_batches), pos.stream
            lr = lr_at(pos.step, total, warmup, peak, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            terms_sum: dict[str, torch.Tensor] = {}
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.accum_steps):
                inputs, labels = next(batches)
                inputs, labels = inputs_to(inputs, device, non_blocking=True), labels.to(device, non_blocking=True)
                sync = _accumulating(model, sharded, env, micro < cfg.accum_steps - 1)
                with sync:
                    with _autocast(device, cfg.amp):
                        loss, terms = objective(model, inputs, labels)
                    scaler.scale(loss / cfg.accum_steps).backward()
                loss_sum += loss.detach().float() / cfg.accum_steps
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0) + v.float() / cfg.accum_steps
            pos.batch += cfg.accum_steps
            if stream:
                pos.stream = stream_after.to_dict()
            if not check_every_step:
                bad_losses += ~torch.isfinite(loss_sum)
            is_log = (pos.step + 1) % cfg.log_every == 0 or pos.step + 1 == total

            if is_log and env.distributed:
                loss_sum, *averaged = _mean_over_processes([loss_sum, *terms_sum.values()], env)
                terms_sum = dict(zip(terms_sum, averaged))
            if check_every_step or is_log:
                bad = torch.tensor([0.0 if torch.isfinite(loss_sum) else 1.0], device=device)
                if env.distributed:
                    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
                if bad.item():
                    pos.batch -= cfg.accum_steps  # this step did not happen
                    if stream:
                        pos.stream = stream_before
                    finite = not _nonfinite_since(torch.zeros((), device=device), trainable, env)  # every process, or none, saves
                    saved = checkpoint(pos, optimizer, scaler) if checkpoint is not None and finite else None
                    where = f"; saved the weights before this step to {saved}" if saved else ""
                    shown = ", ".join(f"{k}={float(v):.4g}" for k, v in terms_sum.items())
                    raise LowrankError(
                        f"the loss became {float(loss_sum)} at step {pos.step + 1} ({shown}){where}; "
                        "lower the learning rate (distill.lr / distill.lr_base) or set distill.clip_grad"
                    )

            if untrained is None:  # one process: the first backward says which parameters no gradient reaches
                untrained = _no_gradient(student)
            if cfg.clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad, foreach=True)
            scaler.step(optimizer)
            scaler.update()
            if not measured:
                measured = state_bytes(student, optimizer)
            optimizer.zero_grad(set_to_none=True)
            pos.step += 1
            if planner is not None and planner.tick(pos.step):  # the step count that ends in time; the schedule follows it
                total, warmup = planner.total, min(warmup, max(0, planner.total - 1))
                if pos.step == total and not is_log:  # this step is now the last: logged as the last is (every process alike)
                    is_log = True
                    if env.distributed:
                        loss_sum, *averaged = _mean_over_processes([loss_sum, *terms_sum.values()], env)
                        terms_sum = dict(zip(terms_sum, averaged))
            scheduled = schedule(pos.step) if schedule is not None else {}
            images_seen += global_batch
            images_since_log += global_batch
            if (last if stream else pos.batch + cfg.accum_steps > sampler.batches):  # the epoch is done
                pos.epoch, pos.batch, pos.stream = pos.epoch + 1, 0, None

            if is_log:
                now = time.perf_counter()
                last_terms = {"loss": float(loss_sum), **{k: float(v) for k, v in terms_sum.items()}, **scheduled}
                if log is not None:
                    log({"step": pos.step, "total_steps": total, "epoch": pos.epoch, "lr": lr, **last_terms,
                         "examples_per_s": images_since_log / max(now - t_log, 1e-9),
                         "images_per_s": images_since_log / max(now - t_log, 1e-9)})  # the older name, kept for readers of metrics.jsonl
                t_log, images_since_log = now, 0
            epoch_end = pos.batch == 0
            due = (cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0) or (not cfg.checkpoint_every and epoch_end) or pos.step == total
            if checkpoint is not None and due:
                if not check_every_step and _nonfinite_since(bad_losses, trainable, env):  # never write (nor rotate out good ones for) NaN weights
                    where = f"; the last checkpoint, {last_saved}, holds finite weights" if last_saved else ""
                    raise LowrankError(
                        f"the loss or the weights became NaN/inf between step {checked_step + 1} and step {pos.step}; "
                        f"no checkpoint written{where}; lower the learning rate (distill.lr / distill.lr_base) or set distill.clip_grad"
                    )
                bad_losses.zero_()
                last_saved, checked_step = checkpoint(pos, optimizer, scaler), pos.step
            if step_hook is not None:
                step_hook(pos)
            if epoch_end:
                break
    seconds = time.perf_counter() - t_start
    if sharded:  # plain modules with the gathered weights, from here on
        student, teacher = sharded[0].restore(), sharded[1].restore() if len(sharded) > 1 else teacher
    student.eval()
    if env.distributed:
        for name in untrained or []:  # as the caller gave it
            dict(student.named_parameters())[name].requires_grad_(True)
    return TrainResult(pos.step, total, peak, global_batch, seconds, images_seen, last_terms, list(untrained or []), measured, student, teacher)


def _accumulating(model: nn.Module, sharded: list[Sharded], env: DistEnv, accumulate: bool):
    """The context of one micro-batch's backward: gradients kept on this process while `accumulate` (DDP's `no_sync`;
    FSDP: no reduce-scatter), reduced at the last micro-batch of a step."""
    if sharded:
        sharded[0].model.set_requires_gradient_sync(not accumulate)
        return contextlib.nullcontext()
    return model.no_sync() if env.distributed and accumulate else contextlib.nullcontext()
