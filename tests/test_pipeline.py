"""Train -> merge -> export -> measure on the tiny random Llama, for real (CPU, few steps)."""

from __future__ import annotations

import os
import time

import json
import math
from pathlib import Path

import pytest

from autotune.cache import atomic_dir, content_key, folder_size
from autotune.candidate import CandidateSpec, Workspace, run_candidate
from autotune.data import DataConfig, load_splits
from autotune.errors import UserError
from autotune.export import ExportSpec, export_model, merge_adapter
from autotune.measure import (LatencySettings, Measurement, measure, normalize_answer, parity_check, score,
                              wilson_interval)
from autotune.train import TrainSpec, load_base_for_training, read_train_log, train_adapter
from conftest import LABELS, write_jsonl

THREADS = 2
FAST_LATENCY = LatencySettings(warmup=1)
SHORT = TrainSpec(rank=4, alpha=8.0, steps=6, batch_size=4, learning_rate=1e-3)


# --------------------------------------------------------------------------- shared artifacts


@pytest.fixture(scope="module")
def lora_adapter(base, splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    result = train_adapter(base, splits, SHORT, out, threads=THREADS)
    return result


@pytest.fixture(scope="module")
def merged_dir(base, lora_adapter, tmp_path_factory):
    return merge_adapter(base, lora_adapter.adapter_dir, tmp_path_factory.mktemp("merged") / "merged")


@pytest.fixture(scope="module")
def exports(merged_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    folders = {}
    for precision in ("int4", "int8", "fp32"):
        out = root / precision
        seconds = export_model(merged_dir, out, ExportSpec(precision=precision), work_dir=root / f"work-{precision}")
        assert seconds > 0
        folders[precision] = out
    return folders


def _prompts(splits, split="validation"):
    examples = getattr(splits, split)
    return [e.prompt for e in examples], [e.label for e in examples]


def _onnx_ops(folder: Path) -> dict[str, list]:
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    ops: dict[str, list] = {}
    for node in model.graph.node:
        ops.setdefault(node.op_type, []).append(node)
    return ops


# --------------------------------------------------------------------------- training


def test_train_writes_adapter(lora_adapter):
    out = lora_adapter.adapter_dir
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "adapter_config.json").is_file()
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    log = json.loads((out / "train_log.json").read_text())
    assert log["spec"]["rank"] == SHORT.rank and log["spec"]["steps"] == SHORT.steps
    assert len(lora_adapter.losses) == SHORT.steps
    assert all(math.isfinite(loss) and loss > 0 for loss in lora_adapter.losses)
    assert math.isfinite(lora_adapter.final_loss)
    assert lora_adapter.threads == THREADS
    again = read_train_log(out)
    assert again.losses == lora_adapter.losses


def test_train_is_deterministic(base, splits, lora_adapter, tmp_path):
    second = train_adapter(base, splits, SHORT, tmp_path, threads=THREADS)
    assert second.losses == lora_adapter.losses
    other = train_adapter(base, splits, TrainSpec(**{**SHORT.__dict__, "seed": 1}), tmp_path / "other", threads=THREADS)
    assert other.losses != lora_adapter.losses


def test_train_reports_steps(base, splits, tmp_path):
    seen = []
    spec = TrainSpec(rank=4, alpha=8.0, steps=2, batch_size=2, target_modules="attention")
    train_adapter(base, splits, spec, tmp_path, threads=THREADS, on_step=lambda step, loss: seen.append((step, loss)))
    assert [step for step, _ in seen] == [1, 2]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(config["target_modules"]) <= {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"}


def test_loss_falls(base, tmp_path):
    # Two prompts per label, repeated: a model that learns at all drives the loss down.
    # The random base (init std 0.02, tied 64-dim embeddings) caps how far it can fall:
    # its logits stay small, so the loss starts near ln(vocab) ~ 10.8 and a drop of a
    # nat or so in 30 steps is real learning (step-to-step noise is ~0.1).
    rows = [{"text": f"{word} {word} {word} number {i % 2}", "label": label}
            for i in range(12) for word, label in zip(("rain", "sun", "dark", "wow"), LABELS)]
    data = load_splits(DataConfig(path=str(write_jsonl(tmp_path / "rep.jsonl", rows))))
    spec = TrainSpec(rank=8, alpha=16.0, dropout=0.0, learning_rate=3e-3, steps=30, batch_size=8)
    result = train_adapter(base, data, spec, tmp_path / "adapter", threads=THREADS)
    first, last = result.losses[:5], result.losses[-5:]
    assert sum(last) / 5 < sum(first) / 5 - 0.5, result.losses
    assert result.losses[-1] < result.losses[0]


def test_qlora_trains_merges_exports(base, splits, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    spec = TrainSpec(method="qlora", rank=4, alpha=8.0, steps=3, batch_size=4, learning_rate=1e-3)
    # QLoRA really trains on a 4-bit base on the CPU.
    import bitsandbytes as bnb

    four_bit = load_base_for_training(base, spec, "cpu", "float32", False)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in four_bit.modules())
    del four_bit
    result = train_adapter(base, splits, spec, tmp_path / "adapter", threads=THREADS)
    assert all(math.isfinite(loss) for loss in result.losses)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    merged = merge_adapter(base, tmp_path / "adapter", tmp_path / "merged")
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config
    dtypes = set()
    for shard in merged.glob("*.safetensors"):  # written one layer group at a time
        with safe_open(str(shard), "pt") as weights:
            dtypes |= {weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert dtypes == {"F32"}
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is torch.nn.Linear for m in linears)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any("lora" in name for name, _ in model.named_parameters())

    out = tmp_path / "int4"
    export_model(merged, out, ExportSpec(precision="int4"), work_dir=tmp_path / "work")
    assert "MatMulNBits" in _onnx_ops(out)
    import onnxruntime_genai as og

    og.Model(str(out))


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("precision,bits", [("int4", 4), ("int8", 8), ("fp32", None)])
def test_exports_load_in_genai(exports, precision, bits):
    import onnxruntime_genai as og

    folder = exports[precision]
    assert (folder / "genai_config.json").is_file()
    assert (folder / "model.onnx").is_file()
    og.Model(str(folder))
    quantized = _onnx_ops(folder).get("MatMulNBits", [])
    if bits is None:
        assert not quantized
    else:
        assert quantized
        for node in quantized:
            attrs = {a.name: a.i for a in node.attribute}
            assert attrs["bits"] == bits
            assert attrs["block_size"] == 32


def test_int4_block_size_option(merged_dir, tmp_path):
    out = tmp_path / "b64"
    export_model(merged_dir, out, ExportSpec(precision="int4", block_size=64, accuracy_level=0), work_dir=tmp_path / "w")
    nodes = _onnx_ops(out)["MatMulNBits"]
    assert {next(a.i for a in n.attribute if a.name == "block_size") for n in nodes} == {64}


def test_export_spec_normalized():
    a = ExportSpec(precision="fp32", block_size=32, accuracy_level=4, algo="rtn")
    b = ExportSpec(precision="fp32", block_size=128, accuracy_level=1, algo="k_quant")
    assert a != b
    assert a.normalized() == b.normalized()
    assert content_key(a.normalized()) == content_key(b.normalized())
    assert a.builder_options() == [] and a.label() == "fp32"
    q1, q2 = ExportSpec(precision="int4", block_size=32), ExportSpec(precision="int4", block_size=128)
    assert q1.normalized() == q1 and q1.normalized() != q2.normalized()
    assert "block_size=128" in q2.builder_options()
    assert ExportSpec(precision="int4", accuracy_level=0).builder_options() == ["block_size=32", "algo_config=default"]


@pytest.mark.parametrize("kwargs", [dict(precision="int3"), dict(block_size=48), dict(accuracy_level=5), dict(algo="gptq")])
def test_export_spec_rejects(kwargs):
    from autotune.errors import UserError

    with pytest.raises(UserError):
        ExportSpec(**kwargs)


# --------------------------------------------------------------------------- measuring


def test_measure(exports, splits):
    prompts, answers = _prompts(splits)
    folder = exports["int4"]
    m = measure(folder, prompts, answers, splits.labels, threads=1, latency=FAST_LATENCY)
    assert 0.0 <= m.accuracy.accuracy <= 1.0
    assert m.accuracy.n == len(prompts) and m.accuracy.correct == round(m.accuracy.accuracy * len(prompts))
    assert len(m.accuracy.predictions) == len(prompts)
    assert sum(sum(row.values()) for row in m.accuracy.confusion.values()) == len(prompts)
    assert 0 <= m.accuracy.invalid <= len(prompts)
    # One timed request per prompt, in prompt order, with its raw answer.
    assert len(m.requests) == len(prompts)
    assert score([r.answer for r in m.requests], answers, splits.labels) == m.accuracy
    for r in m.requests:
        assert r.request_ms >= r.ttft_ms > 0 and r.prompt_tokens > 0
        assert r.request_ms >= r.ttft_ms + sum(r.token_ms) * 0.999
    lat = m.latency
    assert lat is not None and lat.requests == len(prompts)
    assert lat.request_p90_ms >= lat.request_p50_ms >= lat.ttft_p50_ms > 0
    assert lat.ttft_p90_ms >= lat.ttft_p50_ms and lat.token_p90_ms >= lat.token_p50_ms > 0
    assert lat.tokens_per_s > 0 and lat.prompt_tokens_p90 >= lat.prompt_tokens_p50 > 0
    assert lat.metric("request") == lat.request_p50_ms and lat.metric("ttft") == lat.ttft_p50_ms
    assert lat.metric("token") == lat.token_p50_ms
    assert m.peak_rss_mb > 0
    assert m.size_mb == pytest.approx(folder_size(folder) / 2**20) and m.size_mb > 0
    assert m.seconds > 0 and m.threads == 1 and m.provider == "cpu"
    assert set(m.stage_seconds) == {"load", "warmup", "requests"}
    record = m.to_dict()
    assert "predictions" not in record["accuracy"] and record["accuracy"]["interval"] == list(m.accuracy.interval)
    assert [r["answer"] for r in record["requests"]] == [r.answer for r in m.requests]
    assert Measurement.from_dict(json.loads(json.dumps(record)), answers, splits.labels).to_dict() == record


def test_a_gpu_provider_warms_each_prompt_length_before_the_timed_requests(exports, splits, monkeypatch):
    """On CUDA the first prefill of each new prompt length costs ~75 ms more (an H200): a GPU measurement runs
    one untimed request per distinct length first, so it times what a served app pays; the CPU's does not."""
    import onnxruntime_genai as og

    from autotune import generate, measure as measure_module

    sent = []
    real_child = measure_module.run_child
    monkeypatch.setattr(measure_module, "run_child", lambda request, timeout_s: sent.append(request) or real_child(
        {**request, "provider": "cpu"}, timeout_s))  # a "cuda" request, run by the CPU runtime here
    prompts, answers = _prompts(splits)
    prompts = [prompt.replace(" ", " very" * k + " ", 1) for prompt, k in zip(prompts, (0, 1, 1, 2, 0))]  # 3 lengths
    answers = answers[:5]
    for provider in ("cpu", "cuda"):
        measure(exports["int4"], prompts, answers, splits.labels, threads=1, latency=FAST_LATENCY, provider=provider)
    assert [r["warm_each_length"] for r in sent] == [False, True]

    made = []
    real_generator = og.Generator
    monkeypatch.setattr(og, "Generator", lambda model, params: made.append(1) or real_generator(model, params))
    result = generate.run_requests({**sent[1], "provider": "cpu"})
    lengths = {r["prompt_tokens"] for r in result["requests"]}
    assert len(lengths) == 3
    assert len(made) == sent[1]["warmup"] + len(lengths) + len(prompts) and len(result["requests"]) == len(prompts)


def test_measure_without_latency(exports, splits):
    prompts, answers = _prompts(splits)
    m = measure(exports["fp32"], prompts[:3], answers[:3], splits.labels, latency=None)
    assert m.latency is None and m.accuracy.n == 3 and len(m.requests) == 3


def test_measure_restricted_to_labels(exports, splits):
    """Answers restricted to the labels: always a label, the one with the highest teacher-forced log-prob.
    A generated request scores the labels too, after its clock stops: the same log-probs."""
    import numpy as np
    import onnxruntime_genai as og

    prompts, answers = _prompts(splits)
    m = measure(exports["fp32"], prompts[:4], answers[:4], splits.labels, latency=None, restrict_to_labels=True)
    assert m.accuracy.invalid == 0 and all(r.answer in splits.labels for r in m.requests)
    generated = measure(exports["fp32"], prompts[:4], answers[:4], splits.labels, latency=None)
    for restricted, request in zip(m.requests, generated.requests):
        assert len(request.label_logprobs) == len(splits.labels)
        np.testing.assert_allclose(request.label_logprobs, restricted.label_logprobs, rtol=1e-4, atol=1e-4)
    right = [r.label_logprobs[splits.labels.index(a)] for r, a in zip(generated.requests, answers[:4])]
    assert generated.label_logprob(answers[:4], splits.labels) == pytest.approx(sum(right) / 4)
    # The same choice by hand: each label appended to a fresh generator, its tokens scored one by one.
    model = og.Model(str(exports["fp32"]))
    tokenizer = og.Tokenizer(model)
    for prompt, request in zip(prompts[:4], m.requests):
        scores = {}
        for label in splits.labels:
            ids, label_ids = list(tokenizer.encode(prompt)), list(tokenizer.encode(label))
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(ids) + len(label_ids) + 1)
            generator = og.Generator(model, params)
            generator.append_tokens(ids + label_ids)
            logits = generator.get_output("logits")[0].astype(np.float64)
            logp = logits - logits.max(axis=-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(axis=-1, keepdims=True))
            scores[label] = sum(logp[len(ids) - 1 + k, t] for k, t in enumerate(label_ids))
        assert request.answer == max(scores, key=scores.get), scores
        np.testing.assert_allclose([scores[label] for label in splits.labels], request.label_logprobs, atol=1e-4)


def test_rescored_from_raw_answers(exports, splits):
    """A stored measurement is scored again from its raw answers: a scoring change needs no generation."""
    prompts, answers = _prompts(splits)
    m = measure(exports["int4"], prompts[:4], answers[:4], splits.labels, latency=None)
    record = json.loads(json.dumps(m.to_dict()))
    record["requests"][0]["answer"] = f"{answers[0]}."
    record["requests"][1]["answer"] = "not a label"
    record["accuracy"] = {"accuracy": 1.0}  # a stale stored score is ignored
    again = Measurement.from_dict(record, answers[:4], splits.labels)
    expected = score([f"{answers[0]}.", "not a label"] + [r.answer for r in m.requests[2:]], answers[:4], splits.labels)
    assert again.accuracy == expected and again.accuracy.predictions[0] == answers[0]
    assert again.requests[2:] == m.requests[2:]


@pytest.mark.parametrize("correct,n,low,high", [
    (5, 10, 0.2366, 0.7634), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (61, 136, 0.3675, 0.5324), (0, 0, 0.0, 1.0),
])
def test_wilson_interval(correct, n, low, high):
    assert wilson_interval(correct, n) == pytest.approx((low, high), abs=1e-4)


def test_accuracy_describe():
    acc = score(["Joy"] * 3 + ["Sad"], ["Joy", "Joy", "Joy", "Joy"], ("Joy", "Sad"))
    assert acc.correct == 3 and acc.describe() == "0.750 (n=4, 95% CI 0.30-0.95)"
    assert acc.to_dict()["interval"] == pytest.approx([0.3006, 0.9544], abs=1e-4)


def test_measuring_time_limit_follows_the_model_size_and_the_prompts(exports, splits, base, tmp_path):
    from autotune.errors import CandidateError
    from autotune.measure import timeout_for

    small, big = exports["int4"], exports["fp32"]
    assert timeout_for(big, 10) > timeout_for(small, 10)  # each decode step reads the whole model
    assert timeout_for(small, 100) > timeout_for(small, 10)
    assert timeout_for(small, 10, labels_scored=4) > timeout_for(small, 10)
    prompts, answers = _prompts(splits)
    with pytest.raises(CandidateError, match="measuring took longer than 0 s"):  # --measure-timeout's stop
        measure(small, prompts[:2], answers[:2], splits.labels, latency=None, timeout_s=0.01)
    with pytest.raises(UserError, match="--measure-timeout must be a positive number of seconds"):
        Workspace(root=tmp_path, base=base, splits=splits, measure_timeout_s=0)


def test_measure_bad_folder(tmp_path, splits):
    from autotune.errors import CandidateError

    (tmp_path / "genai_config.json").write_text("{}")
    with pytest.raises(CandidateError):
        measure(tmp_path, ["a"], ["Joy"], splits.labels, latency=None)


@pytest.mark.parametrize("text,expected", [
    ("Joy.", "Joy"),
    (" joy\nmore", "Joy"),
    ("\n\n  JOY!  \n", "Joy"),
    ("Joy, clearly", "Joy"),
    ("**Sad**", "Sad"),
    ("Joyful", None),
    ("", None),
    ("   \n ", None),
    ("I think Joy", "Joy"),
    ("\n- joy: \n", "Joy"),
    ("- Fear\n", "Fear"),
    ("not sad, joy", "Sad"),
    ("sadness", None),
    ("Very Sad", "Very Sad"),
    ("very sad, deeply", "Very Sad"),
    ("Sad and very", "Sad"),
    ("Very", None),
])
def test_normalize_answer(text, expected):
    labels = ("Joy", "Sad", "Very Sad", "Fear")
    assert normalize_answer(text, labels) == expected


def test_score():
    labels = ("Joy", "Sad", "Fear")
    acc = score(["Joy.", "sad", "no idea", "Fear", ""], ["Joy", "Joy", "Sad", "Fear", "Fear"], labels)
    assert acc.n == 5 and acc.correct == 2
    assert acc.invalid == 2
    assert acc.accuracy == pytest.approx(2 / 5)
    assert acc.confusion == {
        "Joy": {"Joy": 1, "Sad": 1},
        "Sad": {"<invalid>": 1},
        "Fear": {"Fear": 1, "<invalid>": 1},
    }
    assert acc.predictions == ("Joy", "Sad", "<invalid>", "Fear", "<invalid>")
    empty = score([], [], labels)
    assert empty.accuracy == 0.0 and empty.n == 0
    with pytest.raises(ValueError):
        score(["Joy"], ["Joy", "Sad"], labels)


def test_parity_fp32(tiny_model_dir, splits, tmp_path):
    out = tmp_path / "fp32"
    export_model(tiny_model_dir, out, ExportSpec(precision="fp32"), work_dir=tmp_path / "work")
    prompts, _ = _prompts(splits)
    parity = parity_check(tiny_model_dir, out, prompts[:4], new_tokens=6)
    assert parity.n == 4
    assert parity.ok, parity.mismatched


# --------------------------------------------------------------------------- candidates and caching


def _workspace(root, base, splits) -> Workspace:
    return Workspace(root=root, base=base, splits=splits, threads=THREADS, latency=FAST_LATENCY, max_eval=8)


def test_run_candidate_caches(base, splits, tmp_path):
    ws = _workspace(tmp_path / "ws", base, splits)
    spec = CandidateSpec(train=SHORT, export=ExportSpec(precision="int4"))
    stages = []
    first = run_candidate(ws, spec, on_stage=lambda stage, fraction, detail: stages.append(stage))
    assert first.cached == ()
    assert {"train", "merge", "export", "measure"} <= set(stages)
    assert {"train", "merge", "export", "load", "warmup", "requests"} <= set(first.stage_seconds)
    assert (first.model_dir / "genai_config.json").is_file()
    assert first.model_dir == ws.model_dir(spec)
    assert first.measurement.accuracy.n == 8
    assert first.train is not None and len(first.train.losses) == SHORT.steps
    assert not list(ws.root.rglob("*.tmp-*"))
    assert not list(ws.root.glob("merge-*"))

    second = run_candidate(_workspace(tmp_path / "ws", base, splits), spec)
    assert set(second.cached) == {"train", "export", "measure"}
    assert second.stage_seconds == {}
    assert second.model_dir == first.model_dir
    # The stored record keeps the raw answers and leaves out the predictions; everything round-trips.
    assert second.measurement.to_dict() == first.measurement.to_dict()
    assert second.measurement.accuracy == first.measurement.accuracy
    assert second.train.losses == first.train.losses
    json.dumps(second.to_dict())

    # Same training, another precision: the adapter is reused, the export is new.
    fp32 = CandidateSpec(train=SHORT, export=ExportSpec(precision="fp32"))
    third = run_candidate(ws, fp32, with_latency=False)
    assert "train" in third.cached
    assert "export" not in third.cached and "measure" not in third.cached
    assert third.model_dir != first.model_dir
    assert third.measurement.latency is None
    # fp32 ignores the quantization options: an equivalent spec hits the same folder.
    same = CandidateSpec(train=SHORT, export=ExportSpec(precision="fp32", block_size=128))
    assert ws.model_dir(same) == third.model_dir


def test_run_candidate_zero_shot(base, splits, tmp_path):
    ws = _workspace(tmp_path / "ws", base, splits)
    result = run_candidate(ws, CandidateSpec(train=None, export=ExportSpec(precision="fp32")), with_latency=False)
    assert result.train is None
    assert "train" not in result.stage_seconds and "merge" not in result.stage_seconds
    assert not (ws.root / "adapters").exists()
    assert result.measurement.accuracy.n == 8
    assert "zero-shot" in result.spec.describe()


def test_measurement_key_has_the_measure_version(base, splits, tmp_path, monkeypatch):
    import autotune.candidate as candidate

    ws = _workspace(tmp_path / "ws", base, splits)
    spec = CandidateSpec(train=None, export=ExportSpec(precision="int4"))
    assert "measure" not in run_candidate(ws, spec, with_latency=False).cached
    assert "measure" in run_candidate(ws, spec, with_latency=False).cached
    monkeypatch.setattr(candidate, "MEASURE_VERSION", candidate.MEASURE_VERSION + 1)
    assert "measure" not in run_candidate(ws, spec, with_latency=False).cached  # measured again, not served
    assert len(list((ws.root / "measurements").glob("*.json"))) == 2


def test_baselines(base, splits, tmp_path):
    from collections import Counter

    from autotune.report import baselines

    ws = _workspace(tmp_path / "ws", base, splits)
    floors = baselines(ws, ExportSpec(precision="int4"), "validation")
    assert [b.name for b in floors] == ["majority class", "base, labels named in an instruction",
                                        "base, answer restricted to the labels"]
    _, answers = ws.prompts("validation")
    counts = Counter(e.label for e in splits.train)
    majority = max(splits.labels, key=counts.__getitem__)
    assert floors[0].accuracy.accuracy == pytest.approx(answers.count(majority) / len(answers))
    assert all(b.accuracy.n == len(answers) == 8 for b in floors)
    assert floors[2].accuracy.invalid == 0  # restricted to the labels: every answer is one
    # The base is measured on the instruction prompts, through the zero-shot export of the normal path.
    assert ws.model_dir(CandidateSpec(None, ExportSpec(precision="int4"))).is_dir()
    record = floors[1].to_dict()
    assert record["n"] == 8 and len(record["interval"]) == 2 and record["detail"].startswith("zero-shot base int4")


def test_instruction_prompt(base):
    from autotune.data import instruction_prompt
    from autotune.train import load_tokenizer

    labels = ("Fear", "Joy")
    prompt = "### Text: it rained all day\n### The tone is:\n"
    plain = instruction_prompt(prompt, labels)
    assert plain == "Classify the text as one of: Fear, Joy. Answer with the label only.\n\n" + prompt
    chat = instruction_prompt(prompt, labels, load_tokenizer(base))  # SmolLM2's tokenizer has a chat template
    assert "Fear, Joy" in chat and "it rained all day" in chat
    assert chat.endswith("assistant\nThe tone is:")  # the template's answer cue opens the answer


@pytest.mark.parametrize("raised, reason", [
    (UserError("training diverged (loss nan) at step 2; lower the learning rate"),
     "training diverged (loss nan) at step 2; lower the learning rate"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "RuntimeError: out of memory"),
    (MemoryError(), "out of memory while building the candidate"),
    (ValueError("bad shape\nsecond line"), "ValueError: bad shape"),
])
def test_run_candidate_fails_only_the_candidate(base, splits, tmp_path, monkeypatch, raised, reason):
    """Whatever goes wrong inside one candidate reaches the search as CandidateError, its reason in one line."""
    import autotune.candidate
    from autotune.errors import CandidateError

    def broken(*args, **kwargs):
        raise raised

    monkeypatch.setattr(autotune.candidate, "train_adapter", broken)
    with pytest.raises(CandidateError) as exc:
        run_candidate(_workspace(tmp_path / "ws", base, splits), CandidateSpec(SHORT, ExportSpec(precision="int4")))
    assert str(exc.value) == reason


def test_workspace_sweeps_partials(base, splits, tmp_path):
    root = tmp_path / "ws"
    (root / "adapters" / "abc.tmp-1234abcd").mkdir(parents=True)
    (root / "adapters" / "abc.tmp-1234abcd" / "adapter_model.safetensors").write_text("half")
    (root / "models" / "def.tmp-deadbeef" / "inner.tmp-00000000").mkdir(parents=True)
    (root / "measurements").mkdir()
    stale = root / "measurements" / "k.json.tmp-cafebabe"
    stale.write_text("{")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))  # a killed run's, an hour ago
    fresh = root / "measurements" / "other.json.tmp-0badf00d"
    fresh.write_text("{")  # another worker may be writing it right now: left alone
    (root / "measurements" / "k.json").write_text("{}")
    (root / "adapters" / "good").mkdir()
    _workspace(root, base, splits)
    assert list(root.rglob("*.tmp-*")) == [fresh]
    assert (root / "measurements" / "k.json").is_file()
    assert (root / "adapters" / "good").is_dir()


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "artifact"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "file").write_text("partial")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "artifact"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("1")
    assert (target / "v").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("boom")
    assert (target / "v").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["w"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


@pytest.mark.slow  # the fast tier has each int4 method on every family (tests/test_families.py)
def test_run_candidate_with_each_int4_method(base, splits, tmp_path):
    """Each int4 method through the real candidate chain: recorded, cached apart, and the int4-aware adapter's
    grid in its training key (so an adapter trained for one grid is never reused for another)."""
    ws = _workspace(tmp_path / "ws", base, splits)
    aware = TrainSpec(**{**SHORT.__dict__, "int4_aware": True})
    specs = {
        "rtn": CandidateSpec(SHORT, ExportSpec("int4")),
        "gptq": CandidateSpec(SHORT, ExportSpec("int4", calibration="gptq", calibration_samples=8)),
        "int4-aware": CandidateSpec(aware, ExportSpec("int4")),
        "rtn asymmetric": CandidateSpec(SHORT, ExportSpec("int4", symmetric=False)),
    }
    stages: dict[str, list[str]] = {}
    results = {}
    for method, spec in specs.items():
        assert spec.int4_method == method.split()[0]
        results[method] = run_candidate(ws, spec, with_latency=False,
                                        on_stage=lambda stage, *_: stages.setdefault(method, []).append(stage))
    assert "calibrate" in stages["gptq"] and "calibrate" in results["gptq"].stage_seconds
    assert "calibrate" not in stages["rtn"] and "train" in results["gptq"].cached  # gptq reuses the plain adapter
    assert "train" in results["int4-aware"].stage_seconds  # a new adapter
    assert len({r.model_dir for r in results.values()}) == 4
    # Builder 0.18 cannot share a tied table as asymmetric int4: we round it ourselves (bit-exact) and it ships
    # shared, about the size of the symmetric export rather than one with an fp32 embedding beside it.
    assert "calibrate" in results["rtn asymmetric"].stage_seconds
    assert results["rtn asymmetric"].measurement.size_mb < 1.3 * results["rtn"].measurement.size_mb
    assert ws.train_key(aware) != ws.train_key(TrainSpec(**{**aware.__dict__, "int4_block_size": 16}))
    assert "int4-aware b32" in specs["int4-aware"].describe() and "gptq" in specs["gptq"].describe()
    # The aware adapter's int8 sibling is fine; an int4 export on another grid is refused.
    CandidateSpec(aware, ExportSpec("int8"))
    with pytest.raises(UserError, match="grid it was trained against"):
        CandidateSpec(aware, ExportSpec("int4", block_size=16))
    with pytest.raises(UserError, match="QLoRA"):
        TrainSpec(method="qlora", int4_aware=True)
