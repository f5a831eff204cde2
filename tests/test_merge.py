"""The merge, one decoder layer at a time: peft's merge_and_unload bit for bit, with a layer of the model in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autotune.errors import UserError
from autotune.models import resolve_model


def _adapter(base_dir: Path, out: Path, target_modules="all-linear", seed=1, **lora) -> Path:
    """A saved peft adapter with random (non-zero) A and B, as training leaves them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, task_type="CAUSAL_LM", **lora))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}], ids=["plain", "rslora"])
def test_merge_is_peft_merge_and_unload_bit_for_bit(tiny_model_dir, tmp_path, lora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from autotune.checkpoint import Checkpoint
    from autotune.export import merge_adapter

    adapter = _adapter(tiny_model_dir, tmp_path / "adapter", **lora)
    merged = merge_adapter(resolve_model(str(tiny_model_dir)), adapter, tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    expected.pop("lm_head.weight")  # tied: the embedding's table, written once
    checkpoint = Checkpoint(merged)
    assert len(checkpoint.groups()) == 4  # the embedding, the final norm and one shard per decoder layer
    got, before = checkpoint.read(checkpoint.names), Checkpoint(tiny_model_dir).read(expected)
    assert sorted(got) == sorted(expected)
    moved = 0
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor), name
        moved += not torch.equal(tensor, before[name])
    assert moved == 14  # every Linear of both layers took its adapter
    # transformers loads the sharded folder as the model (the builder loads it the same way)
    reloaded = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert torch.equal(reloaded.lm_head.weight, expected["model.embed_tokens.weight"])
    assert (merged / "tokenizer.json").is_file()


def test_a_uniform_soup_is_the_mean_of_the_merged_models(tiny_model_dir, tmp_path):
    """Weights 1/2 and 1/2 merge the mean of two adapters' updates: the mean of the two merged models, to fp32
    rounding, also where one adapter wraps fewer modules (the other's update alone, halved, lands there)."""
    from autotune.checkpoint import Checkpoint
    from autotune.export import merge_adapter, merge_adapters

    base = resolve_model(str(tiny_model_dir))
    one = _adapter(tiny_model_dir, tmp_path / "one", seed=1)
    two = _adapter(tiny_model_dir, tmp_path / "two", target_modules=["q_proj", "v_proj"], seed=2)
    soup = Checkpoint(merge_adapters(base, [(one, 0.5), (two, 0.5)], tmp_path / "soup"))
    first, second = (Checkpoint(merge_adapter(base, a, tmp_path / f"merged-{a.name}")) for a in (one, two))
    got, a, b = (c.read(soup.names) for c in (soup, first, second))
    before = Checkpoint(tiny_model_dir).read(soup.names)
    assert sorted(got) == sorted(a) == sorted(b)
    for name in got:
        assert torch.allclose(got[name], (a[name] + b[name]) / 2, atol=1e-6), name
    moved = {name for name in got if not torch.equal(got[name], before[name])}
    assert len(moved) == 14 and not torch.equal(got["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])
    assert (tmp_path / "soup" / "tokenizer.json").is_file()


def test_merge_refuses_adapters_it_cannot_merge_exactly(tiny_model_dir, tmp_path):
    from autotune.export import merge_adapter

    base = resolve_model(str(tiny_model_dir))
    dora = _adapter(tiny_model_dir, tmp_path / "dora", use_dora=True)
    with pytest.raises(UserError, match="not a plain LoRA adapter .*use_dora"):
        merge_adapter(base, dora, tmp_path / "merged")
    other = _adapter(tiny_model_dir, tmp_path / "other")
    config = other / "adapter_config.json"
    config.write_text(config.read_text().replace('"modules_to_save": null', '"modules_to_save": ["lm_head"]'))
    with pytest.raises(UserError, match="modules_to_save"):
        merge_adapter(base, other, tmp_path / "merged2")


def test_merge_frees_each_group_of_the_checkpoint_before_it_reads_the_next(tiny_model_dir, tmp_path, monkeypatch):
    """One group in memory at a time: on a 1B model a group kept one group too long was the 400 MB embedding
    table held through the first layer's merge (by enumerate's cached tuple and by a loop variable)."""
    import weakref

    from autotune.checkpoint import Checkpoint
    from autotune.export import merge_adapter

    read, held = Checkpoint.read, []

    def read_one_group(self, names, dtype=None, device="cpu"):
        alive = [name for name, ref in held if ref() is not None]
        assert not alive, f"{alive} still held while the next group is read"
        tensors = read(self, names, dtype, device)
        held.extend((name, weakref.ref(tensor)) for name, tensor in tensors.items())
        return tensors

    monkeypatch.setattr(Checkpoint, "read", read_one_group)
    merge_adapter(resolve_model(str(tiny_model_dir)), _adapter(tiny_model_dir, tmp_path / "adapter"), tmp_path / "merged")
    assert len(held) > 10  # every tensor of the base went through it
