"""What a search runs next: successive halving over training steps, then exports of the best.

Optuna's multi-objective studies refuse ``Trial.report``, so its pruners cannot stop a
training run early. This module builds the multi-fidelity search on the study instead,
with its public API: every trial is one measured candidate, and the next trial's adapter
and length are fixed by :meth:`optuna.Study.enqueue_trial` (its training parameters, and
``user_attrs`` naming its role and steps) before the sampler fills in the rest.

- **screen**: a new adapter (the space's ``start`` first, then the sampler's proposals),
  trained for the first rung (``steps[0]``) and exported the screening way
  (:meth:`~autotune.space.SearchSpace.screening`). The first ``local_first`` proposals after the
  start keep its categorical choices (:meth:`~autotune.space.SearchSpace.local_params`, enqueued
  as fixed parameters) and the sampler draws their rank, alpha and learning rate: a small budget
  screens one or two adapters besides the start, and a draw from the whole space (QLoRA on the
  attention only, say) is seldom a rival to a known-good recipe, while its neighbours are.
- **continue**: an adapter among the best ``promote`` share of those measured at rung k is
  trained on to rung k + 1 (asynchronous successive halving: promotions are decided on the
  trials finished so far, so workers never wait for a rung to fill). Under the ``wsd``
  schedule it resumes from the shorter run's checkpoint (:mod:`autotune.trajectory`).
- **export**: the best adapter at the top rung gets the space's other precisions and int4
  methods (:meth:`~autotune.space.SearchSpace.exports`): export knobs are cheap next to
  training, so they are spent where an adapter has earned them, once the budget has no room
  left for a new adapter that could take its place (or has room for the exports only).

Adapters are ranked within a rung by the mean log-probability of the right label on the
validation prompts (:meth:`~autotune.measure.Measurement.label_logprob`), a lower-variance
signal than accuracy; an adapter whose accuracy is not above the majority-class rate
learnt nothing and is never promoted or exported.
The trial budget decides what is still worth starting: a new adapter only while it could
still reach the top rung and be exported; after that, the best adapter climbs on to the top
rung, and when nothing worth its cost is left the search stops early (:class:`Stop`) instead
of screening adapters that could never be continued.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna


EXTRA_EXPORTS = 4  # int4 variants, knobs sampled, an exported finalist may get when the budget has room


@dataclass(frozen=True)
class Work:
    """A trial to enqueue: the parameters to fix, and the user attributes that say what it is."""

    params: dict[str, Any]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Stop:
    """Nothing left worth a trial: the search ends before its budget, for ``reason``."""

    reason: str


NO_ROOM = "the trials left could not take a new adapter to the top rung"
NOTHING_LEFT = "every adapter of the space is screened, and none is left to continue or export"


def role(trial: optuna.trial.FrozenTrial) -> str:
    return trial.user_attrs.get("role", "screen")


def signal(trial: optuna.trial.FrozenTrial) -> float:
    """How well a trial's adapter learnt, for ranking within a rung: the mean log-prob of the right
    label, or the accuracy where the labels were not scored."""
    value = trial.user_attrs.get("signal")
    return float(value) if value is not None else math.log(max(trial.values[0], 1e-9))


def learned(trial: optuna.trial.FrozenTrial, majority_rate: float) -> bool:
    """Whether the trial beats always naming the most frequent label: below that an adapter learnt nothing
    a continuation or another export could use (the never-answering 0.000 adapters)."""
    return trial.values[0] > majority_rate


class Scheduler:
    """Decides the next trial of a study from the trials so far (see the module docstring).

    Args:
        rungs: the steps of each rung, ascending (the space's ``steps``).
        promote: the share of a rung's adapters that continue to the next.
        exports: the exports of an adapter that reached the top rung, each the parameters to fix
            (``space.exports``); called with the adapter's trial.
        majority_rate: validation accuracy of always answering the most frequent training label.
        start: the parameters of the first adapter (empty: the sampler proposes it).
        local: the parameters the first ``local_first`` new adapters after the start fix (the start's
            categorical choices); empty: the sampler proposes every new adapter whole.
        local_first: how many new adapters keep ``local``.
    """

    def __init__(self, rungs: Sequence[int], promote: float, exports, majority_rate: float,
                 start: dict[str, Any] | None = None, local: dict[str, Any] | None = None,
                 local_first: int = 0) -> None:
        self.rungs = tuple(rungs)
        self.promote = promote
        self.exports = exports
        self.majority_rate = majority_rate
        self.start = dict(start or {})
        self.local = dict(local or {})
        self.local_first = local_first

    def first(self, trials: Sequence[optuna.trial.FrozenTrial]) -> Work | None:
        """The start adapter, for a study without trials."""
        if trials or not self.start:
            return None
        return Work(dict(self.start), {"role": "screen", "steps": self.rungs[0], "start": True})

    def next(self, trials: Sequence[optuna.trial.FrozenTrial], remaining: int,
             fresh: bool = True) -> Work | Stop | None:
        """The trial to enqueue next; None for a new adapter proposed by the sampler; :class:`Stop` when
        nothing left is worth a trial.

        ``remaining``: trials of the budget not yet started (waiting and running ones excluded).
        ``fresh``: whether the space has adapters not screened yet. When it has none and no adapter
        learnt anything, the best of those at chance are continued and exported after all: the budget
        has nothing better to buy.
        """
        if remaining <= 0:
            return Stop("the budget is spent")
        started = {_key(t) for t in trials}  # a pruned one too: its export proved a duplicate or out of bounds
        measured = [t for t in _complete(trials) if role(t) in ("screen", "continue")]
        adapters = [t for t in measured if self._learned(t)] or ([] if fresh else measured)
        best = self._finalist(adapters)
        if best is None:  # nothing learnt yet: only a new adapter can help
            return self._new(trials) if fresh else Stop(NOTHING_LEFT)
        plan = self.exports(best)
        missing = [i for i in range(len(plan)) if _export_key(best, i) not in started]
        at_top = _steps(best) == self.rungs[-1]
        if missing and remaining <= len(missing):  # the budget has room for the exports only: the best so far
            return self._export(best, plan, missing[0])
        if promotion := self._promotion(adapters, started):
            return promotion
        if fresh and remaining > len(plan or [None]) + len(self.rungs) - 1:
            return self._new(trials)  # a new adapter could still reach the top rung and be exported
        # The finalist's exports once no new adapter can take its place: exports spent on a finalist that a later
        # adapter overtakes are spent on neither the final model nor the search.
        if missing and at_top:
            return self._export(best, plan, missing[0])
        if not at_top and remaining > len(missing):  # no room for a new adapter: the best climbs on instead
            following = self.rungs[self.rungs.index(_steps(best)) + 1]
            if _continue_key(best, following) not in started:
                return self._continue(best, following)
        if at_top and plan:  # more int4 variants of the best, their knobs sampled (none for an int4-aware one)
            for index in range(len(plan), len(plan) + EXTRA_EXPORTS):
                if _export_key(best, index) not in started:
                    return self._export(best, plan + [{"precision": "int4"}] * EXTRA_EXPORTS, index)
        return Stop(NO_ROOM if fresh else NOTHING_LEFT)

    # ------------------------------------------------------------------ parts

    def _new(self, trials: Sequence[optuna.trial.FrozenTrial]) -> Work | None:
        """A new adapter: near the start while fewer than ``local_first`` were (a duplicate proposal counts,
        so an exhausted neighbourhood opens the whole space), else the sampler's whole proposal (None)."""
        if self.local and sum(bool(t.user_attrs.get("local")) for t in trials) < self.local_first:
            return Work(dict(self.local), {"role": "screen", "steps": self.rungs[0], "local": True})
        return None

    def _learned(self, trial: optuna.trial.FrozenTrial) -> bool:
        return learned(trial, self.majority_rate)

    def _finalist(self, adapters: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial | None:
        """The best adapter at the highest rung any adapter reached."""
        if not adapters:
            return None
        top = max(_steps(t) for t in adapters)
        return max((t for t in adapters if _steps(t) == top), key=signal)

    def _promotion(self, adapters: list[optuna.trial.FrozenTrial], started: set) -> Work | None:
        """The best adapter of the highest rung whose top ``promote`` share has one not yet continued."""
        for k in reversed(range(len(self.rungs) - 1)):
            done = sorted((t for t in adapters if _steps(t) == self.rungs[k]), key=signal, reverse=True)
            for trial in done[: math.floor(len(done) * self.promote)]:
                if _continue_key(trial, self.rungs[k + 1]) not in started:
                    return self._continue(trial, self.rungs[k + 1])
        return None

    def _continue(self, trial: optuna.trial.FrozenTrial, steps: int) -> Work:
        return Work(_adapter_params(trial), {"role": "continue", "steps": steps,
                                             "trajectory": trial.user_attrs.get("trajectory"),
                                             "from_trial": trial.number})

    def _export(self, trial: optuna.trial.FrozenTrial, plan: list[dict[str, Any]], index: int) -> Work:
        return Work({**_adapter_params(trial), **plan[index]},
                    {"role": "export", "steps": _steps(trial), "trajectory": trial.user_attrs.get("trajectory"),
                     "from_trial": trial.number, "export_index": index})


def _complete(trials: Sequence[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and not t.user_attrs.get("duplicate_of")]


def _steps(trial: optuna.trial.FrozenTrial) -> int | None:
    return trial.user_attrs.get("steps")


def _adapter_params(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The parameters that fix a trial's adapter (recorded by the objective)."""
    return dict(trial.user_attrs.get("adapter_params", {}))


def _continue_key(trial: optuna.trial.FrozenTrial, steps: int) -> tuple:
    """The :func:`_key` of continuing ``trial``'s adapter to ``steps``."""
    return "continue", trial.user_attrs.get("trajectory"), steps, None


def _export_key(trial: optuna.trial.FrozenTrial, index: int) -> tuple:
    """The :func:`_key` of export ``index`` of ``trial``'s adapter at its steps."""
    return "export", trial.user_attrs.get("trajectory"), _steps(trial), index


def _key(trial: optuna.trial.FrozenTrial) -> tuple:
    """What a trial is, to never enqueue the same work twice: (role, adapter, steps, export index)."""
    kind = role(trial)
    index = trial.user_attrs.get("export_index") if kind == "export" else None
    return kind, trial.user_attrs.get("trajectory"), _steps(trial), index
