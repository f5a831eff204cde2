"""Refit: the chosen configuration trained again on the training and validation examples together.

The search spends the validation split on choosing. Once the choice is made those examples are
worth more as training data: small labelled sets are far from their learning curve's plateau
(on the demo, the start's adapter trained on 3/4 of the training split scored 0.06 lower on
validation than on all of it, benchmarks/README.md "Refit"). So by default the chosen
candidate's adapter is trained again, with the same training choices and the same number of
steps, on train + validation, exported the chosen way, and that model ships in ``best/``
(AutoGluon's ``refit_full``; ``--no-refit`` ships the chosen model as it was measured).

What the refit does not change is checked by construction: the export configuration and the base
are the chosen candidate's, so its size, memory and latency are the configuration's (re-measured
here on the test prompts all the same). What it does change, the accuracy, can only be read on
the test split now: the refit model is scored there paired with the chosen model, and both
figures are reported as they are. Nothing is chosen on test: the refit ships unless it fails.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from autotune.candidate import CandidateResult, CandidateSpec, Workspace, run_candidate
from autotune.selection import Candidate, Paired, compare


@dataclass(frozen=True)
class Refit:
    """The refit model, scored on the test split beside the chosen model it replaces."""

    result: CandidateResult  # the refit model on the test split, with latency
    examples: int  # training examples it was trained on (train + validation)
    vs_chosen: Paired  # refit - chosen, on the same test prompts

    def to_dict(self) -> dict:
        m = self.result.measurement
        return {"candidate": self.result.spec.describe(), "train_examples": self.examples,
                "model_key": self.result.model_dir.name,
                "test": m.accuracy.to_dict(), "test_accuracy": m.accuracy.accuracy,
                "vs_chosen": self.vs_chosen.to_dict(), "size_mb": m.size_mb,
                "request_p50_ms": m.latency.request_p50_ms if m.latency else None}


def refit_workspace(ws: Workspace) -> Workspace:
    """``ws`` on :meth:`~autotune.data.Splits.refit`'s split: same folders, model and settings. The split's
    fingerprint is in every cache key, so its adapters and exports never stand in for the search's."""
    return dataclasses.replace(ws, splits=ws.splits.refit())


def refit(ws: Workspace, spec: CandidateSpec, chosen_test: CandidateResult, on_stage=None) -> Refit | None:
    """Train ``spec`` (the chosen candidate) on train + validation, export it as chosen and score it on the
    test split, paired with ``chosen_test`` (the chosen model's test run). None for a candidate without
    training (the base exported as is). Raises :class:`~autotune.errors.CandidateError` as
    :func:`~autotune.candidate.run_candidate` does."""
    if spec.train is None or not ws.splits.validation:
        return None
    refit_ws = refit_workspace(ws)
    result = run_candidate(refit_ws, spec, split="test", with_latency=True, on_stage=on_stage)
    marks = (result.measurement.accuracy.marks, chosen_test.measurement.accuracy.marks)
    paired = compare(Candidate(1, marks[0], 0.0, None), Candidate(0, marks[1], 0.0, None))
    return Refit(result, len(refit_ws.splits.train), paired)
