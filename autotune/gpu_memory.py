"""GPU memory of the measuring process on CUDA, read through NVML (nvidia-ml-py's ``pynvml``).

NVML lists the processes that hold device memory, but in containers, WSL and Windows it
often lists none under our pid (another pid namespace, or no per-process accounting). The
figure then falls back to how much the devices' used memory grew while the process ran:
read before the model is loaded and after its requests (onnxruntime's CUDA arena keeps what
it took, so that is its peak; another process allocating meanwhile would count too). Where
neither can be told the figure is unknown (None), never 0: a 0 would pass every
``--max-memory``. Imported by the measuring child: NVML only, no torch.
"""

from __future__ import annotations

import os

from autotune.errors import UserError


def _devices() -> list:
    import pynvml

    pynvml.nvmlInit()
    return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]


def _devices_used() -> list[int] | None:
    """Bytes in use on each device, None if NVML cannot say."""
    try:
        import pynvml

        return [pynvml.nvmlDeviceGetMemoryInfo(handle).used for handle in _devices()]
    except Exception:  # no NVML, no driver, no permission
        return None


def _process_used() -> int | None:
    """Bytes this process holds on the devices, None if NVML lists no memory under its pid."""
    try:
        import pynvml

        held = [proc.usedGpuMemory for handle in _devices()
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if proc.pid == os.getpid()]
    except Exception:
        return None
    known = [used for used in held if used]  # NVML reports None where it does not account per process
    return sum(known) if known else None


class GpuMemory:
    """The measuring process's GPU memory: create it before the model is loaded, read :meth:`peak_mb` after."""

    def __init__(self) -> None:
        self.before = _devices_used()

    def peak_mb(self) -> float | None:
        own = _process_used()
        if own is not None:
            return own / 2**20
        after = _devices_used()
        if self.before is None or after is None or len(after) != len(self.before):
            return None
        grown = sum(after) - sum(self.before)
        return grown / 2**20 if grown > 0 else None  # no growth seen: it cannot be told


def unreadable() -> str | None:
    """Why GPU memory cannot be measured on this machine (NVML missing or failing), None if it can."""
    try:
        import pynvml
    except ImportError:
        return "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        handles = _devices()
        if not handles:
            return "NVML sees no GPU"
        pynvml.nvmlDeviceGetMemoryInfo(handles[0])
    except Exception as exc:
        return f"NVML: {exc}"
    return None


def check_bound(max_memory_mb: float | None, provider: str) -> None:
    """Refuse ``--max-memory`` before any work where it bounds GPU memory that cannot be measured here."""
    if max_memory_mb is not None and provider == "cuda" and (why := unreadable()):
        raise UserError(f"--max-memory bounds the GPU memory of a CUDA model, which cannot be measured on this "
                        f"machine ({why}); make NVML readable or drop --max-memory")
