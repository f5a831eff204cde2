"""Constraints as of now: whether a trial is feasible follows from what it measured and the bounds in force.

Optuna stores a trial's constraint values when the trial finishes and never changes them
(``Trial.set_constraint``; :func:`autotune.search.record_constraints` records them so). A study resumed
with another ``--max-latency``, ``--max-size`` or ``--max-memory`` keeps those values, so whatever
reads them would judge its trials by the bounds of the run that measured them. Instead every reader
derives feasibility from the stored measurements (objective values and user attributes) and the bounds
of the run: the live view, the trial notes and the selection through :func:`feasible`, and the
sampler through :class:`BoundedSampler`.

:class:`BoundedSampler` wraps the sampler a study was created with and lets it see the study
through :class:`BoundsView`: the same storage, with each complete trial's constraints recomputed as
it is read. Everything a sampler writes passes through to the real storage under the real trial ids,
so its own bookkeeping (NSGA-II's generations and parent populations) lands where it belongs; TPE,
NSGA-II and random sampling all work unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from autotune.bounds import KINDS, Bounds, trial_figures


def constraint_values(trial: FrozenTrial, bounds: Bounds) -> dict[str, float]:
    """A complete trial's constraints under ``bounds``, by bound kind (measured - bound, feasible at <= 0)."""
    return dict(zip((k.key for k in KINDS), bounds.constraint_values(trial_figures(trial)), strict=True))


def feasible(trial: FrozenTrial, bounds: Bounds) -> bool:
    """Whether a complete trial meets every bound in ``bounds`` (a figure it did not measure cannot)."""
    return trial.state == TrialState.COMPLETE and bounds.meets(trial_figures(trial))


def _is_constraint(key: str) -> bool:
    # Optuna's record of a constraint: system attribute "constraints:<name>" (Trial.set_constraint), or one
    # list "constraints" (constraints_func, before Optuna 5).
    return key == "constraints" or key.startswith("constraints:")


def as_of(trial: FrozenTrial, bounds: Bounds) -> FrozenTrial:
    """``trial`` with its constraints under ``bounds`` in place of the stored ones (complete trials; others as
    they are). The stored trial is left unchanged."""
    if trial.state != TrialState.COMPLETE or not trial.values:
        return trial
    seen = copy.copy(trial)
    seen.system_attrs = {k: v for k, v in trial.system_attrs.items() if not _is_constraint(k)}
    for name, value in constraint_values(trial, bounds).items():
        seen.set_constraint(name, value)
    return seen


class BoundsView(optuna.storages.BaseStorage):
    """A study storage read with constraints as of ``bounds`` (:func:`as_of`); writes pass through."""

    def __init__(self, storage: optuna.storages.BaseStorage, bounds: Bounds) -> None:
        self.storage = storage
        self.bounds = bounds

    # Reading trials: constraints as of the bounds in force.
    def get_trial(self, trial_id: int) -> FrozenTrial:
        return as_of(self.storage.get_trial(trial_id), self.bounds)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return [as_of(t, self.bounds) for t in self.storage.get_all_trials(study_id, deepcopy=deepcopy, states=states)]

    # Everything else: the storage itself.
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self.storage.create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self.storage.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self.storage.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self.storage.set_study_system_attr(study_id, key, value)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self.storage.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self.storage.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self.storage.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self.storage.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self.storage.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[optuna.study.FrozenStudy]:
        return self.storage.get_all_studies()

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self.storage.create_new_trial(study_id, template_trial)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        self.storage.set_trial_param(trial_id, param_name, param_value_internal, distribution)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        return self.storage.set_trial_state_values(trial_id, state, values)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        self.storage.set_trial_intermediate_value(trial_id, step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.storage.set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.storage.set_trial_system_attr(trial_id, key, value)


class BoundedSampler(optuna.samplers.BaseSampler):
    """``sampler``, shown the study through :class:`BoundsView` (constraints as of ``bounds``).

    ``storage`` is the study's own storage. The view is opened once per trial sampled, so every
    decision about one trial sees one list of trials (as Optuna's own study caches it per trial).
    """

    def __init__(self, sampler: optuna.samplers.BaseSampler, storage: optuna.storages.BaseStorage,
                 bounds: Bounds) -> None:
        self.sampler = sampler
        self.view = BoundsView(storage, bounds)
        self._seen: tuple[tuple[str, int], optuna.Study] | None = None

    @property
    def bounds(self) -> Bounds:
        return self.view.bounds

    def seen(self, study: optuna.Study, trial: FrozenTrial) -> optuna.Study:
        """The study as the wrapped sampler sees it while it samples ``trial``."""
        key = (study.study_name, trial.number)
        if self._seen is None or self._seen[0] != key:
            self._seen = key, optuna.load_study(study_name=study.study_name, storage=self.view, sampler=self.sampler)
        return self._seen[1]

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.sampler.before_trial(self.seen(study, trial), trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.sampler.infer_relative_search_space(self.seen(study, trial), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.sampler.sample_relative(self.seen(study, trial), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.sampler.sample_independent(self.seen(study, trial), trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.sampler.after_trial(self.seen(study, trial), trial, state, values)
