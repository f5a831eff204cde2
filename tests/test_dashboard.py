"""``autotune dashboard``: a real server on a finished search, read through its JSON API and
rendered by headless Chromium; and the one-line error when there is no study.

The server and every browser run are separate process groups, killed in teardown; every
wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow  # a finished search, a server and headless Chromium (minutes)

HOST = "127.0.0.1"
METRICS = ["accuracy", "latency_ms"]
START_TIMEOUT_S = 30
BROWSER_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _get_json(port: int, path: str, timeout: float = 5) -> object:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as resp:
        assert resp.status == 200
        return json.loads(resp.read().decode())


def _kill_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it spawned."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    # A group leader that has exited may leave children behind (e.g. Chromium's helpers).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Dashboard:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"


@pytest.fixture(scope="module")
def dashboard(tiny_search, tmp_path_factory):
    """``autotune dashboard <tiny_search> --port P`` as a real subprocess, answering on /api/studies."""
    log = tmp_path_factory.mktemp("dashboard") / "server.log"
    port = _free_port()
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "autotune.cli", "dashboard", str(tiny_search), "--port", str(port)],
                                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dashboard exited with {proc.returncode} before answering:\n{log.read_text()[-3000:]}")
            try:
                _get_json(port, "/api/studies", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
                if time.monotonic() > deadline:
                    pytest.fail(f"dashboard did not answer on port {port} within {START_TIMEOUT_S} s:\n"
                                f"{log.read_text()[-3000:]}")
                time.sleep(0.25)
        yield Dashboard(proc, port, log)
    finally:
        _kill_group(proc)


@pytest.fixture(scope="module")
def recorded(tiny_search):
    """The study as stored: (study, trials that finished COMPLETE or FAIL)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="autotune", storage=f"sqlite:///{tiny_search / 'study.db'}")
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)]
    return study, done


@pytest.fixture(scope="module")
def study_id(dashboard) -> int:
    studies = _get_json(dashboard.port, "/api/studies")["study_summaries"]
    named = [s for s in studies if s["study_name"] == "autotune"]
    assert len(named) == 1, studies
    return named[0]["study_id"]


# --------------------------------------------------------------------------- server and API


def test_api_serves_the_study(dashboard, study_id, recorded):
    study, done = recorded
    assert len(done) >= 6, [t.state for t in study.trials]

    detail = _get_json(dashboard.port, f"/api/studies/{study_id}")
    assert detail["name"] == "autotune"
    assert detail["objective_names"] == METRICS  # optuna-dashboard's name for study.metric_names
    assert detail["directions"] == ["maximize", "minimize"]
    trials = detail["trials"]
    assert len(trials) == len(study.trials)
    assert sum(t["state"] in ("Complete", "Fail") for t in trials) == len(done)
    assert sorted(t["number"] for t in trials) == list(range(len(study.trials)))


def test_server_binds_loopback_only_and_prints_url(dashboard):
    import psutil

    proc = psutil.Process(dashboard.proc.pid)
    conns = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6 spells it connections
    listening = [c for c in conns(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening, "the dashboard process has no listening socket"
    assert {(c.laddr.ip, c.laddr.port) for c in listening} == {(HOST, dashboard.port)}

    # And from this machine's other addresses, nothing answers on that port.
    others = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")}
    for address in sorted(others):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(3)
            with pytest.raises(OSError):
                s.connect((address, dashboard.port))

    out = dashboard.output()
    assert f"http://127.0.0.1:{dashboard.port}/dashboard" in out, out
    assert "reachable from other machines" not in out


# --------------------------------------------------------------------------- headless Chromium


def _chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed, but CI must run the dashboard browser test (.ci/run installs it)")
    pytest.skip("chromium not found (Debian: apt-get install chromium); the browser check runs in CI")


def _browse(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with a fresh profile; kill its whole process group afterwards."""
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=8000", *args]
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
           "XDG_CACHE_HOME": str(tmp_path / "xdg-cache")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    try:
        out, err = proc.communicate(timeout=BROWSER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc, grace_s=5)
        pytest.fail(f"chromium did not finish within {BROWSER_TIMEOUT_S} s: {' '.join(cmd)}")
    finally:
        _kill_group(proc, grace_s=5)
    return subprocess.CompletedProcess(cmd, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def _visible_text(dom: str) -> str:
    """The page's text: scripts, styles and tags dropped, whitespace collapsed."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)).strip()


def _rendered(tmp_path: Path, url: str) -> str:
    proc = _browse(tmp_path, "--dump-dom", url)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _visible_text(proc.stdout)


def test_browser_renders_study(dashboard, study_id, recorded, tmp_path):
    study, _ = recorded
    n = len(study.trials)

    # Study list: the study by name.
    text = _rendered(tmp_path, f"{dashboard.base}/dashboard")
    assert "autotune" in text, text[:2000]

    # Study page: the Pareto front's objective selectors name both metrics.
    text = _rendered(tmp_path, f"{dashboard.base}/dashboard/studies/{study_id}")
    assert f"autotune (id={study_id})" in text, text[:2000]
    for metric in METRICS:
        assert metric in text, f"{metric!r} not rendered: {text[:2000]}"

    # Trial list: "<n> Trials", then every trial by number with its state.
    text = _rendered(tmp_path, f"{dashboard.base}/dashboard/studies/{study_id}/trials")
    assert re.search(rf"\b{n} Trials\b", text), text[:2000]
    for number in range(n):
        assert re.search(rf"\bTrial {number}\b", text), f"Trial {number} not rendered: {text[:2000]}"
    assert "Complete" in text


def test_browser_screenshot(dashboard, study_id, tmp_path):
    png = tmp_path / "dash.png"
    proc = _browse(tmp_path, "--hide-scrollbars", "--window-size=1400,900", f"--screenshot={png}",
                   f"{dashboard.base}/dashboard/studies/{study_id}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1400, 900)
    assert len(data) > 10_000, f"screenshot is only {len(data)} bytes (blank page?)"
    keep = os.environ.get("AUTOTUNE_DASHBOARD_PNG")  # set it to keep the screenshot for a look
    if keep:
        shutil.copy(png, keep)


# --------------------------------------------------------------------------- errors


def test_no_study_is_a_one_line_error(tmp_path):
    proc = run_cli("dashboard", str(tmp_path / "empty"), "--port", str(_free_port()), timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no study at "), proc.stderr
    assert "study.db" in lines[0] and "Traceback" not in proc.stderr


def test_port_in_use_is_a_one_line_error(tmp_path):
    (tmp_path / "out").mkdir()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}", study_name="autotune")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("dashboard", str(tmp_path / "out"), "--port", str(port), timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot serve on {HOST}:{port} (Address already in use); choose another --port"], proc.stderr
    assert "Traceback" not in proc.stderr
