"""The study: an Optuna multi-objective search over candidates.

Objectives: maximise validation accuracy, minimise latency (``--latency-metric``: the p50
across validation prompts of the whole request by default, or of TTFT or per-token decode).
The edge bounds (``--max-latency``, ``--max-size``, ``--max-memory``; :mod:`autotune.bounds`)
are constraints the sampler knows about (``Trial.set_constraint``), so infeasible trials are
kept, marked and steered away from: as of the bounds in force, also the trials of a study resumed
under other ones (:mod:`autotune.constraints`).

Optuna does the sampling, the Pareto front and the storage (SQLite by default, any RDB URL
for many workers); this module turns a trial into a candidate and its measurement into
objective values and user attributes. What runs next is :mod:`autotune.schedule`'s: new
adapters on short runs, the best continued to longer ones from their checkpoints, and the
best at the top rung exported at the other precisions and int4 methods (train once,
export many: an export costs an export and a measurement, not a training run).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import optuna

from autotune.bounds import KINDS, Bounds, attrs_figures
from autotune.cache import file_lock
from autotune.candidate import CandidateResult, CandidateSpec, StageCallback, Workspace, run_candidate
from autotune.constraints import feasible
from autotune.errors import CandidateError, UserError
from autotune.export import ExportSpec
from autotune.footprint import footprint
from autotune.measure import LATENCY_METRICS
from autotune.schedule import Scheduler, Stop, Work
from autotune.selection import RULES, Candidate, rank
from autotune.space import SearchSpace

SAMPLERS = ("tpe", "nsga2", "random")
METRIC_NAMES = ("accuracy", "latency_ms")
INTERRUPTED = "interrupted before it finished"
MAX_DUPLICATES = 50  # in a row: the sampler keeps proposing done candidates, so the space is exhausted
DIRECTIONS = ("maximize", "minimize")


@dataclass(frozen=True)
class SearchSettings:
    """How to search; one field per CLI flag."""

    trials: int = 6
    timeout_s: float | None = None
    max_latency_ms: float | None = None
    max_size_mb: float | None = None
    max_memory_mb: float | None = None
    latency_metric: str = "request"
    sampler: str = "tpe"
    seed: int = 0
    siblings: bool = True  # the best adapter's exports (schedule): off, every adapter gets its screening export only
    rule: str = "smallest-tied"  # how the model is chosen (autotune.selection.RULES)

    def __post_init__(self) -> None:
        if self.latency_metric not in LATENCY_METRICS:
            raise UserError(f"unknown --latency-metric '{self.latency_metric}' (choose from {', '.join(LATENCY_METRICS)})")
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown --sampler '{self.sampler}' (choose from {', '.join(SAMPLERS)})")
        if self.rule not in RULES:
            raise UserError(f"unknown --select '{self.rule}' (choose from {', '.join(RULES)})")
        self.bounds  # noqa: B018 (building the Bounds validates them)
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise UserError(f"--timeout must be a positive number of seconds, got {self.timeout_s:g}")
        if self.trials < 1:
            raise UserError(f"--trials must be at least 1, got {self.trials}")

    @property
    def bounds(self) -> Bounds:
        return Bounds(self.max_latency_ms, self.max_size_mb, self.max_memory_mb)


def record_constraints(trial: optuna.Trial, values: Sequence[float]) -> None:
    """Optuna's constraints of a trial (measured - bound, feasible at <= 0; :data:`NO_BOUND` where none is
    given), one per bound kind, by name (``Trial.set_constraint``): the record of the run that measured it.
    The sampler judges finished trials by the bounds in force (:class:`~autotune.constraints.BoundedSampler`)."""
    for kind, value in zip(KINDS, values, strict=True):
        trial.set_constraint(kind.key, value)


def make_sampler(settings: SearchSettings) -> optuna.samplers.BaseSampler:
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=settings.seed, population_size=8)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    return optuna.samplers.TPESampler(seed=settings.seed, multivariate=True, group=True, n_startup_trials=6)


def latency_of(result_or_attrs: Any, metric: str) -> float:
    """The latency objective (ms) of a measurement or of a trial's user attrs."""
    if isinstance(result_or_attrs, dict):
        return float(result_or_attrs[LATENCY_METRICS[metric]])
    return float(result_or_attrs.measurement.latency.metric(metric))


def selection_candidate(trial: optuna.trial.FrozenTrial, metric: str, latency_ms: float | None = None) -> Candidate:
    """What the selection rule (:mod:`autotune.selection`) knows of a complete trial."""
    return Candidate(trial.number, trial.user_attrs.get("correct") or "", trial.values[1] if latency_ms is None
                     else latency_ms, trial.user_attrs.get("size_mb"))


def best_trial(trials: Iterable[optuna.trial.FrozenTrial], bounds: Bounds,
               rule: str = "smallest-tied") -> optuna.trial.FrozenTrial | None:
    """The trial the selection rule ships among the complete ones within ``bounds`` (the run's), as the trials
    measured them."""
    ok = {t.number: t for t in trials if feasible(t, bounds) and t.user_attrs.get("correct")}
    chosen = rank([selection_candidate(t, "") for t in ok.values()], rule).chosen
    return ok[chosen.number] if chosen else None


def trial_attrs(result: CandidateResult, ws: Workspace) -> dict[str, Any]:
    """The measured figures a trial carries (shown in optuna-dashboard)."""
    m = result.measurement
    _, answers = ws.prompts("validation")
    return {
        **asdict(m.latency),
        "peak_rss_mb": m.peak_rss_mb,
        "gpu_memory_mb": m.gpu_memory_mb,
        "size_mb": m.size_mb,
        "invalid_answers": m.accuracy.invalid,
        "eval_examples": m.accuracy.n,
        "accuracy_interval": list(m.accuracy.interval),
        "confusion": m.accuracy.confusion,
        "correct": m.accuracy.marks,
        "signal": m.label_logprob(answers, ws.splits.labels),
        "final_loss": result.train.final_loss if result.train else None,
        "resumed_at_step": result.train.resumed_at_step if result.train else None,
        "stage_seconds": result.stage_seconds,
        "cached": list(result.cached),
        "candidate": result.spec.describe(),
        "int4_method": result.spec.int4_method,
        "spec": asdict(result.spec),
        "model_key": ws.export_key(result.spec),
    }


def majority_rate(ws: Workspace) -> float:
    """Validation accuracy of always naming the most frequent training label (the majority-class baseline)."""
    counts = Counter(e.label for e in ws.splits.train)
    majority = max(ws.splits.labels, key=counts.__getitem__)
    _, answers = ws.prompts("validation")
    return answers.count(majority) / len(answers) if answers else 1.0


class Search:
    """One study over one workspace, space and hardware profile.

    Args:
        ws: model, data and artifact folders.
        space: the search space, already restricted to the profile.
        execution_provider: where candidates run (from the profile).
        settings: trials, constraint, sampler.
        study: the Optuna study (created by :func:`open_study`).
        evaluate: builds and measures a candidate (:func:`~autotune.candidate.run_candidate`; a
            benchmark may replay measured figures instead).
    """

    def __init__(self, ws: Workspace, space: SearchSpace, execution_provider: str,
                 settings: SearchSettings, study: optuna.Study, evaluate: Callable[..., CandidateResult] = run_candidate) -> None:
        self.ws = ws
        self.space = space
        self.execution_provider = execution_provider
        self.settings = settings
        self.study = study
        self.evaluate = evaluate
        self.scheduler = Scheduler(space.rungs, space.promote, self._exports, majority_rate(ws), space.start_params(),
                                   space.local_params(), space.local_first)
        self._duplicates = 0  # consecutive duplicate proposals: a sign the space is exhausted
        self.stopped: str | None = None  # why the search ended before its budget, if it did

    def _exports(self, trial: optuna.trial.FrozenTrial) -> list[dict[str, Any]]:
        """The exports the adapter of ``trial`` gets at the top rung, but those whose configuration alone
        breaks a size or memory bound."""
        if not self.settings.siblings:
            return []
        plan = self.space.exports(CandidateSpec.from_dict(trial.user_attrs["spec"]).train, self.execution_provider)
        return [p for p in plan if not self._over_by_configuration(self.space.screening_at(
            p["precision"], self.execution_provider))]

    def _over_by_configuration(self, export: ExportSpec) -> list[str]:
        """The size and memory bounds ``export``'s configuration breaks on the base model (:mod:`autotune.footprint`)."""
        bounds = self.settings.bounds
        if bounds.max_size_mb is None and bounds.max_memory_mb is None:
            return []
        return footprint(self.ws, export, with_memory=bounds.max_memory_mb is not None).over(bounds)

    def fit_screening(self) -> list[str]:
        """Under ``--max-size`` or ``--max-memory``, screen adapters at the most accurate precision whose
        configuration fits (measured once on the base model); lines saying what was ruled out."""
        lines = []
        for precision in self.space.screening_order():
            over = self._over_by_configuration(self.space.screening_at(precision, self.execution_provider))
            if not over:
                self.space = dataclasses.replace(self.space, screen=precision)
                break
            lines.append(f"{precision} exports ruled out by their configuration on the base model ({', '.join(over)})")
        return lines

    def _same_candidate(self, number: int, key: str) -> int | None:
        """Another trial that measured, or is measuring, the same model (call under the claim lock)."""
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
        for t in self.study.get_trials(deepcopy=False, states=states):
            if t.number != number and t.user_attrs.get("model_key") == key and "duplicate_of" not in t.user_attrs:
                return t.number
        return None

    def objective(self, trial: optuna.Trial, on_stage: StageCallback | None = None) -> tuple[float, float]:
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        role, steps = trial.user_attrs.get("role", "screen"), trial.user_attrs.get("steps", self.space.rungs[0])
        spec = self.space.suggest(trial, self.execution_provider, steps=steps, export=role == "export")
        key = self.ws.export_key(spec)
        if role == "export" and (over := self._over_by_configuration(spec.export)):  # never built, nor trained for
            trial.set_user_attr("excluded", f"its configuration breaks the bounds on the base model: {', '.join(over)}")
            raise optuna.TrialPruned(trial.user_attrs["excluded"])
        for name, value in {"role": role, "steps": steps, "trajectory": self.ws.trajectory_dir(spec.train).name,
                            "adapter_params": self.space.adapter_params(trial.params), "candidate": spec.describe(),
                            "spec": asdict(spec)}.items():  # the spec also on failed trials: their note needs it
            trial.set_user_attr(name, value)
        # Claim the candidate: check and mark under a lock in the shared artifacts folder, so two
        # workers proposing the same candidate at once cannot both miss the other's claim.
        with file_lock(self.ws.root / "claims" / key):
            earlier = self._same_candidate(trial.number, key)
            trial.set_user_attr("model_key", key)
            if earlier is not None:  # the sampler proposed a candidate that is done or under way
                trial.set_user_attr("duplicate_of", earlier)
        if earlier is not None:
            self._duplicates += 1
            raise optuna.TrialPruned(f"same candidate as trial {earlier}")
        self._duplicates = 0
        try:
            result = self.evaluate(self.ws, spec, on_stage=on_stage)
        except CandidateError as exc:  # run_candidate turns any failure inside the candidate into this
            trial.set_user_attr("fail_reason", str(exc))
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", INTERRUPTED)  # Optuna marks it FAIL; a rerun retries it
            raise
        for name, value in trial_attrs(result, self.ws).items():
            trial.set_user_attr(name, value)
        accuracy, latency = result.measurement.accuracy.accuracy, latency_of(result, self.settings.latency_metric)
        values = self.settings.bounds.constraint_values(attrs_figures(trial.number, accuracy, latency, trial.user_attrs))
        record_constraints(trial, values)
        return accuracy, latency

    def schedule(self) -> Work | Stop | None:
        """Enqueue the next trial the scheduler asks for (under a lock: workers share the study); return it,
        or :class:`~autotune.schedule.Stop` when nothing left is worth a trial and none is waiting."""
        with file_lock(self.ws.root / "claims" / "schedule"):
            trials = self.study.get_trials(deepcopy=False)
            waiting = [t for t in trials if t.state in (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)]
            fresh = not self._screened_all(trials)
            work = self.scheduler.first(trials) or self.scheduler.next(trials, self.remaining() - len(waiting), fresh)
            if isinstance(work, Work):
                self.study.enqueue_trial(work.params, user_attrs=work.attrs)
            elif isinstance(work, Stop) and any(t.state == optuna.trial.TrialState.WAITING for t in trials):
                work = None  # a queued trial is still to run (this worker takes it next)
        return work

    def _screened_all(self, trials: list[optuna.trial.FrozenTrial]) -> bool:
        """Every adapter of a categorical space screened (a space with a range never is)."""
        adapters = self.space.adapters()
        screened = {t.user_attrs.get("trajectory") for t in counted_trials(trials) if t.user_attrs.get("role") == "screen"}
        return adapters is not None and len(screened) >= adapters

    def remaining(self) -> int:
        """Trials still to run; interrupted ones and those of dead workers do not count (they are retried)."""
        return max(0, self.settings.trials - len(counted_trials(self.study.get_trials(deepcopy=False))))

    def run(self, on_stage: StageCallback | None = None,
            on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
            on_finish: Callable[[optuna.Trial], None] | None = None) -> None:
        """Run trials until ``settings.trials`` are done (counting earlier runs) or the timeout.

        ``on_finish(trial)`` runs as the objective ends, however it ends, while the trial can
        still take artifacts; ``on_trial(study, frozen_trial)`` once its state is final.
        """
        # A dead worker's trials fail (and are queued again) before the budget is counted, as Optuna does
        # before each trial: otherwise they would hold budget that no one is spending.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        if self.remaining() == 0 or self._stop(self.schedule()):
            return

        def next_or_stop(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            # Counted study-wide, so several workers stop together; duplicates don't count.
            if self.remaining() == 0 or self._duplicates >= MAX_DUPLICATES or self._stop(self.schedule()):
                study.stop()

        callbacks = [next_or_stop] + ([on_trial] if on_trial else [])
        def objective(trial: optuna.Trial) -> tuple[float, float]:
            try:
                return self.objective(trial, on_stage)
            finally:
                if on_finish:
                    on_finish(trial)

        # ERROR, not WARNING: a failed candidate is shown in the trial table with its reason (fail_reason);
        # Optuna's "Trial N failed" warning would print the whole traceback on top.
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        self.study.optimize(
            objective,
            n_trials=None,
            timeout=self.settings.timeout_s,
            catch=(CandidateError,),
            callbacks=callbacks,
            gc_after_trial=True,
        )

    def _stop(self, work: Work | Stop | None) -> bool:
        if isinstance(work, Stop):
            self.stopped = work.reason
        return isinstance(work, Stop)


def counted_trials(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials that count towards ``--trials``: complete ones, and failures that stay failed.

    Not counted: trials interrupted by Ctrl-C (a rerun retries them) and trials of a worker that
    died (its heartbeat stopped; ``RetryHeartbeatStaleTrialCallback`` queued a retry that lists it in
    its ``retry_history``).
    """
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():  # experimental since Optuna 3.0, and what Optuna's own retries record
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    return [t for t in trials
            if t.state == optuna.trial.TrialState.COMPLETE
            or (t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("fail_reason") != INTERRUPTED
                and t.number not in retried)]
