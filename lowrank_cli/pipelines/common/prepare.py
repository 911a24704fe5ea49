"""A distillation run prepared: every input checked, teacher, student and data built, nothing written.

`prepare_compress` (a dense checkpoint: the student is factorized here) and `prepare_distill` (a
factorized checkpoint and its original) both return a `PreparedRun`; `run_loop.run_distillation`
trains it. The task (`models.tasks`) resolves the base loss; `data.modality` loads the data.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from lowrank_cli.data.images import ImageData
from lowrank_cli.data.modality import calibration_for, data_notice, load_data, split_record
from lowrank_cli.data.text import TextData
from lowrank_cli.device import resolve_device
from lowrank_cli.distill.distributed import DistEnv, from_main, on_main_alone
from lowrank_cli.distill.train import check_steps, train_examples
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize.model import check_method, factorize_model
from lowrank_cli.factorize.pclora import apply_pclora
from lowrank_cli.io.manifest import Manifest
from lowrank_cli.io.rundir import RunDir
from lowrank_cli.io.safetensors import read_header, sha256_file
from lowrank_cli.models.build import build_model
from lowrank_cli.models.family import ModelFamily, model_classes
from lowrank_cli.models.tasks import Task
from lowrank_cli.pipelines.common import build_manifest, hint_of, with_max_memory
from lowrank_cli.pipelines.common.streamed import one_process_only, streamed_compress
from lowrank_cli.plan.select import plan_embeddings, plan_layers
from lowrank_cli.recipe import Recipe, parse_duration, recipe_from_dict


def with_run_options(recipe: Recipe, data: str | None = None, epochs: int | None = None, strategy: str | None = None,
                     budget: str | None = None, max_memory: str | None = None) -> Recipe:
    """The recipe with the data source, the number of epochs, the distillation strategy and the time budget given (a copy).
    A source given replaces the recipe's with its digits-only setting (`data.max_shift`) unless it is digits too."""
    recipe = recipe.model_copy(deep=True)
    if data is not None:
        keep = recipe.data.max_shift if str(data) == "digits" else None
        recipe.data = recipe.data.model_copy(update={"source": str(data), "max_shift": keep})
    if epochs is not None:
        if epochs < 1:
            raise LowrankError(f"epochs must be at least 1 (got {epochs})", param="epochs")
        recipe.distill = recipe.distill.model_copy(update={"epochs": int(epochs)})
    if strategy is not None:
        if strategy not in ("ddp", "fsdp"):
            raise LowrankError(f"strategy '{strategy}' is not one of ddp, fsdp", param="strategy")
        recipe = recipe_from_dict({**recipe.to_dict(), "distill": {**recipe.distill.model_dump(mode="json"), "strategy": strategy}},
                                  source=f"recipe '{recipe.name}' with strategy {strategy}")
    if budget is not None:
        try:
            parse_duration(budget)
        except ValueError as e:
            raise LowrankError(f"budget '{budget}': {e}", param="budget") from None
        recipe = recipe_from_dict({**recipe.to_dict(), "distill": {**recipe.distill.model_dump(mode="json"), "budget": budget}},
                                  source=f"recipe '{recipe.name}' with budget {budget}")
    return with_max_memory(recipe, max_memory)


def check_token_noise(recipe: Recipe, family: ModelFamily, model: nn.Module) -> None:
    """`distill.token_noise` replaces tokens: a one-line error, before any work, for a model whose data is not text."""
    modality = family.data_config(model).modality
    if recipe.distill.token_noise and modality != "text":
        raise LowrankError(f"distill.token_noise {recipe.distill.token_noise:g} replaces tokens of text; this model's data is "
                           f"{modality}: set distill.token_noise to 0", param="distill.token_noise")


@dataclass
class PreparedRun:
    """Everything checked and built, nothing written yet."""

    recipe: Recipe
    family: ModelFamily
    teacher: nn.Module
    student: nn.Module
    manifest: Manifest
    data: ImageData
    run: RunDir
    env: DistEnv
    base: str
    teacher_file: Path | None
    resume_from: tuple[Path, Path] | None = None
    labels_match: bool = True  # False: classification data whose labels are not the model's classes (no accuracy to report)
    info: dict[str, Any] = field(default_factory=dict)
    task: Task | None = None  # the teacher's (None: asked of the family); its `.name` is what the report records
    folder: Path | None = None  # the teacher's Hub folder: its config and tokenizer go into the run folder
    calibration: list | None = None  # factorize.method whitened | asvd: the calibration batches the student was factorized on
    started: float = field(default_factory=time.perf_counter)  # when the command began (calibration included): the curve's clock

    def __post_init__(self) -> None:
        if self.task is None:
            self.task = self.family.task(self.teacher)


def run_folder(recipe: Recipe, out: str | Path | None, resume: bool) -> tuple[RunDir, tuple[Path, Path] | None]:
    """The run folder, checked: free of another writer, and empty (a new run) or holding this recipe's run (resume)."""
    run = RunDir(out or Path("runs") / recipe.name)
    run.check_free()
    if resume:
        return run, run.check_resumable(recipe)
    run.check_new()
    return run, None


@contextlib.contextmanager
def claimed(p: PreparedRun) -> Iterator[None]:
    """Hold the run folder's lock (rank 0) and check it again under the lock: what `prepare_*` saw may have changed."""
    if not p.env.is_main:
        yield
        return
    with p.run.locked():
        if p.resume_from is not None:
            p.resume_from = p.run.check_resumable(p.recipe)
        else:
            p.run.check_new()
        yield


def _compress_inputs(checkpoint: str | Path | None, recipe: Recipe, arch: str | None, model_kwargs: dict | None, out: str | Path | None,
                     resume: bool, note: Callable[[str], None] | None = None) -> tuple:
    """(checkpoint, recipe with its calibration default, the built teacher, data, run folder, what to resume from): every
    input of `compress` checked, nothing factorized or written; `note` hears which data a text recipe uses when it is not the
    user's (the built-in text), before calibration uses it."""
    if checkpoint is None and recipe.checkpoint:
        checkpoint = recipe.checkpoint
    if checkpoint is None:
        raise LowrankError("give the checkpoint to compress (argument `checkpoint`, recipe key `checkpoint`)", param="checkpoint")
    recipe = recipe.with_calibration_default()  # whitened | asvd calibrate on the training data; the run's recipe says so (and resumes)
    header = read_header(checkpoint)
    if Manifest.from_header(header) is not None:
        raise LowrankError(f"{checkpoint}: is already factorized; compress the original checkpoint, or distill it against its original (`distill_checkpoint`, `lowrank distill`)")
    built = build_model(checkpoint, arch, dict(model_kwargs or {}), hint=hint_of(recipe))
    check_method(recipe, built.family.task(built.model))
    check_token_noise(recipe, built.family, built.model)
    data = load_data(recipe, built.family, built.model, built.folder)
    run, resume_from = run_folder(recipe, out, resume)
    if note is not None and data_notice(data):
        note(data_notice(data))
    return checkpoint, recipe, built, data, run, resume_from


def check_compress(checkpoint: str | Path | None, recipe: Recipe, *, arch: str | None = None, model_kwargs: dict | None = None,
                   out: str | Path | None = None, resume: bool = False, world: int = 1) -> RunDir:
    """What a launcher checks before torchrun starts `world` processes of `compress`: every input as `prepare_compress`
    checks it and one optimizer step of training data for each process; no calibration, no factorization, and no model
    kept (the processes build their own). Returns the run folder (for its lock); writes nothing."""
    if world > 1 and recipe.factorize.max_memory is not None:  # before the launcher builds the model it could not hold
        streamed = streamed_compress(checkpoint or recipe.checkpoint, recipe, arch, model_kwargs)
        if streamed is not None:
            raise one_process_only(streamed, world)
    _checkpoint, recipe, built, data, run, _resume_from = _compress_inputs(checkpoint, recipe, arch, model_kwargs, out, resume)
    check_steps(train_examples(data.train), recipe.distill, world)
    if recipe.distill.method != "pclora":  # the selection alone (no SVD): a recipe that picks no layer is refused here, not in the processes
        plans = plan_layers(built.family.linear_candidates(built.model), recipe)
        if recipe.factorize.embeddings is not None:
            plans += plan_embeddings(built.family.embedding_candidates(built.model), recipe)
        if not any(p.factorized or (p.reason is None and p.rank is None) for p in plans):  # rank None: set by its SVD (energy)
            raise LowrankError(f"recipe '{recipe.name}' factorizes no layer of {built.architecture}; nothing to distill")
    return run


def check_world_steps(p: PreparedRun, world: int) -> None:
    """A LowrankError unless the prepared run's training data make one optimizer step on each of `world` processes."""
    check_steps(train_examples(p.data.train), p.recipe.distill, world)


def _factorize_once(env: DistEnv, student: nn.Module, recipe: Recipe, family: ModelFamily, calibrate: Callable[[], list | None], device,
                    source: tuple) -> tuple[Manifest, Any, list | None]:
    """Rank 0 calibrates (`calibrate()`), factorizes `student` and sends its manifest; every other process gives its copy the
    same low-rank structure (in the dense layers' dtypes; the weights come from rank 0 later, `distributed.broadcast_module`).
    An error on rank 0 is raised on every process. (manifest, allocation and calibration: rank 0's; None elsewhere)."""
    arch, model_kwargs, checkpoint = source
    allocation, calibration, sent = None, None, ""
    with on_main_alone(env, "calibration and factorization"):
        if env.is_main:
            calibration = calibrate()
            factorized = factorize_model(student, recipe, family=family, calibration=calibration, device=device)
            if not any(p.factorized for p in factorized.plans):
                raise LowrankError(f"recipe '{recipe.name}' factorizes no layer of {arch}; nothing to distill")
            allocation = factorized.allocation
            manifest = build_manifest(arch, family.name, model_kwargs, factorized.plans, recipe, checkpoint, method=recipe.factorize.method,
                                      allocation=allocation)
            sent = json.dumps(manifest.to_dict())
    got = from_main(env, sent)
    if env.is_main:
        return manifest, allocation, calibration
    manifest = Manifest.from_dict(json.loads(got), source="process 0's factorization")
    dtypes = {name: next(student.get_submodule(name).parameters()).dtype for name in manifest.layers}
    manifest.apply(student)
    for name, dtype in dtypes.items():
        student.get_submodule(name).to(dtype)
    return manifest, None, None


def prepare_compress(checkpoint: str | Path | None, recipe: Recipe, *, arch: str | None = None, model_kwargs: dict | None = None,
                     out: str | Path | None = None, resume: bool = False, device: str = "auto", env: DistEnv | None = None,
                     started: float | None = None, note: Callable[[str], None] | None = None) -> PreparedRun:
    """Check the inputs of `compress` and build teacher, SVD student and data; write nothing. `started`: when the command
    began (`time.perf_counter()`; default now), the clock of the curve and of `distill.budget`; `note`: as `_compress_inputs`'."""
    started = time.perf_counter() if started is None else started
    dev = resolve_device(device)
    checkpoint, recipe, built, data, run, resume_from = _compress_inputs(checkpoint, recipe, arch, model_kwargs, out, resume, note)
    teacher, family, arch = built.model, built.family, built.architecture
    svd_dev = env.device if env is not None else dev  # under torchrun: this process's GPU, not cuda:0 for every process
    student = copy.deepcopy(teacher)
    pclora = recipe.distill.method == "pclora"
    # several processes: rank 0 alone calibrates and factorizes, the others take the structure it chose here and its weights
    # after its local stage (`run_loop`); PC-LoRA's adapters are set up alike on every process from the seed
    shared = env is not None and env.distributed and not pclora
    calibration = None

    def calibrate() -> list | None:
        if recipe.factorize.method == "svd" and recipe.factorize.allocation != "sensitivity":
            return None
        f = recipe.factorize  # on factorize.calib_data (defaulted above)
        return calibration_for(f.calib_data, family, teacher, built.folder, f.calib_samples, f.calib_batch_size, recipe.data.max_length,
                               recipe.data.text_field)

    allocation = None
    # PC-LoRA: the dense layers with adapters beside them, finalized to LowRankLinear at the end
    if pclora:
        plans = apply_pclora(student, recipe, recipe.distill.pclora.init, recipe.distill.seed, family=family, device=svd_dev)
    elif shared:
        manifest, allocation, calibration = _factorize_once(env, student, recipe, family, calibrate, svd_dev, (arch, built.model_kwargs, checkpoint))
    else:
        calibration = calibrate()
        factorized = factorize_model(student, recipe, family=family, calibration=calibration, device=svd_dev)
        plans, allocation = factorized.plans, factorized.allocation
    if not shared:
        if not any(p.factorized for p in plans):
            raise LowrankError(f"recipe '{recipe.name}' factorizes no layer of {arch}; nothing to distill")
        manifest = build_manifest(arch, family.name, built.model_kwargs, plans, recipe, checkpoint, method="pclora" if pclora else recipe.factorize.method,
                                  allocation=allocation)
    task = family.task(teacher)
    base, match = task.base_loss(recipe.distill.base_loss, model_classes(teacher), data.num_classes, data.source)
    info = {"architecture": {"name": arch, "source": built.source, **({"note": built.note} if built.note else {})}}
    if allocation is not None:  # rank_rule budget or allocation sensitivity: the ranks beside uniform κ's (and each layer's c_l)
        info["allocation"] = allocation.to_dict()
    return PreparedRun(recipe, family, teacher, student, manifest, data, run, env or DistEnv(device=dev), base, Path(checkpoint), resume_from, match,
                       {**info, **_split_note(data)}, task, built.folder, calibration, started)


def prepare_distill(factorized: str | Path, teacher_file: str | Path, recipe: Recipe | None, *, out: str | Path | None = None,
                    resume: bool = False, device: str = "auto", data: str | None = None, epochs: int | None = None,
                    strategy: str | None = None, env: DistEnv | None = None, note: Callable[[str], None] | None = None,
                    budget: str | None = None, started: float | None = None) -> PreparedRun:
    """Check the inputs of `distill` (a factorized student and its original as the teacher); `started` as `prepare_compress`'s."""
    started = time.perf_counter() if started is None else started
    dev = resolve_device(device)
    manifest = Manifest.from_header(read_header(factorized))
    if manifest is None:
        raise LowrankError(f"{factorized}: is not factorized (no lowrank manifest); run `lowrank compress` on it, or `lowrank factorize` first")
    if manifest.weight_only:
        raise LowrankError(f"{factorized}: was factorized weight-only (no architecture); distillation needs a model architecture")
    if recipe is not None and note is not None and manifest.recipe is not None:
        differs = [k for k in ("select", "factorize") if recipe.to_dict().get(k) != manifest.recipe.get(k)]
        if differs:
            note(f"the recipe's {' and '.join(differs)} sections are not used: {factorized} is already factorized (its manifest says how)")
    recipe = recipe or recipe_from_dict(manifest.recipe or {}, source=f"{factorized} (its manifest's recipe)")
    recipe = with_run_options(recipe, data, epochs, strategy, budget)
    if recipe.distill.method == "pclora":
        raise LowrankError(f"{factorized}: distill.method 'pclora' starts from the dense model, not a factorized one; "
                           "compress the original checkpoint with this recipe instead")
    if Manifest.from_header(read_header(teacher_file)) is not None:
        raise LowrankError(f"teacher {teacher_file}: is a factorized checkpoint; the teacher is the original dense model", param="teacher")
    student = build_model(factorized)
    arch = manifest.architecture
    try:
        teacher = build_model(teacher_file, arch, manifest.model_kwargs, family=manifest.family)
    except LowrankError as e:
        raise LowrankError(f"teacher {teacher_file} does not match the student's architecture '{arch}': {str(e).split(': ', 1)[-1]}", param="teacher") from None
    check_token_noise(recipe, teacher.family, teacher.model)
    data_ = load_data(recipe, teacher.family, teacher.model, teacher.folder or student.folder)
    run, resume_from = run_folder(recipe, out, resume)
    if note is not None and data_notice(data_):
        note(data_notice(data_))
    manifest = manifest.replace(recipe=recipe.to_dict())
    task = teacher.family.task(teacher.model)
    base, match = task.base_loss(recipe.distill.base_loss, model_classes(teacher.model), data_.num_classes, data_.source)
    return PreparedRun(recipe, teacher.family, teacher.model, student.model, manifest, data_, run, env or DistEnv(device=dev), base,
                       Path(teacher_file), resume_from, match,
                       {"factorized_input": {"file": Path(factorized).name, "sha256": sha256_file(factorized)}, **_split_note(data_)}, task,
                       teacher.folder or student.folder, started=started)


def _split_note(data: ImageData | TextData) -> dict[str, Any]:
    return {"data_" + k: v for k, v in split_record(data).items()}


