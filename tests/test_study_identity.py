"""A study's latencies stay comparable: its hardware identity is fixed when it is created.

The measuring thread count, the device (CPU model or GPU name), the execution provider
and the hardware profile are study attributes. A resumed run or a worker that differs
refuses with one line naming the difference and the fix, or, with ``--per-profile``,
uses its own per-hardware study. Values are faked; the storage is a real SQLite study.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from autotune.errors import UserError
from autotune.hardware import GpuInfo, HardwareInfo
from autotune.search import SearchSettings
from autotune.study import hardware_identity, open_study, per_hardware_name
from conftest import run_cli

SETTINGS = SearchSettings(trials=2)
BASE = {"model": "tiny", "data_fingerprint": "abc", "latency_metric": "p50", "config": {"trials": 2}}
HERE = {"profile": "cpu", "execution_provider": "cpu", "device": "Fake CPU A @ 2.0GHz", "measure_threads": 2}


def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def opened(tmp_path: Path, free_threads: int = 3, per_hardware: bool = False, join: bool = False, **changes):
    return open_study(url(tmp_path), "s", SETTINGS, {**BASE, **HERE, **changes}, free_threads=free_threads,
                      per_hardware=per_hardware, join=join)


def test_identity_is_recorded_when_the_study_is_created(tmp_path: Path) -> None:
    study = opened(tmp_path, measure_threads=None, free_threads=3)
    assert {k: study.user_attrs[k] for k in HERE} == {**HERE, "measure_threads": 3}  # the cores free at creation


def test_resume_without_threads_takes_the_studys(tmp_path: Path) -> None:
    opened(tmp_path)
    study = opened(tmp_path, measure_threads=None, free_threads=1)  # fewer cores free now: still the study's 2
    assert study.study_name == "s" and study.user_attrs["measure_threads"] == 2


@pytest.mark.parametrize("key, value, expected", [
    ("measure_threads", 1, ["2 thread(s)", "with 1", "--threads 2", "--per-profile"]),
    ("device", "Fake CPU B", ["'Fake CPU A @ 2.0GHz'", "'Fake CPU B'", "--per-profile"]),
    ("execution_provider", "cuda", ["execution provider 'cpu'", "'cuda'", "--per-profile"]),
    ("profile", "cuda-sm80", ["hardware profile 'cpu'", "'cuda-sm80'", "--profile cpu if it runs here", "--per-profile"]),
])
def test_a_different_machine_refuses_in_one_line(tmp_path: Path, key, value, expected) -> None:
    opened(tmp_path)
    with pytest.raises(UserError) as exc:
        opened(tmp_path, **{key: value})
    message = str(exc.value)
    assert "\n" not in message and exc.value.exit_code == 2
    assert message.startswith("study 's' measures latency"), message
    for fragment in expected:
        assert fragment in message, message
    assert per_hardware_name("s", {**HERE, key: value}) in message  # the study --per-profile would use


def test_per_profile_uses_its_own_study(tmp_path: Path) -> None:
    opened(tmp_path)
    other = {"device": "Fake CPU B", "measure_threads": 1}
    mine = opened(tmp_path, per_hardware=True, join=True, **other)
    assert mine.study_name == per_hardware_name("s", {**HERE, **other})
    assert mine.user_attrs["device"] == "Fake CPU B" and mine.user_attrs["measure_threads"] == 1
    assert mine.user_attrs["config"] == BASE["config"]  # the first of its hardware records the settings
    again = opened(tmp_path, per_hardware=True, join=True, **other)  # a second such worker joins it
    assert again.study_name == mine.study_name
    first = optuna.load_study(study_name="s", storage=url(tmp_path))
    assert first.user_attrs["device"] == HERE["device"] and first.user_attrs["measure_threads"] == 2
    # The same hardware never leaves the study, --per-profile or not.
    assert opened(tmp_path, per_hardware=True).study_name == "s"


def test_settings_still_have_to_match(tmp_path: Path) -> None:
    opened(tmp_path)
    with pytest.raises(UserError, match="data_fingerprint"):
        opened(tmp_path, data_fingerprint="other")


def test_hardware_identity_names_the_device_that_measures() -> None:
    cpu = HardwareInfo(os="linux", cpu_model="Fake CPU", physical_cores=2, logical_cores=2, isa=(), ram_gb=8.0,
                       gpus=(GpuInfo("Fake GPU", 16.0, (8, 0)),))
    cpu_profile = SimpleNamespace(name="cpu", execution_provider="cpu")
    cuda_profile = SimpleNamespace(name="cuda-sm80", execution_provider="cuda")
    assert hardware_identity(cpu_profile, cpu, 2) == {"profile": "cpu", "execution_provider": "cpu",
                                                       "device": "Fake CPU", "measure_threads": 2}
    assert hardware_identity(cuda_profile, cpu, None)["device"] == "Fake GPU"


def test_resumed_search_with_other_threads_refuses(tmp_path: Path, tiny_model_dir, tiny_dataset, tiny_space) -> None:
    """Through the CLI: a study measured with 1 thread, resumed asking for 2, is refused before any work."""
    out = tmp_path / "out"
    out.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name="autotune",
                                directions=["maximize", "minimize"])
    study.set_user_attr("measure_threads", 1)
    proc = run_cli("--model", str(tiny_model_dir), "--data", str(tiny_dataset), "--space", str(tiny_space),
                   "--trials", "6", "--max-latency", "1000", "--threads", "2", "-o", str(out))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: study 'autotune' measures latency with 1 thread(s), this run with 2;"), line
    assert "--threads 1" in line and "--per-profile" in line
    assert not study.trials and not (out / "cache" / "adapters").exists()
