"""The distillation run: the teacher's and the SVD student's baseline, the local stage, training, the final student.

`run_distillation` trains a `prepare.PreparedRun` and writes the run folder (rank 0): `run.json`,
metrics, checkpoints, the student in the format `lowrank factorize` writes with a `distill`
record in its manifest, and `report.json` (`report`). Under torchrun every process trains; rank 0
alone evaluates, writes and reports (under `distill.strategy: fsdp` every process runs the periodic evaluations of the
sharded models; rank 0 alone records them).
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from typing import Any, Callable

import torch
from torch import nn

from lowrank_cli.data.loaders import Head
from lowrank_cli.distill.budget import Budget, StepPlanner
from lowrank_cli.distill.distributed import DistEnv, all_gather_strings, barrier, broadcast_module, on_main_alone, slowest
from lowrank_cli.distill.evaluate import Evaluation, evaluate
from lowrank_cli.distill.fsdp import full_state
from lowrank_cli.distill.local import StageDeadline, local_batches, local_distill
from lowrank_cli.distill.objective import DistillationObjective, ProgressiveObjective, freeze, teacher_dtype
from lowrank_cli.distill.train import TrainResult, check_steps, rng_state, total_steps, train, train_examples
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize.model import factorize_model
from lowrank_cli.io.atomic import write_json
from lowrank_cli.io.manifest import read_checkpoint, save_factorized, tensors_digest
from lowrank_cli.io.rundir import Position, load_training_state
from lowrank_cli.io.safetensors import sha256_file
from lowrank_cli.models.build import load_state_dict_strict
from lowrank_cli.nn.pclora import decay_lambda, finalize, set_lambda
from lowrank_cli.pipelines.common.prepare import PreparedRun
from lowrank_cli.pipelines.common.report import curve, run_report

Log = Callable[[dict[str, Any]], None]


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
    total = total_steps(train_examples(p.data.train), cfg, p.env.world)
    if p.resume_from is not None:
        q = int(p.run.run_info().get("pclora", {}).get("decay_steps", 0))
        if q > total:
            raise LowrankError(f"{p.run.root}: λ reaches 0 at step {q} in this run, but the run now has only {total} steps; "
                               "resume with at least the epochs it was started with", param="epochs")
        if q:
            return q
    return max(1, min(total, round(cfg.pclora.decay_end * total)))


def _on_main(env: DistEnv, values: list[float]) -> list[float]:
    """Rank 0's `values` on every process (what it measured alone, e.g. the baseline evaluations)."""
    return json.loads(all_gather_strings(env, json.dumps(values))[0])


def _reserve(student: nn.Module, final_eval_seconds: float, budget_seconds: float) -> float:
    """Seconds kept at a budget's end: the final evaluation (as long as the SVD student's), the last checkpoint (weights and
    optimizer state, about 3× the weights) and the student's save at 100 MB/s, the report, and 1 % of the budget for what the
    clock cannot foresee."""
    bytes_ = sum(t.numel() * t.element_size() for t in student.state_dict().values())
    return 1.1 * final_eval_seconds + 4 * bytes_ / 1e8 + 2.0 + 0.01 * budget_seconds


def _resumed_budget(p: PreparedRun) -> Budget | None:
    """A resumed run's clock: its budget from this command's start, with the reserve and the plan the run recorded."""
    seconds = p.recipe.distill.budget_seconds()
    if seconds is None:
        return None
    recorded = p.run.run_info().get("budget", {})
    return Budget(seconds, p.started, p.recipe.distill.budget or "", float(recorded.get("reserve_seconds", 0.0)), dict(recorded))


def _agree(env: DistEnv, step_seconds: float, left_seconds: float) -> tuple[float, float]:
    """The slowest process's step time and the least time any process has left: every process plans the same count."""
    step, minus_left = slowest(env, step_seconds, -left_seconds)
    return step, -minus_left


def _end_to_end_planner(p: PreparedRun, budget: Budget | None, upper: int, eval_seconds: float) -> StepPlanner | None:
    """The end-to-end stage's planner under a budget: to the deadline less the reserve, each periodic evaluation the count
    brings at `eval_seconds` (the one after the local stage); None without a budget, or when a resumed run's plan is fixed."""
    if budget is None or "steps" in budget.record.get("end_to_end", {}):
        return None
    cfg = p.recipe.distill
    return StepPlanner(until=budget.deadline - budget.reserve, upper=upper, agree=lambda step, left: _agree(p.env, step, left),
                       eval_seconds=slowest(p.env, eval_seconds)[0], eval_every=cfg.eval_every,
                       probe_share=0.02, replan_at=(0.1, 1 / 3, 2 / 3))


def _record_plan(p: PreparedRun, budget: Budget, planner: StepPlanner, note: Callable[[str], None] | None) -> None:
    """The end-to-end stage's plan into the budget's record and run.json (a resumed run keeps its count)."""
    budget.record["end_to_end"].update({"steps": planner.total, "step_seconds": planner.step_seconds, "plans": list(planner.plans)})
    if p.env.is_main:
        p.run.update_info({"budget": budget.record})
    if note is not None:
        upper = "" if planner.total < planner.upper else f", the recipe's most ({planner.upper})"
        note(f"end-to-end: {planner.step_seconds:.2f} s a step → {planner.total} steps{upper} to end in time")


def _local_stage(p: PreparedRun, teacher: nn.Module, budget: Budget | None, note: Callable[[str], None], log: Log | None) -> None:
    """The local stage (`distill.local`) on this process, its blocks logged to metrics.jsonl and `log`, its record in run.json;
    under a budget, to the stage's deadline."""
    cfg, run = p.recipe.distill, p.run
    n_local = cfg.local.examples if train_examples(p.data.train) is None else min(cfg.local.examples, len(p.data.train))
    deadline = None
    if budget is not None:
        deadline = StageDeadline(budget.local_until(cfg.local.budget_share, budget.record.get("first_eval_estimate", 0.0)))
        note(f"local distillation: {budget.record['local']['planned_seconds'] / 60:.1f} min ({cfg.local.budget_share:.0%} of the training "
             f"time), at most {cfg.local.steps} steps per block, on {n_local} training examples")
    else:
        note(f"local distillation: {cfg.local.steps} steps per block on {n_local} training examples")
    done, total_blocks = [0], len(p.family.blocks(p.student)) * cfg.local.rounds

    def block_done(record: dict[str, Any]) -> None:
        done[0] += 1
        run.append_metrics({"step": 0, "stage": "local", **record})
        if log is not None:
            log({"stage": "local", **record, "done": done[0], "blocks": total_blocks})

    local = local_distill(p.student, teacher, p.family, local_batches(p.data.train, cfg.local, cfg.seed, cfg.group_by_length), cfg.local,
                          p.env.device, cfg.seed, block_done, deadline)
    p.info["local"] = local.to_dict()
    if budget is not None:
        budget.record["local"].update({"seconds": local.seconds, "max_steps": cfg.local.steps, "steps": [b["steps"] for b in local.blocks]})
    run.update_info({"local": p.info["local"], **({"budget": budget.record} if budget is not None else {})})


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
    check_steps(train_examples(p.data.train), cfg, env.world)  # before run.create: no half-written run on this error
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
        """A held-out evaluation of the student now, with the wall time since the command began (rank 0
        records it; under FSDP every process runs it)."""
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

    resume, budget = None, None
    if p.resume_from is not None:
        student_file, state_file = p.resume_from
        load_state_dict_strict(p.student, read_checkpoint(student_file)[2], student_file, manifest.architecture)
        resume = load_training_state(state_file)
        baseline = run.run_info().get("baseline", {})
        if "local" in run.run_info():
            p.info["local"] = run.run_info()["local"]
        budget = _resumed_budget(p)
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
        baseline, t_eval, svd_seconds = {}, time.perf_counter(), 0.0
        with on_main_alone(env, "the evaluations of the teacher and the SVD-only student"):
            if env.is_main:
                if cfg.budget is None:  # under a budget, said once its check has passed (an error stays one line)
                    note("evaluating the teacher and the SVD-only student")
                # PC-LoRA starts from the teacher itself; its SVD-only reference is the SVD student of the same ranks
                svd = p.student
                if pclora:
                    svd = copy.deepcopy(p.teacher)
                    factorize_model(svd, p.recipe, family=family, calibration=p.calibration, device=device)
                t = accuracy(teacher)
                t_svd = time.perf_counter()
                s = accuracy(svd)
                svd_seconds = time.perf_counter() - t_svd
                baseline = {"teacher": t.to_dict() if t else None, "svd": s.to_dict() if s else None}
        if cfg.budget is not None:  # before the run is created: a budget too short leaves nothing behind
            budget = Budget(cfg.budget_seconds(), p.started, cfg.budget)
            reserve = _reserve(p.student, svd_seconds, budget.seconds)
            setup, evals, reserve, left, svd_seconds = _on_main(env, [t_eval - p.started, time.perf_counter() - t_eval, reserve,
                                                                      budget.training_seconds() - reserve, svd_seconds])
            budget.check_room(setup, evals, reserve, left)
            val = len(p.data.val) if p.labels_match else 0
            budget.record["first_eval_estimate"] = svd_seconds * (min(1.0, cfg.eval_examples / max(1, val)) if cfg.eval_examples else 1.0)
            note(f"time budget {cfg.budget}: {setup:.0f} s for loading, calibration and factorization, {evals:.0f} s to evaluate the "
                 f"teacher and the SVD-only student; {budget.record['training_seconds'] / 60:.1f} min to train, {budget.reserve:.0f} s kept for the end")
        if env.is_main:
            run.create(p.recipe, {"teacher": manifest.distill["teacher"], "data": p.data.source, "world_size": env.world, "strategy": cfg.strategy,
                                  "device": str(device), "base_loss": p.base, "baseline": baseline, **p.info,
                                  **({"budget": budget.record} if budget is not None else {})})
            # the run folder is the student's Hub folder where the family's models are (its config and tokenizer)
            family.write_hub_files(run.root, manifest.architecture, manifest.model_kwargs, p.folder)
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
        with on_main_alone(env, "the local stage"):
            if env.is_main:  # once, on rank 0: the other processes take its weights below
                _local_stage(p, teacher, budget, note, log)
    if resume is None and env.distributed and not pclora:  # rank 0 factorized (and ran the local stage): every process starts from its student
        broadcast_module(env, p.student)
    eval_seconds = time.perf_counter()
    if resume is None and (cfg.eval_every or cfg.local is not None):
        point(0, "local" if cfg.local is not None else "start")
    eval_seconds = time.perf_counter() - eval_seconds

    train_cfg = cfg
    if budget is not None and "steps" in budget.record.get("end_to_end", {}):  # resumed: the count the run planned holds
        planned = int(budget.record["end_to_end"]["steps"])
        train_cfg = cfg.model_copy(update={"max_steps": min(planned, cfg.max_steps or planned)})
    last_step = total_steps(train_examples(p.data.train), train_cfg, env.world)
    planner = _end_to_end_planner(p, budget, last_step, eval_seconds)
    if planner is not None:
        budget.record["end_to_end"] = {"planned_seconds": planner.until - time.perf_counter(), "max_steps": last_step}

    def every(pos: Position) -> None:
        if planner is not None and len(planner.plans) > len(budget.record["end_to_end"].get("plans", [])):
            _record_plan(p, budget, planner, note if len(planner.plans) == 1 else None)
        last = planner.total if planner is not None else last_step
        if cfg.eval_every and pos.step % cfg.eval_every == 0 and pos.step < last:  # the final evaluation follows the last
            t_point = time.perf_counter()
            point(pos.step, "train")
            if planner is not None:
                planner.overhead(slowest(env, time.perf_counter() - t_point)[0], cfg.eval_every)
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
                                         teacher_dtype(device, cfg.amp, cfg.strategy), cfg.token_noise)
    else:
        objective = DistillationObjective(p.student, teacher, cfg, p.base, family, teacher_dtype(device, cfg.amp, cfg.strategy))
    structures = all_gather_strings(env, tensors_digest({k: torch.tensor(v.shape) for k, v in p.student.state_dict().items()}))
    if len(set(structures)) != 1:  # a sensitivity allocation measured apart on each process may choose other ranks
        raise LowrankError(f"the {env.world} processes factorized the student with different ranks; factorize once (`lowrank factorize`, "
                           "or factorize_checkpoint) and distill that checkpoint on several processes")
    try:
        result: TrainResult = train(p.student, objective, p.data.train, train_cfg, env, num_workers=p.recipe.data.num_workers,
                                    resume=resume, log=log_metrics, checkpoint=save, step_hook=every, schedule=schedule,
                                    teacher=teacher, blocks=family.blocks, planner=planner)
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
        report = run_report(p, teacher, baseline, final, result, digests, time.perf_counter() - t0)
        report["curve"] = curve(run, final, result.steps, time.perf_counter() - p.started)
        if budget is not None:
            budget.record.setdefault("end_to_end", {}).update({"seconds": result.seconds, "steps": result.steps})
            budget.record["command_seconds"] = time.perf_counter() - p.started
            report["budget"] = budget.record
        write_json(run.report_file, report)
    barrier(env)
    return report


