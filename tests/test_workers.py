"""Scale-out: several `autotune worker` processes on one study in PostgreSQL (no mocks).

A throwaway PostgreSQL server is started for the module (tests/postgres.py). A
coordinator run creates study ``s1`` and records its settings; two workers then share
it and one artifacts folder. Other studies are made by copying ``s1``'s record (that is
all a worker reads from a study), so each test pays only for its own trials.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

import postgres
from conftest import run_cli

pytestmark = pytest.mark.slow  # a PostgreSQL server and several workers (minutes)

S = optuna.trial.TrialState
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEARTBEAT_S, GRACE_S = 2, 6  # the kill test's heartbeat settings (defaults: 10 s / 30 s)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pg():
    server = postgres.server_or_skip()
    yield server
    server.stop()


def search_args(model: Path, data: Path, space: Path, url: str, study: str, artifacts: Path, out: Path,
                trials: int) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--space", str(space), "--storage", url, "--study", study,
            "--artifacts", str(artifacts), "--trials", str(trials), "--max-latency", "1000", "--threads", "1",
            "-o", str(out)]


def start_worker(url: str, study: str, artifacts: Path, out: Path, *extra: str, env: dict | None = None):
    """An ``autotune worker`` process; its output goes to OUT.log (pipes could fill and block it)."""
    import os

    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "w")
    cmd = [sys.executable, "-m", "autotune.cli", "worker", "--storage", url, "--study", study,
           "--artifacts", str(artifacts), "-o", str(out), "--threads", "1", *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    proc.log_path = out.parent / f"{out.name}.log"
    return proc


def finish(proc, timeout: float) -> str:
    """Wait for a worker; return its output (the process is killed if it overruns)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.log_path.read_text(errors="replace")


def load(url: str, study: str) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=url)


def copy_study(url: str, source: str, name: str, **changes) -> optuna.Study:
    """A new, empty study with ``source``'s record (settings, profile, model ...), ``changes`` applied."""
    src = load(url, source)
    dst = optuna.create_study(study_name=name, storage=url, directions=["maximize", "minimize"])
    for key, value in src.user_attrs.items():
        if not key.startswith(("chosen", "zero_shot")):
            dst.set_user_attr(key, changes.get(key, value))
    return dst


def worker_id(proc) -> str:
    import socket

    return f"{socket.gethostname()}:{proc.pid}"


def retried(trials) -> set[int]:
    """Numbers of failed trials that RetryFailedTrialCallback queued again."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def partials(folder: Path) -> list[Path]:
    return list(folder.rglob("*.tmp-*"))


def assert_clean_failure(proc, code: int = 2) -> str:
    """Exit ``code`` with one ``error:`` line and no traceback; return that line."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@dataclass
class SharedRun:
    url: str
    shared: Path
    workers: list
    logs: list[str]
    tmp: Path


@pytest.fixture(scope="module")
def s1(pg, tmp_path_factory, tiny_model_dir, tiny_dataset, tiny_space) -> SharedRun:
    """Study s1: a coordinator runs 2 trials (creating the study), then two workers bring it to 7 (all the tiny
    space holds: 4 adapters screened, the best one's 3 other exports)."""
    tmp = tmp_path_factory.mktemp("workers")
    shared = tmp / "shared"
    proc = run_cli(*search_args(tiny_model_dir, tiny_dataset, tiny_space, pg.url, "s1", shared, tmp / "out0", 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    workers = [start_worker(pg.url, "s1", shared, tmp / f"out{i}", "--trials", "7") for i in (1, 2)]
    logs = [finish(w, 420) for w in workers]
    return SharedRun(pg.url, shared, workers, logs, tmp)


# --------------------------------------------------------------------------- 1. two workers share a study


def test_two_workers_share_the_study(s1: SharedRun) -> None:
    for w, log in zip(s1.workers, s1.logs):
        assert w.returncode == 0, log[-3000:]
    trials = load(s1.url, "s1").get_trials(deepcopy=False)
    done = [t for t in trials if t.state == S.COMPLETE]
    assert len(done) == 7

    # No candidate evaluated twice.
    keys = [t.user_attrs["model_key"] for t in done]
    assert len(keys) == len(set(keys)), sorted(keys)

    # No trial lost: each one finished, was a duplicate, was retried, or is a queued sibling never started.
    again = retried(trials)
    for t in trials:
        ok = (t.state == S.COMPLETE
              or (t.state == S.PRUNED and "duplicate_of" in t.user_attrs)
              or (t.state == S.FAIL and t.number in again)
              or (t.state == S.WAITING and not t.params))
        assert ok, (t.number, t.state, t.user_attrs.get("fail_reason"), t.user_attrs.get("candidate"))
    for t in trials:
        if "duplicate_of" in t.user_attrs:
            assert t.user_attrs["model_key"] == trials[t.user_attrs["duplicate_of"]].user_attrs["model_key"]

    # One adapter cache for all: each training config trained once, by whichever process got it first.
    configs = {json.dumps(t.user_attrs["spec"]["train"], sort_keys=True) for t in done}
    adapters = [d for d in (s1.shared / "adapters").iterdir() if d.is_dir()]
    assert len(adapters) == len(configs), ([d.name for d in adapters], configs)
    assert all((d / "train_log.json").is_file() for d in adapters)
    trained = [t for t in done if "train" in t.user_attrs["stage_seconds"]]
    assert len(trained) == len(configs), [(t.number, t.user_attrs["candidate"]) for t in trained]
    assert not partials(s1.shared)

    # Both workers measured candidates.
    by_worker = {t.user_attrs.get("worker") for t in done}
    for w in s1.workers:
        assert worker_id(w) in by_worker, (worker_id(w), by_worker)


# --------------------------------------------------------------------------- 2. a killed worker's trial is retried


def test_killed_worker_trial_is_retried(s1: SharedRun) -> None:
    url, tmp = s1.url, s1.tmp
    copy_study(url, "s1", "s2")
    shared = tmp / "shared2"  # fresh: the trial really trains, so it is still running when killed
    env = {"AUTOTUNE_HEARTBEAT_S": str(HEARTBEAT_S), "AUTOTUNE_GRACE_S": str(GRACE_S)}
    a = start_worker(url, "s2", shared, tmp / "outA", "--trials", "1", env=env)
    study = load(url, "s2")
    victim = None
    deadline = time.monotonic() + 180
    while victim is None and time.monotonic() < deadline and a.poll() is None:
        running = [t for t in study.get_trials(deepcopy=False, states=(S.RUNNING,))
                   if t.user_attrs.get("worker") == worker_id(a) and "model_key" in t.user_attrs]
        victim = running[0] if running else None
        time.sleep(0.2)
    assert victim is not None, finish(a, 1)[-3000:]
    time.sleep(1.0)  # mid-training; at least one heartbeat recorded
    a.send_signal(signal.SIGKILL)
    a.wait()
    assert load(url, "s2").trials[victim.number].state == S.RUNNING, "the trial finished before the kill"

    # B starts once A's heartbeat is stale, fails A's trial, and runs its retry.
    time.sleep(GRACE_S + 1)
    b = start_worker(url, "s2", shared, tmp / "outB", "--trials", "1", env=env)
    log = finish(b, 300)
    assert b.returncode == 0, log[-3000:]
    trials = load(url, "s2").get_trials(deepcopy=False)
    assert trials[victim.number].state == S.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1, [(t.number, t.state, t.system_attrs) for t in trials]
    retry = retries[0]
    assert retry.state == S.COMPLETE
    assert retry.params == victim.params
    assert retry.user_attrs["worker"] == worker_id(b)
    assert retry.user_attrs["model_key"] == victim.user_attrs["model_key"]
    others = [t for t in trials if t.number not in (victim.number, retry.number)]
    assert all(t.state == S.WAITING for t in others), [(t.number, t.state) for t in others]  # the retry's siblings
    assert not partials(shared)  # A's half-written adapter was swept, and B wrote its own


# --------------------------------------------------------------------------- 3. another hardware profile


def test_worker_refuses_another_profile_unless_per_profile(s1: SharedRun) -> None:
    url, tmp = s1.url, s1.tmp
    here = load(url, "s1").user_attrs["profile"]
    copy_study(url, "s1", "s3", profile="cuda-sm80")
    proc = run_cli("worker", "--storage", url, "--study", "s3", "--artifacts", str(tmp / "shared3"),
                   "-o", str(tmp / "out3"), "--threads", "1")
    line = assert_clean_failure(proc, 2)
    assert "--per-profile" in line and "cuda-sm80" in line and here in line, line
    assert not load(url, "s3").trials

    proc = run_cli("worker", "--storage", url, "--study", "s3", "--per-profile", "--trials", "1",
                   "--artifacts", str(tmp / "shared3"), "-o", str(tmp / "out3"), "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from autotune.study import HARDWARE_KEYS, per_hardware_name

    name = per_hardware_name("s3", {k: load(url, "s1").user_attrs[k] for k in HARDWARE_KEYS})  # this machine's
    assert name.startswith(f"s3@{here}-1t-") and name in proc.stdout + proc.stderr
    assert not load(url, "s3").trials  # the cuda study is left alone
    mine = load(url, name)
    assert mine.user_attrs["profile"] == here
    assert mine.user_attrs["config"] == load(url, "s1").user_attrs["config"] | {"trials": 1}
    assert len([t for t in mine.trials if t.state == S.COMPLETE]) == 1


# --------------------------------------------------------------------------- 4. select


def test_select_writes_the_outputs(s1: SharedRun) -> None:
    out = s1.tmp / "outsel"
    proc = run_cli("select", "--storage", s1.url, "--study", "s1", "--artifacts", str(s1.shared), "-o", str(out),
                   "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("best/genai_config.json", "report.json", "MODEL_CARD.md", "pareto.csv", "pareto.png"):
        assert (out / name).is_file(), name
    assert (out / "pareto.png").read_bytes()[:8] == PNG_MAGIC
    report = json.loads((out / "report.json").read_text())
    study = load(s1.url, "s1")
    assert report["trials"]["complete"] == len([t for t in study.trials if t.state == S.COMPLETE])
    assert study.user_attrs["chosen_trial"] == report["chosen"]["trial"]
    assert "autotune:autotune@" not in (out / "MODEL_CARD.md").read_text()  # the password is not written


# --------------------------------------------------------------------------- 5. clean errors


@pytest.mark.parametrize("command", ["worker", "select"])
def test_unknown_study(s1: SharedRun, command: str) -> None:
    proc = run_cli(command, "--storage", s1.url, "--study", "nope", "-o", str(s1.tmp / "out-nope"))
    line = assert_clean_failure(proc, 2)
    assert "no study 'nope'" in line and "s1" in line, line


@pytest.mark.parametrize("url", ["postgresql://nohost:1/x", "notaurl"])
def test_bad_storage_url(url: str, tmp_path, tiny_model_dir, tiny_dataset, tiny_space) -> None:
    worker = run_cli("worker", "--storage", url, "--study", "s1", "-o", str(tmp_path / "w"))
    assert "--storage" in assert_clean_failure(worker, 2)
    main = run_cli(*search_args(tiny_model_dir, tiny_dataset, tiny_space, url, "s1", tmp_path / "a", tmp_path / "m", 1))
    assert "--storage" in assert_clean_failure(main, 2)


# --------------------------------------------------------------------------- 6. two machines, one study


def built(artifacts: Path) -> dict[str, int]:
    """Every adapter and exported model in an artifacts folder, with the mtime (ns) of its completion file."""
    found = {}
    for kind, marker in (("adapters", "train_log.json"), ("models", "genai_config.json")):
        for folder in (artifacts / kind).iterdir() if (artifacts / kind).is_dir() else ():
            if (folder / marker).is_file():
                found[f"{kind}/{folder.name}"] = (folder / marker).stat().st_mtime_ns
    return found


def test_a_second_machine_rebuilds_nothing_the_first_built(pg, tmp_path, tiny_model_dir, tiny_dataset,
                                                             tiny_space) -> None:
    """Machine 1 searches (its own cache root); machine 2 gets the model folder copied anew (same bytes, new
    mtimes and inodes) and its own cache root, shares the study and the artifacts folder, selects, and runs
    a trial the sampler proposed twice: it trains and exports nothing machine 1 built."""
    import shutil

    model, shared = tmp_path / "model", tmp_path / "shared"
    shutil.copytree(tiny_model_dir, model)
    one = run_cli(*search_args(model, tiny_dataset, tiny_space, pg.url, "two", shared, tmp_path / "out1", 3),
                  "--keep-all", env={"AUTOTUNE_CACHE": str(tmp_path / "cache1")})
    assert one.returncode == 0, one.stderr[-3000:]
    before = built(shared)
    assert any(k.startswith("adapters/") for k in before) and any(k.startswith("models/") for k in before)

    copy = tmp_path / "model-copy"  # machine 2's copy of the model, at the path the study names
    shutil.copytree(model, copy, copy_function=shutil.copyfile)
    shutil.rmtree(model)
    copy.rename(model)
    machine_2 = {"AUTOTUNE_CACHE": str(tmp_path / "cache2")}
    two = run_cli("select", "--storage", pg.url, "--study", "two", "--artifacts", str(shared), "-o",
                  str(tmp_path / "out2"), "--threads", "1", env=machine_2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert built(shared) == before  # nothing retrained or re-exported, not even the base for the baselines

    study = load(pg.url, "two")
    done = next(t for t in study.trials if t.state == S.COMPLETE and t.user_attrs["role"] == "screen")
    study.enqueue_trial(done.params, user_attrs={"role": "screen", "steps": done.user_attrs["steps"]})
    worker = start_worker(pg.url, "two", shared, tmp_path / "out3", "--trials", "4", env=machine_2)
    log = finish(worker, 300)
    assert worker.returncode == 0, log[-3000:]
    again = [t for t in load(pg.url, "two").trials if t.number > done.number and t.params == done.params
             and t.user_attrs.get("role") == "screen"]
    assert again and all(t.state == S.PRUNED and t.user_attrs.get("duplicate_of") == done.number for t in again), \
        log[-3000:]  # the one enqueued here, and any the sampler proposed again
    after = built(shared)  # the worker's fourth trial built its own candidate; nothing of machine 1's again
    assert {k: after.get(k) for k in before} == before


def test_a_worker_with_another_checkpoint_behind_the_same_path_refuses(pg, tmp_path, tiny_model_dir, tiny_dataset,
                                                                         tiny_space) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    one = run_cli(*search_args(model, tiny_dataset, tiny_space, pg.url, "other-weights", tmp_path / "shared",
                               tmp_path / "out1", 1))
    assert one.returncode == 0, one.stderr[-3000:]
    shutil.rmtree(model)
    from conftest import build_tiny_model

    build_tiny_model(model, seed=1)  # another checkpoint, same name and shape
    proc = run_cli("worker", "--storage", pg.url, "--study", "other-weights", "--artifacts", str(tmp_path / "shared"),
                   "-o", str(tmp_path / "out2"), "--threads", "1")
    line = assert_clean_failure(proc, 2)
    assert "its files differ" in line and str(model) in line, line
