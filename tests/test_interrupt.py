"""Crashes and interruptions lose nothing: real searches, real signals, real reruns.

Every test starts the real search (``python -m autotune.cli``) on the tiny random Llama
in its own session, watches it from outside and stops it at a chosen point. One search is
stopped at every point in turn (each time the same command is started again and resumes:
repeated interruptions are what a user's laptop sees, and one search costs a fraction of one
per point):

* ``kill -9`` of the whole process group while an adapter is being trained
  (``cache/adapters/*.tmp-*`` exists), while a model is being exported
  (``cache/models/*.tmp-*``), while a model is being measured (an ``autotune.measure``
  child process exists) and between trials (the COMPLETE count in study.db just rose);
* Ctrl-C (SIGINT to the process group) mid-export of a trial, then during selection (while
  the front is re-benchmarked, and while the zero-shot base is exported for the test split).

Each test waits for its stage to be observable (a partial folder, a measuring child, a
trial count in study.db), never for an amount of time; a stage it cannot catch fails the
test instead of sending the signal elsewhere.

Every kill comes after at least one trial finished, so there is something to lose.
After the last stop the same command runs to completion, and it must keep every
finished trial with its values, retrain no finished adapter, leave no partial artifact
and write a loadable ``best/``. A search whose every candidate fails (a model the
builder cannot export) must end with exit code 1 and a report of the reasons.

Training in these searches takes 20 optimizer steps (a few seconds) so the training
window is wide; the export (~2 s) and measuring (~1 s) windows are wide enough for
the 0.05 s polling as they are.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import psutil
import pytest

from autotune.search import INTERRUPTED

pytestmark = pytest.mark.slow  # real searches killed and rerun (minutes)

TRIALS = 6
POLL_S = 0.05
# The tiny space, but training long enough to be caught in the act.
SLOW_TRAIN_SPACE = """\
method: [lora, qlora]
rank: [4, 8]
alpha_ratio: [2]
learning_rate: [1.0e-3]
steps: [20]
batch_size: [4]
precision: [int4, int8, fp32]
block_size: [32]
accuracy_level: [4]
"""

# Filled by the tests, printed at the end of the module: the reliability figures.
FIGURES: dict[str, dict] = {}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def slow_space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "slow-train.yaml"
    path.write_text(SLOW_TRAIN_SPACE)
    return path


@pytest.fixture(scope="module", autouse=True)
def _report_figures():
    yield
    if FIGURES:
        lines = ["", "reliability figures (tests/test_interrupt.py):"]
        for point, f in FIGURES.items():
            lines.append("  " + point + ": " + ", ".join(f"{k}={v}" for k, v in f.items()))
        print("\n".join(lines))


def search_command(model: Path, data: Path, space: Path, out: Path, trials: int = TRIALS) -> list[str]:
    return [sys.executable, "-m", "autotune.cli", "--model", str(model), "--data", str(data), "--space", str(space),
            "--trials", str(trials), "--max-latency", "1000", "--threads", "1", "-o", str(out)]


def start(command: list[str], logs: Path) -> subprocess.Popen:
    """Start a search in its own process group (so a signal reaches all of it, children too)."""
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, stdout=open(logs / "stdout.txt", "w"), stderr=open(logs / "stderr.txt", "w"),
                            start_new_session=True, env=os.environ.copy())


def complete_count(out: Path) -> int:
    """COMPLETE trials in the study, read without disturbing the writer (0 if not there yet)."""
    db = out / "study.db"
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5) as conn:
            return conn.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:  # not created yet, or locked for a moment
        return 0


def measuring(proc: subprocess.Popen) -> bool:
    """Whether the search has a ``python -m autotune.measure`` child right now."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return False
    for child in children:
        try:
            if "autotune.generate" in child.cmdline():
                return True
        except psutil.Error:
            continue
    return False


def wait_for(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"the search ended (exit {proc.returncode}) before {what}:\n{_tail(logs)}")
        time.sleep(POLL_S)
    stop_group(proc, signal.SIGKILL)
    pytest.fail(f"{what} did not happen within {timeout:.0f} s:\n{_tail(logs)}")


def stop_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def wait_group_gone(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Wait for the leader and every process of its group (the measuring child too)."""
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in psutil.process_iter(["pid"]) if _pgid(p.info["pid"]) == proc.pid]
        if not alive:
            return
        time.sleep(POLL_S)
    raise AssertionError(f"processes of the killed group still alive: {alive}")


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def kill_when(proc: subprocess.Popen, waits: list[tuple[Callable[[], bool], str]], logs: Path) -> None:
    """Wait for each condition in turn, then kill -9 the run's process group and wait until all of it is gone."""
    try:
        for condition, what in waits:
            wait_for(proc, condition, 300, what, logs)
        stop_group(proc, signal.SIGKILL)
        wait_group_gone(proc)
    finally:
        if proc.poll() is None:
            stop_group(proc, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def ctrl_c_when(proc: subprocess.Popen, waits: list[tuple[Callable[[], bool], str]], logs: Path) -> str:
    """Wait for each condition in turn, then Ctrl-C the run's process group.

    Asserts that it stopped cleanly (exit 130, no traceback) and returns its stderr.
    """
    try:
        for condition, what in waits:
            wait_for(proc, condition, 300, what, logs)
        stop_group(proc, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            stop_group(proc, signal.SIGKILL)
            proc.wait()
    stderr = (logs / "stderr.txt").read_text()
    assert "Traceback" not in stderr, _tail(logs)
    assert proc.returncode == 130, _tail(logs)
    return stderr


def _tail(logs: Path, n: int = 3000) -> str:
    parts = []
    for name in ("stdout.txt", "stderr.txt"):
        path = logs / name
        if path.is_file():
            parts.append(f"--- {name}\n{path.read_text()[-n:]}")
    return "\n".join(parts)


def load_trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(f"sqlite:///{(out / 'study.db').resolve()}")
    return optuna.load_study(storage=storage, study_name="autotune").get_trials(deepcopy=False)


def finished(trials) -> dict[int, tuple]:
    """number -> (values, params) of the COMPLETE trials."""
    return {t.number: (tuple(t.values), dict(t.params), t.user_attrs.get("model_key"))
            for t in trials if t.state == optuna.trial.TrialState.COMPLETE}


def trained_adapters(out: Path) -> dict[str, int]:
    """adapter folder -> mtime (ns) of its train_log.json, for every finished adapter."""
    root = out / "cache" / "adapters"
    if not root.is_dir():
        return {}
    return {d.name: (d / "train_log.json").stat().st_mtime_ns for d in root.iterdir()
            if d.is_dir() and (d / "train_log.json").is_file()}


def partials(out: Path) -> list[Path]:
    cache = out / "cache"
    return sorted(cache.rglob("*.tmp-*")) if cache.is_dir() else []


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_resumed_without_loss(out: Path, before: dict[int, tuple], adapters_before: dict[str, int],
                                rerun: subprocess.CompletedProcess, expected: int = TRIALS) -> dict:
    """The checks after every rerun; returns the figures."""
    where = f"stdout:\n{rerun.stdout[-3000:]}\nstderr:\n{rerun.stderr[-3000:]}"
    assert "Traceback" not in rerun.stderr, where
    assert rerun.returncode == 0, where
    trials = load_trials(out)
    after = finished(trials)
    assert len(after) >= expected, f"only {len(after)} COMPLETE trials after the rerun"
    lost = [n for n, record in before.items() if after.get(n) != record]
    assert not lost, f"trials finished before the kill changed or vanished: {lost}"
    assert not partials(out), partials(out)
    adapters_after = trained_adapters(out)
    retrained = [name for name, mtime in adapters_before.items() if adapters_after.get(name) != mtime]
    assert not retrained, f"adapters trained before the kill were trained again: {retrained}"
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING], "a trial was left RUNNING"
    import onnxruntime_genai as og

    og.Model(str(out / "best"))
    return {"complete_before": len(before), "complete_after": len(after), "lost": len(lost),
            "adapters_kept": len(adapters_before), "retrained": len(retrained)}


# --------------------------------------------------------------------------- kill -9


def _training(out, proc):
    return any((out / "cache" / "adapters").glob("*.tmp-*"))


def _exporting(out, proc):
    """The builder is writing a model folder (not merely merging: ``<key>.tmp-merge-*``)."""
    return any(".tmp-merge-" not in p.name for p in (out / "cache" / "models").glob("*.tmp-*"))


def _measuring(out, proc):
    return measuring(proc)


KILL_POINTS = {
    "training": _training,
    "exporting": _exporting,
    "measuring": _measuring,
    "between-trials": None,  # right after the COMPLETE count rises past what the run started with
}  # in this order, on one search: the last kill leaves two trials of the six for the final rerun


def test_kill_9_at_every_stage_then_rerun_loses_nothing(tmp_path: Path, tiny_model_dir, tiny_dataset,
                                                         slow_space) -> None:
    """One search, killed with kill -9 at each stage in turn (each time the same command is started again and
    resumes), then run to completion: every trial finished before any kill keeps its values, no finished adapter
    is trained again, each trial a kill cut short is failed and retried, and nothing partial is left."""
    out = tmp_path / "out"
    command = search_command(tiny_model_dir, tiny_dataset, slow_space, out)
    kept: dict[int, tuple] = {}  # every trial finished before some kill
    adapters_kept: dict[str, int] = {}
    cut_short: list[int] = []
    for round_, (point, condition) in enumerate(KILL_POINTS.items()):
        logs = tmp_path / f"run{round_}"
        at_start = complete_count(out)
        proc = start(command, logs)
        # Each run finishes a trial first (the one the last kill cut short, queued again), so each kill hits
        # another trial: a trial killed more than MAX_RETRY times is given up, by design.
        waits = [(lambda: complete_count(out) > at_start, "a trial finished in this run")]
        if condition is not None:  # between-trials: right after that trial
            waits.append((lambda: condition(out, proc) and complete_count(out) <= TRIALS - 1,
                          f"{point} after a finished trial"))
        kill_when(proc, waits, logs)
        if round_:  # this run resumed the last one's study: the trial that kill cut short was queued again
            assert "interrupted trial(s) queued again" in (logs / "stdout.txt").read_text() + (
                logs / "stderr.txt").read_text(), _tail(logs)
        trials = load_trials(out)
        before = finished(trials)
        lost = [n for n, record in kept.items() if before.get(n) != record]
        assert not lost, f"trials finished before an earlier kill changed or vanished: {lost}"
        running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        left = partials(out)
        if point in ("training", "exporting"):
            assert left, f"killed while {point}, yet no partial artifact was on disk: the kill missed its window"
        assert before, "nothing had finished before the kill"
        kept.update(before)
        adapters_kept.update(trained_adapters(out))
        cut_short += running
        FIGURES[f"kill -9 {point}"] = {"complete_at_kill": len(before), "partials_at_kill": len(left),
                                       "running_at_kill": len(running)}

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    figures = assert_resumed_without_loss(out, kept, adapters_kept, rerun)
    trials = load_trials(out)
    again = {optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials}
    assert cut_short and all(trials[n].state == optuna.trial.TrialState.FAIL and n in again for n in cut_short), (
        cut_short, [(t.number, t.state) for t in trials])
    FIGURES["kill -9, every stage, then a full rerun"] = {**figures, "kills": len(KILL_POINTS), "survived": True}


# --------------------------------------------------------------------------- a second run on the same folder


def test_a_second_run_on_the_same_folder_leaves_the_first_alone(tmp_path: Path, tiny_model_dir, tiny_dataset,
                                                                slow_space) -> None:
    """While a search trains, the same command again refuses in one line; the first's trial is not failed and
    the first goes on to finish its trials."""
    out = tmp_path / "out"
    command = search_command(tiny_model_dir, tiny_dataset, slow_space, out, trials=2)
    first = start(command, tmp_path / "first")
    try:
        wait_for(first, lambda: _training(out, first), 300, "the first run training", tmp_path / "first")
        running = [t.number for t in load_trials(out) if t.state == optuna.trial.TrialState.RUNNING]
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert last_line(second.stderr).startswith(f"error: --output {out} is in use by autotune (pid {first.pid} ")
        trials = load_trials(out)  # still running, or finished since: not failed by the second run
        assert running and all(trials[n].state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE)
                               for n in running), [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials]
        first.wait(timeout=600)
    finally:
        if first.poll() is None:
            stop_group(first, signal.SIGKILL)
            first.wait()
    assert first.returncode == 0, _tail(tmp_path / "first")
    assert all(load_trials(out)[n].state == optuna.trial.TrialState.COMPLETE for n in running)


# --------------------------------------------------------------------------- Ctrl-C


SELECTION_POINTS = {
    "re-benchmark": _measuring,  # the front's latency measured again
    "zero-shot export": _exporting,  # the base exported at the chosen precision, for the test split
}


def test_ctrl_c_mid_trial_and_during_selection_keeps_finished_work_and_resumes(
        tmp_path: Path, tiny_model_dir, tiny_dataset, slow_space) -> None:
    """One search, Ctrl-C'd mid-export of a trial, then (each time the same command is started again and
    resumes) during each stage of selection, then run to completion: each stop exits 130 in one line with
    nothing partial, the interrupted trial is retried, selection is interrupted without writing best/, and the
    final run keeps every finished trial."""
    out = tmp_path / "out"
    command = search_command(tiny_model_dir, tiny_dataset, slow_space, out)
    logs = tmp_path / "run0"
    proc = start(command, logs)
    stderr = ctrl_c_when(proc, [
        (lambda: complete_count(out) >= 1, "the first trial finished"),
        # A trial's export, with trials still to come: selection exports too (the zero-shot base), and
        # a signal that lands there is a selection point's case, not this one's.
        (lambda: _exporting(out, proc) and complete_count(out) <= TRIALS - 2,
         "a trial's export after a finished trial"),
    ], logs)
    line = last_line(stderr)
    assert line.startswith("interrupted:") and "kept" in line and "rerun" in line, line
    assert not partials(out), f"Ctrl-C left partial artifacts: {partials(out)}"
    trials = load_trials(out)
    kept = finished(trials)
    interrupted = [t for t in trials if t.state == optuna.trial.TrialState.FAIL
                   and t.user_attrs.get("fail_reason") == INTERRUPTED]
    assert len(interrupted) == 1, [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials]
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    adapters_kept = trained_adapters(out)
    FIGURES["ctrl-c exporting"] = {"exit_code": proc.returncode, "complete_at_stop": len(kept)}

    for round_, (point, condition) in enumerate(SELECTION_POINTS.items(), start=1):
        logs = tmp_path / f"run{round_}"
        proc = start(command, logs)
        # Every trial is COMPLETE before selection starts, so what runs after that is selection.
        stderr = ctrl_c_when(proc, [(lambda: complete_count(out) >= TRIALS and condition(out, proc),
                                     f"selection's {point}")], logs)
        if round_ == 1:
            assert "1 interrupted trial(s) queued again" in stderr + (logs / "stdout.txt").read_text(), _tail(logs)
        assert last_line(stderr).startswith("interrupted:"), _tail(logs)
        assert not (out / "best").exists(), "the run went on after Ctrl-C and wrote best/"
        assert not partials(out), f"Ctrl-C left partial artifacts: {partials(out)}"
        before = finished(load_trials(out))
        assert len(before) == TRIALS and all(before.get(n) == record for n, record in kept.items())
        kept = before
        FIGURES[f"ctrl-c {point}"] = {"exit_code": proc.returncode, "complete_at_stop": len(before)}

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    figures = assert_resumed_without_loss(out, kept, adapters_kept, rerun)
    assert len(finished(load_trials(out))) == TRIALS  # selection only: no trial ran again
    retried = [t for t in load_trials(out) if t.state == optuna.trial.TrialState.COMPLETE
               and t.number > interrupted[0].number and t.params == interrupted[0].params]
    assert retried, "the interrupted candidate was not retried"
    FIGURES["ctrl-c, mid-trial and selection, then a full rerun"] = {
        **figures, "retried_as": retried[0].number, "survived": True}


# --------------------------------------------------------------------------- every candidate fails


def test_every_candidate_failing_exits_1_with_reasons(tmp_path: Path, tiny_model_dir, tiny_dataset) -> None:
    """A Llama with tanh activations: peft trains it, the genai builder cannot export it."""
    model = tmp_path / "tanh-llama"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["hidden_act"] = "tanh"
    (model / "config.json").write_text(json.dumps(config))
    space = tmp_path / "space.yaml"
    space.write_text("method: [lora]\nrank: [4]\nsteps: [2]\nbatch_size: [4]\nprecision: [int4, fp32]\n"
                     "block_size: [32]\naccuracy_level: [4]\n")
    out = tmp_path / "out"
    proc = subprocess.run(search_command(model, tiny_dataset, space, out, trials=4),
                          capture_output=True, text=True, timeout=600)
    where = f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, where
    assert proc.returncode == 1, where
    line = last_line(proc.stderr)
    assert line.startswith("error: every candidate failed") and "report.json" in line, where

    report = json.loads((out / "report.json").read_text())
    assert report["chosen"] is None and "failed" in report["why"]
    assert report["trials"], report
    for row in report["trials"]:
        assert row["state"] == "FAIL", row
        assert row["reason"] and "tanh activation" in row["reason"], row
        assert row["candidate"], row
    # Each adapter is screened at one precision; one that never measured gets no other export.
    assert all(any(f" {p}" in row["candidate"] for p in ("int4", "fp32")) for row in report["trials"]), report
    trials = load_trials(out)
    assert all(t.state == optuna.trial.TrialState.FAIL and "tanh" in t.user_attrs.get("fail_reason", "")
               for t in trials), [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials]
    assert not partials(out), partials(out)
    assert not (out / "best").exists()
    FIGURES["every candidate fails"] = {"trials": len(trials), "exit_code": proc.returncode}
