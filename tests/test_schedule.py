"""The multi-fidelity search on the study: rungs, promotions, exports and the budget (autotune.schedule).

The candidates are not built here: ``Search(evaluate=...)`` gets a function that returns figures
computed from the candidate's spec, so these tests see exactly the decisions the search makes.
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from autotune.candidate import CandidateResult, Workspace
from autotune.data import DataConfig, load_splits
from autotune.measure import Latency, Measurement, Request, score
from autotune.schedule import NO_ROOM, Scheduler, Stop
from autotune.search import Search, SearchSettings
from autotune.study import open_study
from autotune.space import SearchSpace
from conftest import LABELS, write_jsonl

SPACE = {
    "start": {"method": "lora", "rank": 16, "alpha_ratio": 2, "learning_rate": 1.0e-3, "int4_method": "gptq",
              "block_size": 32, "symmetric": True},
    "rank": [4, 16, 64], "alpha_ratio": [1, 2], "learning_rate": [5.0e-4, 1.0e-3, 2.0e-3],
    "steps": [10, 20, 40], "promote": 0.5,
    "int4_method": ["rtn", "gptq"], "precision": ["int4", "int8", "fp32"], "block_size": [32, 64],
    "symmetric": [True, False],
}


def quality(spec) -> float:
    """A made-up learning curve: longer and higher-rank training learns more; lr 5e-4 never learns."""
    t = spec.train
    if t.learning_rate < 6e-4:
        return 0.0
    learnt = (1 - math.exp(-t.steps / 8)) * (0.7 + 0.1 * math.log2(t.rank / 4) / 4)
    loss = {"fp32": 0.0, "int8": 0.01, "int4": 0.08 if spec.export.calibration == "none" else 0.03}
    return max(0.0, learnt - loss[spec.export.precision])


def fake_evaluate(ws: Workspace, spec, on_stage=None, **_) -> CandidateResult:
    prompts, answers = ws.prompts("validation")
    p = quality(spec)
    right = round(p * len(answers))
    generated = [a if i < right else "nonsense" for i, a in enumerate(answers)]
    latency = {"int4": 40.0, "int8": 30.0, "fp32": 60.0}[spec.export.precision]
    size = {"int4": 90.0, "int8": 270.0, "fp32": 520.0}[spec.export.precision] + (10 if spec.export.block_size == 32 else 0)
    requests = tuple(Request(g, 20, latency, latency / 2, (5.0,), tuple(
        math.log(max(p, 1e-3)) if label == a else math.log(max(1 - p, 1e-3) / 3) for label in ws.splits.labels))
        for g, a in zip(generated, answers))
    lat = Latency(latency, latency, latency / 2, latency / 2, 5.0, 5.0, 200.0, 20, 20, len(answers))
    measurement = Measurement(score(generated, answers, ws.splits.labels), lat, 300.0, size, 1.0, 1, "cpu",
                              requests=requests)
    return CandidateResult(spec, ws.model_dir(spec), measurement, None, {"train": float(spec.train.steps)})


@pytest.fixture()
def search(tmp_path: Path, base):
    """A search over SPACE on 60 examples per label (48 validation prompts: enough to tell learnt from chance)."""
    rows = [{"text": f"example {i} about {label.lower()}", "label": label} for i in range(60) for label in LABELS]
    splits = load_splits(DataConfig(path=str(write_jsonl(tmp_path / "data.jsonl", rows))))

    def make(trials: int, **space_changes) -> Search:
        space = SearchSpace.from_dict({**SPACE, **space_changes}).restrict(("int4", "int8", "fp32"), False, "cpu")
        ws = Workspace(root=tmp_path / "cache", base=base, splits=splits, threads=1)
        settings = SearchSettings(trials=trials, seed=0)
        study = open_study(f"sqlite:///{tmp_path / 'study.db'}", "s", settings, {})
        return Search(ws, space, "cpu", settings, study, evaluate=fake_evaluate)
    return make


def _trials(search: Search) -> list[optuna.trial.FrozenTrial]:
    return [t for t in search.study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]


def test_the_start_adapter_comes_first_and_the_best_climb_the_rungs_then_get_exported(search) -> None:
    s = search(12)
    s.run()
    trials = _trials(s)
    assert len(trials) == 12
    first = trials[0]
    assert first.user_attrs["role"] == "screen" and first.user_attrs["steps"] == 10
    assert first.params["rank"] == 16 and first.params["learning_rate"] == 1.0e-3
    assert first.user_attrs["spec"]["export"]["precision"] == "int8"  # the screening export
    for t in trials:
        role, steps = t.user_attrs["role"], t.user_attrs["steps"]
        if role == "screen":
            assert steps == 10
        if role == "continue":  # the same adapter as a finished trial one rung below
            source = next(u for u in trials if u.number == t.user_attrs["from_trial"])
            assert source.user_attrs["trajectory"] == t.user_attrs["trajectory"]
            assert s.space.rungs.index(steps) == s.space.rungs.index(source.user_attrs["steps"]) + 1
            assert source.number < t.number
        if role == "export":  # only adapters that reached the top rung
            assert steps == 40
    exports = [t for t in trials if t.user_attrs["role"] == "export"]
    assert exports, [t.user_attrs["candidate"] for t in trials]
    assert exports[0].user_attrs["spec"]["export"]["calibration"] == "gptq"  # the start's int4 method first
    assert {t.user_attrs["spec"]["export"]["precision"] for t in exports} >= {"int4", "fp32"}


def test_exports_wait_until_no_new_adapter_could_take_the_finalists_place(search) -> None:
    """With room in the budget, the search screens and climbs first; the exports go to the adapter that is
    the finalist once nothing new can overtake it, never to one a later adapter displaced."""
    s = search(16)
    s.run()
    trials = _trials(s)
    roles = [t.user_attrs["role"] for t in trials]
    first = roles.index("export")
    assert set(roles[first:]) == {"export"} and roles.count("screen") >= 4, roles
    assert len({t.user_attrs["trajectory"] for t in trials[first:]}) == 1


def test_an_adapter_that_learnt_nothing_is_never_continued_or_exported(search) -> None:
    s = search(12)
    s.run()
    trials = _trials(s)
    dead = {t.user_attrs["trajectory"] for t in trials if t.params.get("learning_rate") == 5.0e-4}
    assert all(t.user_attrs["role"] == "screen" for t in trials if t.user_attrs["trajectory"] in dead)


def test_a_short_budget_still_exports_the_best_adapter(search) -> None:
    s = search(4)
    s.run()
    roles = [t.user_attrs["role"] for t in _trials(s)]
    assert len(roles) == 4 and "export" in roles


def test_no_siblings_means_no_exports(search) -> None:
    s = search(8)
    s.settings = SearchSettings(trials=8, seed=0, siblings=False)
    s.run()
    assert {t.user_attrs["role"] for t in _trials(s)} <= {"screen", "continue"}


def test_a_resumed_search_goes_on_where_it_stopped(search) -> None:
    first = search(6)
    first.run()
    before = [(t.number, t.user_attrs["role"], t.user_attrs["steps"]) for t in _trials(first)]
    second = search(12)
    second.run()
    after = [(t.number, t.user_attrs["role"], t.user_attrs["steps"]) for t in _trials(second)]
    assert after[:6] == before
    # It ran the rest of the budget, but for the last trial: a new adapter it could never continue.
    assert len(after) == 11 and second.stopped == NO_ROOM


def test_no_adapter_is_screened_once_the_budget_cannot_take_it_to_the_top_rung(search) -> None:
    s = search(12)
    s.run()
    trials = _trials(s)
    screens = [t.number for t in trials if t.user_attrs["role"] == "screen"]
    assert all(12 - n >= len(s.space.rungs) for n in screens[1:]), screens
    assert len(trials) + s.remaining() == 12 and (s.remaining() == 0 or s.stopped)


def test_an_int4_aware_finalist_gets_no_exports_and_the_budget_is_not_spent_on_duplicates() -> None:
    """An int4-aware adapter has one int4 model (its trained grid) and no other precision: at the top rung it
    gets no export trials (they would all be the same model), and with no room for a new adapter the
    search stops."""
    from optuna.trial import TrialState, create_trial

    def adapter(number: int, steps: int, signal: float) -> optuna.trial.FrozenTrial:
        trial = create_trial(values=[0.7, 50.0], state=TrialState.COMPLETE, user_attrs={
            "role": "screen" if steps == 10 else "continue", "steps": steps, "trajectory": f"t{number % 2}",
            "signal": signal, "adapter_params": {"int4_aware": True}})
        trial.number = number
        return trial

    scheduler = Scheduler((10, 20), 0.5, lambda trial: [], majority_rate=0.25)
    trials = [adapter(0, 10, -0.5), adapter(1, 10, -0.9), adapter(2, 20, -0.3)]
    assert scheduler.next(trials, remaining=2) == Stop(NO_ROOM)
    assert scheduler.next(trials, remaining=5) is None  # room for a new adapter to reach the top rung


def test_the_first_new_adapters_stay_near_the_start_then_the_whole_space_opens(search) -> None:
    """``local_first`` new adapters keep the start's categorical choices (here its target modules) and the
    sampler draws the rest; the ones after them are the sampler's whole proposals."""
    s = search(16, target_modules=["all-linear", "attention"], local_first=2,
               start={**SPACE["start"], "target_modules": "all-linear"})
    s.run()
    screens = [t for t in _trials(s) if t.user_attrs["role"] == "screen"]
    local = [t for t in s.study.get_trials() if t.user_attrs.get("local")]
    assert len(screens) >= 4 and len(local) == 2
    assert [t.number for t in local] == [t.number for t in screens[1:3]]
    assert {t.params["target_modules"] for t in local} == {"all-linear"}
    assert {t.user_attrs["trajectory"] for t in local}.isdisjoint({screens[0].user_attrs["trajectory"]})
    assert not any(t.user_attrs.get("local") for t in screens[3:])


def test_a_space_without_categorical_training_choices_has_no_nearby_adapters(search) -> None:
    """The start's categorical choices are the only ones (SPACE samples none): the sampler proposes every new
    adapter as before."""
    s = search(12, local_first=2)
    s.run()
    assert not any(t.user_attrs.get("local") for t in s.study.get_trials())
