"""`compress` one transformer block at a time, for a model whose in-memory run would not fit `factorize.max_memory`
(docs/algorithms.md §12).

The model is a skeleton (parameters on the meta device); its weights are read from the checkpoint's files a block at
a time. With ranks allocated across layers (`allocation: sensitivity`), the measurements come first, block by block
(`factorize.blockwise.measure_streamed`), and the ranks are the in-memory path's. Then, for each block in turn:

1. the dense (teacher) block is read; its planned layers are factorized on the block's calibration inputs (whitened
   SVD) into the student block, and the dense outputs become the next block's calibration inputs;
2. the student block is distilled alone against the teacher block (the local stage, `distill.local`), on the cached
   training examples, to its part of the time budget;
3. the held-out examples go one block on through the teacher, the SVD-only student and the distilled student;
4. the student block is written to the run folder's shards, and both blocks are dropped.

The held-out perplexity of all three comes from the model's head at the end. Nothing holds the whole model, so there is
no end-to-end stage: the whole training time goes to the local stage. The cached activations stay in memory within what
`factorize.max_memory` leaves after the blocks' work, and go to memory-mapped files in the run folder beyond that.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank_cli.data.loaders import eval_loader
from lowrank_cli.data.modality import calibration_for, data_notice, load_data
from lowrank_cli.device import resolve_device
from lowrank_cli.distill.budget import Budget
from lowrank_cli.distill.evaluate import Evaluation
from lowrank_cli.distill.local import _Batch, local_batches, train_block
from lowrank_cli.distill.losses import next_token_nll
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize.blockwise import ActivationStore, BlockSource, factorize_block, measure_streamed
from lowrank_cli.factorize.model import allocate_on_bases, check_method
from lowrank_cli.factorize.stream import plan_streamed
from lowrank_cli.io.atomic import atomic_output, write_json
from lowrank_cli.io.manifest import Manifest, finish_factorized
from lowrank_cli.io.rundir import RunDir
from lowrank_cli.io.safetensors import CheckpointHeader, read_header, read_tensors, shard_bytes, shard_writer
from lowrank_cli.measure.macs import count_macs, count_params
from lowrank_cli.measure.memory import available_memory, resident_bytes
from lowrank_cli.models.build import Built
from lowrank_cli.models.family import inputs_to
from lowrank_cli.models.skeleton import hub_skeleton, zero_weights
from lowrank_cli.pipelines.common import build_manifest, recovered_fraction
from lowrank_cli.plan.memory import WORK_PER_BLOCK, block_need, in_memory_need
from lowrank_cli.plan.select import saved_params
from lowrank_cli.recipe import Recipe

Note = Callable[[str], None]
Log = Callable[[dict[str, Any]], None]


@dataclass
class Streamed:
    """A checkpoint that `compress` takes one block at a time: its skeleton, the checkpoint's name of each saved tensor,
    and the memory accounting that chose this path."""

    built: Built
    sources: dict[str, str]
    header: CheckpointHeader
    max_memory: int
    in_memory: int  # bytes the in-memory run needs for its weights (teacher, student, gradients, Adam)
    block_need: int  # bytes one block's work needs (the largest block), or the weights outside the blocks if more
    memory: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, int] | None = None  # each linear's input rows per example (a MAC budget's allocation needs them)


def fmt_bytes(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def streamed_compress(checkpoint, recipe: Recipe, arch: str | None, model_kwargs: dict | None) -> Streamed | None:
    """The block-by-block plan when the in-memory run would need more than `factorize.max_memory` (default: the machine's
    available memory), else None. With the limit given, a LowrankError when such a model cannot be taken one block at a
    time, or when one block's work alone needs more than the limit; by the machine's memory alone, a model or recipe this
    path does not take goes the in-memory way as before."""
    if checkpoint is None:
        return None
    header = read_header(checkpoint)
    need = in_memory_need(sum(t.nbytes for t in header.tensors.values()))
    if recipe.factorize.max_memory is not None:
        return blockwise_plan(checkpoint, header, recipe, arch, model_kwargs, need)
    try:  # by the machine's memory alone: only what this path takes, else the in-memory path as before
        s = blockwise_plan(checkpoint, header, recipe, arch, model_kwargs, need)
        if s is not None:
            _check(s, recipe.with_calibration_default())
        return s
    except LowrankError:
        return None


def one_process_only(s: Streamed, world: int) -> LowrankError:
    """The error for a model that must go one block at a time, asked of `world` processes."""
    return LowrankError(f"the in-memory run needs about {fmt_bytes(s.in_memory)}, more than factorize.max_memory ({fmt_bytes(s.max_memory)}), "
                        f"so the model is compressed one block at a time, which runs in one process, not {world}; run it in one process, "
                        "or raise factorize.max_memory", param="factorize.max_memory")


def blockwise_plan(checkpoint, header: CheckpointHeader, recipe: Recipe, arch: str | None, model_kwargs: dict | None,
                   in_memory: int, trains: bool = True) -> Streamed | None:
    """`Streamed` when `in_memory` bytes exceed `factorize.max_memory` (or the available memory), else None; see
    `streamed_compress`."""
    limit = recipe.factorize.max_memory_bytes()
    if in_memory <= (limit if limit is not None else available_memory()):
        return None
    given = f"factorize.max_memory {recipe.factorize.max_memory}" if limit is not None else f"the available memory ({fmt_bytes(available_memory())})"
    found = hub_skeleton(header, arch, dict(model_kwargs or {})) if Manifest.from_header(header) is None else None
    if found is None and limit is None:  # the machine's memory is only an estimate's default: the in-memory path as before
        return None
    if found is None:
        raise LowrankError(f"{checkpoint}: its in-memory work needs about {fmt_bytes(in_memory)}, more than {given}, and only a "
                           "transformers Hub folder whose weights load as stored is taken one block at a time", param="factorize.max_memory")
    built, sources = found
    prefixes = tuple(f"{name}." for name, _ in built.family.blocks(built.model))
    block_bytes = max(sum(header.tensors[sources[k]].nbytes for k in sources if k.startswith(p)) for p in prefixes)
    outside = sum(header.tensors[v].nbytes for k, v in sources.items() if not k.startswith(prefixes))
    need = block_need(block_bytes, outside, WORK_PER_BLOCK if trains else 2)
    limit = limit if limit is not None else available_memory()
    if need > limit:
        work = "its teacher, its student, the student's gradients and Adam's two moments" if trains else "its teacher and its student"
        raise LowrankError(f"{given} is less than one block's work needs: {fmt_bytes(need)} (a block of {fmt_bytes(block_bytes)} as {work}; "
                           f"the weights outside the blocks: {fmt_bytes(outside)}); "
                           f"give factorize.max_memory of at least {fmt_bytes(need * 1.2)}", param="factorize.max_memory")
    return Streamed(built, sources, header, limit, in_memory, need,
                    {"max_memory": limit, "in_memory_need": in_memory, "block_need": need, "block_bytes": block_bytes, "outside_bytes": outside})


def _check(s: Streamed, recipe: Recipe) -> None:
    """What the block-by-block path does not do, refused in one line before any work."""
    f, task = recipe.factorize, s.built.family.task(s.built.model)
    check_method(recipe, task)
    planned = [p.name for p in plan_streamed(s.built.model, recipe, s.built.family) if p.factorized]
    prefixes = tuple(f"{name}." for name, _ in s.built.family.blocks(s.built.model))
    outside = [name for name in planned if not name.startswith(prefixes)]
    why = None
    if recipe.distill.method == "pclora":
        why = "distill.method 'pclora' trains the whole model"
    elif task.metric != "perplexity":
        why = f"its held-out evaluation is computed for causal language models; this model's task is {task.name}"
    elif f.method == "asvd" or (f.method == "svd" and f.allocation == "sensitivity"):
        why = f"factorize.method '{f.method}' with factorize.allocation '{f.allocation}' is not computed one block at a time (use whitened)"
    elif outside:
        why = f"it would factorize layers outside the transformer blocks ({', '.join(outside[:3])}); exclude them (select.exclude)"
    elif len(set(getattr(getattr(s.built.model, "config", None), "layer_types", None) or ["one"])) > 1:
        why = "its blocks are called with masks of their own (config layer_types: sliding-window and full attention), which one block's call cannot replay"
    elif recipe.distill.local is not None and recipe.distill.local.rounds > 1:
        why = f"distill.local.rounds {recipe.distill.local.rounds} goes over the blocks again (one block at a time goes once: set it to 1)"
    elif f.rank_rule == "budget" and f.method != "whitened" or f.embeddings is not None or recipe.select.latency_aware:
        why = "factorize.embeddings, select.latency_aware and rank_rule 'budget' with another method than whitened need the whole model"
    elif not planned:
        why = f"recipe '{recipe.name}' factorizes no layer of {s.built.architecture}; nothing to compress"
    if why is not None:
        raise LowrankError(f"the model needs more than factorize.max_memory ({fmt_bytes(s.max_memory)}) in memory and is compressed one block "
                           f"at a time, but {why}; raise factorize.max_memory", param="factorize.max_memory")


@dataclass
class _Chains:
    """Per batch of a group (calibration, local stage, held out): the call that replays the blocks, and the mask."""

    calls: list
    masks: list

    def meta(self) -> list[_Batch]:
        return [_Batch(c, m) for c, m in zip(self.calls, self.masks)]


def compress_streamed(s: Streamed, checkpoint, recipe: Recipe, run: RunDir, *, device: str = "auto", note: Note | None = None,
                      log: Log | None = None, started: float | None = None, resume: bool = False) -> dict[str, Any]:
    """Compress `checkpoint` one block at a time into the run folder `run` (held by the caller: new, or with `resume` a
    streamed run of the same recipe, which goes on after its last finished block); the report."""
    started = time.perf_counter() if started is None else started
    note = note or (lambda _msg: None)
    recipe = recipe.with_calibration_default()
    _check(s, recipe)
    state = StreamState.load(run, recipe) if resume else None
    built, dev = s.built, resolve_device(device)
    model, family = built.model, built.family
    data = load_data(recipe, family, model, built.folder)
    if data_notice(data):
        note(data_notice(data))
    f = recipe.factorize
    calibration = None
    if f.method == "whitened" or f.allocation == "sensitivity":
        calibration = calibration_for(f.calib_data, family, model, built.folder, f.calib_samples, f.calib_batch_size,
                                      recipe.data.max_length, recipe.data.text_field)
    plans = plan_streamed(model, recipe, family)
    before = count_params(model)
    macs = count_macs(zero_weights(model), family.example_at(model), family.forward)  # weights of no memory
    s.rows = macs.linear_rows
    note(f"{fmt_bytes(s.in_memory)} in memory is more than {fmt_bytes(s.max_memory)} (factorize.max_memory): compressing one block at a time "
         f"({len(family.blocks(model))} blocks, {fmt_bytes(s.block_need)} for a block's work)")
    # what the limit leaves beyond this process as it stands (the libraries, the data) and one block's work
    store = ActivationStore(run.root / ".activations", max(0, s.max_memory - resident_bytes() - s.block_need))
    try:
        with read_tensors(s.header) as reader:
            src = BlockSource(model, family, reader.get_tensor, s.sources, dev)
            report = _compress(s, src, recipe, run, plans, calibration, data, store, state, _Hooks(note, log, started), reader)
    finally:
        store.close()
    report.update({"params_before": before, "params_after": before - saved_params(plans), "macs_before": macs.macs,
                   "macs_after": macs.macs_after(plans)})
    report["streamed"].update({"activations_peak_memory": store.peak_memory, "activations_peak_disk": store.peak_disk})
    write_json(run.report_file, report)
    shutil.rmtree(run.root / ".stream", ignore_errors=True)  # the run is complete: its progress is no longer needed
    return report


@dataclass
class _Hooks:
    note: Note
    log: Log | None
    started: float


class StreamState:
    """A streamed run's progress in `<run>/.stream/`: `state.json` (the ranks chosen, the finished blocks' records) and, for
    each finished block, `block-NNNN.safetensors` (its student weights and the local stage's random state after it). A
    block counts once its record is in `state.json`, which is written after its file, atomically."""

    def __init__(self, run: RunDir, ranks: dict[str, list], allocation: dict | None, records: list[dict[str, Any]],
                 allocation_record: dict | None = None):
        self.run, self.ranks, self.allocation, self.records = run, ranks, allocation, records
        self.allocation_record = allocation_record  # what the manifest records of a sensitivity allocation

    @property
    def folder(self) -> Path:
        return self.run.root / ".stream"

    @property
    def done(self) -> int:
        return len(self.records)

    def block_file(self, i: int) -> Path:
        return self.folder / f"block-{i:04d}.safetensors"

    @classmethod
    def load(cls, run: RunDir, recipe: Recipe) -> "StreamState":
        run.check_same_recipe(recipe)
        path = run.root / ".stream" / "state.json"
        if not path.is_file():
            raise LowrankError(f"{run.root}: holds no run compressed one block at a time with a finished block; start it again, "
                               "without resuming, in a new output folder", param="resume")
        try:
            saved = json.loads(path.read_text())
            return cls(run, dict(saved["ranks"]), saved.get("allocation"), list(saved["records"]), saved.get("allocation_record"))
        except (ValueError, KeyError, TypeError) as e:
            raise LowrankError(f"{path}: is not a block-by-block run's progress file ({type(e).__name__}: {e}); start the run again in a "
                               "new output folder", param="resume") from None

    def save(self) -> None:
        self.folder.mkdir(exist_ok=True)
        write_json(self.folder / "state.json", {"ranks": self.ranks, "allocation": self.allocation, "records": self.records,
                                                "allocation_record": self.allocation_record})

    def finish_block(self, i: int, student: nn.Module, generator: torch.Generator, record: dict[str, Any], plans: list) -> None:
        self.folder.mkdir(exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
        with atomic_output(self.block_file(i), force=True) as tmp:  # a block redone after a kill between its file and the state
            save_file({**tensors, GENERATOR: generator.get_state()}, str(tmp))
        self.ranks.update(_ranks(plans))
        self.records.append(record)
        self.save()

    def restore_block(self, i: int, student: nn.Module, generator: torch.Generator) -> None:
        tensors = load_file(str(self.block_file(i)))
        generator.set_state(tensors.pop(GENERATOR))
        student.load_state_dict(tensors, strict=True)


GENERATOR = "__lowrank_generator_state__"


def discard_streamed(run: RunDir) -> None:
    """After a failure of a run this command started: one with a finished block (or whose progress cannot be read, or that
    finished) stays; one without is removed (`RunDir.discard`), its progress folder too."""
    state = run.root / ".stream" / "state.json"
    if run.report_file.exists():
        return
    if state.is_file():
        try:
            records = json.loads(state.read_text()).get("records")
        except (ValueError, AttributeError):
            return
        if records:
            return
    shutil.rmtree(run.root / ".stream", ignore_errors=True)
    shutil.rmtree(run.root / ".shards", ignore_errors=True)
    run.discard()


def _ranks(plans: list) -> dict[str, list]:
    return {p.name: [p.factorized, p.rank, p.reason] for p in plans}


def _restore_ranks(plans: list, ranks: dict[str, list]) -> None:
    for p in plans:
        if p.name in ranks:
            p.factorized, p.rank, p.reason = ranks[p.name]


def _compress(s: Streamed, src: BlockSource, recipe: Recipe, run: RunDir, plans, calibration, data, store: ActivationStore,
              state: StreamState | None, hooks: _Hooks, reader) -> dict[str, Any]:
    f, family = recipe.factorize, s.built.family
    allocation = None
    allocated = f.allocation == "sensitivity" or f.rank_rule == "budget"
    if state is not None:
        _restore_ranks(plans, state.ranks)
        allocation = state.allocation
        hooks.note(f"resuming {run.root}: {state.done} of {len(src)} blocks done; their forward passes are replayed")
    else:
        if allocated:
            hooks.note("measuring each layer's spectrum and sensitivity, one block at a time (a forward and a backward pass)")
            progress = None if hooks.log is None else (lambda done, total: hooks.log({"stage": "measure", "done": done, "blocks": total}))
            sigmas, unit, sens = measure_streamed(src, plans, recipe, calibration, family.task(s.built.model), store, progress=progress)
            chosen = allocate_on_bases(plans, recipe, sigmas.__getitem__, sens, unit, s.rows)
            allocation = chosen.to_dict()
            record = chosen.manifest_record() if chosen.allocation == "sensitivity" else None
        run.create(recipe, {"teacher": str(s.header.folder or ""), "data": data.source, "world_size": 1, "device": str(src.device),
                            "base_loss": "local", "streamed": s.memory, **({"allocation": allocation} if allocation is not None else {})})
        state = StreamState(run, _ranks(plans) if allocated else {}, allocation, [], record if allocated else None)
        state.save()
    groups = _first_inputs(src, recipe, calibration, data)
    budget = _budget(recipe.distill, hooks.started, s, hooks.note, _end_seconds(src, groups["val"]) if recipe.distill.budget else 0.0)
    if budget is not None:
        run.update_info({"budget": budget.record})
    local = _blocks(src, recipe, plans, groups, store, state, budget, allocated, hooks)
    hooks.note("writing the student's shards")
    manifest = _write_student(s, src, recipe, run, plans, state, reader, data.source)
    family.write_hub_files(run.root, s.built.architecture, s.built.model_kwargs, s.header.folder)
    evals = _head_evaluations(src, groups["val"], store)
    seconds = time.perf_counter() - hooks.started
    report = {"run": str(run.root), "student": str(run.root), "architecture": s.built.architecture, "architecture_source": s.built.source,
              "accuracy": evals, "task": family.task(s.built.model).name, "method": "local",
              "recovered_fraction": recovered_fraction(*(-math.log(e["perplexity"]) for e in evals.values())),
              "train": {"steps": 0, "seconds": 0.0, "lr": recipe.distill.local.lr if recipe.distill.local else 0.0, "global_batch": 0,
                        "examples_per_s": 0.0, "end_to_end": "skipped: the model is compressed one block at a time"},
              "local": local, "data": {"source": data.source, "val": len(data.val)}, "layers": len(manifest.layers),
              **({"allocation": allocation} if allocation is not None else {}),
              "streamed": dict(s.memory), "world_size": 1, "seconds": seconds,
              "curve": [{"step": 0, "stage": "local", "seconds": seconds, "eval": evals["distilled"]}]}
    if budget is not None:
        budget.record["command_seconds"] = seconds
        report["budget"] = budget.record
    run.update_info({"local": local, **({"budget": budget.record} if budget is not None else {})})
    return report


def _write_student(s: Streamed, src: BlockSource, recipe: Recipe, run: RunDir, plans, state: StreamState, reader, data_source) -> Manifest:
    """The student's shards in the run folder: the tensors outside the blocks as stored, each block's from its file."""
    tmp = run.root / ".shards"  # written whole there, then moved into place: no half-written shard in the run folder
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with shard_writer(tmp, shard_bytes(None)) as writer:
        for key in src.keys:
            if src.outside(key):
                writer.add(key, reader.get_tensor(s.sources[key]))
        for i in range(len(src)):
            for key, value in load_file(str(state.block_file(i))).items():
                if key != GENERATOR:
                    writer.add(src.prefix(i) + key, value)
        manifest = build_manifest(s.built.architecture, s.built.family.name, s.built.model_kwargs, plans, recipe, s.header.folder,
                                  recipe.factorize.method)
        if state.allocation_record is not None:
            manifest = manifest.replace(allocation=state.allocation_record)
        record = {"teacher": {"file": str(s.header.folder)}, "data": data_source, "method": "local", "steps": 0}
        manifest = finish_factorized(writer, manifest.replace(distill=record))
    for path in sorted(tmp.iterdir(), key=lambda p: p.name.endswith(".json")):  # the index last
        os.replace(path, run.root / path.name)
    tmp.rmdir()
    return manifest


def _first_inputs(src: BlockSource, recipe: Recipe, calibration, data) -> dict[str, Any]:
    """Each group of batches (calibration, the local stage's training examples, the held-out examples) with its first
    block's inputs: the weights outside the blocks read once for all."""
    cfg = recipe.distill
    groups: dict[str, list] = {"calib": list(calibration) if recipe.factorize.method == "whitened" else [],
                               "local": local_batches(data.train, cfg.local, cfg.seed, cfg.group_by_length) if cfg.local is not None else [],
                               "val": [inputs for inputs, _ in eval_loader(data.val, 16, 0, pin_memory=False)]}
    batches = [b[0] if isinstance(b, (tuple, list)) else b for name in groups for b in groups[name]]
    hidden, calls, masks = src.first_inputs(batches)
    out, i = {}, 0
    for name, items in groups.items():
        n = len(items)
        out[name] = (hidden[i:i + n], _Chains(calls[i:i + n], masks[i:i + n]), batches[i:i + n])
        i += n
    return out


def _end_seconds(src: BlockSource, val) -> float:
    """The time the work after the blocks will take: the head on every held-out example for each of the three models, timed
    on one example here."""
    hidden, chain, batches = val
    if not batches:
        return 0.0
    src.load_outside()
    try:
        one = inputs_to({k: v[:1] if torch.is_tensor(v) and v.dim() else v for k, v in batches[0].items()}, src.device)
        with torch.no_grad():
            src.runner.head(one, hidden[0][:1], chain.calls[0].tuple_out)  # once unmeasured: the first call's set-up
            t0 = time.perf_counter()
            src.runner.head(one, hidden[0][:1], chain.calls[0].tuple_out)
            per_example = time.perf_counter() - t0
    finally:
        src.drop_outside()
    return 3 * per_example * sum(h.shape[0] for h in hidden)


def _budget(cfg, started: float, s: Streamed, note: Note, end_seconds: float) -> Budget | None:
    if cfg.budget is None:
        return None
    budget = Budget(cfg.budget_seconds(), started, cfg.budget)
    setup = time.perf_counter() - started
    # the head's evaluations, the student's shards written from the blocks' files (read and written at 100 MB/s), and 1 % for the rest
    reserve = 1.2 * end_seconds + 2 * s.memory["in_memory_need"] / 5 / 1e8 + 2.0 + 0.01 * budget.seconds
    budget.check_room(setup, 0.0, reserve)
    note(f"time budget {cfg.budget}: {setup:.0f} s for loading and measuring; {budget.record['training_seconds'] / 60:.1f} min for the "
         "blocks (each one's factorization, local stage and evaluation)")
    return budget


def _blocks(src: BlockSource, recipe: Recipe, plans: list, groups: dict, store: ActivationStore, state: StreamState,
            budget: Budget | None, allocated: bool, hooks: _Hooks) -> dict[str, Any]:
    """Every block in turn (see the module docstring), the finished ones of a resumed run replayed from their files; the
    local stage's record."""
    cfg = recipe.distill
    local_cfg = cfg.local
    student_chain = local_cfg is not None and local_cfg.inputs == "student"
    calib, calib_chain, _ = groups["calib"]
    local_in, local_chain, _ = groups["local"]
    val_in, val_chain, _ = groups["val"]
    n_local, examples = len(local_in), sum(h.shape[0] for h in local_in)
    for name, tensors in (("calib", calib), ("t_local", local_in), ("s_local", local_in if student_chain else []),
                          ("t_val", val_in), ("svd_val", val_in), ("s_val", val_in)):
        store.put(name, tensors)
    for key in ("calib", "local", "val"):  # the store holds them now (in memory or on disk)
        groups[key] = (None, *groups[key][1:])
    del calib, local_in, val_in
    todo = {p.name: p for p in plans if p.factorized}
    gen = torch.Generator().manual_seed(cfg.seed)
    t0, after_training, n = time.perf_counter(), 0.0, len(src)
    deadline = None if budget is None else budget.deadline - budget.reserve
    if budget is not None:
        budget.record["local"] = {"planned_seconds": deadline - t0, "max_steps": local_cfg.steps if local_cfg else 0}
    for b in range(n):
        replay = b < state.done
        until = None
        if deadline is not None and not replay:
            now = time.perf_counter()
            until = (now + max(0.0, deadline - now) / (n - b) - after_training, deadline)
        block = src.load(b)
        calibrated = (store.get("calib"), calib_chain.calls, calib_chain.masks) if recipe.factorize.method == "whitened" else None
        student, calib_out = factorize_block(block, src.prefix(b), todo, recipe, src.device, allocated or replay, calibrated)
        if calib_out is not None:
            store.put("calib", calib_out)
        with torch.no_grad():
            store.put("t_val", [c(block, h) for c, h in zip(val_chain.calls, store.get("t_val"))])
            store.put("svd_val", [c(student, h) for c, h in zip(val_chain.calls, store.get("svd_val"))])
        entry = {"block": src.runner.names[b], "index": b, "round": 1, "steps": 0}
        if replay:
            state.restore_block(b, student, gen)
            _advance(block, student, store, local_chain, student_chain)
        elif local_cfg is not None and n_local and deadline is not None and time.perf_counter() >= deadline:
            entry["untrained"] = True  # out of time: the block stays as SVD left it, its chains move on
            _advance(block, student, store, local_chain, student_chain)
        elif local_cfg is not None and n_local:
            entry.update(_train(block, student, store, local_chain, local_cfg, gen, until, student_chain))
        t_after = time.perf_counter()
        with torch.no_grad():
            store.put("s_val", [c(student, h) for c, h in zip(val_chain.calls, store.get("s_val"))])
        if not replay:
            entry["seconds"] = time.perf_counter() - t0
            state.finish_block(b, student, gen, entry, plans)
            if hooks.log is not None:
                hooks.log({"stage": "local", **entry, "done": b + 1, "blocks": n})
            state.run.append_metrics({"step": 0, "stage": "local", **entry})
        src.drop(b)
        del student, block
        after_training = time.perf_counter() - t_after
    record = {"blocks": state.records, "seconds": time.perf_counter() - t0, "examples": examples,
              "tokens": sum(int(m.sum()) for m in local_chain.masks if m is not None),
              **({"untrained": [e["block"] for e in state.records if e.get("untrained")]} if any(e.get("untrained") for e in state.records) else {})}
    if budget is not None:
        budget.record["local"].update({"seconds": record["seconds"], "steps": [e["steps"] for e in state.records]})
    return record


def _advance(block: nn.Module, student: nn.Module, store: ActivationStore, chain: _Chains, student_chain: bool) -> None:
    """A finished block replayed: the local stage's chains one block on, without training."""
    with torch.no_grad():
        if student_chain:
            store.put("s_local", [c(student, h) for c, h in zip(chain.calls, store.get("s_local"))])
        store.put("t_local", [c(block, h) for c, h in zip(chain.calls, store.get("t_local"))])


def _train(block, student, store: ActivationStore, chain: _Chains, cfg, gen, until, student_chain: bool) -> dict[str, Any]:
    """The local stage on one block: the teacher block's outputs the target, the student trained from its own chain's
    inputs (or the teacher's); both chains move one block on."""
    with torch.no_grad():
        target = [c(block, h) for c, h in zip(chain.calls, store.get("t_local"))]
    source = store.get("s_local") if student_chain else store.get("t_local")
    before, after, outs, steps, reverted = train_block(student, source, target, chain.meta(), cfg, gen, until)
    if student_chain:
        store.put("s_local", outs)
    store.put("t_local", target)
    return {"error_before": before, "error_after": before if reverted else after, "steps": steps,
            **({"reverted": True, "error_trained": after} if reverted else {})}


def _head_evaluations(src: BlockSource, val, store: ActivationStore) -> dict[str, dict | None]:
    """Held-out perplexity of the teacher, the SVD-only and the distilled student from their last blocks' outputs."""
    _, chain, batches = val
    src.load_outside()
    out = {}
    try:
        for label, name in (("teacher", "t_val"), ("svd", "svd_val"), ("distilled", "s_val")):
            nll = tokens = 0.0
            examples = 0
            with torch.no_grad():
                for inputs, call, hidden in zip(batches, chain.calls, store.get(name)):
                    inputs = {k: v.to(src.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
                    for i in range(hidden.shape[0]):  # one example at a time: a vocabulary's logits for one sequence
                        one = {k: v[i:i + 1] if torch.is_tensor(v) and v.dim() and v.shape[0] == hidden.shape[0] else v for k, v in inputs.items()}
                        logits = src.runner.head(one, hidden[i:i + 1], call.tuple_out)
                        total, count = next_token_nll(logits, one["input_ids"], one.get("attention_mask"))
                        nll, tokens = nll + float(total), tokens + float(count)
                    examples += hidden.shape[0]
            out[label] = Evaluation(examples=examples, perplexity=math.exp(nll / max(tokens, 1))).to_dict()
    finally:
        src.drop_outside()
    return out
