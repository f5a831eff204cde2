"""Training internals on the tiny random Llama: packed batches, checkpointing, constants, memory checks."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from autotune.candidate import Workspace
from autotune.data import DataConfig, load_splits
from autotune.errors import CandidateError
from autotune.gradients import _groups, accumulate_gradients
from autotune.memory import check_memory, memory_need
from autotune.models import BaseModel, model_shape
from autotune.packing import PACKED_ATTENTION, consecutive_parts, keep_mask, packed_attention
from autotune.train import TrainSpec, _peft_model, encode_example, load_tokenizer, train_adapter
from conftest import LABELS, record_hub_kernels, write_jsonl
from families import smollm2_tokenizer

# Phi-3-mini-4k-instruct's config.json (3.8B parameters): sizes only, no weights.
PHI3_MINI = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
             "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    rows = [{"text": f"example {'long ' * (i % 5)}number {i} about {label.lower()}", "label": label}
            for i in range(10) for label in LABELS]
    return load_splits(DataConfig(path=str(write_jsonl(tmp_path_factory.mktemp("data") / "d.jsonl", rows))))


def _fake_free(monkeypatch, free_bytes: int) -> None:
    import autotune.export
    import autotune.memory

    for module in (autotune.memory, autotune.export):
        monkeypatch.setattr(module, "free_memory", lambda device: (free_bytes, "RAM"))


def _loss_and_grads(model, batch, pad_id: int, packed: bool, pass_tokens: int = 0, seed: int = 0, groups: int = 1):
    import torch

    model.zero_grad()
    torch.manual_seed(seed)
    loss = accumulate_gradients(model, batch, pad_id, "cpu", packed, pass_tokens, groups)
    return loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.fixture()
def peft_model(base):
    import torch

    torch.manual_seed(0)
    model = _peft_model(base, TrainSpec(rank=4, alpha=8.0, dropout=0.2), "cpu", "float32", False, False)
    for lora_b in (p for n, p in model.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(lora_b, std=0.02)  # non-zero, so the LoRA A gradients are non-zero too
    return model


@pytest.mark.parametrize("packed,pass_tokens", [(True, 0), (False, 30), (True, 25), (True, 1)])
def test_packing_and_parts_give_the_padded_step_dropout_included(base, splits, peft_model, packed, pass_tokens):
    tokenizer = load_tokenizer(base)
    batch = [encode_example(e, tokenizer, False) for e in splits.train[:6]]
    assert len({len(ids) for ids, _ in batch}) > 1  # padding would really be needed
    padded, g_padded = _loss_and_grads(peft_model, batch, tokenizer.pad_token_id, packed=False)
    loss, grads = _loss_and_grads(peft_model, batch, tokenizer.pad_token_id, packed, pass_tokens)
    parts = consecutive_parts([len(ids) for ids, _ in batch], packed, pass_tokens)
    assert len(parts) == {0: 1, 1: len(batch)}.get(pass_tokens, len(parts)) and (len(parts) > 1) == (pass_tokens > 0)
    assert loss == pytest.approx(padded, rel=1e-5)  # same dropout masks, not just the same distribution
    worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, g_padded, strict=True))
    assert worst < 1e-4, worst  # float summation order only
    other_seed, _ = _loss_and_grads(peft_model, batch, tokenizer.pad_token_id, packed, pass_tokens, seed=1)
    assert other_seed != pytest.approx(loss, rel=1e-4)  # dropout is live: other masks, another loss


@pytest.mark.parametrize("method,packed,pass_tokens", [("lora", True, 0), ("lora", True, 25), ("lora", False, 0),
                                                       ("qlora", True, 25)])
def test_step_groups_run_at_once_give_the_same_numbers_as_one_after_the_other(base, splits, method, packed,
                                                                            pass_tokens):
    """Groups run at once (2 threads) or in turn (1 thread): bit for bit the same loss and gradients, dropout
    included, QLoRA's 4-bit base too; against one group, the same up to float summation order."""
    import torch

    torch.manual_seed(0)
    peft_model = _peft_model(base, TrainSpec(method=method, rank=4, alpha=8.0, dropout=0.2), "cpu", "float32", False, False)
    for lora_b in (p for n, p in peft_model.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(lora_b, std=0.02)
    tokenizer = load_tokenizer(base)
    batch = [encode_example(e, tokenizer, False) for e in splits.train[:7]]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        together = _loss_and_grads(peft_model, batch, tokenizer.pad_token_id, packed, pass_tokens, groups=2)
        assert torch.get_num_threads() == 2  # the workers' one thread each does not leak out
        torch.set_num_threads(1)
        in_turn = _loss_and_grads(peft_model, batch, tokenizer.pad_token_id, packed, pass_tokens, groups=2)
        one = _loss_and_grads(peft_model, batch, tokenizer.pad_token_id, packed, pass_tokens, groups=1)
    finally:
        torch.set_num_threads(threads)
    assert together[0] == in_turn[0]
    assert all(torch.equal(a, b) for a, b in zip(together[1], in_turn[1], strict=True))
    assert together[0] == pytest.approx(one[0], rel=1e-6)
    worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(together[1], one[1], strict=True))
    assert worst < 1e-5, worst


def test_step_groups_are_consecutive_and_balanced_by_tokens():
    assert _groups([10, 10, 10, 10], 2) == [(0, 2), (2, 4)]
    assert _groups([30, 5, 5, 5, 5, 10], 2) == [(0, 1), (1, 6)]  # 30 | 30
    assert _groups([20, 5, 5, 5, 5, 20], 2) == [(0, 3), (3, 6)]  # 30 | 30, not 25 | 35
    assert _groups([7, 7, 7], 3) == [(0, 1), (1, 2), (2, 3)]
    assert _groups([100, 1, 1], 2) == [(0, 1), (1, 3)]
    assert _groups([5], 2) == [(0, 1)] and _groups([5, 6], 1) == [(0, 2)]


def test_the_step_loss_is_transformers_own(base, splits, peft_model):
    """With dropout off, packed and padded steps give transformers' loss over full logits (the loop scores
    only the answer positions through the vocab-wide head)."""
    import torch

    peft_model.eval()
    tokenizer = load_tokenizer(base)
    batch = [encode_example(e, tokenizer, False) for e in splits.train[:6]]
    width = max(len(ids) for ids, _ in batch)
    ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in batch])
    labels = torch.tensor([t + [-100] * (width - len(t)) for _, t in batch])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
    with torch.no_grad():
        full = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    for packed in (True, False):
        assert _loss_and_grads(peft_model, batch, tokenizer.pad_token_id, packed, 2)[0] == pytest.approx(full, rel=1e-5)


def test_dropout_masks_are_bernoulli_and_seeded():
    import torch

    index = torch.arange(2**20, dtype=torch.int32)
    keep = keep_mask(index, seed=7, p=0.05).float()
    assert keep.mean().item() == pytest.approx(0.95, abs=0.002)  # 2**20 draws: sd 0.0002
    assert torch.equal(keep_mask(index, 7, 0.05).float(), keep)  # a pure function of (index, seed)
    other = keep_mask(index, seed=8, p=0.05).float()
    assert (keep != other).float().mean().item() == pytest.approx(2 * 0.05 * 0.95, abs=0.003)  # independent seeds
    neighbours = torch.corrcoef(torch.stack([keep[:-1], keep[1:]]))[0, 1].item()
    assert abs(neighbours) < 0.01  # adjacent coordinates uncorrelated
    assert keep_mask(index, 7, 0.5).float().mean().item() == pytest.approx(0.5, abs=0.003)


def test_packed_attention_is_the_block_diagonal_mask_per_example(peft_model):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    assert peft_model.get_base_model().config._attn_implementation == PACKED_ATTENTION  # what training runs
    lengths = [3, 7, 5, 1]
    segment = torch.arange(len(lengths)).repeat_interleave(torch.tensor(lengths))
    position = torch.cat([torch.arange(n) for n in lengths])
    mask = (segment[:, None] == segment[None, :]) & (position[:, None] >= position[None, :])
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True  # grouped-query attention: 4 query heads, 2 kv heads
    torch.manual_seed(0)
    tensors = [torch.randn(1, heads, sum(lengths), 8, requires_grad=True) for heads in (4, 2, 2)]
    expected, _ = sdpa_attention_forward(module, *tensors, mask[None, None], scaling=0.3)
    grads = torch.autograd.grad(expected.square().sum(), tensors)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out, _ = packed_attention(module, *tensors, None, scaling=0.3, cu_seq_lens_q=starts)
    assert out.shape == expected.shape and torch.allclose(out, expected, atol=1e-6)
    for got, want in zip(torch.autograd.grad(out.square().sum(), tensors), grads, strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    plain, _ = packed_attention(module, *tensors, mask[None, None], scaling=0.3)  # no cu_seq_lens: sdpa itself
    assert torch.equal(plain, expected)


def test_gradient_checkpointing_changes_nothing_but_memory(base, splits, tmp_path):
    spec = TrainSpec(rank=4, alpha=8.0, steps=3, batch_size=4, learning_rate=1e-3)
    plain = train_adapter(base, splits, spec, tmp_path / "plain", threads=1, checkpointing=False)
    recomputed = train_adapter(base, splits, spec, tmp_path / "ckpt", threads=1, checkpointing=True)
    assert recomputed.losses == pytest.approx(plain.losses, rel=1e-5)
    assert json.loads((tmp_path / "ckpt" / "train_log.json").read_text())["checkpointing"] is True


def test_padded_batching_trains(base, splits, tmp_path):
    spec = TrainSpec(rank=4, alpha=8.0, steps=2, batch_size=4, batching="padded")
    assert len(train_adapter(base, splits, spec, tmp_path, threads=1).losses) == 2


@pytest.mark.parametrize("change", [
    {"optimizer": "sgd"}, {"weight_decay": 0.01}, {"max_grad_norm": 0.5}, {"lr_schedule": "linear"},
    {"min_lr_ratio": 0.0}, {"warmup_fraction": 0.2}, {"batching": "padded"}, {"pass_tokens": 64}, {"gradient_checkpointing": "on"},
    {"warmup_steps": 3}, {"decay_fraction": 0.3}, {"loss_scale": 2.0**12}, {"loss_scale_growth": 100},
])
def test_changing_a_training_constant_misses_the_adapter_cache(base, splits, tmp_path, change):
    ws = Workspace(root=tmp_path, base=base, splits=splits)
    spec = TrainSpec()
    assert ws.train_key(replace(spec, **change)) != ws.train_key(spec)
    assert ws.train_key(TrainSpec()) == ws.train_key(spec)


def test_lr_schedules():
    cosine = TrainSpec(steps=100, warmup_fraction=0.1, lr_schedule="cosine")
    assert cosine.lr_factor(0) == pytest.approx(0.1) and cosine.lr_factor(9) == pytest.approx(1.0)
    assert cosine.lr_factor(10) == pytest.approx(1.0) and cosine.lr_factor(100) == pytest.approx(0.1)
    assert replace(cosine, lr_schedule="constant").lr_factor(60) == 1.0
    assert replace(cosine, lr_schedule="linear", min_lr_ratio=0.0).lr_factor(55) == pytest.approx(0.5)


def test_wsd_runs_share_their_stable_part():
    """Before its decay, a wsd run's learning rate does not depend on its length; then it decays to min_lr_ratio."""
    short, long = TrainSpec(steps=30), TrainSpec(steps=120)
    assert (short.stable_steps, long.stable_steps) == (24, 96)
    assert [short.lr_factor(k) for k in range(24)] == [long.lr_factor(k) for k in range(24)]
    assert short.lr_factor(0) == pytest.approx(1 / 7) and short.lr_factor(6) == 1.0 and long.lr_factor(95) == 1.0
    assert short.lr_factor(29) == pytest.approx(0.1) and long.lr_factor(119) == pytest.approx(0.1)
    assert short.lr_factor(24) < 1.0


@pytest.mark.parametrize("method, dtype", [("lora", "float32"), ("qlora", "float32"), ("lora", "float16")])
def test_a_longer_run_continues_a_shorter_ones_checkpoint_to_the_same_adapter(base, splits, tmp_path, method, dtype):
    """The adapter of 10 steps continued from the 5-step run's stable checkpoint is the fresh 10-step adapter,
    bit for bit (weights, and the losses of every step). In fp16 the loss scale starts high enough that the
    first steps overflow: the checkpoint carries the scale those steps lowered."""
    import torch
    from safetensors.torch import load_file

    from autotune import trajectory

    short = TrainSpec(method=method, rank=4, alpha=8.0, steps=5, batch_size=4, learning_rate=1e-3, warmup_steps=2,
                      dropout=0.1, loss_scale=2.0**20)
    long = replace(short, steps=10)
    saved = trajectory.step_dir(tmp_path / "trajectory", short.stable_steps)
    train_adapter(base, splits, short, tmp_path / "short", threads=1, checkpoint_to=saved, dtype=dtype)
    assert trajectory.latest(tmp_path / "trajectory", long.stable_steps) == saved
    continued = train_adapter(base, splits, long, tmp_path / "continued", threads=1, resume_from=saved, dtype=dtype)
    fresh = train_adapter(base, splits, long, tmp_path / "fresh", threads=1, dtype=dtype)
    if dtype == "float16":
        assert json.loads((tmp_path / "short" / "train_log.json").read_text())["overflow_steps_skipped"] > 0
    assert continued.losses == fresh.losses and len(fresh.losses) == 10
    a, b = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("continued", "fresh"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "continued" / "train_log.json").read_text())["resumed_at_step"] == 4


def test_a_qlora_base_loads_without_hub_kernels(base, monkeypatch):
    from autotune.train import load_base_for_training

    asked = record_hub_kernels(monkeypatch)
    load_base_for_training(base, TrainSpec(method="qlora"), "cpu", "float32", False)
    assert asked == [False]


# --------------------------------------------------------------------------- fp16: loss scaling


def test_only_fp16_training_scales_its_loss():
    import torch

    from autotune.train import loss_scaler

    spec = TrainSpec(loss_scale=2.0**12, loss_scale_growth=500)
    scaler = loss_scaler(spec, "cpu", "float16")
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() == 2.0**12
    assert scaler.get_growth_interval() == 500
    assert loss_scaler(spec, "cpu", "bfloat16") is None and loss_scaler(spec, "cpu", "float32") is None


@pytest.fixture(scope="module")
def small_gradients(tiny_model_dir, tmp_path_factory):
    """The tiny model with its tied embeddings and head scaled down 1000x: its gradients are ~1e-6, as a confident
    model's are late in training."""
    import shutil

    from safetensors.torch import load_file, save_file

    from autotune.models import resolve_model

    folder = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("small") / "small-gradients")
    weights = load_file(folder / "model.safetensors")
    save_file({k: v * 1e-3 if "embed" in k else v for k, v in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return resolve_model(str(folder))


def test_scaled_fp16_gradients_keep_what_unscaled_ones_flush_to_zero(small_gradients, splits):
    """One step's LoRA gradients against fp16 weights on the small-gradient model, unscaled, lose a sixth of
    their entries to zero and differ from fp32's by 2%; scaled by 2^16 as training does, none and 0.2%
    (measured here)."""
    import torch

    small = small_gradients
    tokenizer = load_tokenizer(small)
    batch = [encode_example(e, tokenizer, False) for e in splits.train[:4]]
    spec = TrainSpec(rank=4, alpha=8.0, dropout=0.0)

    def gradients(dtype: str, scale: float | None):
        torch.manual_seed(0)
        model = _peft_model(small, spec, "cpu", dtype, False, False)
        with torch.no_grad():  # non-zero B, the same in every model, so that A gets gradients too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        accumulate_gradients(model, batch, tokenizer.pad_token_id, "cpu", True, 0, 1,
                             None if scale is None else torch.tensor(scale))
        return torch.cat([p.grad.flatten().float() / (scale or 1.0) for p in model.parameters() if p.requires_grad])

    fp32 = gradients("float32", None)
    assert fp32.abs().median() < 1e-5 and (fp32 == 0).float().mean() == 0
    for scale, zeros, error in ((None, (0.05, 1.0), (0.01, 1.0)), (2.0**16, (0.0, 0.0), (0.0, 0.005))):
        fp16 = gradients("float16", scale)
        assert zeros[0] <= (fp16 == 0).float().mean() <= zeros[1], scale
        assert error[0] <= (fp16 - fp32).norm() / fp32.norm() <= error[1], scale


def test_an_fp16_training_step_moves_every_weight_an_fp32_step_moves(small_gradients, splits, tmp_path):
    """One optimizer step on the small-gradient model: in fp32 every LoRA B entry moves; against fp16 weights
    too, because the loss is scaled (unscaled, the entries whose gradients fp16 flushed to zero stay put)."""
    import torch
    from safetensors.torch import load_file

    spec = TrainSpec(rank=4, alpha=8.0, steps=1, batch_size=4, dropout=0.0, learning_rate=1e-3, warmup_steps=0)
    for dtype in ("float32", "float16"):
        train_adapter(small_gradients, splits, spec, tmp_path / dtype, threads=1, dtype=dtype)
        weights = load_file(str(tmp_path / dtype / "adapter_model.safetensors"))
        b = torch.cat([w.flatten() for k, w in weights.items() if "lora_B" in k])  # zero before the step
        assert b.numel() > 0 and torch.count_nonzero(b) == b.numel(), (dtype, (b == 0).float().mean())


def test_a_step_whose_scaled_gradients_overflow_is_skipped_and_the_scale_halves(base, splits, tmp_path):
    import torch
    from safetensors.torch import load_file

    spec = TrainSpec(rank=4, alpha=8.0, steps=3, batch_size=4, learning_rate=1e-3, loss_scale=2.0**40)
    train_adapter(base, splits, spec, tmp_path / "adapter", threads=1, dtype="float16")
    log = json.loads((tmp_path / "adapter" / "train_log.json").read_text())
    assert log["overflow_steps_skipped"] == 3 and log["loss_scale"] == 2.0**37
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(torch.count_nonzero(w) == 0 for k, w in weights.items() if "lora_B" in k)  # no step was applied


def test_model_shape_counts_parameters_from_the_config(base, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).parameters())
    assert model_shape(base).parameters == pytest.approx(real, rel=0.01)  # norms are left out
    (tmp_path / "config.json").write_text(json.dumps(PHI3_MINI))
    phi3 = BaseModel("phi3-mini", tmp_path, "Phi3ForCausalLM", "x", 0)
    assert model_shape(phi3).parameters == pytest.approx(3.82e9, rel=0.01)


def test_memory_check_turns_on_checkpointing_only_when_short(base, monkeypatch):
    spec = TrainSpec()
    plain = memory_need(base, spec, "float32", 4096, checkpointing=False)
    lean = memory_need(base, spec, "float32", 4096, checkpointing=True)
    assert lean < plain
    _fake_free(monkeypatch, 10 * plain)
    assert check_memory(base, spec, "cpu", "float32", 1.0, 4096) is False
    _fake_free(monkeypatch, (plain + lean) // 2)
    assert check_memory(base, spec, "cpu", "float32", 1.0, 4096) is True
    with pytest.raises(CandidateError):
        check_memory(base, replace(spec, gradient_checkpointing="off"), "cpu", "float32", 1.0, 4096)
    _fake_free(monkeypatch, lean // 2)
    with pytest.raises(CandidateError, match=r"GiB needed, .* GiB free"):
        check_memory(base, spec, "cpu", "float32", 1.0, 4096)


def test_a_model_too_large_is_refused_before_any_work(tmp_path, monkeypatch, capsys, small_dataset):
    from safetensors.torch import save_file

    from autotune import cli

    folder = tmp_path / "phi3-mini"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(PHI3_MINI))
    save_file({}, str(folder / "model.safetensors"))  # a stand-in: no weight is read before the refusal
    smollm2_tokenizer().save_pretrained(folder)
    _fake_free(monkeypatch, 16 * 2**30)
    code = cli.main(["candidate", "--model", str(folder), "--data", str(small_dataset), "--target", "cpu",
                     "--threads", "1", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "GiB needed" in err and "16.0 GiB free" in err, err
    assert not (tmp_path / "out" / "cache" / "adapters").exists()


def test_int4_aware_memory_counts_the_rounded_weights_it_keeps(base):
    plain, aware = TrainSpec(rank=4, alpha=8.0), TrainSpec(rank=4, alpha=8.0, int4_aware=True)
    shape = model_shape(base)
    for dtype, width in (("float32", 4), ("bfloat16", 2)):
        for checkpointing in (False, True):  # kept across the step, recomputed layers or not
            extra = memory_need(base, aware, dtype, 256, checkpointing) - memory_need(base, plain, dtype, 256, checkpointing)
            assert extra == (shape.parameters - shape.embedding_parameters) * width


def test_the_workspace_continues_an_adapter_from_its_shorter_run(base, splits, tmp_path):
    """run_candidate at 10 steps, after the same adapter at 5: training starts at the 5-step run's checkpoint."""
    from autotune.candidate import CandidateSpec, run_candidate
    from autotune.export import ExportSpec

    ws = Workspace(root=tmp_path, base=base, splits=splits, threads=1, train_threads=1, max_eval=4)
    short = TrainSpec(rank=4, alpha=8.0, steps=5, batch_size=4, learning_rate=1e-3, warmup_steps=2)
    run_candidate(ws, CandidateSpec(short, ExportSpec("fp32")), with_latency=False)
    long = replace(short, steps=10)
    run_candidate(ws, CandidateSpec(long, ExportSpec("fp32")), with_latency=False)
    log = json.loads((ws.adapter_dir(long) / "train_log.json").read_text())
    assert log["resumed_at_step"] == short.stable_steps and len(log["losses"]) == 10
    assert ws.trajectory_dir(long) == ws.trajectory_dir(short) != ws.trajectory_dir(replace(short, rank=8))
