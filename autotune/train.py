"""Fine-tune a LoRA (or QLoRA) adapter on the training split: one readable loop.

The loss covers only the answer tokens (the label and EOS), never the prompt, so the
model learns to answer rather than to parrot the template. Runs are seeded; threads are
chosen from the cores that are actually free, since oversubscribing the cores made
training steps 10-30x slower on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from autotune.data import Example, Splits, render_prompt
from autotune.errors import CandidateError, UserError
from autotune.models import BaseModel, model_shape
from autotune.packing import (computed_tokens, consecutive_parts, packed_inputs, padded_layout_dropout,
                              use_packed_attention)
from autotune.quantize import Int4Grid, fake_quantize

# Bump when a change to this module or to autotune.packing changes the adapters it trains: it is part of every
# adapter's cache key. 3: each packed example attends on its own, in fp32 on the CPU. 4: int4-aware adapters
# get their straight-through gradients from one LoRA pass, and a step's gradients are summed group by group
# (the same gradients, summed in another order).
CODE_VERSION = 4
METHODS = ("lora", "qlora")
OPTIMIZERS = ("adamw", "sgd")
# wsd (warmup-stable-decay): a run of N steps is a run of M < N steps up to M's decay, so a longer run
# continues a shorter one's checkpoint (autotune.schedule's rungs) and trains the same adapter.
LR_SCHEDULES = ("wsd", "cosine", "linear", "constant")
# packed: a step's examples in one row, each with its own positions and causal block (no padding: ~40% less
# compute here); padded: one row per example. The same training: dropout masks follow the padded layout.
BATCHING = ("packed", "padded")
CHECKPOINTING = ("auto", "on", "off")
TARGET_MODULES = {
    "all-linear": "all-linear",
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj", "gate_up_proj"],
}


@dataclass(frozen=True)
class TrainSpec:
    """The training choices of one candidate (everything that changes the adapter).

    ``alpha`` is the LoRA scale numerator: the update is scaled by ``alpha / rank``.
    ``target_modules`` is ``all-linear``, ``attention`` or ``mlp``. ``lr_schedule`` ``wsd``
    warms the learning rate up linearly over ``warmup_steps``, holds it, and decays it linearly to
    ``min_lr_ratio`` of its peak over the last ``decay_fraction`` of the steps: up to
    :attr:`stable_steps` a run does not depend on its length, so a longer run continues a shorter
    one's checkpoint. ``cosine``, ``linear`` and ``constant`` warm up over ``warmup_fraction`` of
    the steps, then follow their shape down to ``min_lr_ratio``. ``max_grad_norm`` 0 turns
    gradient clipping off.
    ``gradient_checkpointing`` ``auto`` turns it on only when memory is short: it recomputes
    activations in the backward pass (same gradients; each layer's forward runs twice).
    ``int4_aware`` trains against the int4 export the builder will write: every quantized
    weight is computed as its symmetric int4 rounding in blocks of ``int4_block_size`` (see
    :func:`quantization_aware`), so the adapter learns to land well on that grid (symmetric,
    the builder's default rounding: one int4-aware adapter per block size).
    ``step_groups`` cuts each step's batch into that many groups of examples, each with its own
    gradient, summed in order (:func:`accumulate_gradients`): on a CPU with two or more threads the
    groups run at once; ``pass_tokens`` bounds the tokens of each forward pass within a group.
    """

    method: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    learning_rate: float = 3e-4
    steps: int = 150
    batch_size: int = 8
    target_modules: str = "all-linear"
    warmup_fraction: float = 0.1
    seed: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_schedule: str = "wsd"
    min_lr_ratio: float = 0.1
    warmup_steps: int = 6
    decay_fraction: float = 0.2
    batching: str = "packed"
    pass_tokens: int = 256
    step_groups: int = 2
    gradient_checkpointing: str = "auto"
    int4_aware: bool = False
    int4_block_size: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}' (choose from {', '.join(METHODS)})")
        if self.target_modules not in TARGET_MODULES:
            raise UserError(f"unknown target modules '{self.target_modules}' (choose from {', '.join(TARGET_MODULES)})")
        for name in ("rank", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.pass_tokens < 0:
            raise UserError(f"--pass-tokens must be >= 0 (0: a whole step per pass), got {self.pass_tokens}")
        if self.step_groups < 1:
            raise UserError(f"--step-groups must be at least 1, got {self.step_groups}")
        if self.alpha <= 0 or self.learning_rate <= 0 or not 0 <= self.dropout < 1:
            raise UserError("alpha and learning rate must be positive and dropout in [0, 1)")
        for name, choices in (("optimizer", OPTIMIZERS), ("lr_schedule", LR_SCHEDULES), ("batching", BATCHING),
                              ("gradient_checkpointing", CHECKPOINTING)):
            if getattr(self, name) not in choices:
                raise UserError(f"unknown {name.replace('_', ' ')} '{getattr(self, name)}' (choose from {', '.join(choices)})")
        if self.int4_aware:
            self.int4_grid()  # raises on a block size the export cannot use
        if self.int4_aware and self.method == "qlora":
            raise UserError("int4-aware training needs the full-precision base (QLoRA trains against nf4 weights, not "
                            "the int4 grid of the export); use --method lora with it")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.warmup_fraction < 1:
            raise UserError("weight decay and max grad norm must be >= 0, min lr ratio in [0, 1] and warm-up fraction in [0, 1)")
        if self.warmup_steps < 0 or not 0 < self.decay_fraction <= 1:
            raise UserError("warm-up steps must be >= 0 and the decay fraction in (0, 1]")

    def int4_grid(self) -> Int4Grid | None:
        """The export grid this adapter is trained against, or None for plain training."""
        return Int4Grid(self.int4_block_size, symmetric=True) if self.int4_aware else None

    @property
    def stable_steps(self) -> int:
        """Steps before the decay of a ``wsd`` run (all of them otherwise): the part a longer run shares."""
        if self.lr_schedule != "wsd":
            return self.steps
        return self.steps - max(1, round(self.steps * self.decay_fraction))

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``learning_rate`` at optimizer step ``step`` (0-based)."""
        if self.lr_schedule == "wsd":
            if step < self.warmup_steps:
                return (step + 1) / (self.warmup_steps + 1)
            if step < self.stable_steps:
                return 1.0
            progress = (step - self.stable_steps + 1) / (self.steps - self.stable_steps)
            return 1.0 - (1.0 - self.min_lr_ratio) * progress
        warmup = max(1, int(self.steps * self.warmup_fraction))
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape[self.lr_schedule]


@dataclass(frozen=True)
class TrainResult:
    """A trained adapter on disk and how training went."""

    adapter_dir: Path
    losses: tuple[float, ...]
    seconds: float
    threads: int

    @property
    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return sum(tail) / len(tail)


def load_tokenizer(base: BaseModel, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_example(example: Example, tokenizer, chat_template: bool) -> tuple[list[int], list[int]]:
    """(input ids, labels) with the prompt masked out of the loss by -100."""
    prompt_ids = tokenizer(render_prompt(example.prompt, tokenizer, chat_template), add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(example.label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def calibration_samples(splits: Splits, tokenizer) -> list[list[int]]:
    """Token ids of the training examples (prompt and answer), in a fixed shuffled order: what a
    calibrated int4 export is fitted to. Never validation or test data."""
    examples = list(splits.train)
    random.Random(0).shuffle(examples)
    return [encode_example(e, tokenizer, splits.config.chat_template)[0] for e in examples]


def load_base_for_training(base: BaseModel, spec: TrainSpec, device: str, dtype: str, trust_remote_code: bool):
    """The base model ready for peft: full precision for LoRA, nf4 for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=any(base.path.glob("*.safetensors")))
    if spec.method == "qlora":
        from transformers import BitsAndBytesConfig
        from peft import prepare_model_for_kbit_training

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(base.path, device_map={"": device}, **kwargs)
        # Gradient checkpointing trades time for memory; small models do not need it.
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = AutoModelForCausalLM.from_pretrained(base.path, **kwargs)
    return model.to(device)


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


def train_adapter(
    base: BaseModel,
    splits: Splits,
    spec: TrainSpec,
    out_dir: Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    threads: int | None = None,
    trust_remote_code: bool = False,
    checkpointing: bool | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a LoRA/QLoRA adapter and save it (peft format, safetensors) in ``out_dir``.

    The model is freed (and its memory handed back to the OS) before this returns, so the
    next stage starts with one model at most in memory.

    Args:
        base: the base checkpoint.
        splits: the data; only ``splits.train`` is used.
        spec: the training choices.
        out_dir: where the adapter is saved (written by the caller atomically).
        device: ``cpu`` or ``cuda``.
        dtype: training dtype of the frozen base weights (``float32``, ``bfloat16``, ``float16``).
        threads: torch intra-op threads; ``None`` picks the cores free right now.
        checkpointing: gradient checkpointing; ``None`` follows ``spec`` (``auto`` means off here:
            :func:`check_memory` decides it from the free memory).
        on_step: called after each optimizer step with (step, loss), e.g. for a progress bar.
    """
    import torch

    from autotune.hardware import choose_threads

    threads = choose_threads(threads)
    torch.set_num_threads(threads)
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    tokenizer = load_tokenizer(base, trust_remote_code)
    encoded = [encode_example(e, tokenizer, splits.config.chat_template) for e in splits.train]
    if checkpointing is None:
        checkpointing = spec.gradient_checkpointing == "on"
    model = _peft_model(base, spec, device, dtype, trust_remote_code, checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer_class = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[spec.optimizer]
    optimizer = optimizer_class(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, spec.lr_factor)
    # A model with its own code may not build its mask from packed position ids; padding gives the same loss.
    packed = spec.batching == "packed" and not trust_remote_code
    order = _batches(len(encoded), spec.batch_size, spec.steps, spec.seed)
    losses: list[float] = []
    start = time.perf_counter()
    for step, indices in enumerate(order):
        loss = accumulate_gradients(model, [encoded[i] for i in indices], tokenizer.pad_token_id, device, packed,
                                    spec.pass_tokens, spec.step_groups)
        if not math.isfinite(loss):
            raise UserError(f"training diverged (loss {loss}) at step {step}; lower the learning rate")
        if spec.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        trim_heap()  # packed lengths vary per step; without this glibc's heap grows ~0.3 GB by fragmentation
        if on_step is not None:
            on_step(step + 1, losses[-1])
    seconds = time.perf_counter() - start

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del model, optimizer, scheduler, params
    release_memory()
    result = TrainResult(adapter_dir=out_dir, losses=tuple(losses), seconds=seconds, threads=threads)
    (out_dir / "train_log.json").write_text(json.dumps(
        {"spec": asdict(spec), "losses": losses, "seconds": seconds, "threads": threads, "checkpointing": checkpointing},
        indent=1))
    return result


def _peft_model(base: BaseModel, spec: TrainSpec, device: str, dtype: str, trust_remote_code: bool, checkpointing: bool):
    from peft import LoraConfig, get_peft_model

    model = load_base_for_training(base, spec, device, dtype, trust_remote_code)
    if checkpointing:
        # Non-reentrant checkpointing needs no input grads and replays dropout masks exactly.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=TARGET_MODULES[spec.target_modules],
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise UserError(f"LoRA target modules '{spec.target_modules}' do not exist in {base.architecture} ({exc})") from exc
    model.dropout_layout = padded_layout_dropout(model)
    use_packed_attention(model.get_base_model())
    if spec.int4_aware:
        quantization_aware(model, spec.int4_grid())
    model.train()
    return model


def quantization_aware(model, grid: Int4Grid) -> None:
    """Make a peft model compute with the int4 weights its export will ship.

    A LoRA-wrapped Linear computes ``x @ fake_quantize(W + s * B @ A)``: the merged weight
    rounded to the export grid, with a straight-through gradient to A and B. Every other
    Linear the builder quantizes (the layers LoRA does not wrap and the LM head, which is
    the tied embedding in SmolLM2-like models) is frozen, so it is rounded once, in place.
    After a normal merge, the builder's int4 weights equal what training computed with.
    LoRA dropout stays a regulariser of the adapter's path only: the noise term
    ``s * B @ A (dropout(x) - x)`` is zero in expectation and absent at export.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    wrapped = set()
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.base_layer, torch.nn.Linear):
            module.forward = _int4_forward(module, grid)
            wrapped.add(id(module.base_layer))
    with torch.no_grad():
        for name, module in model.named_modules():
            # The builder quantizes the decoder's MatMuls and the LM head; embeddings are Gathers (a tied
            # one shares the LM head's weight, so rounding the head rounds both, as the export does).
            if isinstance(module, torch.nn.Linear) and id(module) not in wrapped and _exported_as_int4(name):
                module.weight.copy_(fake_quantize(module.weight, grid))


def _exported_as_int4(name: str) -> bool:
    parts = name.split(".")
    if any(part.startswith("lora_") for part in parts):  # the adapter's own A and B
        return False
    return "layers" in parts or parts[-1] == "lm_head"


def _int4_forward(layer, grid: Int4Grid):
    import torch
    import torch.nn.functional as F

    cached = {"key": None, "weight": None}
    lock = threading.Lock()  # a step's groups may run at once: one computes, the other waits for it

    def rounded(dtype):
        """``fake_quantize(W + s * B @ A)``, computed once per value of A and B (once per optimizer step, not
        once per part of a step and again in each checkpointed recompute)."""
        (adapter,) = layer.active_adapters
        base, a, b = layer.base_layer.weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        key = (adapter, dtype, a._version, b._version, base._version)  # an optimizer step updates A and B in place
        with lock:
            if cached["key"] != key:
                cached["weight"] = None  # the old copy goes before the new one is made
                with torch.no_grad():
                    # In fp32, as the export merges and rounds (a bf16 base on a GPU is exact to within its own rounding).
                    merged = base.float() + layer.scaling[adapter] * (b.float() @ a.float())
                    cached["key"], cached["weight"] = key, fake_quantize(merged, grid).to(dtype)
            return cached["weight"]

    def forward(x, *args, **kwargs):
        (adapter,) = layer.active_adapters
        a, b, scaling = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.scaling[adapter]
        y = F.linear(x, rounded(x.dtype), layer.base_layer.bias)
        if not torch.is_grad_enabled() or not a.requires_grad:
            return y  # eval, or a frozen adapter: exactly the rounded weight's output
        # The straight-through gradient: d loss / d(W + s * B @ A) is d loss / d(rounded weight), so A and B
        # get the LoRA path's gradients on x, and x its own through the rounded weight. One LoRA pass carries
        # them: on ``x.detach()``, minus its own value (so it adds zero). In training, LoRA dropout's noise
        # ``s * B @ A (dropout(x) - x)`` rides on the same pass (zero in expectation, absent at export).
        x_a = x.to(a.dtype)
        source, offset = x_a.detach(), None
        dropout = layer.lora_dropout[adapter]
        if layer.training and getattr(dropout, "p", 0.0) > 0:
            source = (dropout(x_a) - x_a) + source
            with torch.no_grad():
                offset = scaling * F.linear(F.linear(x_a, a), b)
        lora = scaling * F.linear(F.linear(source, a), b)
        return y + (lora - (lora.detach() if offset is None else offset)).to(y.dtype)

    return forward


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


def read_train_log(adapter_dir: Path) -> TrainResult:
    """The :class:`TrainResult` of an adapter trained earlier (for cache hits)."""
    log = json.loads((adapter_dir / "train_log.json").read_text())
    return TrainResult(adapter_dir, tuple(log["losses"]), log["seconds"], log["threads"])


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Shuffled epochs, cut into ``steps`` batches (an epoch boundary may fall mid-batch)."""
    rng = random.Random(seed)
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        epoch = list(range(n))
        rng.shuffle(epoch)
        stream += epoch
    return [stream[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def accumulate_gradients(model, batch: Sequence[tuple[list[int], list[int]]], pad_id: int, device: str, packed: bool,
                         pass_tokens: int = 0, groups: int = 1) -> float:
    """Forward and backward of one step's batch; returns its mean answer-token loss.

    The batch is cut into ``groups`` consecutive groups of examples of about equal tokens, and each
    group runs in consecutive parts of at most ``pass_tokens`` computed tokens (0: in one pass; an
    example longer than that is a part of its own). Each part's loss is weighted by its share of
    the answer tokens, and every part draws its dropout masks where its rows sit in the whole
    batch (:class:`~autotune.packing.DropoutLayout`): the gradients are the whole batch's, whatever
    the split or the packing, while the activations held at once are bounded by the parts.

    Each group's gradient is computed on its own and the groups' are summed in order into
    ``.grad``, so the numbers do not depend on how the groups run: on a CPU with two or more torch
    threads they run at once, each on its share of the threads (two one-thread streams of small
    ops keep two cores busier than one two-thread stream, whose every op waits for both threads).
    """
    import torch

    scored = [sum(t != -100 for t in labels[1:]) for _, labels in batch]
    total, width = sum(scored), max(len(ids) for ids, _ in batch)
    lengths = [len(ids) for ids, _ in batch]
    layout = model.dropout_layout
    layout.seed = int(torch.randint(-2**31, 2**31 - 1, ()))
    params = [p for p in model.parameters() if p.requires_grad]

    def group_gradients(first_example: int, last_example: int, threads: int | None = None):
        if threads is not None:  # a worker thread: its own share of the cores
            torch.set_num_threads(threads)
        loss_sum, grads = 0.0, None
        for first, last in consecutive_parts(lengths[first_example:last_example], packed, pass_tokens):
            first, last = first + first_example, last + first_example
            part = batch[first:last]
            with layout.batch(lengths[first:last], packed, first_row=first, width=width):
                loss = _packed_loss(model, part, device) if packed else _padded_loss(model, part, pad_id, device)
                share = sum(scored[first:last]) / total
                # Inside the layout: a checkpointed layer's recompute draws the same masks.
                part_grads = torch.autograd.grad(loss * share, params, allow_unused=True)
            grads = part_grads if grads is None else [_add(a, b) for a, b in zip(grads, part_grads)]
            loss_sum += loss.item() * share
        return loss_sum, grads

    spans = _groups(lengths, groups)
    threads = torch.get_num_threads()
    if len(spans) > 1 and device == "cpu" and threads >= 2:
        from concurrent.futures import ThreadPoolExecutor

        share = max(1, threads // len(spans))
        try:
            with ThreadPoolExecutor(len(spans)) as pool:
                results = list(pool.map(lambda span: group_gradients(*span, threads=share), spans))
        finally:
            torch.set_num_threads(threads)
    else:
        results = [group_gradients(*span) for span in spans]
    for param, *grads in zip(params, *(grads for _, grads in results)):
        for grad in grads:  # in the groups' order, onto whatever .grad holds already
            param.grad = _add(param.grad, grad)
    return sum(loss for loss, _ in results)


def _add(a, b):
    """``a + b`` where either may be None (a parameter no example reached)."""
    return b if a is None else a if b is None else a + b


def _groups(lengths: Sequence[int], groups: int) -> list[tuple[int, int]]:
    """``groups`` consecutive, non-empty (first, last) example ranges of about equal tokens (fewer if
    there are fewer examples)."""
    groups = max(1, min(groups, len(lengths)))
    ends = list(itertools.accumulate(lengths))
    cuts = [0]
    for g in range(1, groups):
        target = ends[-1] * g / groups
        # The boundary closest to the target that leaves every group at least one example.
        cut = min(range(cuts[-1] + 1, len(lengths) - (groups - g) + 1), key=lambda k: abs(ends[k - 1] - target))
        cuts.append(cut)
    return list(zip(cuts, [*cuts[1:], len(lengths)]))


def _packed_loss(model, batch: Sequence[tuple[list[int], list[int]]], device: str):
    """Mean answer-token loss of a batch packed into one row, logits only where a label is scored.

    Each example keeps its own position ids (restarting at 0) and attends only within itself
    (:func:`~autotune.packing.packed_attention`; other attention kinds get a block-diagonal
    mask that transformers builds from the position ids), exactly as in a padded batch, but
    no compute goes to padding. The vocab-wide head runs on the scored positions only (a few
    per example) instead of every token.
    """
    import torch

    inputs = packed_inputs([ids for ids, _ in batch], device)  # cu_seq_lens_q: packed_attention attends within each
    positions = inputs["position_ids"][0].tolist()
    targets = [t for _, labels in batch for t in labels]
    # The logit at position i predicts token i + 1; an example's last position predicts nothing.
    keep = [i for i in range(len(targets) - 1) if targets[i + 1] != -100 and positions[i + 1] != 0]
    logits = model(**inputs, logits_to_keep=torch.tensor(keep, device=device),
                   use_cache=False).logits  # a cache would hide the packed positions from the mask builder
    gold = torch.tensor([targets[i + 1] for i in keep], device=device)
    return torch.nn.functional.cross_entropy(logits[0].float(), gold)


def _padded_loss(model, batch: Sequence[tuple[list[int], list[int]]], pad_id: int, device: str):
    """Mean answer-token loss of a batch padded to its longest example (one row each).

    The vocab-wide head runs only at the positions where some row scores an answer token.
    """
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, target) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(target)] = torch.tensor(target)
        attention[row, : len(ids)] = 1
    # The logit at position i predicts token i + 1.
    keep = (labels[:, 1:] != -100).any(dim=0).nonzero().flatten()
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), logits_to_keep=keep.to(device),
                   use_cache=False).logits
    gold = labels[:, keep + 1].to(device)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), gold.flatten(), ignore_index=-100)
