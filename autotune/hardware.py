"""Probe the machine and choose the hardware profile that the search runs under.

Two halves:

* :func:`probe` measures what this machine *can* run (CPU, RAM, GPUs, whether
  bitsandbytes 4-bit really works, which onnxruntime-genai execution providers are
  installed) and returns a frozen :class:`HardwareInfo`.
* :func:`choose_profile` picks one :class:`Profile` (loaded from the YAML files in
  ``hardware_profiles/``) for a ``--target``. It never falls back silently: a
  target this machine cannot run raises :class:`~autotune.errors.UserError` with
  the reason and the fix.

Heavy imports (torch, bitsandbytes, onnxruntime) happen inside the probes so that
importing this module stays cheap.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import yaml

from autotune.errors import UserError

if TYPE_CHECKING:
    from rich.console import Group


_logger = logging.getLogger(__name__)

TARGETS = ("auto", "cpu", "cuda", "dml")
EXECUTION_PROVIDERS = ("cpu", "cuda", "dml")

# Export precisions each execution provider can actually *run*. ModelBuilder also
# builds fp16/bf16 models for CPU, but onnxruntime's CPU EP lacks fp16/bf16
# kernels for the ops it emits, so they fail at load/run time; DirectML has no
# bf16 and runs fp32 poorly (and ModelBuilder does not emit int8 for it).
VALID_PRECISIONS: dict[str, tuple[str, ...]] = {
    "cpu": ("fp32", "int8", "int4"),
    "cuda": ("fp32", "fp16", "bf16", "int4"),
    "dml": ("fp16", "int4"),
}
TRAIN_DEVICES = ("cpu", "cuda")
TRAIN_DTYPES = ("float32", "bfloat16", "float16")
OSES = ("linux", "windows", "darwin")
REQUIRES_KEYS = ("gpu", "min_compute_capability", "os", "provider")

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
        isa: the SIMD extensions present, a subset of ``avx2``, ``avx512``,
            ``avx512_vnni``, ``avx_vnni``, ``amx``, ``neon``.
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
        return {
            "os": self.os,
            "cpu_model": self.cpu_model,
            "physical_cores": self.physical_cores,
            "logical_cores": self.logical_cores,
            "isa": list(self.isa),
            "ram_gb": self.ram_gb,
            "gpus": [g.to_dict() for g in self.gpus],
            "bnb_4bit": self.bnb_4bit,
            "genai_providers": list(self.genai_providers),
            "ort_providers": list(self.ort_providers),
        }


# --------------------------------------------------------------------------- probe


def probe() -> HardwareInfo:
    """Measure this machine.

    Every probe is guarded: one that fails reports "absent" (no GPU, no ISA flag,
    bnb_4bit False) instead of raising. Without a GPU this takes about as long as
    importing torch and bitsandbytes, which the 4-bit probe needs.
    """
    logical = _usable_logical_cores()
    gpus = _probe_gpus()
    return HardwareInfo(
        os=_os_name(),
        cpu_model=_guard(_cpu_model, "unknown CPU"),
        physical_cores=_guard(lambda: _physical_cores(logical), logical),
        logical_cores=logical,
        isa=_guard(_probe_isa, ()),
        ram_gb=_guard(_ram_gb, 0.0),
        gpus=gpus,
        bnb_4bit=_probe_bnb_4bit("cuda" if gpus else "cpu"),
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
    if sys.platform.startswith("win"):
        return "windows"
    if sys.platform == "darwin":
        return "darwin"
    return "linux" if sys.platform.startswith("linux") else sys.platform


@functools.lru_cache(maxsize=1)
def _proc_cpuinfo() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo (Linux only)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return info
    for line in text.splitlines():
        if not line.strip():
            if info:
                break  # all processors repeat the same flags
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def _sysctl(name: str) -> str:
    out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2)
    return out.stdout.strip()


def _cpu_model() -> str:
    cpuinfo = _proc_cpuinfo()
    # ARM Linux has no "model name" on many kernels.
    for key in ("model name", "Model", "Hardware", "cpu model"):
        if cpuinfo.get(key):
            return cpuinfo[key]
    if sys.platform == "darwin":
        name = _guard(lambda: _sysctl("machdep.cpu.brand_string"), "")
        if name:
            return name
    return platform.processor() or platform.machine() or "unknown CPU"


def _probe_isa() -> tuple[str, ...]:
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64") or machine.startswith("armv8"):
        # Advanced SIMD (NEON) is mandatory on AArch64.
        return ("neon",)
    flags = set(_proc_cpuinfo().get("flags", "").split())
    if not flags and sys.platform == "darwin":
        text = _sysctl("machdep.cpu.features") + " " + _sysctl("machdep.cpu.leaf7_features")
        flags = {f.lower().replace(".", "_") for f in text.split()}
    if flags:
        found = {
            "avx2": "avx2" in flags,
            "avx512": "avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags or "avx512vnni" in flags,
            "avx_vnni": "avx_vnni" in flags or "avxvnni" in flags,
            "amx": "amx_tile" in flags or "amx_int8" in flags,
        }
    else:
        # Windows has no flag list; torch's dispatcher checks CPUID for us.
        import torch

        cpu = torch._C._cpu
        found = {
            "avx2": bool(cpu._is_avx2_supported()),
            "avx512": bool(cpu._is_avx512_supported()),
            "avx512_vnni": bool(cpu._is_vnni_supported()),
            "amx": bool(cpu._is_amx_tile_supported()),
        }
    return tuple(name for name, present in found.items() if present)


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
    total = psutil.virtual_memory().total
    limit = _guard(_cgroup_memory_limit, None)
    if limit is not None:
        total = min(total, limit)
    return round(total / 2**30, 1)


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


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _genai_providers(has_gpu: bool) -> tuple[str, ...]:
    providers = ["cpu"]  # every onnxruntime-genai build runs on CPU
    # The CPU and CUDA wheels install the same module, so ask the module itself which
    # providers it was built with; the distribution names are the fallback for old versions.
    try:
        import onnxruntime_genai as og

        cuda, dml = og.is_cuda_available(), og.is_dml_available()
    except (ImportError, AttributeError):
        cuda, dml = _installed(_GENAI_CUDA_DIST), _installed(_GENAI_DML_DIST)
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


# --------------------------------------------------------------------------- profiles


def _parse_capability(value: Any) -> tuple[int, int] | None:
    """``8.0`` / ``"8.6"`` / ``[8, 6]`` -> ``(8, 6)``; None if not a capability."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    if isinstance(value, (int, float, str)):
        major, _, minor = str(value).strip().partition(".")
        if major.isdigit() and (minor.isdigit() or minor == ""):
            return (int(major), int(minor or 0))
    return None


@dataclass(frozen=True)
class Profile:
    """A hardware profile: what the search may train and export on one kind of machine.

    Loaded 1:1 from a YAML file in ``hardware_profiles/``.

    Attributes:
        name: unique profile name, e.g. ``"cuda-sm80"``.
        description: one line for ``autotune profile``.
        execution_provider: the onnxruntime-genai EP exports run on: ``cpu``,
            ``cuda`` or ``dml``.
        precisions: export precisions to search, each valid on the EP
            (see :data:`VALID_PRECISIONS`).
        qlora: whether QLoRA (bitsandbytes 4-bit base) candidates are searched; also
            needs :attr:`HardwareInfo.bnb_4bit` (see :func:`qlora_enabled`).
        train_device: ``cpu`` or ``cuda``.
        train_dtype: ``float32``, ``bfloat16`` or ``float16``.
        memory_headroom: fraction of the free RAM/VRAM one candidate may use.
        requires: match conditions; keys from :data:`REQUIRES_KEYS`:
            ``gpu`` (bool), ``min_compute_capability`` (e.g. ``8.0``), ``os`` (name
            or list), ``provider`` (a genai provider that must be usable).
        priority: higher wins under ``--target auto``.
        source: the YAML file it came from.
    """

    name: str
    description: str
    execution_provider: str
    precisions: tuple[str, ...]
    qlora: bool
    train_device: str
    train_dtype: str
    memory_headroom: float
    requires: dict[str, Any] = field(hash=False)
    priority: int
    source: Path

    @classmethod
    def from_yaml(cls, path: Path | str) -> Profile:
        """Load and validate one profile; any problem raises a one-line UserError."""
        path = Path(path)
        where = f"hardware profile {path}"
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UserError(f"{where}: cannot read: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            detail = " ".join(str(exc).split())
            raise UserError(f"{where}: invalid YAML: {detail}") from None
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
        return cls._from_mapping(data, path)

    @classmethod
    def _from_mapping(cls, data: dict[str, Any], path: Path) -> Profile:
        where = f"hardware profile {path}"
        known = [f for f in cls.__dataclass_fields__ if f != "source"]
        for key in data:
            if key not in known:
                raise UserError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
        missing = [k for k in known if k not in data]
        if missing:
            raise UserError(f"{where}: missing key(s) {', '.join(missing)}")

        def bad(key: str, expected: str) -> UserError:
            return UserError(f"{where}: {key} must be {expected} (got {data[key]!r})")

        def one_of(key: str, choices: tuple[str, ...]) -> str:
            if data[key] not in choices:
                raise bad(key, "one of " + ", ".join(choices))
            return data[key]

        for key in ("name", "description"):
            if not isinstance(data[key], str) or (key == "name" and not data[key].strip()):
                raise bad(key, "a non-empty string" if key == "name" else "a string")
        ep = one_of("execution_provider", EXECUTION_PROVIDERS)
        precisions = data["precisions"]
        if not isinstance(precisions, list) or not precisions:
            raise bad("precisions", "a non-empty list")
        for p in precisions:
            if p not in VALID_PRECISIONS[ep]:
                raise UserError(
                    f"{where}: precision {p!r} does not run on execution_provider {ep} "
                    f"(valid: {', '.join(VALID_PRECISIONS[ep])})"
                )
        if len(set(precisions)) != len(precisions):
            raise bad("precisions", "a list without duplicates")
        if not isinstance(data["qlora"], bool):
            raise bad("qlora", "true or false")
        train_device = one_of("train_device", TRAIN_DEVICES)
        train_dtype = one_of("train_dtype", TRAIN_DTYPES)
        headroom = data["memory_headroom"]
        if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 0 < headroom <= 1:
            raise bad("memory_headroom", "a fraction in (0, 1]")
        priority = data["priority"]
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise bad("priority", "an integer")
        requires = data["requires"] if data["requires"] is not None else {}
        if not isinstance(requires, dict):
            raise bad("requires", "a mapping (or {})")
        _validate_requires(requires, where)

        # Combinations that would only fail deep inside a run.
        min_cc = _parse_capability(requires.get("min_compute_capability", 0)) or (0, 0)
        needs_gpu = requires.get("gpu") is True
        if train_device == "cuda" and not needs_gpu:
            raise UserError(f"{where}: train_device cuda needs requires.gpu: true")
        if train_dtype == "float16" and train_device != "cuda":
            raise UserError(f"{where}: train_dtype float16 needs train_device cuda (CPU fp16 training is unsupported)")
        if train_device == "cuda" and train_dtype == "bfloat16" and min_cc < (8, 0):
            raise UserError(f"{where}: train_dtype bfloat16 needs requires.min_compute_capability: 8.0 (bf16 is sm80+)")
        if ep == "cuda" and "bf16" in precisions and min_cc < (8, 0):
            raise UserError(f"{where}: precision bf16 needs requires.min_compute_capability: 8.0 (bf16 is sm80+)")

        return cls(
            name=data["name"],
            description=data["description"],
            execution_provider=ep,
            precisions=tuple(precisions),
            qlora=data["qlora"],
            train_device=train_device,
            train_dtype=train_dtype,
            memory_headroom=float(headroom),
            requires=dict(requires),
            priority=priority,
            source=path,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict for reports."""
        return {
            "name": self.name,
            "description": self.description,
            "execution_provider": self.execution_provider,
            "precisions": list(self.precisions),
            "qlora": self.qlora,
            "train_device": self.train_device,
            "train_dtype": self.train_dtype,
            "memory_headroom": self.memory_headroom,
            "requires": dict(self.requires),
            "priority": self.priority,
            "source": str(self.source),
        }


def _validate_requires(requires: dict[str, Any], where: str) -> None:
    for key, value in requires.items():
        if key not in REQUIRES_KEYS:
            raise UserError(f"{where}: unknown key 'requires.{key}' (known: {', '.join(REQUIRES_KEYS)})")
        if key == "gpu" and not isinstance(value, bool):
            raise UserError(f"{where}: requires.gpu must be true or false (got {value!r})")
        if key == "min_compute_capability" and _parse_capability(value) is None:
            raise UserError(f"{where}: requires.min_compute_capability must look like 8.0 (got {value!r})")
        if key == "os":
            names = value if isinstance(value, list) else [value]
            if not names or any(n not in OSES for n in names):
                raise UserError(f"{where}: requires.os must be one or a list of {', '.join(OSES)} (got {value!r})")
        if key == "provider" and value not in EXECUTION_PROVIDERS:
            raise UserError(
                f"{where}: requires.provider must be one of {', '.join(EXECUTION_PROVIDERS)} (got {value!r})"
            )


def default_profiles_dir() -> Path:
    """Where the shipped profiles live.

    The first existing of: ``$AUTOTUNE_PROFILES_DIR``, the source checkout's
    ``hardware_profiles/``, ``<sys.prefix>/share/autotune/hardware_profiles`` (the
    installed wheel's data files).
    """
    env = os.environ.get("AUTOTUNE_PROFILES_DIR")
    if env:
        # An explicit setting that points nowhere is a mistake, not a hint.
        if not Path(env).is_dir():
            raise UserError(f"AUTOTUNE_PROFILES_DIR={env} is not a directory; fix or unset it")
        return Path(env)
    repo = Path(__file__).resolve().parent.parent / "hardware_profiles"
    installed = Path(sys.prefix) / "share" / "autotune" / "hardware_profiles"
    for candidate in (repo, installed):
        if candidate.is_dir():
            return candidate
    return repo


def load_profiles(directory: Path | None = None) -> list[Profile]:
    """Load every ``*.yaml``/``*.yml`` profile in ``directory`` (default: :func:`default_profiles_dir`)."""
    directory = Path(directory) if directory is not None else default_profiles_dir()
    if not directory.is_dir():
        raise UserError(f"hardware profiles directory {directory} does not exist; reinstall autotune")
    paths = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
    if not paths:
        raise UserError(f"no hardware profiles (*.yaml) in {directory}; reinstall autotune")
    profiles: list[Profile] = []
    seen: dict[str, Path] = {}
    for path in paths:
        profile = Profile.from_yaml(path)
        if profile.name in seen:
            raise UserError(f"hardware profile {path}: name {profile.name!r} already used by {seen[profile.name]}")
        seen[profile.name] = path
        profiles.append(profile)
    return profiles


# --------------------------------------------------------------------------- choice


def _mismatch(profile: Profile, info: HardwareInfo) -> str | None:
    """Why ``profile`` cannot run on ``info``, or None if it can."""
    req = profile.requires
    if "os" in req:
        oses = req["os"] if isinstance(req["os"], list) else [req["os"]]
        if info.os not in oses:
            return f"needs {' or '.join(oses)} (this is {info.os})"
    if req.get("gpu") is True and not info.gpus:
        return "needs a CUDA GPU (torch sees none)"
    if req.get("gpu") is False and info.gpus:
        return "is for machines without a GPU"
    if "min_compute_capability" in req:
        need = _parse_capability(req["min_compute_capability"]) or (0, 0)
        best = max((g.compute_capability for g in info.gpus), default=None)
        if best is None or best < need:
            found = f"{best[0]}.{best[1]}" if best else "no GPU"
            return f"needs compute capability >= {need[0]}.{need[1]} (found {found})"
    # A profile can only export to an EP that is usable, whether or not it says so.
    for provider in dict.fromkeys((profile.execution_provider, req.get("provider", profile.execution_provider))):
        if provider not in info.genai_providers:
            return f"needs the onnxruntime-genai {provider} provider (usable here: {', '.join(info.genai_providers)})"
    return None


def matches(profile: Profile, info: HardwareInfo) -> bool:
    """Whether ``profile`` can run on the machine described by ``info``."""
    return _mismatch(profile, info) is None


def choose_profile(info: HardwareInfo, target: str, profiles: list[Profile]) -> Profile:
    """The profile to run ``--target`` under on this machine.

    ``auto`` picks the highest-priority matching profile; ``cpu``/``cuda``/``dml``
    the highest-priority matching profile with that execution provider. Raises
    UserError (one line: reason and fix) when none matches; never falls back.
    """
    if target not in TARGETS:
        raise UserError(f"unknown --target {target!r} (choose from {', '.join(TARGETS)})")
    candidates = [p for p in profiles if target == "auto" or p.execution_provider == target]
    if not candidates:
        raise UserError(f"--target {target}: no hardware profile for it; reinstall autotune or add one")
    matching = [p for p in candidates if matches(p, info)]
    if matching:
        # Stable on ties: the name breaks them so the choice is reproducible.
        return max(matching, key=lambda p: (p.priority, p.name))

    if target == "cuda":
        if not info.gpus:
            raise UserError(
                "--target cuda: no CUDA GPU found (torch sees none); run on a machine with an NVIDIA GPU "
                "and `pip install 'autotune[cuda]'`, or use --target cpu"
            )
        if "cuda" not in info.genai_providers:
            raise UserError(
                f"--target cuda: GPU found ({info.gpus[0].name}) but onnxruntime-genai-cuda is not installed; "
                "pip uninstall -y onnxruntime-genai && pip install 'autotune[cuda]' (the CPU and CUDA wheels share one module)"
            )
    if target == "dml":
        if info.os != "windows":
            raise UserError(f"--target dml: DirectML needs Windows (this is {info.os}); use --target cpu or cuda")
        if "dml" not in info.genai_providers:
            raise UserError(
                "--target dml: onnxruntime-genai-directml is not installed; pip install 'autotune[dml]'"
            )
    reasons = "; ".join(f"{p.name} {_mismatch(p, info)}" for p in candidates)
    fix = "use --target cpu" if target != "cpu" else "check the profiles' requires"
    raise UserError(f"--target {target}: no hardware profile matches this machine ({reasons}); {fix}")


def qlora_enabled(profile: Profile, info: HardwareInfo) -> bool:
    """Whether QLoRA candidates may be searched: the profile allows it and the 4-bit probe passed."""
    return profile.qlora and info.bnb_4bit


def memory_budget_gb(profile: Profile) -> float:
    """GiB one candidate may use now: free RAM/VRAM on the train device x memory_headroom."""
    free = psutil.virtual_memory().available
    if profile.train_device == "cuda":
        try:
            import torch

            free, _total = torch.cuda.mem_get_info()
        except Exception as exc:
            raise UserError(f"profile {profile.name} trains on cuda but CUDA memory is unreadable: {exc}") from None
    return round(free / 2**30 * profile.memory_headroom, 2)


# --------------------------------------------------------------------------- display


def format_profile(info: HardwareInfo, profile: Profile, threads: int | None = None) -> Group:
    """What ``autotune profile`` prints: the machine, then the chosen profile."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    machine = Table(title="Hardware", show_header=False, title_justify="left")
    machine.add_column(style="bold")
    machine.add_column()
    machine.add_row("OS", info.os)
    machine.add_row("CPU", escape(info.cpu_model))
    machine.add_row("Cores", f"{info.physical_cores} physical, {info.logical_cores} logical")
    if threads is not None:
        machine.add_row("Free cores now", str(threads))
    machine.add_row("ISA", ", ".join(info.isa) or "-")
    machine.add_row("RAM", f"{info.ram_gb:.1f} GiB")
    gpus = [
        f"{escape(g.name)} ({g.vram_gb:.1f} GiB, sm{g.compute_capability[0]}{g.compute_capability[1]}"
        f"{', bf16' if g.bf16 else ''})"
        for g in info.gpus
    ]
    machine.add_row("GPUs", "\n".join(gpus) or "none")
    machine.add_row("bitsandbytes 4-bit", "works" if info.bnb_4bit else "[yellow]unavailable[/]")
    machine.add_row("genai providers", ", ".join(info.genai_providers))
    machine.add_row("ORT providers", ", ".join(info.ort_providers) or "-")

    chosen = Table(title=f"Profile: {profile.name}", show_header=False, title_justify="left")
    chosen.add_column(style="bold")
    chosen.add_column()
    chosen.add_row("Description", escape(profile.description))
    chosen.add_row("Execution provider", profile.execution_provider)
    chosen.add_row("Export precisions", ", ".join(profile.precisions))
    chosen.add_row("Training", f"{profile.train_device}, {profile.train_dtype}")
    if qlora_enabled(profile, info):
        qlora = "yes"
    elif profile.qlora:
        qlora = "[yellow]no: bitsandbytes 4-bit probe failed[/]"
    else:
        qlora = "no (profile)"
    chosen.add_row("QLoRA", qlora)
    chosen.add_row("Memory headroom", f"{profile.memory_headroom:.0%} of free memory")
    chosen.add_row("Source", escape(str(profile.source)))
    return Group(machine, chosen)
