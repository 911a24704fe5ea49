"""Training sized by a time budget (`distill.budget`, `--budget`): durations, the step planner, the local stage's
deadline, a whole run that plans its stages and resumes with its plan, and the one-line errors."""

import json

import pytest
import torch
import yaml
from conftest import TINY_VIT, TINY_VIT_KWARGS, one_line_error, tiny_vit

from lowrank_cli.cli.render_training import budget_table
from lowrank_cli.distill import budget as budget_mod
from lowrank_cli.distill.budget import Budget, StepPlanner, evaluations_between, fit_steps
from lowrank_cli.distill.local import StageDeadline, local_distill
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize.model import factorize_model
from lowrank_cli.models import get_family
from lowrank_cli.pipelines.compress import compress_checkpoint
from lowrank_cli.recipe import LocalConfig, load_recipe, parse_duration, recipe_from_dict


def test_durations_parse_and_bad_ones_name_the_key():
    assert [parse_duration(t) for t in ("30m", "1h30m", "90s", "2h", "1.5h", "20min", " 1h 5s ")] == [1800, 5400, 90, 7200, 5400, 1200, 3605]
    for bad in ("30", "abc", "0m", "m", "1d", "-5m", "30m1h"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert recipe_from_dict({"distill": {"budget": "20m"}}).distill.budget_seconds() == 1200
    assert recipe_from_dict({}).distill.budget_seconds() is None
    with pytest.raises(LowrankError, match=r"distill.budget: not a duration such as 30m.*a bare number.*\(got 30\)"):
        recipe_from_dict({"distill": {"budget": 30}})
    with pytest.raises(LowrankError, match="distill.budget.*distill.method 'pclora'"):
        recipe_from_dict({"distill": {"budget": "10m", "method": "pclora"}})
    with pytest.raises(LowrankError, match="budget_share"):
        recipe_from_dict({"distill": {"local": {"budget_share": 1.0}}})


def test_fit_steps_fills_the_time_left_with_the_steps_and_the_evaluations_they_bring():
    assert [evaluations_between(0, n, 10) for n in (9, 10, 11, 20, 21)] == [0, 0, 1, 1, 2]  # none after the last step (the final one)
    assert evaluations_between(10, 21, 10) == 1 and evaluations_between(10, 20, 10) == 0 and evaluations_between(0, 50, 0) == 0
    assert fit_steps(4, 0.5, 10.0, 1000) == 24  # 4 done, 20 more in 10 s
    assert fit_steps(0, 1.0, 25.0, 1000, eval_seconds=10.0, eval_every=10) == 15  # 15 s of steps and the evaluation at step 10
    assert fit_steps(0, 1.0, 25.0, 1000, eval_seconds=100.0, eval_every=10) == 10  # no room for that evaluation: stop at step 10
    assert fit_steps(4, 0.5, 10.0, 10) == 10  # the recipe's upper bound
    assert fit_steps(4, 0.5, -3.0, 1000) == 4  # late: stop now
    assert fit_steps(4, 0.0, 10.0, 50) == 50


class _Clock:
    """A fake `time.perf_counter` that advances by hand."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


def test_planner_times_the_steps_after_the_first_and_replans_from_their_mean(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(budget_mod, "time", clock)
    planner = StepPlanner(until=200.0, upper=10_000, eval_seconds=1.0, eval_every=10, replan_at=(1 / 3, 2 / 3))  # evaluations: 1 s, estimated
    planner.start(0)
    durations = [5.0] + [1.0] * 3  # the first step (allocations) is not timed
    plans = []
    for step, d in enumerate(durations, 1):
        clock.now += d
        plans.append(planner.tick(step))
    assert plans == [False, False, False, True]
    # at t = 108, 92 s left at 1 s a step: 84 more steps after the 4 done and the 8 evaluations (steps 10 to 80) they bring
    assert planner.step_seconds == pytest.approx(1.0) and planner.total == 88
    step = 4
    while step < round(planner.plans[0]["total"] / 3):  # the machine slows down: 2 s a step from here
        step += 1
        clock.now += 2.0
        planner.tick(step)
    assert len(planner.plans) == 2 and planner.plans[1]["at_step"] == 29  # a third of 88
    assert planner.step_seconds == pytest.approx(53 / 28)  # steps 2-29 took 3 + 25 × 2 s
    assert planner.total == 50  # 42 s left: 21 steps (39.75 s) and the evaluations at 30 and 40 (2 s)


def test_planner_takes_measured_evaluations_out_of_the_step_time_and_spreads_their_cost(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(budget_mod, "time", clock)
    planner = StepPlanner(until=1000.0, upper=10_000, replan_at=(0.5,))
    planner.start(0)
    step = 0
    while not planner.plans:
        step += 1
        clock.now += 1.0
        planner.tick(step)
    assert planner.total == 4 + int((1000.0 - clock.now) // 1.0)  # no evaluation yet, none estimated
    while step < planner.plans[0]["total"] // 2:
        step += 1
        clock.now += 1.0
        if step % 10 == 0:  # an evaluation of 5 s every 10 steps, after the step's tick
            clock.now += 5.0
            planner.overhead(5.0, every=10)
        planner.tick(step)
    assert len(planner.plans) == 2
    assert planner.step_seconds == pytest.approx(1.0)  # the evaluations are not steps
    assert (planner.eval_seconds, planner.eval_every) == (5.0, 10)
    left = 1000.0 - clock.now
    assert planner.total == step + max(k for k in range(int(left) + 1) if k + 5.0 * evaluations_between(step, step + k, 10) <= left)


def test_planner_probes_until_its_steps_took_their_share_of_the_time(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(budget_mod, "time", clock)
    planner = StepPlanner(until=1100.0, upper=10_000, probe_share=0.02)  # 1 000 s ahead: probe 20 s at least
    planner.start(0)
    step = 0
    while not planner.plans:
        step += 1
        clock.now += 0.5 if step < 10 else 2.0  # short batches first, then long ones
        planner.tick(step)
    assert step == 17  # steps 2-17 are timed: 8 × 0.5 s + 8 × 2 s = the 20 s of 2 % (three steps would have said 0.5 s a step)
    assert planner.step_seconds == pytest.approx((8 * 0.5 + 8 * 2.0) / 16)


def test_planner_keeps_its_lower_bound_but_not_past_the_hard_deadline(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(budget_mod, "time", clock)
    planner = StepPlanner(until=105.0, upper=500, lower=20, hard_until=130.0)
    planner.start(0)
    for step in range(1, 5):
        clock.now += 1.0
        planner.tick(step)
    assert planner.total == 20  # 1 s left of the block's part: 20 steps all the same
    step = 4
    while step < planner.total:
        step += 1
        clock.now += 2.0
        if planner.tick(step):
            break
    assert planner.total == step == 17 and planner.plans[-1]["deadline"]  # 104 + 13 × 2 s passes the stage's deadline at 130


def test_planner_agrees_with_the_other_processes_and_keeps_its_bound(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(budget_mod, "time", clock)
    seen = []

    def agree(step, left):
        seen.append((step, left))
        return step * 2, left / 2  # another process is twice as slow and has half the time left

    planner = StepPlanner(until=300.0, upper=40, agree=agree)
    planner.start(10)  # resumed at step 10
    for step in range(11, 15):
        clock.now += 1.0
        planner.tick(step)
    assert seen == [(1.0, 196.0)] and planner.total == 40  # 14 + 98 // 2 = 63, bounded by 40


def test_budget_refuses_a_run_it_leaves_no_time_to_train():
    b = Budget(60.0, started=0.0, label="1m")
    budget_mod_time = budget_mod.time.perf_counter()
    b.started = budget_mod_time - 58.0  # 58 s of the minute are gone
    with pytest.raises(LowrankError, match=r"distill.budget 1m leaves no time to train: .*took 50 s.*8 s.*above 1\.0 min") as e:
        b.check_room(50.0, 8.0, 2.0)
    assert e.value.param == "budget"
    with pytest.raises(LowrankError, match="leaves no time"):  # rank 0's measure decides, not this process's clock
        Budget(60.0, started=budget_mod_time, label="1m").check_room(50.0, 8.0, 2.0, left=1.0)
    ok = Budget(600.0, started=budget_mod.time.perf_counter(), label="10m")
    ok.check_room(5.0, 1.0, 10.0)
    assert 585 < ok.record["training_seconds"] <= 590 and ok.record["reserve_seconds"] == 10.0


def _local_setup():
    teacher = tiny_vit()
    student = tiny_vit()
    factorize_model(student, recipe_from_dict({"factorize": {"kappa": 3}}), family=get_family("timm"))
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return teacher, student, batches


def test_local_stage_past_its_deadline_leaves_the_blocks_and_within_it_keeps_its_bound():
    teacher, student, batches = _local_setup()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = LocalConfig(steps=6, examples=8, batch_size=4)
    late = local_distill(student, teacher, get_family("timm"), batches, cfg, torch.device("cpu"), deadline=StageDeadline(until=0.0))
    assert late.blocks == [] and late.untrained == ["blocks.0", "blocks.1"] and late.to_dict()["untrained"] == late.untrained
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    rounds = LocalConfig(steps=6, rounds=2, examples=8, batch_size=4)
    assert local_distill(student, teacher, get_family("timm"), batches, rounds, torch.device("cpu"),
                         deadline=StageDeadline(until=0.0)).untrained == ["blocks.0 (round 1)", "blocks.1 (round 1)",
                                                                          "blocks.0 (round 2)", "blocks.1 (round 2)"]
    roomy = local_distill(student, teacher, get_family("timm"), batches, cfg, torch.device("cpu"),
                          deadline=StageDeadline(until=budget_mod.time.perf_counter() + 600))
    assert [b["steps"] for b in roomy.blocks] == [6, 6] and not roomy.untrained  # the recipe's bound, not the clock, ended them
    fixed = local_distill(student, teacher, get_family("timm"), batches, cfg, torch.device("cpu"))
    assert [b["steps"] for b in fixed.blocks] == [6, 6]


@pytest.mark.parametrize("lr", [1.0, 10.0])  # Adam at lr 1 makes each block worse in 3 steps; at lr 10 its output NaN
def test_a_block_that_training_makes_worse_goes_back_to_its_weights(lr):
    teacher, student, batches = _local_setup()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    wild = LocalConfig(steps=3, examples=8, batch_size=4, lr=lr)
    result = local_distill(student, teacher, get_family("timm"), batches, wild, torch.device("cpu"))
    assert all(b.get("reverted") for b in result.blocks) and [b["steps"] for b in result.blocks] == [3, 3]
    assert all(b["error_after"] == b["error_before"] and not b["error_trained"] <= b["error_before"] for b in result.blocks)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def _budget_recipe(tmp_path, **distill):
    cfg = {"epochs": 500, "batch_size": 16, "lr": 1e-3, "warmup_steps": 2, "log_every": 5, "eval_every": 25, "checkpoint_every": 20,
           "local": {"steps": 5000, "examples": 32, "batch_size": 16, "budget_share": 0.3, "min_steps": 4}, "budget": "12s", **distill}
    path = tmp_path / "budget.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny-budget", "model": TINY_VIT, "model_kwargs": TINY_VIT_KWARGS, "factorize": {"kappa": 3},
                                    "data": {"source": "synthetic", "synthetic_size": 128, "num_workers": 0}, "distill": cfg}))
    return path


@pytest.mark.slow
def test_a_budgeted_run_plans_both_stages_reports_them_and_resumes_with_its_plan(cli, tmp_path, vit_ckpt):
    out = tmp_path / "run"
    r = cli("compress", vit_ckpt, "--recipe", _budget_recipe(tmp_path), "--out", out, "--device", "cpu", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    b = report["budget"]
    assert b["seconds"] == 12 and b["reserve_seconds"] > 2
    local, e2e = b["local"], b["end_to_end"]
    # the clock, not the bound, ended each block; on a loaded machine the first block's 4 steps can outlast the stage's time,
    # and the second is then left untrained (recorded as such), never trained past the deadline
    untrained = report["local"].get("untrained", [])
    assert local["steps"] and len(local["steps"]) + len(untrained) == 2 and all(4 <= s < 5000 for s in local["steps"])
    assert [blk["steps"] for blk in report["local"]["blocks"]] == local["steps"]
    assert 4 <= e2e["steps"] < e2e["max_steps"] == 500 * (128 // 16)
    ats = [p["at_step"] for p in e2e["plans"]]
    assert ats[0] >= 4 and ats == sorted(set(ats))  # the first plan after 3 timed steps and 2 % of the stage's time, then later ones
    assert report["train"]["steps"] == report["train"]["total_steps"] == e2e["steps"] == e2e["plans"][-1]["total"]
    assert b["command_seconds"] < 12 * 1.5  # ends near the budget (the exact margin is the benchmark's to measure)
    assert json.loads((out / "run.json").read_text())["budget"]["end_to_end"]["steps"] == e2e["steps"]
    table = budget_table(report)
    assert table is not None and [c.header for c in table.columns] == ["stage", "planned min", "actual min", "steps"]
    assert budget_table({"budget": None}) is None

    # interrupted after its plan: the resumed run ends at the planned count, whatever the clock says now
    recipe = load_recipe(str(_budget_recipe(tmp_path)))
    planned = {}

    def interrupt(pos):
        if pos.step == 45:
            planned["steps"] = json.loads((tmp_path / "cut" / "run.json").read_text())["budget"]["end_to_end"]["steps"]
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress_checkpoint(vit_ckpt, recipe, out=tmp_path / "cut", device="cpu", step_hook=interrupt)
    resumed = compress_checkpoint(vit_ckpt, recipe, out=tmp_path / "cut", device="cpu", resume=True)
    assert resumed["train"]["steps"] == planned["steps"] > 45


def test_budget_errors_are_one_line_and_leave_nothing(cli, tmp_path, vit_ckpt):
    out = tmp_path / "run"
    one_line_error(cli("compress", vit_ckpt, "--recipe", _budget_recipe(tmp_path), "--out", out, "--budget", "20"),
                   "--budget '20': not a duration such as 30m, 1h30m, 90s or 2h")
    one_line_error(cli("compress", vit_ckpt, "--recipe", _budget_recipe(tmp_path), "--out", out, "--budget", "1s", "--device", "cpu"),
                   "distill.budget 1s leaves no time to train", "took", "(option --budget)")
    assert not out.exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(_budget_recipe(tmp_path).read_text().replace("budget: 12s", "budget: 12"))
    one_line_error(cli("compress", vit_ckpt, "--recipe", bad, "--out", out), "distill.budget: not a duration")
    assert not out.exists()
