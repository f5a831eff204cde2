"""Hardware profiles: what the search may train and export on one kind of machine.

A profile is a YAML file in ``hardware_profiles/`` (one :class:`Profile` each), checked
when loaded so that a wrong key or a combination that could only fail deep inside a run
is a one-line :class:`~autotune.errors.UserError`. :mod:`autotune.hardware` matches them
against the probed machine.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autotune.errors import UserError

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
REQUIRES_KEYS = ("gpu", "min_compute_capability", "os", "provider", "isa")
# CPU instruction sets a profile can require (any one of a list), as HardwareInfo.isa names them.
ISAS = ("avx2", "avx512", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx", "neon")


def parse_capability(value: Any) -> tuple[int, int] | None:
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
            needs :attr:`HardwareInfo.bnb_4bit` (see :func:`~autotune.profile_choice.qlora_enabled`).
        train_device: ``cpu`` or ``cuda``.
        train_dtype: ``float32``, ``bfloat16`` or ``float16``.
        memory_headroom: fraction of the free RAM/VRAM one candidate may use.
        requires: match conditions; keys from :data:`REQUIRES_KEYS`:
            ``gpu`` (bool), ``min_compute_capability`` (e.g. ``8.0``), ``os`` (name
            or list), ``provider`` (a genai provider that must be usable), ``isa``
            (a CPU instruction set from :data:`ISAS`, or a list: any one of them).
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
        min_cc = parse_capability(requires.get("min_compute_capability", 0)) or (0, 0)
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


def one_or_many(value: Any) -> list:
    """A ``requires`` value that may be one name or a list of them (``os``, ``isa``), as a list."""
    return value if isinstance(value, list) else [value]


def _validate_requires(requires: dict[str, Any], where: str) -> None:
    for key, value in requires.items():
        if key not in REQUIRES_KEYS:
            raise UserError(f"{where}: unknown key 'requires.{key}' (known: {', '.join(REQUIRES_KEYS)})")
        if key == "gpu" and not isinstance(value, bool):
            raise UserError(f"{where}: requires.gpu must be true or false (got {value!r})")
        if key == "min_compute_capability" and parse_capability(value) is None:
            raise UserError(f"{where}: requires.min_compute_capability must look like 8.0 (got {value!r})")
        for name, choices in (("os", OSES), ("isa", ISAS)):
            names = one_or_many(value)
            if key == name and (not names or any(n not in choices for n in names)):
                raise UserError(f"{where}: requires.{name} must be one or a list of {', '.join(choices)} (got {value!r})")
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
