"""Memory: what training a candidate needs, what is free on its device, and handing freed memory back.

:func:`check_memory` refuses a candidate that would not fit before anything is loaded, and turns on gradient
checkpointing only when training would not fit without it. The figures are a model of the peak (runtime,
frozen weights, LoRA state, activations), not a measurement.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from autotune.data import Splits
from autotune.errors import CandidateError
from autotune.models import BaseModel, model_shape
from autotune.packing import computed_tokens

if TYPE_CHECKING:  # annotations only: train imports this module
    from autotune.train import TrainSpec

RUNTIME_BYTES = 2**29  # torch + transformers + peft imported, data tokenized: ~0.5 GiB RSS measured
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def tokens_per_step(splits: Splits, spec: TrainSpec) -> int:
    """A bound on the tokens a step's passes hold at once (its groups' passes may run together), from the
    longest examples (~3 characters per token)."""
    lengths = sorted((len(e.prompt) + len(e.label)) // 3 + 4 for e in splits.train)[-spec.batch_size:]
    tokens = computed_tokens(lengths, spec.batching == "packed")
    return min(tokens, spec.step_groups * max(spec.pass_tokens, lengths[-1])) if spec.pass_tokens else tokens


def memory_need(base: BaseModel, spec: TrainSpec, dtype: str, tokens: int, checkpointing: bool) -> int:
    """Bytes that training ``spec`` holds at its peak: runtime, frozen weights, LoRA state, activations.

    Activations per token and layer are about 14 hidden-size plus 5 MLP-width values (the
    norms, projections, MLP intermediates and the LoRA dropout copies saved for the backward
    pass); with checkpointing only each layer's input is kept, plus one layer being
    recomputed. Only the positions that score an answer token go through the vocab-wide head,
    so the logits are negligible.
    """
    shape = model_shape(base)
    width = _DTYPE_BYTES.get(dtype, 4)
    if spec.method == "qlora":  # nf4 linears (~0.56 byte/weight with double quant), embeddings kept in fp32
        weights = (shape.parameters - shape.embedding_parameters) * 0.56 + shape.embedding_parameters * 4
    else:
        weights = shape.parameters * width
    if spec.int4_aware:  # each layer's rounded weight, kept from one optimizer step to the next
        weights += (shape.parameters - shape.embedding_parameters) * width
    lora = spec.rank * shape.layers * (6 * shape.hidden + 3 * shape.intermediate) * 16  # weights, grads, 2 Adam moments
    per_layer = (14 * shape.hidden + 5 * shape.intermediate) * 4 * tokens
    activations = shape.hidden * 4 * tokens * shape.layers + per_layer if checkpointing else per_layer * shape.layers
    return int(RUNTIME_BYTES + weights + lora + activations)


def free_memory(device: str) -> tuple[int, str]:
    """(free bytes, what they are) on the training device."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0], "GPU memory"
    import psutil

    return psutil.virtual_memory().available, "RAM"


def check_memory(base: BaseModel, spec: TrainSpec, device: str, dtype: str, headroom: float, tokens: int = 512) -> bool:
    """Refuse training that would not fit in free RAM / VRAM, before loading anything.

    Returns whether gradient checkpointing is to be used: ``on``, or ``auto`` when training
    without it would not fit but with it would.

    Raises:
        CandidateError: it does not fit even with checkpointing (the message gives needed and free memory).
    """
    free, where = free_memory(device)
    usable = free * headroom
    plain = memory_need(base, spec, dtype, tokens, checkpointing=False)
    if spec.gradient_checkpointing == "on" or (spec.gradient_checkpointing == "auto" and plain > usable):
        need, checkpointing = memory_need(base, spec, dtype, tokens, checkpointing=True), True
    else:
        need, checkpointing = plain, False
    if need > usable:
        hint = "use --method qlora or a smaller model" if spec.method == "lora" else "use a smaller model"
        raise CandidateError(
            f"not enough free {where} to train {spec.method} on {base.name}: about {need / 2**30:.1f} GiB needed, "
            f"{free / 2**30:.1f} GiB free ({headroom:.0%} usable); close other programs or {hint}"
        )
    return checkpointing



def trim_heap() -> None:
    """Hand free heap pages back to the OS (glibc keeps them otherwise); a no-op off glibc."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def release_memory() -> None:
    """Collect garbage, then trim the heap: what a finished stage held leaves the process's RSS."""
    import gc

    gc.collect()
    trim_heap()
