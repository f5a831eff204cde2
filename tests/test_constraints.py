"""Constraints as of now (autotune.constraints): a study searched under one bound and resumed under a
tighter one is judged by the tighter one everywhere: by the sampler, the live view's "best so far",
the trial notes in optuna-dashboard and the selection.

The candidates are not built: ``Search(evaluate=...)`` gets the figures tests/test_schedule.py computes
from each spec (int8 30 ms, int4 40 ms, fp32 60 ms per request).
"""

from __future__ import annotations

import io
from pathlib import Path

import optuna
import pytest
from rich.console import Console

from autotune.bounds import Bounds
from autotune.candidate import Workspace
from autotune.constraints import BoundedSampler, BoundsView, as_of, feasible
from autotune.dashboard import TrialRecorder
from autotune.data import DataConfig, load_splits
from autotune.live import SearchView
from autotune.report import feasible_pool
from autotune.search import Search, SearchSettings, best_trial, selection_candidate
from autotune.study import open_storage, open_study
from autotune.selection import rank
from autotune.space import SearchSpace
from conftest import LABELS, write_jsonl
from test_schedule import SPACE, fake_evaluate

S = optuna.trial.TrialState
LOOSE, TIGHT = 100.0, 35.0  # ms: every export meets the first; only the int8 ones (30 ms) meet the second


class Spy(optuna.samplers.BaseSampler):
    """A sampler that records, at each decision, which complete trials it was shown as feasible."""

    def __init__(self, sampler: optuna.samplers.BaseSampler) -> None:
        self.sampler = sampler
        self.seen: list[dict[int, bool]] = []

    def _look(self, study: optuna.Study) -> None:
        self.seen.append({t.number: all(v <= 0 for v in t.constraints.values())
                          for t in study.get_trials(deepcopy=False, states=(S.COMPLETE,))})

    def infer_relative_search_space(self, study, trial):
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        self._look(study)
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        self._look(study)
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)


def _run(tmp_path: Path, base, splits, trials: int, max_latency: float) -> tuple[Search, TrialRecorder, Spy]:
    """One run of the search on the study in ``tmp_path`` (created or resumed), notes written as the CLI does."""
    space = SearchSpace.from_dict(SPACE).restrict(("int4", "int8", "fp32"), False, "cpu")
    ws = Workspace(root=tmp_path / "cache", base=base, splits=splits, threads=1, device="test CPU")
    settings = SearchSettings(trials=trials, seed=0, max_latency_ms=max_latency)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(url, "s", settings, settings.bounds.to_dict())
    assert isinstance(study.sampler, BoundedSampler) and study.sampler.bounds == settings.bounds
    spy = study.sampler.sampler = Spy(study.sampler.sampler)
    recorder = TrialRecorder(ws, tmp_path / "artifacts", settings.latency_metric, settings.bounds)
    recorder.judge_again(study, open_storage(url))
    search = Search(ws, space, "cpu", settings, study, evaluate=fake_evaluate)
    search.run(on_trial=recorder, on_finish=recorder.attach)
    return search, recorder, spy


def _notes(study: optuna.Study, storage) -> dict[int, str]:
    from optuna_dashboard import get_note

    handles = optuna.load_study(study_name=study.study_name, storage=storage, sampler=optuna.samplers.RandomSampler())
    study_id = storage.get_study_id_from_name(study.study_name)
    return {t.number: get_note(optuna.Trial(handles, storage.get_trial_id_from_study_id_trial_number(study_id, t.number)))
            for t in study.get_trials(deepcopy=False, states=(S.COMPLETE,))}


@pytest.fixture()
def splits(tmp_path: Path):
    rows = [{"text": f"example {i} about {label.lower()}", "label": label} for i in range(60) for label in LABELS]
    return load_splits(DataConfig(path=str(write_jsonl(tmp_path / "data.jsonl", rows))))


def test_a_study_resumed_under_a_tighter_bound_is_judged_by_it_everywhere(tmp_path: Path, base, splits) -> None:
    first, _, _ = _run(tmp_path, base, splits, trials=6, max_latency=LOOSE)
    before = first.study.get_trials(deepcopy=False, states=(S.COMPLETE,))
    slow = [t.number for t in before if t.values[1] > TIGHT]
    assert slow and len(slow) < len(before), [(t.number, t.values) for t in before]  # the new bound bites, not all
    assert all(t.constraints["max_latency_ms"] <= 0 for t in before)  # as stored: feasible under the first bound

    second, _, spy = _run(tmp_path, base, splits, trials=10, max_latency=TIGHT)
    study, bounds = second.study, Bounds(max_latency_ms=TIGHT)
    complete = study.get_trials(deepcopy=False, states=(S.COMPLETE,))
    expected = {t.number: t.values[1] <= TIGHT for t in complete}
    assert len(complete) == 10

    # 1. The sampler: every time it decided, each complete trial it was shown was feasible iff within 35 ms.
    assert spy.seen, "the resumed search never asked the sampler"
    for shown in spy.seen:
        assert shown == {n: expected[n] for n in shown}, shown
    assert any(set(slow) <= set(shown) for shown in spy.seen)
    # The stored constraints stay the record of the run that measured each trial (Optuna never changes them).
    assert all(t.constraints["max_latency_ms"] <= 0 for t in complete if t.number in slow)

    # 2. The selection: the feasible pool, and the rule's first choice on the trials' own figures.
    pool = feasible_pool(study, bounds)
    assert {t.number for t in pool} == {n for n, ok in expected.items() if ok}
    chosen = rank([selection_candidate(t, "request") for t in pool], second.settings.rule).chosen

    # 3. The live view: its "best so far" is that choice.
    best = best_trial(complete, bounds, second.settings.rule)
    assert best is not None and best.number == chosen.number
    view = SearchView(study, "request", bounds, 10, None, second.settings.rule)
    text = Console(file=io.StringIO(), width=200, record=True)
    text.print(view._render(final=True))
    assert f"best so far: #{chosen.number} " in text.export_text()

    # 4. The notes: rewritten under the bound in force when the study was resumed.
    notes = _notes(study, open_storage(f"sqlite:///{tmp_path / 'study.db'}"))
    for number, ok in expected.items():
        assert ("**Feasible:** yes" if ok else "**Feasible:** **no**") in notes[number], (number, notes[number])


def test_the_view_recomputes_constraints_and_passes_writes_through(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize", "minimize"])
    spec = {"export": {"execution_provider": "cpu"}}
    for latency in (20.0, 50.0):
        study.add_trial(optuna.trial.create_trial(values=[0.5, latency], user_attrs={"size_mb": 80.0, "spec": spec},
                                                  constraints={"max_latency_ms": latency - 100.0}))
    bounds = Bounds(max_latency_ms=30.0, max_size_mb=60.0)
    view = optuna.load_study(study_name="s", storage=BoundsView(storage, bounds))
    seen = view.get_trials()
    assert [t.constraints for t in seen] == [{"max_latency_ms": -10.0, "max_size_mb": 20.0, "max_memory_mb": -1.0},
                                            {"max_latency_ms": 20.0, "max_size_mb": 20.0, "max_memory_mb": -1.0}]
    assert [feasible(t, bounds) for t in seen] == [False, False]
    assert [feasible(t, Bounds(max_latency_ms=30.0)) for t in seen] == [True, False]
    assert study.trials[0].constraints == {"max_latency_ms": -80.0}  # the stored trial is unchanged
    assert as_of(study.trials[0], Bounds()).constraints == {"max_latency_ms": -1.0, "max_size_mb": -1.0,
                                                            "max_memory_mb": -1.0}
    running = view.ask()  # what a sampler writes through the view lands on the real trial
    running.set_user_attr("through", "view")
    assert study.trials[running.number].state == S.RUNNING
    assert study.trials[running.number].user_attrs == {"through": "view"}
