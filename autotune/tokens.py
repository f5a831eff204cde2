"""Prompts and labels as token ids: one tokenization for training, GPTQ calibration and measuring.

The measured model (and an app) sees what onnxruntime-genai's tokenizer makes of the rendered prompt,
with the tokenizer's special tokens added (``tokenizer.update_options(add_special_tokens="true")``:
the BOS of the families that have one; onnxruntime-genai adds none by default). Training tokenizes the
same text with transformers, and the two agree token for token (tests/test_families.py, per family):

- a chat template's own BOS text is dropped where the tokenizer adds the BOS itself (Llama 3, Gemma and
  Mistral templates write ``{{ bos_token }}``), so the BOS is never doubled;
- a SentencePiece tokenizer puts its word-start ``▁`` after every special token, as onnxruntime-genai's
  does; transformers 5 puts it only at the very start when the tokenizer is not ``legacy``;
- a label is tokenized in context, as it follows the prompt (after ``...is:\\n`` SentencePiece writes
  ``Joy``; alone, ``▁Joy``): those are the ids a right answer is generated as, then the EOS;
- the label-restricted baseline scores those same ids after each prompt.
"""

from __future__ import annotations

# Bump when a change here changes the ids of a prompt or a label: part of every adapter's, export's and
# measurement's cache key (training, GPTQ calibration and measuring all tokenize through this module).
CODE_VERSION = 1


def for_runtime(tokenizer):
    """``tokenizer`` made to tokenize as onnxruntime-genai does (in place; returned for chaining).

    Its SentencePiece pre-tokenizer prepends ``▁`` to the text after each special token too
    (``prepend_scheme`` ``always``), as the runtime's tokenizer does whatever tokenizer.json says.
    """
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme == "first":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=pre.replacement, prepend_scheme="always",
                                                         split=pre.split)
    return tokenizer


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` puts a BOS in front of what it encodes (with its special tokens)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]


def without_bos(text: str, tokenizer) -> str:
    """``text`` (a rendered chat template) without its leading BOS where the tokenizer adds one itself."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        return text[len(bos):]
    return text


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The ids of a rendered prompt, as the measuring child's tokenizer encodes it (special tokens added)."""
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def label_ids(tokenizer, prompt: str, label: str, prompt_tokens: list[int] | None = None) -> list[int]:
    """The ids of ``label`` as it follows ``prompt``: what a right answer is generated as (no EOS).

    They are the tail of the prompt-and-label text's ids. Where the prompt's own ids are not a prefix of
    those (its last characters merge with the label's first), the label alone: generation after the
    prompt's ids can only write it that way.
    """
    prompt_tokens = prompt_ids(tokenizer, prompt) if prompt_tokens is None else prompt_tokens
    whole = tokenizer(prompt + label, add_special_tokens=True)["input_ids"]
    if whole[: len(prompt_tokens)] == prompt_tokens and len(whole) > len(prompt_tokens):
        return whole[len(prompt_tokens):]
    return tokenizer(label, add_special_tokens=False)["input_ids"]


def encode(tokenizer, prompt: str, label: str) -> tuple[list[int], list[int]]:
    """(input ids, targets) of one training example: prompt, label in context, EOS; the prompt's targets are
    -100 (no loss on it)."""
    ids = prompt_ids(tokenizer, prompt)
    answer = label_ids(tokenizer, prompt, label, ids) + [tokenizer.eos_token_id]
    return ids + answer, [-100] * len(ids) + answer
