"""GPU memory on CUDA (autotune.gpu_memory): where NVML lists no process under our pid (containers, WSL,
Windows) the figure is the devices' growth while the model ran, and where nothing can say it is unknown
(None), never 0; ``--max-memory`` never passes an unknown figure, and is refused up front where NVML
cannot be read. NVML is replaced by a fake here: this machine has no GPU.
"""

from __future__ import annotations

import os
import sys
import types

import pytest

from autotune import gpu_memory
from autotune.bounds import GPU, RSS, Bounds, attrs_figures, memory_of
from autotune.card import model_card
from autotune.errors import UserError
from autotune.measure import Latency
from autotune.notes import measured_rows

MB = 2**20


def fake_nvml(monkeypatch, used: list[list[int]], processes: list[tuple[int, int | None]], fails: bool = False):
    """A ``pynvml`` with one device: ``used`` its used bytes at each successive reading, ``processes``
    (pid, bytes) what it lists; ``fails``: nvmlInit raises (no driver)."""
    readings = iter(used)
    module = types.ModuleType("pynvml")

    def init():
        if fails:
            raise RuntimeError("NVML Shared Library Not Found")

    module.nvmlInit = init
    module.nvmlDeviceGetCount = lambda: 1
    module.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=next(readings)[0])
    module.nvmlDeviceGetComputeRunningProcesses = lambda handle: [
        types.SimpleNamespace(pid=pid, usedGpuMemory=b) for pid, b in processes]
    monkeypatch.setitem(sys.modules, "pynvml", module)


def test_no_process_listed_under_our_pid_falls_back_to_the_devices_growth(monkeypatch) -> None:
    fake_nvml(monkeypatch, [[1000 * MB], [1812 * MB]], [(1, 500 * MB)])  # only another pid (the host's view)
    memory = gpu_memory.GpuMemory()
    assert memory.peak_mb() == 812.0


def test_the_process_own_figure_when_nvml_lists_it(monkeypatch) -> None:
    fake_nvml(monkeypatch, [[1000 * MB], [3000 * MB]], [(os.getpid(), 700 * MB), (1, 500 * MB)])
    assert gpu_memory.GpuMemory().peak_mb() == 700.0


@pytest.mark.parametrize("used, processes, fails", [
    ([[1000 * MB], [1000 * MB]], [(os.getpid(), None)], False),  # no per-process accounting, no growth seen
    ([], [], True),  # no NVML at all
])
def test_unknown_is_none_never_zero(monkeypatch, used, processes, fails) -> None:
    fake_nvml(monkeypatch, used, processes, fails)
    assert gpu_memory.GpuMemory().peak_mb() is None


def test_an_unknown_gpu_figure_never_meets_max_memory() -> None:
    assert memory_of("cuda", 700.0, None) == (None, GPU)  # not the host's RSS in its place
    assert memory_of("cpu", 700.0, None) == (700.0, RSS)
    cuda = {"spec": {"export": {"execution_provider": "cuda"}}, "peak_rss_mb": 700.0, "gpu_memory_mb": None,
            "size_mb": 90.0, "candidate": "lora r8 int4"}
    figures = attrs_figures(3, 0.6, 12.0, cuda)
    bounds = Bounds(max_memory_mb=10_000.0)
    assert not bounds.meets(figures) and figures.shown(bounds.given()[0][0], "request") == "not measured"
    assert bounds.constraint_values(figures)[2] > 0


def test_max_memory_on_cuda_is_refused_up_front_where_nvml_cannot_be_read(monkeypatch) -> None:
    fake_nvml(monkeypatch, [], [], fails=True)
    with pytest.raises(UserError, match="--max-memory") as info:
        gpu_memory.check_bound(600.0, "cuda")
    assert "\n" not in str(info.value) and "NVML Shared Library Not Found" in str(info.value)
    gpu_memory.check_bound(600.0, "cpu")  # peak RSS: always measured
    gpu_memory.check_bound(None, "cuda")
    fake_nvml(monkeypatch, [[1000 * MB]], [])
    gpu_memory.check_bound(600.0, "cuda")


def test_card_and_note_show_an_unknown_gpu_figure_as_unknown() -> None:
    latency = dict(zip(Latency.__dataclass_fields__, (10.0,) * 9 + (8,)))
    attrs = {**latency, "peak_rss_mb": 700.0, "gpu_memory_mb": None, "size_mb": 90.0,
             "spec": {"train": None, "export": {"precision": "int4", "execution_provider": "cuda"}}}
    assert ["GPU memory", "unknown"] in measured_rows(attrs)
    accuracy = {"accuracy": 0.6, "n": 8, "interval": [0.3, 0.85]}
    report = {
        "model": "tiny", "data": "labels Sad, Joy", "latency_metric": "request", "bounds": [],
        "trials": {"complete": 1, "failed": []}, "pareto": [],
        "selection": {"says": "the most accurate", "alpha": 0.05, "note": "winner's curse"},
        "profile": {"name": "cuda-sm80"}, "hardware": {"os": "linux"}, "versions": {}, "command": "autotune",
        "chosen": {"trial": 0, "candidate": "zero-shot base int4", "spec": attrs["spec"], "measured": attrs,
                   "validation_accuracy": 0.6, "validation_n": 8, "validation_interval": [0.3, 0.85],
                   "test": accuracy, "baselines": [], "latency_ms": 10.0, "latency_spread_ms": 0.5},
    }
    assert "| GPU memory of the measuring process | unknown" in model_card(report)
