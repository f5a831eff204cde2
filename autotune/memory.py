"""Memory: what training a candidate needs, what is free on its device, and handing freed memory back.

:func:`check_memory` refuses a candidate that would not fit before anything is loaded, and turns on gradient
checkpointing only when training would not fit without it. The figures are a model of the peak (runtime,
frozen weights, LoRA state, activations), not a measurement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from autotune.data import Splits
from autotune.errors import CandidateError
from autotune.models import BaseModel, ModelShape, model_shape
from autotune.packing import computed_tokens

if TYPE_CHECKING:  # annotations only: train and export import this module
    from autotune.export import ExportSpec
    from autotune.train import TrainSpec

# A process with torch, transformers and peft imported and the data tokenized: ~0.5 GiB RSS measured. The stages'
# needs below are what each adds to what the process already holds; a projection on paper adds them to this.
RUNTIME_BYTES = 2**29
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def tokens_per_step(splits: Splits, spec: TrainSpec) -> int:
    """A bound on the tokens a step's passes hold at once (its groups' passes may run together), from the
    longest examples (~3 characters per token)."""
    lengths = sorted((len(e.prompt) + len(e.label)) // 3 + 4 for e in splits.train)[-spec.batch_size:]
    tokens = computed_tokens(lengths, spec.batching == "packed")
    return min(tokens, spec.step_groups * max(spec.pass_tokens, lengths[-1])) if spec.pass_tokens else tokens


def memory_need(base: BaseModel, spec: TrainSpec, dtype: str, tokens: int, checkpointing: bool) -> int:
    """Bytes that training ``spec`` adds to the process at its peak: frozen weights, LoRA state, activations.

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
    return int(weights + lora + activations)


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


# ------------------------------------------------------------------ each stage's peak: predicted, then measured

@dataclass(frozen=True)
class StageMemory:
    """One stage's peak memory: predicted before it ran, measured while it ran.

    The prediction is what the stage holds by the model's config (:func:`memory_need`, :func:`merge_need`,
    :func:`calibrate_need`, :func:`export_need`) on top of ``start``, what the process held when the stage
    began. ``measured`` is the stage's peak resident set (RAM) or, for a stage on a GPU, torch's peak
    reserved memory; None where the platform cannot say.
    """

    predicted: int
    measured: int | None
    where: str = "RAM"
    start: int | None = None

    def to_dict(self) -> dict:
        mb = lambda n: None if n is None else round(n / 2**20, 1)  # noqa: E731
        return {"predicted_mb": mb(self.predicted), "measured_mb": mb(self.measured), "where": self.where,
                "start_mb": mb(self.start)}


@contextlib.contextmanager
def stage_peak(record: dict, stage: str, need: int, device: str = "cpu") -> Iterator[None]:
    """Measure the peak memory of the block into ``record[stage]``, beside the prediction: what the process
    holds now plus ``need``, the stage's own bytes.

    RAM: Linux's peak RSS (VmHWM), reset at the block's start (``/proc/self/clear_refs``); GPU: torch's
    peak reserved memory, reset likewise.
    """
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_reserved()
        yield
        record[stage] = StageMemory(start + need, torch.cuda.max_memory_reserved(), "GPU memory", start)
        return
    release_memory()  # what earlier stages freed leaves the RSS: ``start`` is what the process really holds
    reset = _reset_peak_rss()
    start = _status_bytes("VmRSS") or RUNTIME_BYTES
    yield
    record[stage] = StageMemory(start + need, _status_bytes("VmHWM") if reset else None, "RAM", start)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # 5: reset the peak RSS to the current RSS (Linux 4.0+)
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    """A size line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith(f"{field}:"))
        return int(line.split()[1]) * 1024
    return None


# What each stage after training adds at its peak, from the model's config. The merge and GPTQ are ours and are
# counted tensor by tensor; the builder and onnxruntime-genai are libraries, so their bytes are measured: per
# parameter of the decoder layers and of the embedding table, whose handling differs (builder 0.18 and
# onnxruntime-genai 0.18, 2026-12-03; int4 from a pre-quantized checkpoint fitted on SmolLM2-135M and random
# 360M and 1B models of its family, the others on SmolLM2-135M and a 126M model of hidden 960).
_BUILDER_BYTES = {  # (per decoder-layer parameter, per embedding parameter) the builder adds
    "int4-prequantized": (1.57, 16.6),
    "int4": (9.6, 14.8),
    "int8": (10.3, 20.5),
    "fp32": (5.4, 8.7),
    "fp16": (5.4, 8.7),
    "bf16": (5.4, 8.7),
}
_BUILDER_IMPORTS = 64 * 2**20  # onnx, onnx-ir and the builder, imported by the first export of a process
_TOKENIZER_BYTES = 1200  # per vocabulary entry, a fast tokenizer loaded (SmolLM2's: ~59 MB measured)
_MERGE_FIXED = 64 * 2**20  # the merge's config handling (transformers' AutoConfig and GenerationConfig)
_MEASURE_RUNTIME = 95 * 2**20  # the measuring child without a model: onnxruntime-genai, tokenizer, prompts
_MEASURE_BYTES = {"int4": 1.55, "int8": 0.9}  # of the exported weights' bytes on disk; 1.5 for the float ones


def _layer_parameters(shape: ModelShape) -> int:
    return shape.attention + 3 * shape.hidden * shape.intermediate


def merge_need(base: BaseModel, rank: int = 16) -> int:
    """The merge's peak: one decoder layer or the embedding table in fp32 at a time (read in the checkpoint's
    dtype, one tensor of it beside its fp32 copy) plus ``B @ A`` and its scaled copy for one Linear; the
    adapter of ``rank``; the tokenizer it saves beside the weights."""
    shape = model_shape(base)
    stored = base.size_bytes / max(1, shape.parameters)  # bytes a parameter on disk
    if not shape.layers:  # a config without the usual fields: the whole model at once
        return int(shape.parameters * (4 + stored))
    linear = shape.hidden * shape.intermediate
    converting = stored < 3.5  # a bf16/fp16 checkpoint is read, then widened tensor by tensor
    layer = _layer_parameters(shape) * 4 + (linear * stored if converting else 0) + 2 * linear * 4
    table = shape.vocab * shape.hidden * (4 + (stored if converting else 0))
    adapter = rank * shape.layers * (6 * shape.hidden + 3 * shape.intermediate) * 4
    return int(max(layer, table) + adapter + shape.vocab * _TOKENIZER_BYTES + _MERGE_FIXED)


def _gptq_bytes(rows: int, columns: int) -> int:
    """:func:`autotune.gptq.gptq_weight` of a ``[rows, columns]`` weight: while the Hessian is factored, the
    weight and three ``[columns, columns]`` matrices (the Hessian, its reversed copy, the factor); in the column
    loop, the weight, its transposed copy, its codes twice (as bytes), a lazy batch of errors, and two of them."""
    from autotune.gptq import LAZY_COLUMNS  # here: autotune.gptq imports this module

    factor = 4 * rows * columns + 12 * columns * columns
    loop = 10 * rows * columns + 8 * columns * columns + 4 * LAZY_COLUMNS * rows
    return max(factor, loop)


def calibrate_need(base: BaseModel, spec: ExportSpec, lengths: Sequence[int]) -> int:
    """The pre-quantized checkpoint's peak: GPTQ one decoder layer at a time on calibration samples of
    ``lengths`` tokens (none: the builder's own rounding, written as is), then the checkpoint written.

    GPTQ keeps every finished layer's int4 weights (a byte per code, an fp32 scale and a byte zero point per
    block). Besides them, the peak is a layer (its fp32 weights, the hidden states in and out, the Hessians
    of its four inputs, and then either one packed pass's activations or GPTQ of its largest matrix) or the
    LM head (the final hidden states and GPTQ of the table).
    """
    shape = model_shape(base)
    h, i, v = shape.hidden, shape.intermediate, shape.vocab
    per_code = 1 + 5 / spec.block_size
    layers = _layer_parameters(shape) * shape.layers * per_code
    if spec.calibration == "none" or not shape.layers:
        # quantize_rtn of one weight at a time from the memory-mapped fp32 file, all int4 weights kept until written
        return int(shape.parameters * (per_code + 4 / max(1, shape.layers)))
    tokens = sum(lengths[: spec.calibration_samples])
    per_pass = min(tokens, max(spec.calibration_tokens_per_pass, max(lengths, default=0)))
    activations = per_pass * (8 * h + 4 * i) * 4
    gptq = max(_gptq_bytes(2 * i, h), _gptq_bytes(h, i))  # gate and up stacked, or down
    layer = _layer_parameters(shape) * 4 + 2 * tokens * h * 4 + 4 * (3 * h * h + i * i) + max(activations, gptq)
    head = tokens * h * 4 + _gptq_bytes(v, h)
    written = v * h * (per_code if shape.tied else 4 + 0.5)  # an untied table stays fp32; Olive packs two codes a byte
    return int(layers + max(layer, head, written))


def export_need(base: BaseModel, spec: ExportSpec) -> int:
    """The builder's peak for ``spec`` (measured bytes per parameter: see :data:`_BUILDER_BYTES`)."""
    shape = model_shape(base)
    kind = "int4-prequantized" if spec.prequantized else spec.precision
    per_layer, per_table = _BUILDER_BYTES[kind]
    table = shape.embedding_parameters
    return int(_BUILDER_IMPORTS + (shape.parameters - table) * per_layer + table * per_table)


def measure_need(model_dir: Path, precision: str) -> int:
    """The measuring child's peak, a process of its own: its runtime and the exported weights (their bytes on
    disk, times how much of them onnxruntime holds at ``precision``, measured)."""
    weights = sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.suffix in (".onnx", ".data"))
    return int(_MEASURE_RUNTIME + weights * _MEASURE_BYTES.get(precision, 1.5))
