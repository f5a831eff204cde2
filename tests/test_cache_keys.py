"""A cache never serves what a changed library or constant would have built differently.

Each key (adapter, export, measurement) holds the schema version, the version of the
autotune code that builds the artifact and the versions of the libraries that shape it.
The end-to-end test builds one candidate on the tiny random Llama, then changes one
version at a time and checks which stages run again; unchanged inputs reuse everything.
"""

from __future__ import annotations

import pytest

from autotune import cache, export, train
from autotune.candidate import CandidateSpec, Workspace, run_candidate
from autotune.export import ExportSpec
from autotune.train import TrainSpec

SPEC = CandidateSpec(train=TrainSpec(rank=4, alpha=8.0, steps=2, batch_size=4, learning_rate=1e-3),
                     export=ExportSpec(precision="int4"))


def fake_versions(monkeypatch: pytest.MonkeyPatch, **changed: str) -> None:
    """Pretend that the packages named (``peft``, ``onnxruntime_genai`` ...) are at another version."""
    real = cache.library_version
    changed = {name.replace("_", "-"): version for name, version in changed.items()}
    monkeypatch.setattr(cache, "library_version", lambda name: changed.get(name) or real(name))


def workspace(root, base, splits) -> Workspace:
    return Workspace(root=root, base=base, splits=splits, threads=1, max_eval=4)


# --------------------------------------------------------------------------- keys


def test_library_version_reads_installed_packages() -> None:
    assert cache.library_version("torch")
    assert cache.library_version("onnxruntime-genai")  # whichever of its wheels is installed
    assert cache.library_version("no-such-package-for-autotune") is None
    assert cache.library_versions("peft", "onnx") == {"peft": cache.library_version("peft"),
                                                      "onnx": cache.library_version("onnx")}


def test_a_whole_number_and_its_float_are_one_choice_and_one_key(base, splits, tmp_path) -> None:
    ws = workspace(tmp_path, base, splits)
    as_int = TrainSpec(rank=4, alpha=8, steps=2, batch_size=4, learning_rate=1e-3, max_grad_norm=1, weight_decay=0)
    as_float = TrainSpec(rank=4, alpha=8.0, steps=2, batch_size=4, learning_rate=1e-3, max_grad_norm=1.0, weight_decay=0.0)
    assert as_int == as_float and isinstance(as_int.alpha, float)
    assert ws.train_key(as_int) == ws.train_key(as_float) == ws.train_key(SPEC.train)
    assert ws.export_key(CandidateSpec(as_int, SPEC.export)) == ws.export_key(SPEC)
    assert isinstance(TrainSpec(rank=4).rank, int)  # int fields stay ints: their keys do not change


@pytest.mark.parametrize("package, keys", [
    ("torch", {"adapter", "model"}),
    ("transformers", {"adapter", "model"}),
    ("peft", {"adapter", "model"}),
    ("bitsandbytes", set()),  # LoRA does not use it; QLoRA does (next test)
    ("onnxruntime_genai", {"model"}),
    ("onnx", {"model"}),
    ("onnx_ir", {"model"}),
    ("onnxruntime", set()),  # it runs the model, it does not build it: measurement keys only
])
def test_keys_name_the_libraries_that_shape_the_artifact(package, keys, monkeypatch, base, splits, tmp_path) -> None:
    ws = workspace(tmp_path, base, splits)
    before = {"adapter": ws.train_key(SPEC.train), "model": ws.export_key(SPEC)}
    fake_versions(monkeypatch, **{package: "999.0"})
    after = {"adapter": ws.train_key(SPEC.train), "model": ws.export_key(SPEC)}
    assert {k for k in before if before[k] != after[k]} == keys


def test_qlora_key_names_bitsandbytes(monkeypatch, base, splits, tmp_path) -> None:
    ws = workspace(tmp_path, base, splits)
    qlora = TrainSpec(method="qlora", rank=4, alpha=8.0, steps=2, batch_size=4)
    before = ws.train_key(qlora)
    fake_versions(monkeypatch, bitsandbytes="999.0")
    assert ws.train_key(qlora) != before


@pytest.mark.parametrize("module, name, keys", [
    (cache, "SCHEMA_VERSION", {"adapter", "model"}),
    (train, "CODE_VERSION", {"adapter", "model"}),
    (export, "CODE_VERSION", {"model"}),
])
def test_code_versions_are_in_the_keys(module, name, keys, monkeypatch, base, splits, tmp_path) -> None:
    ws = workspace(tmp_path, base, splits)
    before = {"adapter": ws.train_key(SPEC.train), "model": ws.export_key(SPEC)}
    monkeypatch.setattr(module, name, getattr(module, name) + 1)
    after = {"adapter": ws.train_key(SPEC.train), "model": ws.export_key(SPEC)}
    assert {k for k in before if before[k] != after[k]} == keys


# --------------------------------------------------------------------------- end to end


def test_changed_versions_rebuild_and_unchanged_inputs_reuse(monkeypatch, base, splits, tmp_path) -> None:
    root = tmp_path / "ws"

    def run():
        return run_candidate(workspace(root, base, splits), SPEC, with_latency=False)

    first = run()
    assert first.cached == ()
    assert set(run().cached) == {"train", "export", "measure"}  # unchanged inputs: nothing runs again

    fake_versions(monkeypatch, onnxruntime="999.0")  # the runtime: measure again, nothing else
    assert set(run().cached) == {"train", "export"}

    fake_versions(monkeypatch, onnxruntime_genai="999.0")  # the builder: export and measure again
    again = run()
    assert set(again.cached) == {"train"} and again.model_dir != first.model_dir

    monkeypatch.setattr(train, "CODE_VERSION", train.CODE_VERSION + 1)  # training code: train again
    retrained = run()
    assert retrained.cached == () and "train" in retrained.stage_seconds
    assert set(run().cached) == {"train", "export", "measure"}  # and the new artifacts are reused

    monkeypatch.undo()  # back to the real versions: the first artifacts are still there
    assert set(run().cached) == {"train", "export", "measure"}
    assert not list(root.rglob("*.tmp-*"))


# --------------------------------------------------------------------------- machines sharing an artifacts folder


def test_a_latency_measured_on_one_device_is_not_served_to_another(monkeypatch, base, splits, tmp_path) -> None:
    """Two machines of one profile and thread count share --artifacts: each measures on its own device."""
    from autotune import candidate
    from autotune.measure import Latency, Measurement, Request, score

    measured = []

    def fake_measure(model_dir, prompts, answers, labels, **_):
        measured.append(model_dir)
        latency = Latency(*(10.0,) * 9, len(prompts))
        requests = tuple(Request(a, 5, 10.0, 5.0, ()) for a in answers)
        return Measurement(score(answers, answers, labels), latency, 100.0, 1.0, 0.1, 1, "cpu", requests=requests)

    monkeypatch.setattr(candidate, "measure", fake_measure)
    base_export = CandidateSpec(None, ExportSpec(precision="int4"))

    def run(device: str):
        ws = Workspace(root=tmp_path / "shared", base=base, splits=splits, threads=1, max_eval=4, device=device)
        (ws.model_dir(base_export)).mkdir(parents=True, exist_ok=True)  # exported already (by either machine)
        (ws.model_dir(base_export) / "genai_config.json").write_text("{}")
        return run_candidate(ws, base_export)

    assert "measure" not in run("AMD EPYC 9R14").cached
    assert "measure" not in run("Intel Xeon Platinum 8488C").cached  # same profile and threads, another CPU
    assert "measure" in run("AMD EPYC 9R14").cached
    assert len(measured) == 2


def test_workspace_device_defaults_to_this_machines(base, splits, tmp_path) -> None:
    from autotune.hardware import probe

    ws = Workspace(root=tmp_path, base=base, splits=splits, threads=1)
    assert ws.device == probe().cpu_model  # this machine has no CUDA GPU: its CPU measures
