"""GPTQ one decoder layer at a time: the codes of the whole model in memory, from a sharded checkpoint."""

from __future__ import annotations

import pytest
import torch

from autotune.quantize import Int4Grid, quantize_rtn
from conftest import build_tiny_model


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny model (hidden 128, 3 layers) written the way the merge writes it: one shard per decoder layer."""
    from autotune.checkpoint import Checkpoint, write_checkpoint

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-3") / "model", hidden=128, layers=3)
    checkpoint = Checkpoint(folder)
    out = tmp_path_factory.mktemp("sharded") / "model"
    write_checkpoint(out, (checkpoint.read(group) for group in checkpoint.groups()))
    for extra in folder.iterdir():
        if not extra.name.endswith(".safetensors"):
            (out / extra.name).write_bytes(extra.read_bytes())
    return out


@pytest.fixture(scope="module")
def splits_samples(tiny_model_dir):
    """12 training examples of the demo data, tokenized (SmolLM2's tokenizer, as every tiny model has)."""
    from autotune.data import DataConfig, load_splits
    from autotune.models import resolve_model
    from autotune.train import calibration_samples, load_tokenizer

    return calibration_samples(load_splits(DataConfig()), load_tokenizer(resolve_model(str(tiny_model_dir))))[:12]


@pytest.mark.parametrize("grid", [Int4Grid(32, False), Int4Grid(16, True)], ids=["b32-asym", "b16-sym"])
def test_gptq_layer_by_layer_gives_the_codes_of_the_model_in_memory(sharded, splits_samples, grid):
    from transformers import AutoModelForCausalLM

    from autotune.gptq import gptq_checkpoint, gptq_quantize

    torch.set_num_threads(1)
    layers = []
    streamed = gptq_checkpoint(sharded, splits_samples, grid, on_layer=lambda i, n: layers.append((i, n)),
                               tokens_per_pass=256)
    model = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).eval()
    whole = gptq_quantize(model, splits_samples, grid, tokens_per_pass=256)
    assert layers == [(1, 3), (2, 3), (3, 3)]
    assert sorted(streamed) == sorted(whole) and len(whole) == 3 * 7 + 1
    for name, weight in whole.items():
        got = streamed[name]
        assert torch.equal(got.q, weight.q) and torch.equal(got.scales, weight.scales), name
        assert torch.equal(got.zero_points, weight.zero_points), name
    assert not torch.equal(whole["lm_head"].q, quantize_rtn(model.lm_head.weight, grid).q)  # calibrated, not rounded


def test_gptq_with_bf16_forwards_rounds_the_fp32_weights(sharded, splits_samples):
    """Forwards in a narrower dtype (a GPU profile's) still round the checkpoint's fp32 weights: each row's
    first block, which no earlier error reaches, has exactly the fp32 weight's grid; and GPTQ on bf16
    Hessians still moves the layer's outputs on its calibration inputs less than plain rounding does."""
    from transformers import AutoModelForCausalLM

    from autotune.gptq import gptq_checkpoint

    torch.set_num_threads(1)
    grid = Int4Grid(32, True)
    bf16 = gptq_checkpoint(sharded, splits_samples, grid, dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.2.self_attn.q_proj", "lm_head"):
        rtn = quantize_rtn(model.get_submodule(name).weight, grid)
        assert torch.equal(bf16[name].scales[:, 0], rtn.scales[:, 0]), name
    layer = model.model.layers[0]
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(torch.tensor([t for ids in splits_samples for t in ids])))
        weight = layer.self_attn.q_proj.weight
        error = lambda q: (x @ (weight - q.dequantize()).T).pow(2).mean().item()  # noqa: E731
        assert error(bf16["model.layers.0.self_attn.q_proj"]) < 0.8 * error(quantize_rtn(weight, grid))
