"""`compress` (factorize, then distill) and `distill` (a checkpoint already factorized).

Both go through the same steps:

1. Check every input before anything is written: data, teacher, run folder, device.
2. Evaluate the teacher and the SVD-only student.
3. Train the student against the frozen teacher (`distill.train`: PELA or PC-LoRA).
4. Save the final student in the format `lowrank factorize` writes, with a `distill` record
   in its manifest; evaluate it; write `report.json`.

Under torchrun, every process trains; rank 0 alone evaluates, writes and reports.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lowrank_cli.data.images import ImageData, load_image_data
from lowrank_cli.data.loaders import Head
from lowrank_cli.data.text import TextData, load_text_data
from lowrank_cli.device import resolve_device
from lowrank_cli.distill.distributed import DistEnv, all_gather_strings, barrier, close_distributed, init_distributed
from lowrank_cli.distill.evaluate import Evaluation, evaluate
from lowrank_cli.distill.fsdp import full_state
from lowrank_cli.distill.local import local_batches, local_distill
from lowrank_cli.distill.objective import DistillationObjective, ProgressiveObjective, freeze, teacher_dtype
from lowrank_cli.distill.train import TrainResult, check_steps, rng_state, total_steps, train
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize.model import factorize_model
from lowrank_cli.factorize.pclora import apply_pclora
from lowrank_cli.io.atomic import write_json
from lowrank_cli.io.hub import copy_side_files, write_config
from lowrank_cli.io.manifest import Manifest, read_checkpoint, save_factorized, tensors_digest
from lowrank_cli.io.rundir import Position, RunDir, load_training_state
from lowrank_cli.io.safetensors import read_header, sha256_file
from lowrank_cli.measure.macs import count_macs, count_params
from lowrank_cli.models.build import build_model, load_state_dict_strict
from lowrank_cli.models.family import ModelFamily, TextConfig
from lowrank_cli.nn.pclora import decay_lambda, finalize, set_lambda
from lowrank_cli.pipelines.common import hint_of
from lowrank_cli.pipelines.factorize import build_manifest, calibration_for
from lowrank_cli.recipe import Recipe, recipe_from_dict

Log = Callable[[dict[str, Any]], None]


def with_run_options(recipe: Recipe, data: str | None = None, epochs: int | None = None, strategy: str | None = None) -> Recipe:
    """The recipe with the data source, the number of epochs and the distillation strategy given (a copy)."""
    recipe = recipe.model_copy(deep=True)
    if data is not None:
        recipe.data = recipe.data.model_copy(update={"source": str(data)})
    if epochs is not None:
        if epochs < 1:
            raise LowrankError(f"epochs must be at least 1 (got {epochs})", param="epochs")
        recipe.distill = recipe.distill.model_copy(update={"epochs": int(epochs)})
    if strategy is not None:
        if strategy not in ("ddp", "fsdp"):
            raise LowrankError(f"strategy '{strategy}' is not one of ddp, fsdp", param="strategy")
        recipe = recipe_from_dict({**recipe.to_dict(), "distill": {**recipe.distill.model_dump(mode="json"), "strategy": strategy}},
                                  source=f"recipe '{recipe.name}' with strategy {strategy}")
    return recipe


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
    task: str = "image-classification"
    folder: Path | None = None  # the teacher's Hub folder: its config and tokenizer go into the run folder
    calibration: list | None = None  # factorize.method whitened | asvd: the calibration batches the student was factorized on
    started: float = field(default_factory=time.perf_counter)  # when the command began (calibration included): the curve's clock


def model_classes(model: nn.Module) -> int | None:
    """The number of classes a classifier outputs (timm: `num_classes`; transformers: `config.num_labels`)."""
    classes = getattr(model, "num_classes", None)
    if classes is None and hasattr(model, "config") and type(model).__name__.endswith("Classification"):
        classes = getattr(model.config, "num_labels", None)
    return classes


def _resolve_base(recipe: Recipe, task: str, model: nn.Module, data: ImageData | TextData) -> tuple[str, bool]:
    """The base loss `auto` stands for, for this task and data, and whether the data's labels are the model's classes."""
    kind = recipe.distill.base_loss
    if task in ("classification", "image-classification"):
        classes = model_classes(model)
        match = classes == data.num_classes
        if kind == "auto":
            kind = "ce" if match else "logits"
        if kind == "ce" and not match:
            raise LowrankError(
                f"distill.base_loss 'ce': the data '{data.source}' has {data.num_classes} classes but the model has {classes} outputs; "
                "use base_loss: logits (match the teacher's logits) or none"
            )
        return kind, match
    if kind == "ce":
        raise LowrankError(f"distill.base_loss 'ce' needs a classifier; this model's task is {task} (use auto, kl, lm, logits or none)")
    if kind in ("lm", "kl") and task != "causal-lm":
        raise LowrankError(f"distill.base_loss '{kind}' is for causal language models; this model's task is {task} (use auto, logits or none)")
    if kind == "auto":
        kind = "kl" if task == "causal-lm" else "none"
    return kind, True


def _run_dir(recipe: Recipe, out: str | Path | None, resume: bool) -> tuple[RunDir, tuple[Path, Path] | None]:
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


def load_data(recipe: Recipe, family: ModelFamily, model: nn.Module, folder: Path | None, all_held_out: bool = False) -> ImageData | TextData:
    """The training and held-out data of `recipe.data` for this model: images, or text tokenized by its own tokenizer
    (`all_held_out`: a text file or a folder without train/val parts is all held out, for evaluation)."""
    cfg = family.data_config(model)
    if isinstance(cfg, TextConfig):
        length = recipe.data.max_length or cfg.max_length
        limit = family.max_positions(model)
        if limit is not None and length > limit:
            raise LowrankError(f"data.max_length {length} is above the model's {limit} positions")
        return load_text_data(recipe.data.source, folder, length, all_held_out=all_held_out)
    return load_image_data(recipe.data.source, cfg, model_classes(model) or 10, recipe.data.synthetic_size, recipe.data.skip_unreadable)


def prepare_compress(checkpoint: str | Path | None, recipe: Recipe, *, arch: str | None = None, model_kwargs: dict | None = None,
                     out: str | Path | None = None, resume: bool = False, device: str = "auto", env: DistEnv | None = None) -> PreparedRun:
    """Check the inputs of `compress` and build teacher, SVD student and data; write nothing."""
    started = time.perf_counter()
    dev = resolve_device(device)
    if checkpoint is None and recipe.checkpoint:
        checkpoint = recipe.checkpoint
    if checkpoint is None:
        raise LowrankError("give the checkpoint to compress (argument `checkpoint`, recipe key `checkpoint`)", param="checkpoint")
    recipe = recipe.with_calibration_default()  # whitened | asvd calibrate on the training data; the run's recipe says so (and resumes)
    header = read_header(checkpoint)
    if Manifest.from_header(header) is not None:
        raise LowrankError(f"{checkpoint}: is already factorized; compress the original checkpoint, or distill it against its original (`distill_checkpoint`, `lowrank distill`)")
    built = build_model(checkpoint, arch, dict(model_kwargs or {}), hint=hint_of(recipe))
    teacher, family, arch = built.model, built.family, built.architecture
    data = load_data(recipe, family, teacher, built.folder)
    run, resume_from = _run_dir(recipe, out, resume)
    svd_dev = env.device if env is not None else dev  # under torchrun: this process's GPU, not cuda:0 for every process
    student = copy.deepcopy(teacher)
    pclora = recipe.distill.method == "pclora"
    calibration = None
    if recipe.factorize.method != "svd" or recipe.factorize.allocation == "sensitivity":  # on factorize.calib_data (defaulted above)
        f = recipe.factorize
        calibration = calibration_for(f.calib_data, family, teacher, built.folder, f.calib_samples, f.calib_batch_size, recipe.data.max_length)
    allocation = None
    # PC-LoRA: the dense layers with adapters beside them, finalized to LowRankLinear at the end
    if pclora:
        plans = apply_pclora(student, recipe, recipe.distill.pclora.init, recipe.distill.seed, family=family, device=svd_dev)
    else:
        factorized = factorize_model(student, recipe, family=family, calibration=calibration, device=svd_dev)
        plans, allocation = factorized.plans, factorized.allocation
    if not any(p.factorized for p in plans):
        raise LowrankError(f"recipe '{recipe.name}' factorizes no layer of {arch}; nothing to distill")
    manifest = build_manifest(arch, family.name, built.model_kwargs, plans, recipe, checkpoint, method="pclora" if pclora else recipe.factorize.method,
                              allocation=allocation)
    task = family.task(teacher)
    base, match = _resolve_base(recipe, task, teacher, data)
    info = {"architecture": {"name": arch, "source": built.source, **({"note": built.note} if built.note else {})}}
    if allocation is not None:  # rank_rule budget or allocation sensitivity: the ranks beside uniform κ's (and each layer's c_l)
        info["allocation"] = allocation.to_dict()
    return PreparedRun(recipe, family, teacher, student, manifest, data, run, env or DistEnv(device=dev), base, Path(checkpoint), resume_from, match,
                       {**info, **_split_note(data)}, task, built.folder, calibration, started)


def prepare_distill(factorized: str | Path, teacher_file: str | Path, recipe: Recipe | None, *, out: str | Path | None = None,
                    resume: bool = False, device: str = "auto", data: str | None = None, epochs: int | None = None,
                    strategy: str | None = None, env: DistEnv | None = None, note: Callable[[str], None] | None = None) -> PreparedRun:
    """Check the inputs of `distill` (a factorized student and its original as the teacher)."""
    started = time.perf_counter()
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
    recipe = with_run_options(recipe, data, epochs, strategy)
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
    data_ = load_data(recipe, teacher.family, teacher.model, teacher.folder or student.folder)
    run, resume_from = _run_dir(recipe, out, resume)
    manifest = manifest.replace(recipe=recipe.to_dict())
    task = teacher.family.task(teacher.model)
    base, match = _resolve_base(recipe, task, teacher.model, data_)
    return PreparedRun(recipe, teacher.family, teacher.model, student.model, manifest, data_, run, env or DistEnv(device=dev), base,
                       Path(teacher_file), resume_from, match,
                       {"factorized_input": {"file": Path(factorized).name, "sha256": sha256_file(factorized)}, **_split_note(data_)}, task,
                       teacher.folder or student.folder, started=started)


def _split_note(data: ImageData | TextData) -> dict[str, Any]:
    return {"data_split": data.split} if isinstance(data, TextData) else {}


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes): equal digests mean equal weights."""
    return tensors_digest(model.state_dict())


def _distill_record(p: PreparedRun, result_steps: int | None = None) -> dict[str, Any]:
    cfg = p.recipe.distill
    teacher = {"file": p.teacher_file.name, "sha256": sha256_file(p.teacher_file)} if p.teacher_file else None
    if cfg.method == "pclora":
        losses = {"method": "pclora", **cfg.pclora.model_dump(), **({"decay_steps": p.info["pclora"]["decay_steps"]} if "pclora" in p.info else {})}
    else:
        losses = {"method": "pela", "alpha": cfg.alpha, "beta": cfg.beta, "epsilon": cfg.epsilon, "rwp_form": cfg.rwp_form}
    return {"teacher": teacher, "data": p.data.source, "epochs": cfg.epochs, **losses, "base_loss": p.base,
            **({"steps": result_steps} if result_steps else {})}


def decay_steps(p: PreparedRun) -> int:
    """PC-LoRA's q: the step from which λ = 0, `decay_end` × the run's total optimizer steps (≥ 1).

    A resumed run keeps the q it started with (run.json), whatever the number of epochs says now.
    """
    cfg = p.recipe.distill
    total = total_steps(len(p.data.train), cfg, p.env.world)
    if p.resume_from is not None:
        q = int(p.run.run_info().get("pclora", {}).get("decay_steps", 0))
        if q > total:
            raise LowrankError(f"{p.run.root}: λ reaches 0 at step {q} in this run, but the run now has only {total} steps; "
                               "resume with at least the epochs it was started with", param="epochs")
        if q:
            return q
    return max(1, min(total, round(cfg.pclora.decay_end * total)))


def lambda_course(schedule: str, q: int, points: int = 5) -> list[tuple[int, float]]:
    """λ at `points` steps evenly spaced from 0 to q (where it is exactly 0)."""
    return [(round(q * i / (points - 1)), decay_lambda(schedule, round(q * i / (points - 1)), q)) for i in range(points)]


def run_distillation(p: PreparedRun, *, log: Log | None = None, note: Callable[[str], None] | None = None,
                     step_hook: Callable[[Position], None] | None = None) -> dict[str, Any]:
    """Train the prepared student against its teacher; returns the report (also written, by rank 0).

    A new run that fails before its first complete checkpoint is removed (rank 0); a later
    failure leaves it resumable. Call it inside `claimed(p)`.
    """
    try:
        return _run_distillation(p, log=log, note=note, step_hook=step_hook)
    except BaseException:
        if p.env.is_main and p.resume_from is None:
            p.run.discard()
        raise


def _run_distillation(p: PreparedRun, *, log: Log | None, note: Callable[[str], None] | None,
                      step_hook: Callable[[Position], None] | None) -> dict[str, Any]:
    env, run, cfg, family = p.env, p.run, p.recipe.distill, p.family
    note = note if (note is not None and env.is_main) else (lambda _msg: None)
    device = env.device
    check_steps(len(p.data.train), cfg, env.world)  # before run.create: no half-written run on this error
    torch.manual_seed(cfg.seed)  # the same start on every process and in every resumed run
    teacher = freeze(p.teacher).to(device)
    pclora = cfg.method == "pclora"
    if pclora:
        p.info["pclora"] = {"decay_steps": decay_steps(p)}
    manifest = p.manifest.replace(distill=_distill_record(p))
    t0 = time.perf_counter()

    def accuracy(model: nn.Module, limit: int | None = None) -> Evaluation | None:
        """The model on the held-out split (its first `limit` examples), by its task, against the teacher (the teacher
        too: its reference figures)."""
        if not p.labels_match:
            return None
        val = p.data.val if limit is None else Head(p.data.val, limit)
        return evaluate(model, val, family, device, teacher=teacher, num_workers=p.recipe.data.num_workers, task=p.task)

    objective = None  # its block hooks are paused while the student is evaluated
    sharding = cfg.strategy == "fsdp" and env.distributed

    def point(step: int, stage: str) -> None:
        """A held-out evaluation of the student now, with the wall time since the command began (rank 0)."""
        if not p.labels_match or not (env.is_main or sharding):  # under FSDP every process runs the sharded models' forward
            return
        with objective.paused() if objective is not None else contextlib.nullcontext():
            e = accuracy(p.student, cfg.eval_examples)
        record = {"step": step, "stage": stage, "seconds": time.perf_counter() - p.started, "eval": e.to_dict()}
        if not env.is_main:
            return
        run.append_metrics(record)
        if log is not None:
            log(record)

    resume = None
    if p.resume_from is not None:
        student_file, state_file = p.resume_from
        load_state_dict_strict(p.student, read_checkpoint(student_file)[2], student_file, manifest.architecture)
        resume = load_training_state(state_file)
        baseline = run.run_info().get("baseline", {})
        if "local" in run.run_info():
            p.info["local"] = run.run_info()["local"]
        if env.is_main:
            stale, cut = run.remove_temporaries(), run.truncate_metrics(resume.position.step)
            if stale or cut:
                note(f"removed {len(stale)} temporary files of interrupted writes and {cut} metrics lines after step {resume.position.step}")
        note(f"resuming {run.root} from {student_file.name} (step {resume.position.step})")
        started = run.run_info().get("world_size")
        if started and started != env.world:
            note(f"the run started on {started} processes and resumes on {env.world}: the global batch, learning rate and data order "
                 f"follow {env.world} from here, so it will not match an uninterrupted run")
    else:
        baseline = {}
        if env.is_main:
            note("evaluating the teacher and the SVD-only student")
            # PC-LoRA starts from the teacher itself; its SVD-only reference is the SVD student of the same ranks
            svd = p.student
            if pclora:
                svd = copy.deepcopy(p.teacher)
                factorize_model(svd, p.recipe, family=family, calibration=p.calibration, device=device)
            t, s = accuracy(teacher), accuracy(svd)
            baseline = {"teacher": t.to_dict() if t else None, "svd": s.to_dict() if s else None}
            run.create(p.recipe, {"teacher": manifest.distill["teacher"], "data": p.data.source, "world_size": env.world, "strategy": cfg.strategy,
                                  "device": str(device), "base_loss": p.base, "baseline": baseline, **p.info})
            if family.name == "transformers":  # the run folder is the student's Hub folder: its config and tokenizer
                write_config(run.root, {**manifest.model_kwargs, "architectures": [manifest.architecture]})
                copy_side_files(p.folder, run.root)
        barrier(env)

    def save(pos: Position, optimizer, scaler) -> str:
        path = run.root / f"checkpoint-{pos.step:06d}.safetensors"
        weights, optimizer_state = full_state(p.student, optimizer)  # FSDP: gathered to rank 0, every process takes part
        if env.is_main:
            run.save_checkpoint(pos, weights, manifest, optimizer_state, scaler, rng_state(device), cfg.keep_checkpoints)
        return str(path)

    def log_metrics(record: dict[str, Any]) -> None:
        if env.is_main:
            run.append_metrics(record)
            if log is not None:
                log(record)

    if resume is None and cfg.local is not None:
        note(f"local distillation: {cfg.local.steps} steps per block on {min(cfg.local.examples, len(p.data.train))} training examples")

        done, total_blocks = [0], len(family.blocks(p.student)) * cfg.local.rounds

        def block_done(record: dict[str, Any]) -> None:
            done[0] += 1
            if env.is_main:
                run.append_metrics({"step": 0, "stage": "local", **record})
                if log is not None:
                    log({"stage": "local", **record, "done": done[0], "blocks": total_blocks})

        local = local_distill(p.student, teacher, family, local_batches(p.data.train, cfg.local, cfg.seed), cfg.local, device,
                              cfg.seed, block_done)
        p.info["local"] = local.to_dict()
        if env.is_main:
            run.update_info({"local": p.info["local"]})
    if resume is None and (cfg.eval_every or cfg.local is not None):
        point(0, "local" if cfg.local is not None else "start")

    last_step = total_steps(len(p.data.train), cfg, env.world)

    def every(pos: Position) -> None:
        if cfg.eval_every and pos.step % cfg.eval_every == 0 and pos.step < last_step:  # the final evaluation follows the last
            point(pos.step, "train")
        if step_hook is not None:
            step_hook(pos)

    schedule = None
    if pclora:
        q = p.info["pclora"]["decay_steps"]

        def schedule(step: int) -> dict[str, float]:
            lam = decay_lambda(cfg.pclora.schedule, step, q)
            set_lambda(p.student, lam)
            return {"lam": lam}

        objective = ProgressiveObjective(p.student, teacher, cfg.pclora.task_weight, p.base, family, cfg.logit_weight, cfg.pooled_cosine,
                                         teacher_dtype(device, cfg.amp, cfg.strategy))
    else:
        objective = DistillationObjective(p.student, teacher, cfg, p.base, family, teacher_dtype(device, cfg.amp, cfg.strategy))
    structures = all_gather_strings(env, tensors_digest({k: torch.tensor(v.shape) for k, v in p.student.state_dict().items()}))
    if len(set(structures)) != 1:  # a sensitivity allocation measured apart on each process may choose other ranks
        raise LowrankError(f"the {env.world} processes factorized the student with different ranks; factorize once (`lowrank factorize`, "
                           "or factorize_checkpoint) and distill that checkpoint on several processes")
    try:
        result: TrainResult = train(p.student, objective, p.data.train, cfg, env, num_workers=p.recipe.data.num_workers,
                                    resume=resume, log=log_metrics, checkpoint=save, step_hook=every, schedule=schedule,
                                    teacher=teacher, blocks=family.blocks)
    finally:
        objective.close()
    p.student, teacher = result.student, result.teacher  # FSDP: plain copies holding the gathered weights
    if result.untrained:
        note(f"left untrained (no gradient reaches them from the loss): {', '.join(result.untrained)}")
    digests = all_gather_strings(env, weights_digest(p.student))
    if len(set(digests)) != 1:
        raise LowrankError(f"the {env.world} processes ended with different student weights ({', '.join(d[:8] for d in digests)}); a DDP set-up problem")
    if pclora:  # λ is 0 from step q ≤ total on: the frozen branch contributes nothing and is dropped
        finalize(p.student).eval()
    report: dict[str, Any] = {}
    if env.is_main:
        manifest = manifest.replace(distill=_distill_record(p, result.steps))
        save_factorized(run.student_file, p.student.state_dict(), manifest, force=True)
        note("evaluating the distilled student")
        final = accuracy(p.student)
        report = _report(p, teacher, baseline, final, result, digests, time.perf_counter() - t0)
        report["curve"] = _curve(run, final, result.steps, time.perf_counter() - p.started)
        write_json(run.report_file, report)
    barrier(env)
    return report


def _curve(run: RunDir, final: Evaluation | None, steps: int, seconds: float) -> list[dict[str, Any]]:
    """Held-out quality against wall time: every evaluation in the run's metrics (a resumed run's earlier ones too), then the final."""
    points = [r for r in run.read_metrics() if "eval" in r]
    if final is not None:
        points.append({"step": steps, "stage": "final", "seconds": seconds, "eval": final.to_dict()})
    return points


def recovered_fraction(teacher: float | None, svd: float | None, distilled: float | None) -> float | None:
    """(distilled − svd) / (teacher − svd): the share of what SVD lost that distillation won back.

    The figures are the task's primary ones, larger better (`Evaluation.primary`): top-1, the
    mean embedding cosine to the teacher, or −log perplexity.
    """
    if teacher is None or svd is None or distilled is None or teacher - svd <= 1e-12:
        return None
    return (distilled - svd) / (teacher - svd)


def _primary(d: dict | None) -> float | None:
    return None if d is None else Evaluation(**d).primary()


def _report(p: PreparedRun, teacher: nn.Module, baseline: dict, final: Evaluation | None, result: TrainResult,
            digests: list[str], seconds: float) -> dict[str, Any]:
    example = p.family.example_inputs(teacher)
    macs_t, macs_s = count_macs(teacher, example, p.family.forward), count_macs(p.student, example, p.family.forward)
    return {
        "run": str(p.run.root),
        "student": str(p.run.student_file),
        "architecture": p.manifest.architecture,
        "architecture_source": p.info.get("architecture", {}).get("source", "manifest"),
        "architecture_note": p.info.get("architecture", {}).get("note"),
        "params_before": count_params(teacher), "params_after": count_params(p.student),
        "macs_before": macs_t.macs, "macs_after": macs_s.macs,
        "accuracy": {"teacher": baseline.get("teacher"), "svd": baseline.get("svd"), "distilled": final.to_dict() if final else None},
        "task": p.task,
        "recovered_fraction": recovered_fraction(_primary(baseline.get("teacher")), _primary(baseline.get("svd")), final.primary() if final else None),
        "train": {"steps": result.steps, "total_steps": result.total_steps, "lr": result.lr, "global_batch": result.global_batch,
                  "seconds": result.seconds, "examples_per_s": result.images / max(result.seconds, 1e-9),
                  "images_per_s": result.images / max(result.seconds, 1e-9), "last": result.last_terms,
                  "base_loss": p.base, "untrained": result.untrained, "state_bytes": result.state_bytes},
        "method": p.recipe.distill.method,
        **({"local": p.info["local"]} if "local" in p.info else {}),
        **({"pclora": _pclora_report(p, result)} if p.recipe.distill.method == "pclora" else {}),
        "data": {"source": p.data.source, "train": len(p.data.train), "val": len(p.data.val), "skipped_unreadable": len(p.data.skipped),
                 "skipped_first": p.data.skipped[:5], **({"split": p.data.split} if isinstance(p.data, TextData) else {})},
        **({"allocation": p.info["allocation"]} if "allocation" in p.info else {}),
        "world_size": p.env.world,
        "rank_weight_sha256": digests,
        "seconds": seconds,
    }


def _pclora_report(p: PreparedRun, result: TrainResult) -> dict[str, Any]:
    cfg, q = p.recipe.distill.pclora, p.info["pclora"]["decay_steps"]
    return {"schedule": cfg.schedule, "init": cfg.init, "task_weight": cfg.task_weight, "decay_end": cfg.decay_end,
            "decay_steps": q, "zero_at_step": q, "total_steps": result.total_steps,
            "lambda_final": decay_lambda(cfg.schedule, result.steps, q), "course": lambda_course(cfg.schedule, q)}


def compress_checkpoint(checkpoint, recipe: Recipe, *, device: str = "auto", log: Log | None = None, note=None, step_hook=None, **kw) -> dict[str, Any]:
    """Factorize `checkpoint` by the recipe and distill it; the library form of `lowrank compress`."""
    env = init_distributed(resolve_device(device))
    try:
        p = prepare_compress(checkpoint, recipe, device=device, env=env, **kw)
        barrier(env)  # every process has checked the run folder before rank 0 writes in it (else a slow one finds "already holds a run")
        with claimed(p):
            return run_distillation(p, log=log, note=note, step_hook=step_hook)
    finally:
        close_distributed()


def distill_checkpoint(factorized, teacher, recipe: Recipe | None = None, *, device: str = "auto", log: Log | None = None, note=None, step_hook=None, **kw) -> dict[str, Any]:
    """Distill an already factorized checkpoint against its original; the library form of `lowrank distill`."""
    env = init_distributed(resolve_device(device))
    try:
        p = prepare_distill(factorized, teacher, recipe, device=device, env=env, note=note if env.is_main else None, **kw)
        barrier(env)  # every process has checked the run folder before rank 0 writes in it
        with claimed(p):
            return run_distillation(p, log=log, note=note, step_hook=step_hook)
    finally:
        close_distributed()
