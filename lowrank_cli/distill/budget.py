"""Training sized by a wall-time budget (`distill.budget`): each stage's step count set from its own timed steps.

A step count that suits two CPU cores is seconds of training on a GPU, and an hour on a slower machine. With a
budget, the recipe's counts (`distill.max_steps`, `distill.epochs`, `distill.local.steps`) are upper bounds and the
clock decides the rest (docs/algorithms.md §11):

1. The budget runs from the command's start: loading, calibration and factorization come out of it first, then
   the evaluations of the teacher and of the SVD-only student. What is left, less a reserve for the final
   evaluation and the save (`reserve_seconds`), is the training time.
2. The local stage gets `distill.local.budget_share` of it (less the evaluation that follows it). Each block gets an
   equal part of what the stage has left when the block starts; the block's first steps are timed (`StepPlanner`)
   and its step count set to end in its part (at least `local.min_steps`, at most `local.steps`); no block starts or
   steps past the stage's deadline.
3. The end-to-end stage gets the rest, to the deadline less the reserve. Its first steps are timed (at least 2 % of
   its time), and the count set from them and from the periodic evaluations it brings, each at its measured cost;
   it is planned again a tenth, a third and two thirds of the way in, from the mean time of the steps so far
   (evaluations taken out), so that a first estimate that was off, or a machine that slows down, still ends in time.
   The cosine schedule follows the count as planned.

Several processes agree on every end-to-end count: each plan takes the slowest process's step time and the least time
left (`agree`). The local stage runs on rank 0 alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from lowrank_cli.errors import LowrankError

# (seconds a step, seconds left) measured on this process -> those every process plans with: the slowest step, the least time left
Agree = Callable[[float, float], "tuple[float, float]"]


def _same(step_seconds: float, left_seconds: float) -> tuple[float, float]:
    return step_seconds, left_seconds


def evaluations_between(done: int, total: int, every: int) -> int:
    """The periodic evaluations a run from step `done` to `total` makes: after each step k with done < k < total and
    k a multiple of `every` (none after the last step, whose evaluation is the final one; none when `every` is 0)."""
    if every <= 0 or total - 1 <= done:
        return 0
    return (total - 1) // every - done // every


def fit_steps(done: int, step_seconds: float, left_seconds: float, upper: int, eval_seconds: float = 0.0, eval_every: int = 0) -> int:
    """The step count that ends a stage in time: the `done` steps, then as many as `left_seconds` holds at `step_seconds`
    each, with the periodic evaluations they bring (`eval_seconds` each, after every `eval_every`-th step); at most `upper`,
    at least `done`."""
    if step_seconds <= 0:
        return max(done, upper)
    left = max(0.0, left_seconds)

    def fits(n: int) -> bool:
        return (n - done) * step_seconds + evaluations_between(done, n, eval_every) * eval_seconds <= left

    lo, hi = done, max(done, min(upper, done + int(left // step_seconds)))
    while lo < hi:  # the largest count that fits: the cost grows with the count
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


@dataclass
class StepPlanner:
    """Times a stage's steps and sets its count so that it ends by `until` (a `time.perf_counter()` time).

    `start()` right before the first step, `tick(done)` after each, `overhead(seconds, every)` after each periodic evaluation
    (every `every` steps). The first `skip` steps are not timed (allocations, a first-step probe); the plan is made once
    `probe` more are done and they took `probe_share` of the time to `until` (steps of text batches vary with their
    length), and made again at each fraction of `replan_at` of the planned count, from the mean time of the
    steps since the skipped ones less the evaluations in it, and the evaluations the count would bring counted at
    `eval_seconds` each (at first the caller's estimate, then the last evaluation measured). `total` is the count to run
    (at first `upper`).
    """

    until: float
    upper: int
    agree: Agree = _same
    eval_seconds: float = 0.0  # a periodic evaluation's cost (at first the caller's estimate, then the last measured)
    eval_every: int = 0  # its period in steps (0: none)
    skip: int = 1
    probe: int = 3
    probe_share: float = 0.0  # and the timed steps last at least this share of the time there was at `start()`
    replan_at: tuple[float, ...] = ()
    lower: int = 0  # the fewest steps a plan sets (the hard deadline aside)
    hard_until: float | None = None  # past it, the stage ends at the step done (one process: no agreement needed)
    total: int = 0
    step_seconds: float | None = None
    plans: list[dict[str, float]] = field(default_factory=list)
    _t0: float | None = None
    _first: int = 0
    _timed_from: float | None = None
    _replan: set[int] = field(default_factory=set)
    _overhead: float = 0.0  # seconds of evaluations since the timed steps began
    _window: float = 0.0  # the seconds from `start()` to `until`

    def __post_init__(self) -> None:
        self.total = self.upper

    def start(self, done: int = 0) -> None:
        self._t0, self._first = time.perf_counter(), done
        self._timed_from = self._t0 if self.skip == 0 else None
        self._window = max(0.0, self.until - self._t0)

    def overhead(self, seconds: float, every: int) -> None:
        """A periodic evaluation took `seconds`; one runs every `every` steps."""
        if self._timed_from is not None:
            self._overhead += seconds
        self.eval_seconds, self.eval_every = seconds, every

    def tick(self, done: int) -> bool:
        """After each step (`done` steps in all): True when this call (re)planned `total`."""
        now = time.perf_counter()
        if self._t0 is None:
            self.start(done - 1)
        n = done - self._first
        if self.hard_until is not None and now >= self.hard_until and self.total > done:
            self.total = done
            self.plans.append({"at_step": done, "step_seconds": self.step_seconds or 0.0, "total": done, "deadline": True})
            return True
        if n == self.skip:
            self._timed_from = now
        if n <= self.skip or self._timed_from is None:
            return False
        timed = n - self.skip
        probing = timed < self.probe or now - self._timed_from < self.probe_share * self._window
        if (done not in self._replan) if self.plans else probing:
            return False
        self.step_seconds, left = self.agree((now - self._timed_from - self._overhead) / timed, self.until - now)
        self.total = max(min(self.lower, self.upper), fit_steps(done, self.step_seconds, left, self.upper, self.eval_seconds, self.eval_every))
        if not self.plans:
            self._replan = {round(f * self.total) for f in self.replan_at} - {done}
        self.plans.append({"at_step": done, "step_seconds": self.step_seconds, "total": self.total})
        return True


@dataclass
class Budget:
    """The whole command's clock: `seconds` from `started` (both `time.perf_counter()` terms), and the plan so far."""

    seconds: float
    started: float
    label: str = ""  # as the recipe gave it (`20m`), for messages
    reserve: float = 0.0  # kept at the end for the final evaluation and the save
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def deadline(self) -> float:
        return self.started + self.seconds

    def training_seconds(self, now: float | None = None) -> float:
        """What is left to train, now, less the reserve."""
        return self.deadline - self.reserve - (time.perf_counter() if now is None else now)

    def check_room(self, setup_seconds: float, evaluation_seconds: float, reserve: float, left: float | None = None) -> None:
        """Set the reserve; a LowrankError when the budget leaves no time to train after what it already took (`left`: the
        training time rank 0 measured, so that every process decides alike; default: this process's)."""
        self.reserve = reserve
        left = self.training_seconds() if left is None else left
        self.record.update({"seconds": self.seconds, "setup_seconds": setup_seconds, "baseline_eval_seconds": evaluation_seconds,
                            "reserve_seconds": reserve, "training_seconds": left})
        if left < 0.05 * self.seconds:
            need = setup_seconds + evaluation_seconds + reserve
            raise LowrankError(f"distill.budget {self.label or f'{self.seconds:g}s'} leaves no time to train: loading, calibration and "
                               f"factorization took {setup_seconds:.0f} s, evaluating the teacher and the SVD student {evaluation_seconds:.0f} s, "
                               f"and the final evaluation and save need about {reserve:.0f} s; give a budget well above {need / 60:.1f} min",
                               param="budget")

    def local_until(self, share: float, held_back: float = 0.0) -> float:
        """The local stage's deadline: `share` of the training time left now, less `held_back` seconds of other work before
        the end-to-end stage (the evaluation after the local stage)."""
        now = time.perf_counter()
        until = now + share * max(0.0, self.training_seconds(now) - held_back)
        self.record["local"] = {"planned_seconds": until - now}
        return until
