"""Tiny random-weight models of each family the onnxruntime-genai builder exports, built locally, offline.

Every model has 2 layers, hidden 64 and MLP width 128 (bitsandbytes' CPU 4-bit needs dims divisible
by 64) and head size 32 (the CPU attention kernel needs a multiple of 16).

Tokenizers are what make families differ in tokenization, so each family can get one that behaves
like its own (built here, no hub):

- ``chatml`` (Qwen2/2.5, Qwen3, SmolLM2): SmolLM2's real tokenizer, byte-level BPE, no BOS, ChatML template.
- ``llama3``: the same BPE with a BOS its post-processor adds and Llama 3's template, which writes the BOS too.
- ``gemma``: a SentencePiece BPE without a dummy prefix (Gemma's), BOS added, ``{{ bos_token }}<start_of_turn>``.
- ``mistral``: a SentencePiece BPE with the dummy prefix (Llama 2 / Mistral), BOS added, ``{{ bos_token }}[INST]``.
- ``phi3``: the same kind of SentencePiece BPE, no BOS, ``<|user|>`` / ``<|assistant|>`` / ``<|end|>`` turns.

The SentencePiece models are trained here on a few hundred lines (vocabulary 512, byte fallback), so their
labels tokenize like a real model's: "Joy" alone is "▁Joy", after a newline it is "Joy".
"""

from __future__ import annotations

import atexit
import functools
import io
import random
import shutil
import tempfile
from pathlib import Path

HIDDEN, WIDTH, HEAD = 64, 128, 32
# family -> (transformers config class, its options beyond the shared sizes)
FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True)),
    "phi3": ("Phi3Config", dict(original_max_position_embeddings=512, pad_token_id=None)),
    # Gemma's sliding window (local layers attend to the last 256 positions) below the context (512).
    "gemma2": ("Gemma2Config", dict(query_pre_attn_scalar=HEAD, sliding_window=256)),
    "gemma3": ("Gemma3TextConfig", dict(query_pre_attn_scalar=HEAD, sliding_window=256,
                                        layer_types=["sliding_attention", "full_attention"])),
}
# The tokenizer each family's own checkpoints behave like.
FAMILY_TOKENIZER = {"llama": "llama3", "mistral": "mistral", "qwen2": "chatml", "qwen3": "chatml", "phi3": "phi3",
                    "gemma2": "gemma", "gemma3": "gemma"}

LLAMA3_TEMPLATE = ("{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
                  "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
                  "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
                    "{% endif %}{% endfor %}")
PHI3_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
LABEL_WORDS = ("Sad", "Joy", "Fear", "Surprise")


def smollm2_tokenizer():
    """SmolLM2's tokenizer, a fresh copy (read from the GGUF file once per process: that takes seconds)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_smollm2_folder())


@functools.cache
def _smollm2_folder() -> Path:
    from transformers import AutoTokenizer

    from autotune.models import _demo_gguf_path

    gguf = _demo_gguf_path()
    folder = Path(tempfile.mkdtemp(prefix="smollm2-tokenizer-"))
    atexit.register(shutil.rmtree, folder, True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


def _sentencepiece(dummy_prefix: bool, newline_pieces: bool) -> bytes:
    """A SentencePiece BPE model (vocabulary 512, byte fallback) trained on template-like lines and words.

    Without ``newline_pieces`` a newline is not in the vocabulary and encodes as its byte, ``<0x0A>``, as in
    Llama 2's, Mistral's and Phi-3's models; Gemma's has pieces for newlines.
    """
    import sentencepiece

    rng = random.Random(0)
    words = ("the a of and to in is it that was for on are with as be at this have from or had by not what all "
             "were when your can said there use an each which do how their if will up other about out many then "
             "example number things text tone label answer classify only one").split()
    words += [w.lower() for w in LABEL_WORDS] + list(LABEL_WORDS)
    lines = [f"### Text: example number {i} about {label.lower()} things\n### The tone is:\n{label}"
             for i in range(10) for label in LABEL_WORDS]
    lines += [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    if not newline_pieces:
        lines = [line.replace("\n", " ") for line in lines]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=512, byte_fallback=True,
        add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return model.getvalue()


def build_tokenizer(style: str, folder: Path):
    """A tokenizer of ``style`` (see the module docstring), loaded back from ``folder`` as a user's would be."""
    from tokenizers import processors
    from transformers import AutoTokenizer, GemmaTokenizer, LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    if style in ("chatml", "llama3"):
        tokenizer = smollm2_tokenizer()
        if style == "llama3":
            tokenizer.add_special_tokens({"additional_special_tokens": [
                "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
            tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
            bos = f"{tokenizer.bos_token}:0"
            tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A:0", pair=f"{bos} $A:0 {bos} $B:1",
                special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
            tokenizer.chat_template = LLAMA3_TEMPLATE
    else:
        source = folder / "sentencepiece"
        source.mkdir(exist_ok=True)
        (source / "tokenizer.model").write_bytes(_sentencepiece(dummy_prefix=style != "gemma", newline_pieces=style == "gemma"))
        if style == "gemma":
            tokenizer = GemmaTokenizer.from_pretrained(source, add_bos_token=True)
            tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
            tokenizer.chat_template = GEMMA_TEMPLATE
        elif style == "mistral":
            tokenizer = LlamaTokenizer.from_pretrained(source, add_bos_token=True)
            tokenizer.chat_template = MISTRAL_TEMPLATE
        elif style == "phi3":
            tokenizer = LlamaTokenizer.from_pretrained(source, add_bos_token=False)
            tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
            tokenizer.eos_token = "<|end|>"
            tokenizer.chat_template = PHI3_TEMPLATE
        else:
            raise ValueError(f"unknown tokenizer style {style}")
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def build_family_model(folder: Path, family: str, *, tokenizer_style: str | None = None, seed: int = 0) -> Path:
    """Save a random model of ``family`` (safetensors) into ``folder``, with SmolLM2's tokenizer or one of
    ``tokenizer_style``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if tokenizer_style is None:
        tokenizer = smollm2_tokenizer()
    else:
        tokenizer = build_tokenizer(tokenizer_style, folder.parent / f"{folder.name}-tokenizer")
    config_class, options = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=2,
        num_attention_heads=HIDDEN // HEAD, num_key_value_heads=1, head_dim=HEAD, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **options)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
