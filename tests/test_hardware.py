"""Tests for autotune.hardware (the real probe on this machine) and autotune.profile_choice (profile choice
from given answers)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from autotune import hardware, profile_choice
from autotune.errors import UserError
from autotune.hardware import GpuInfo, HardwareInfo, choose_threads, free_cores, probe
from autotune.profile_choice import choose_profile, matches
from autotune.profiles import ISAS, VALID_PRECISIONS, Profile, default_profiles_dir, load_profiles

A100 = GpuInfo("NVIDIA A100-SXM4-80GB", 79.2, (8, 0))
T4 = GpuInfo("Tesla T4", 14.6, (7, 5))
P100 = GpuInfo("Tesla P100-PCIE-16GB", 15.9, (6, 0))


def machine(
    *,
    os: str = "linux",
    gpus: tuple[GpuInfo, ...] = (),
    genai: tuple[str, ...] = ("cpu",),
    bnb_4bit: bool = True,
) -> HardwareInfo:
    """A HardwareInfo as probe() would report it, without probing."""
    return HardwareInfo(
        os=os,
        cpu_model="Test CPU",
        physical_cores=8,
        logical_cores=16,
        isa=("avx2",),
        ram_gb=64.0,
        gpus=gpus,
        bnb_4bit=bnb_4bit,
        genai_providers=genai,
        ort_providers=("CPUExecutionProvider",),
    )


@pytest.fixture(scope="module")
def profiles() -> list[Profile]:
    return load_profiles()


@pytest.fixture(scope="module")
def real_info() -> HardwareInfo:
    return probe()


def one_line_error(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert excinfo.value.exit_code == 2
    return message


# --------------------------------------------------------------------------- real probe


def test_probe_sane_on_this_machine(real_info: HardwareInfo) -> None:
    info = real_info
    assert info.os in ("linux", "windows", "darwin")
    assert info.cpu_model
    assert 1 <= info.physical_cores <= info.logical_cores <= (psutil.cpu_count() or 1)
    assert set(info.isa) <= set(ISAS) and set(hardware._ISA_FLAGS) | {"neon"} == set(ISAS)
    assert info.ram_gb > 0.5
    assert "cpu" in info.genai_providers
    assert "CPUExecutionProvider" in info.ort_providers
    assert isinstance(info.bnb_4bit, bool)
    for gpu in info.gpus:
        assert gpu.vram_gb > 0 and gpu.compute_capability >= (3, 0)
    d = info.to_dict()
    assert d["os"] == info.os and isinstance(d["isa"], list) and isinstance(d["gpus"], list)


def test_probe_chooses_cpu_here(real_info: HardwareInfo, profiles: list[Profile]) -> None:
    if real_info.gpus:
        pytest.skip("this machine has a GPU")
    expected = "cpu-bf16" if {"avx512_bf16", "amx"} & set(real_info.isa) else "cpu"
    assert choose_profile(real_info, "auto", profiles).name == expected
    assert choose_profile(real_info, "cpu", profiles).name == expected


def test_target_cuda_without_gpu_is_one_line_error(real_info: HardwareInfo, profiles: list[Profile]) -> None:
    if real_info.gpus:
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError) as excinfo:
        choose_profile(real_info, "cuda", profiles)
    message = one_line_error(excinfo)
    assert message.startswith("--target cuda: no CUDA GPU found")
    assert "--target cpu" in message


def test_bnb_probe_is_cached() -> None:
    hardware._probe_bnb_4bit("cpu")
    hits = hardware._probe_bnb_4bit.cache_info().hits
    hardware._probe_bnb_4bit("cpu")
    assert hardware._probe_bnb_4bit.cache_info().hits == hits + 1


def test_free_cores_within_bounds(real_info: HardwareInfo) -> None:
    n = free_cores()
    assert 1 <= n <= real_info.physical_cores
    assert 1 <= choose_threads() <= real_info.physical_cores
    assert choose_threads(3) == 3
    with pytest.raises(UserError):
        choose_threads(0)


def test_format_profile_renders(real_info: HardwareInfo, profiles: list[Profile]) -> None:
    from rich.console import Console

    profile = next(p for p in profiles if p.name == "cpu")
    console = Console(record=True, width=120)
    console.print(profile_choice.format_profile(real_info, profile, threads=1))
    text = console.export_text()
    assert "Profile: cpu" in text and "int4" in text


# --------------------------------------------------------------------------- choice from data


def test_a100_with_genai_cuda_gets_sm80(profiles: list[Profile]) -> None:
    info = machine(gpus=(A100,), genai=("cpu", "cuda"))
    for target in ("auto", "cuda"):
        chosen = choose_profile(info, target, profiles)
        assert chosen.name == "cuda-sm80"
        assert "bf16" in chosen.precisions and chosen.train_dtype == "bfloat16"
    assert choose_profile(info, "cpu", profiles).name == "cpu"


def test_t4_gets_cuda_without_bf16(profiles: list[Profile]) -> None:
    info = machine(gpus=(T4,), genai=("cpu", "cuda"))
    chosen = choose_profile(info, "auto", profiles)
    assert chosen.name == "cuda"
    assert "bf16" not in chosen.precisions and chosen.train_dtype == "float16"
    assert choose_profile(info, "cuda", profiles).name == "cuda"


def test_gpu_too_old_for_every_cuda_profile(profiles: list[Profile]) -> None:
    info = machine(gpus=(P100,), genai=("cpu", "cuda"))
    assert choose_profile(info, "auto", profiles).name == "cpu"
    with pytest.raises(UserError) as excinfo:
        choose_profile(info, "cuda", profiles)
    message = one_line_error(excinfo)
    assert "compute capability" in message and "found 6.0" in message


def test_gpu_without_genai_cuda(profiles: list[Profile]) -> None:
    info = machine(gpus=(A100,), genai=("cpu",))
    assert choose_profile(info, "auto", profiles).name == "cpu"
    with pytest.raises(UserError) as excinfo:
        choose_profile(info, "cuda", profiles)
    message = one_line_error(excinfo)
    assert "onnxruntime-genai-cuda is not installed" in message
    assert "autotune[cuda]" in message


def test_windows_dml(profiles: list[Profile]) -> None:
    info = machine(os="windows", genai=("cpu", "dml"))
    for target in ("auto", "dml"):
        chosen = choose_profile(info, target, profiles)
        assert chosen.name == "dml" and not chosen.qlora and chosen.train_device == "cpu"


def test_windows_nvidia_prefers_cuda_over_dml(profiles: list[Profile]) -> None:
    info = machine(os="windows", gpus=(A100,), genai=("cpu", "cuda", "dml"))
    assert choose_profile(info, "auto", profiles).name == "cuda-sm80"
    assert choose_profile(info, "dml", profiles).name == "dml"


def test_windows_without_directml_package(profiles: list[Profile]) -> None:
    info = machine(os="windows")
    assert choose_profile(info, "auto", profiles).name == "cpu"
    with pytest.raises(UserError) as excinfo:
        choose_profile(info, "dml", profiles)
    assert "onnxruntime-genai-directml is not installed" in one_line_error(excinfo)


def test_dml_on_linux_is_error(profiles: list[Profile]) -> None:
    info = machine(os="linux", genai=("cpu",))
    with pytest.raises(UserError) as excinfo:
        choose_profile(info, "dml", profiles)
    message = one_line_error(excinfo)
    assert message.startswith("--target dml: DirectML needs Windows")


def test_unknown_target(profiles: list[Profile]) -> None:
    with pytest.raises(UserError) as excinfo:
        choose_profile(machine(), "tpu", profiles)
    assert one_line_error(excinfo) == "unknown --target 'tpu' (choose from auto, cpu, cuda, dml)"


def test_matches() -> None:
    by_name = {p.name: p for p in load_profiles()}
    assert matches(by_name["cpu"], machine())
    assert not matches(by_name["cuda"], machine())
    assert matches(by_name["cuda"], machine(gpus=(A100,), genai=("cpu", "cuda")))
    assert not matches(by_name["cuda-sm80"], machine(gpus=(T4,), genai=("cpu", "cuda")))
    assert not matches(by_name["dml"], machine(os="linux", genai=("cpu", "dml")))


@pytest.mark.parametrize(("isa", "expected"), [
    (("avx2",), "cpu"), (("avx2", "avx512"), "cpu"), (("avx512", "avx512_bf16"), "cpu-bf16"), (("amx",), "cpu-bf16"),
])
def test_a_cpu_with_native_bf16_trains_in_bf16(profiles: list[Profile], isa: tuple[str, ...], expected: str) -> None:
    chosen = choose_profile(replace(machine(), isa=isa), "cpu", profiles)
    assert chosen.name == expected
    assert chosen.train_dtype == {"cpu": "float32", "cpu-bf16": "bfloat16"}[expected]
    assert choose_profile(replace(machine(), isa=isa), "auto", profiles).name == expected
    if expected == "cpu":
        assert "needs a CPU with avx512_bf16 or amx" in profile_choice._mismatch(
            next(p for p in profiles if p.name == "cpu-bf16"), replace(machine(), isa=isa))


def test_a_profile_asked_for_by_name(profiles: list[Profile]) -> None:
    """--profile cpu trains in fp32 on a CPU that cpu-bf16 would get; a profile that cannot run here, one of
    another target, or an unknown name is refused in one line that says what to do."""
    bf16_cpu = replace(machine(), isa=("avx512", "avx512_bf16"))
    assert choose_profile(bf16_cpu, "auto", profiles, "cpu").train_dtype == "float32"
    assert choose_profile(bf16_cpu, "cpu", profiles, "cpu").name == "cpu"
    for target, name, fragments in [
        ("auto", "cpu-bf16", ["--profile cpu-bf16 does not run on this machine", "avx512_bf16", "drop --profile"]),
        ("cuda", "cpu", ["--profile cpu runs on cpu, not --target cuda"]),
        ("auto", "tpu", ["--profile tpu: no such hardware profile", "cpu-bf16", "cuda-sm80"]),
    ]:
        with pytest.raises(UserError) as excinfo:
            choose_profile(replace(machine(), isa=("avx2",)) if name == "cpu-bf16" else bf16_cpu, target, profiles, name)
        message = one_line_error(excinfo)
        for fragment in fragments:
            assert fragment in message, message


def test_qlora_needs_the_probe(profiles: list[Profile]) -> None:
    cpu = next(p for p in profiles if p.name == "cpu")
    assert profile_choice.qlora_enabled(cpu, machine(bnb_4bit=True))
    assert not profile_choice.qlora_enabled(cpu, machine(bnb_4bit=False))


def test_gpu_bf16_property() -> None:
    assert A100.bf16 and not T4.bf16


# --------------------------------------------------------------------------- profile files

VALID = """\
name: test
description: a test profile
execution_provider: cpu
precisions: [int4, fp32]
qlora: false
train_device: cpu
train_dtype: float32
memory_headroom: 0.5
requires: {}
priority: 1
"""


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_valid_profile_loads(tmp_path: Path) -> None:
    profile = Profile.from_yaml(write(tmp_path, VALID))
    assert profile.name == "test" and profile.precisions == ("int4", "fp32")
    assert profile.source == tmp_path / "p.yaml"
    assert profile.to_dict()["requires"] == {}


def test_unknown_key_is_user_error(tmp_path: Path) -> None:
    path = write(tmp_path, VALID + "colour: blue\n")
    with pytest.raises(UserError) as excinfo:
        Profile.from_yaml(path)
    message = one_line_error(excinfo)
    assert message.startswith(f"hardware profile {path}: unknown key 'colour' (known: name, description,")


@pytest.mark.parametrize(
    ("replace", "by", "fragment"),
    [
        ("execution_provider: cpu", "execution_provider: tpu", "execution_provider must be one of"),
        ("precisions: [int4, fp32]", "precisions: [fp16]", "precision 'fp16' does not run on execution_provider cpu"),
        ("precisions: [int4, fp32]", "precisions: []", "precisions must be a non-empty list"),
        ("qlora: false", "qlora: maybe", "qlora must be true or false"),
        ("train_dtype: float32", "train_dtype: float16", "float16 needs train_device cuda"),
        ("memory_headroom: 0.5", "memory_headroom: 1.5", "memory_headroom must be a fraction"),
        ("priority: 1", "priority: high", "priority must be an integer"),
        ("requires: {}", "requires: {ram: 4}", "unknown key 'requires.ram'"),
        ("requires: {}", "requires: {os: beos}", "requires.os must be"),
        ("requires: {}", "requires: {isa: [sse9]}", "requires.isa must be one or a list of avx2,"),
        ("name: test\n", "", "missing key(s) name"),
    ],
)
def test_bad_values_are_user_errors(tmp_path: Path, replace: str, by: str, fragment: str) -> None:
    assert replace in VALID
    with pytest.raises(UserError) as excinfo:
        Profile.from_yaml(write(tmp_path, VALID.replace(replace, by)))
    assert fragment in one_line_error(excinfo)


def test_bf16_on_cuda_needs_sm80(tmp_path: Path) -> None:
    text = (
        VALID.replace("execution_provider: cpu", "execution_provider: cuda")
        .replace("precisions: [int4, fp32]", "precisions: [bf16]")
        .replace("requires: {}", "requires: {gpu: true, min_compute_capability: 7.5}")
    )
    with pytest.raises(UserError) as excinfo:
        Profile.from_yaml(write(tmp_path, text))
    assert "bf16 needs requires.min_compute_capability: 8.0" in one_line_error(excinfo)


def test_invalid_yaml_and_duplicates(tmp_path: Path) -> None:
    with pytest.raises(UserError) as excinfo:
        Profile.from_yaml(write(tmp_path, "name: [unclosed\n"))
    assert "invalid YAML" in one_line_error(excinfo)

    dup = tmp_path / "dup"
    dup.mkdir()
    write(dup, VALID, "a.yaml")
    write(dup, VALID, "b.yaml")
    with pytest.raises(UserError) as excinfo:
        load_profiles(dup)
    assert "already used" in one_line_error(excinfo)

    with pytest.raises(UserError):
        load_profiles(tmp_path / "missing")


def test_every_shipped_profile_is_valid(profiles: list[Profile]) -> None:
    names = {p.name for p in profiles}
    assert {"cpu", "cuda", "cuda-sm80", "dml"} <= names
    for profile in profiles:
        assert profile.precisions
        assert set(profile.precisions) <= set(VALID_PRECISIONS[profile.execution_provider]), profile.name
        assert profile.source.is_file()
        assert 0 < profile.memory_headroom <= 1
    by_name = {p.name: p for p in profiles}
    assert set(by_name["cpu"].precisions) == {"int4", "int8", "fp32"}
    assert by_name["cuda-sm80"].priority > by_name["cuda"].priority > by_name["dml"].priority > by_name["cpu"].priority


def test_default_profiles_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AUTOTUNE_PROFILES_DIR", raising=False)
    assert default_profiles_dir() == Path(hardware.__file__).resolve().parent.parent / "hardware_profiles"
    monkeypatch.setenv("AUTOTUNE_PROFILES_DIR", str(tmp_path))
    assert default_profiles_dir() == tmp_path
    monkeypatch.setenv("AUTOTUNE_PROFILES_DIR", str(tmp_path / "nope"))
    with pytest.raises(UserError):
        default_profiles_dir()
