"""Choose the hardware profile a run uses on this machine, and show the choice.

:func:`choose_profile` picks one :class:`~autotune.profiles.Profile` (loaded from the YAML
files in ``hardware_profiles/``) for a ``--target``, from what :func:`~autotune.hardware.probe`
measured. It never falls back silently: a target this machine cannot run raises
:class:`~autotune.errors.UserError` with the reason and the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autotune.errors import UserError
from autotune.hardware import HardwareInfo
from autotune.profiles import Profile, one_or_many, parse_capability

if TYPE_CHECKING:
    from rich.console import Group

TARGETS = ("auto", "cpu", "cuda", "dml")


def _mismatch(profile: Profile, info: HardwareInfo) -> str | None:
    """Why ``profile`` cannot run on ``info``, or None if it can."""
    req = profile.requires
    if "os" in req:
        oses = one_or_many(req["os"])
        if info.os not in oses:
            return f"needs {' or '.join(oses)} (this is {info.os})"
    if "isa" in req:
        wanted = one_or_many(req["isa"])
        if not set(wanted) & set(info.isa):
            return f"needs a CPU with {' or '.join(wanted)} (this one has {', '.join(info.isa) or 'none of them'})"
    if req.get("gpu") is True and not info.gpus:
        return "needs a CUDA GPU (torch sees none)"
    if req.get("gpu") is False and info.gpus:
        return "is for machines without a GPU"
    if "min_compute_capability" in req:
        need = parse_capability(req["min_compute_capability"]) or (0, 0)
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


def choose_profile(info: HardwareInfo, target: str, profiles: list[Profile], name: str | None = None) -> Profile:
    """The profile to run ``--target`` under on this machine.

    ``auto`` picks the highest-priority matching profile; ``cpu``/``cuda``/``dml``
    the highest-priority matching profile with that execution provider. ``name``
    (``--profile``) picks that profile instead, if it runs here and on ``target``, e.g. ``cpu``
    (fp32 training) on a CPU that ``cpu-bf16`` would get. Raises UserError (one line: reason
    and fix) when none matches; never falls back.
    """
    if target not in TARGETS:
        raise UserError(f"unknown --target {target!r} (choose from {', '.join(TARGETS)})")
    if name is not None:
        return _named_profile(info, target, profiles, name)
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


def _named_profile(info: HardwareInfo, target: str, profiles: list[Profile], name: str) -> Profile:
    named = next((p for p in profiles if p.name == name), None)
    if named is None:
        raise UserError(f"--profile {name}: no such hardware profile (choose from {', '.join(sorted(p.name for p in profiles))})")
    if target != "auto" and named.execution_provider != target:
        raise UserError(f"--profile {name} runs on {named.execution_provider}, not --target {target}; "
                        f"drop one of the two")
    reason = _mismatch(named, info)
    if reason is not None:
        raise UserError(f"--profile {name} does not run on this machine ({reason}); "
                        "drop --profile to use the one that does (`autotune profile` shows it)")
    return named


def qlora_enabled(profile: Profile, info: HardwareInfo) -> bool:
    """Whether QLoRA candidates may be searched: the profile allows it and the 4-bit probe passed."""
    return profile.qlora and info.bnb_4bit


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
