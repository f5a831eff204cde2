"""Two runs on one output folder, and the trials a stopped run left behind (issue 22, item 6).

A search or selection holds its output folder: a second one on the same folder refuses in one
line instead of failing the first's live trials. Only trials whose process is gone are failed:
on a local study the held folder proves it; on any storage given by URL, SQLite included,
a heartbeat that stopped does (``fail_stale_trials``). Public Optuna APIs only.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback

from autotune.errors import UserError
from autotune.report import claim_output
from autotune.search import INTERRUPTED, SearchSettings, counted_trials
from autotune.study import open_storage, open_study, requeue_interrupted
from conftest import run_cli

S = optuna.trial.TrialState
ROOT = Path(__file__).resolve().parent.parent


def test_no_private_optuna_attributes() -> None:
    for module in ("search", "study", "dashboard", "report", "constraints", "cli"):
        text = (ROOT / "autotune" / f"{module}.py").read_text()
        assert not re.search(r"\._(storage|trial_id|study_id)\b", text), module


def test_a_second_run_on_a_held_output_folder_refuses_in_one_line(tmp_path, tiny_model_dir, tiny_dataset,
                                                                   tiny_space) -> None:
    out = tmp_path / "out"
    out.mkdir()
    held = claim_output(out)  # the first run, alive
    with pytest.raises(UserError, match="in use"):
        claim_output(out)
    proc = run_cli("--model", str(tiny_model_dir), "--data", str(tiny_dataset), "--space", str(tiny_space),
                   "--trials", "2", "--threads", "1", "-o", str(out))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith(f"error: --output {out} is in use by autotune (pid ") and "--storage" in lines[-1]
    assert not (out / "study.db").exists()  # the first run's study is not touched
    held.release()
    claim_output(out).release()  # free again once the first run is gone


def test_sqlite_studies_beat_and_only_silent_trials_are_failed(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AUTOTUNE_HEARTBEAT_S", "1")
    monkeypatch.setenv("AUTOTUNE_GRACE_S", "2")
    url = f"sqlite:///{tmp_path / 'shared.db'}"  # one SQLite file that two processes share by URL
    storage = open_storage(url)
    assert storage.get_heartbeat_interval() == 1
    study = open_study(url, "s", SearchSettings(), {})
    study_id = storage.get_study_id_from_name("s")
    live, dead = study.ask(), study.ask()
    ids = {t.number: storage.get_trial_id_from_study_id_trial_number(study_id, t.number) for t in (live, dead)}
    for trial_id in ids.values():
        storage.record_heartbeat(trial_id)
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:  # the live trial's process keeps beating; the dead one's stopped
        storage.record_heartbeat(ids[live.number])
        time.sleep(0.5)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    assert trials[live.number].state == S.RUNNING
    assert trials[dead.number].state == S.FAIL
    retry = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == dead.number]
    assert len(retry) == 1 and retry[0].state == S.WAITING


def test_a_local_resume_retries_killed_and_interrupted_trials(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(url, "autotune", SearchSettings(), {})
    distribution = optuna.distributions.CategoricalDistribution([4, 8])
    attrs = {"role": "continue", "steps": 60, "trajectory": "abc", "from_trial": 0}
    study.add_trial(optuna.trial.create_trial(state=S.FAIL, params={"rank": 4}, distributions={"rank": distribution},
                                              user_attrs={**attrs, "fail_reason": INTERRUPTED}))  # Ctrl-C
    killed = study.ask({"rank": distribution})  # left RUNNING by a kill -9
    killed.set_user_attr("role", "screen")
    assert requeue_interrupted(study) == 2
    trials = study.get_trials(deepcopy=False)
    assert trials[killed.number].state == S.FAIL
    waiting = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t) or t.user_attrs.get("retry_of"): t
               for t in trials if t.state == S.WAITING}
    assert set(waiting) == {0, killed.number}
    assert waiting[0].user_attrs == {**attrs, "retry_of": 0}  # rung and role kept: it continues, not screens again
    assert waiting[killed.number].user_attrs["role"] == "screen"
    assert counted_trials(trials) == []  # neither counts towards --trials: both run again
    assert requeue_interrupted(study) == 0  # queued once
