"""Probe the machine: what it can run, and how many cores are free for training and inference.

:func:`probe` measures what this machine *can* run (CPU, RAM, GPUs, whether bitsandbytes
4-bit really works, which onnxruntime-genai execution providers are installed) and returns a
frozen :class:`HardwareInfo`; :func:`choose_threads` picks the threads a stage runs on.
Which hardware profile runs on it is :mod:`autotune.profile_choice`'s job.

Heavy imports (torch, bitsandbytes, onnxruntime) happen inside the probes so that
importing this module stays cheap.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import psutil

from autotune.errors import UserError

_logger = logging.getLogger(__name__)

# The genai wheels are separate distributions that all install the same
# ``onnxruntime_genai`` module; which one is installed decides the providers.
_GENAI_CUDA_DIST = "onnxruntime-genai-cuda"
_GENAI_DML_DIST = "onnxruntime-genai-directml"

# A core busier than this (percent) is taken by someone else. Training threads
# placed on busy cores made training 10-30x slower through oversubscription.
_BUSY_PERCENT = 50.0


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA GPU as torch sees it.

    Attributes:
        name: the device name, e.g. ``"NVIDIA A100-SXM4-80GB"``.
        vram_gb: total device memory in GiB.
        compute_capability: ``(major, minor)``, e.g. ``(8, 0)`` for an A100.
    """

    name: str
    vram_gb: float
    compute_capability: tuple[int, int]

    @property
    def bf16(self) -> bool:
        """Whether the GPU has native bf16 (Ampere, sm80, and newer)."""
        return self.compute_capability >= (8, 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vram_gb": self.vram_gb,
            "compute_capability": f"{self.compute_capability[0]}.{self.compute_capability[1]}",
            "bf16": self.bf16,
        }


@dataclass(frozen=True)
class HardwareInfo:
    """What this machine can run, as measured by :func:`probe`.

    Attributes:
        os: ``"linux"``, ``"windows"`` or ``"darwin"``.
        cpu_model: the CPU's marketing name (best effort).
        physical_cores: physical cores this process may use.
        logical_cores: logical CPUs this process may use (affinity and cgroup quota
            applied, so inside a container it is the container's share).
        isa: the SIMD extensions present, a subset of :data:`~autotune.profiles.ISAS`
            (``avx512_bf16`` and ``amx`` have native bf16 dot products).
        ram_gb: total RAM in GiB (a cgroup memory limit, if lower, wins).
        gpus: the CUDA GPUs torch can use.
        bnb_4bit: whether a bitsandbytes NF4 ``Linear4bit`` really quantizes and
            runs forward and backward here, on the GPU if any, else on the CPU.
        genai_providers: the onnxruntime-genai execution providers usable here
            (``"cpu"`` always; ``"cuda"``, ``"dml"`` when installed and runnable).
        ort_providers: ``onnxruntime.get_available_providers()``.
    """

    os: str
    cpu_model: str
    physical_cores: int
    logical_cores: int
    isa: tuple[str, ...]
    ram_gb: float
    gpus: tuple[GpuInfo, ...] = ()
    bnb_4bit: bool = False
    genai_providers: tuple[str, ...] = ("cpu",)
    ort_providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict for reports."""
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**record, "gpus": [g.to_dict() for g in self.gpus],
                **{k: list(record[k]) for k in ("isa", "genai_providers", "ort_providers")}}


# --------------------------------------------------------------------------- probe


def probe() -> HardwareInfo:
    """Measure this machine.

    Every probe is guarded: one that fails reports "absent" (no GPU, no ISA flag,
    bnb_4bit False) instead of raising. Without a GPU this takes about as long as
    importing torch and bitsandbytes, which the 4-bit probe needs.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        cpu = pool.submit(_guard, _cpu_info, {})  # waits on a child process while torch imports here
        logical = _usable_logical_cores()
        gpus = _probe_gpus()
        bnb_4bit = _probe_bnb_4bit("cuda" if gpus else "cpu")
        cpu.result()
    return HardwareInfo(
        os=_os_name(),
        cpu_model=_guard(_cpu_model, "unknown CPU"),
        physical_cores=_guard(lambda: _physical_cores(logical), logical),
        logical_cores=logical,
        isa=_guard(_probe_isa, ()),
        ram_gb=_guard(_ram_gb, 0.0),
        gpus=gpus,
        bnb_4bit=bnb_4bit,
        genai_providers=_guard(lambda: _genai_providers(bool(gpus)), ("cpu",)),
        ort_providers=_guard(_ort_providers, ()),
    )


def _guard(fn: Any, default: Any) -> Any:
    try:
        return fn()
    except Exception as exc:  # a probe must never take the CLI down
        _logger.debug("hardware probe %s failed: %r", getattr(fn, "__name__", fn), exc)
        return default


def _os_name() -> str:
    return platform.system().lower()  # linux, windows, darwin


@functools.lru_cache(maxsize=1)
def _cpu_info() -> dict[str, Any]:
    """py-cpuinfo's record of this CPU (brand, flags) on Linux, macOS and Windows alike.

    It reads CPUID in a child process (about a second): :func:`probe` runs it beside the
    torch and bitsandbytes probes.
    """
    import cpuinfo

    return cpuinfo.get_cpu_info()


def _cpu_model() -> str:
    return _cpu_info().get("brand_raw") or platform.processor() or platform.machine() or "unknown CPU"


def device_name(cuda: bool) -> str:
    """What measures a model here: the first CUDA GPU's name on a CUDA profile, else the CPU's model (the
    ``device`` of a study's hardware identity, :func:`autotune.study.hardware_identity`)."""
    gpus = _probe_gpus() if cuda else ()
    return gpus[0].name if gpus else _guard(_cpu_model, "unknown CPU")


# The SIMD extensions that matter for int4/int8 kernels, and py-cpuinfo's spellings of them.
_ISA_FLAGS = {
    "avx2": ("avx2",),
    "avx512": ("avx512f",),
    "avx512_vnni": ("avx512_vnni", "avx512vnni"),
    "avx_vnni": ("avx_vnni", "avxvnni"),
    "avx512_bf16": ("avx512_bf16", "avx512bf16"),
    "amx": ("amx_tile", "amx_int8", "amxtile", "amxint8"),
}


def _probe_isa() -> tuple[str, ...]:
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64") or machine.startswith("armv8"):
        return ("neon",)  # Advanced SIMD (NEON) is mandatory on AArch64
    flags = set(_cpu_info().get("flags", ()))
    return tuple(name for name, spellings in _ISA_FLAGS.items() if flags.intersection(spellings))


def _usable_cpu_ids() -> list[int]:
    """The logical CPUs this process may be scheduled on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(psutil.cpu_count(logical=True) or 1))


def _cgroup_cpu_quota() -> float | None:
    """CPUs granted by a cgroup CPU quota (containers), or None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]  # cgroup v2
    except (OSError, ValueError):
        try:
            quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()  # v1
            period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def _usable_logical_cores() -> int:
    n = len(_guard(_usable_cpu_ids, [0])) or 1
    quota = _guard(_cgroup_cpu_quota, None)
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return n


def _physical_cores(logical: int) -> int:
    physical = psutil.cpu_count(logical=False) or logical
    host_logical = psutil.cpu_count(logical=True) or logical
    # Scale by the share of the host we may use (affinity, container quota).
    return max(1, min(logical, round(physical * logical / host_logical)))


def _cgroup_memory_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        # v1 reports "no limit" as a huge number near 2**63.
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def _ram_gb() -> float:
    limit = _guard(_cgroup_memory_limit, None) or float("inf")
    return round(min(psutil.virtual_memory().total, limit) / 2**30, 1)


def _probe_gpus() -> tuple[GpuInfo, ...]:
    try:
        import torch

        # ROCm builds also answer torch.cuda, but onnxruntime-genai's CUDA EP
        # and the cuda profiles are NVIDIA only.
        if torch.version.cuda is None or not torch.cuda.is_available():
            return ()
        gpus = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append(GpuInfo(props.name, round(props.total_memory / 2**30, 1), (major, minor)))
        return tuple(gpus)
    except Exception as exc:
        _logger.debug("GPU probe failed: %r", exc)
        return ()


@functools.lru_cache(maxsize=None)
def _probe_bnb_4bit(device: str) -> bool:
    """Whether bitsandbytes NF4 works on ``device``: quantize a tiny layer, run it.

    Import success proves little (bitsandbytes imports fine without a usable
    backend), so this runs what QLoRA runs: quantize, forward, backward to the input.
    Cached per process; it costs about a second after torch is imported.
    """
    try:
        import torch

        # On CPUs with AVX512-BF16, importing bitsandbytes warns that an optional
        # Hub kernel (`pip install kernels`) is missing; its own kernels still work.
        bnb_logger = logging.getLogger("bitsandbytes")
        level = bnb_logger.level
        bnb_logger.setLevel(logging.ERROR)
        try:
            import bitsandbytes as bnb
        finally:
            bnb_logger.setLevel(level)

        dtype = torch.float32
        if device == "cuda":
            dtype = torch.bfloat16 if torch.cuda.get_device_capability(0) >= (8, 0) else torch.float16
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer = layer.to(device)  # quantizes the weight
        if not getattr(layer.weight, "bnb_quantized", False):
            return False
        x = torch.randn(2, 64, device=device, dtype=dtype, requires_grad=True)
        y = layer(x)
        y.float().sum().backward()
        return bool(torch.isfinite(y).all()) and x.grad is not None
    except Exception as exc:
        _logger.debug("bitsandbytes 4-bit probe on %s failed: %r", device, exc)
        return False


def _genai_providers(has_gpu: bool) -> tuple[str, ...]:
    providers = ["cpu"]  # every onnxruntime-genai build runs on CPU
    # The CPU and CUDA wheels install the same module, so ask the module itself which
    # providers it was built with; the distribution names are the fallback for old versions.
    try:
        import onnxruntime_genai as og

        cuda, dml = og.is_cuda_available(), og.is_dml_available()
    except (ImportError, AttributeError):
        from autotune.cache import library_version

        cuda, dml = (library_version(dist) is not None for dist in (_GENAI_CUDA_DIST, _GENAI_DML_DIST))
    if has_gpu and cuda:
        providers.append("cuda")
    if _os_name() == "windows" and dml:
        providers.append("dml")
    return tuple(providers)


def _ort_providers() -> tuple[str, ...]:
    import onnxruntime

    return tuple(onnxruntime.get_available_providers())


# --------------------------------------------------------------------------- cores


def free_cores() -> int:
    """Cores that other processes leave free right now (sampled over 0.2 s).

    This process's own load (imports, progress rendering) does not count against it.
    At least 1, at most the usable physical cores (two threads sharing a core's SIMD
    units gain little for training and export).
    """
    logical = _usable_logical_cores()
    physical = _guard(lambda: _physical_cores(logical), logical)
    try:
        me = psutil.Process()
        me.cpu_percent(None)  # starts this process's own measurement window
        percents = psutil.cpu_percent(interval=0.2, percpu=True)
        own = me.cpu_percent(None) / 100  # in cores
        ids = _usable_cpu_ids()
        usable = [percents[i] for i in ids if i < len(percents)] or percents
        busy_by_others = max(0.0, sum(usable) / 100 - own)
        free = len(usable) - int(busy_by_others + 1 - _BUSY_PERCENT / 100)  # a core over half busy is taken
    except Exception as exc:
        _logger.debug("cpu_percent failed: %r", exc)
        free = physical
    return max(1, min(free, physical))


def choose_threads(requested: int | None = None) -> int:
    """Threads for training/inference: ``requested`` if given, else :func:`free_cores`."""
    if requested is None:
        return free_cores()
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise UserError(f"--threads must be a whole number >= 1 (got {requested!r})")
    return requested
