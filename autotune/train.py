"""Fine-tune a LoRA (or QLoRA) adapter on the training split: one readable loop.

The loss covers only the answer tokens (the label and EOS), never the prompt, so the
model learns to answer rather than to parrot the template. Runs are seeded; threads are
chosen from the cores that are actually free, since oversubscribing the cores made
training steps 10-30x slower on a 2-core machine.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from autotune import tokens, trajectory
from autotune.cache import whole_floats
from autotune.data import Example, Splits, render_prompt
from autotune.errors import UserError
from autotune.gradients import accumulate_gradients
from autotune.int4_aware import quantization_aware
from autotune.memory import release_memory, trim_heap
from autotune.models import BaseModel, load_causal_lm
from autotune.packing import padded_layout_dropout, use_packed_attention
from autotune.quantize import Int4Grid

# Bump when a change to this module or to the ones it trains with (autotune.gradients, autotune.int4_aware,
# autotune.packing) changes the adapters it trains: it is part of every adapter's cache key. 3: each packed
# example attends on its own, in fp32 on the CPU. 4: int4-aware adapters get their straight-through gradients
# from one LoRA pass, and a step's gradients are summed group by group (the same gradients, summed in another
# order). 5: fp16 training scales its loss (dynamic, torch.amp.GradScaler). 6: a QLoRA base loads without the
# Hub's kernels (models.load_causal_lm), which transformers 5 swapped in where it could fetch them.
CODE_VERSION = 6
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
    :func:`~autotune.int4_aware.quantization_aware`), so the adapter learns to land well on that
    grid (symmetric, the builder's default rounding: one int4-aware adapter per block size).
    ``step_groups`` cuts each step's batch into that many groups of examples, each with its own
    gradient, summed in order (:func:`~autotune.gradients.accumulate_gradients`): on a CPU with
    two or more threads the groups run at once; ``pass_tokens`` bounds the tokens of each forward
    pass within a group.
    Training against fp16 frozen weights (the ``cuda`` profile: GPUs without bf16) scales the loss, so
    that small gradients do not underflow fp16 on their way back (:func:`loss_scaler`): by
    ``loss_scale`` at first, halved when a step's gradients overflow (that step is skipped), doubled
    after ``loss_scale_growth`` steps without. bf16 and fp32 have fp32's range and are not scaled.
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
    loss_scale: float = 2.0**16
    loss_scale_growth: int = 2000

    def __post_init__(self) -> None:
        whole_floats(self)
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
        if not self.loss_scale >= 1 or self.loss_scale_growth < 1:
            raise UserError("the loss scale must be >= 1 and its growth interval at least 1 step")

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
    resumed_at_step: int = 0  # where training started: a shorter run's checkpoint (autotune.trajectory), or 0

    @property
    def steps_computed(self) -> int:
        """The optimizer steps this run computed itself."""
        return len(self.losses) - self.resumed_at_step

    @property
    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return sum(tail) / len(tail)


def load_tokenizer(base: BaseModel, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = tokens.for_runtime(AutoTokenizer.from_pretrained(base.path, trust_remote_code=trust_remote_code))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_example(example: Example, tokenizer, chat_template: bool) -> tuple[list[int], list[int]]:
    """(input ids, labels) with the prompt masked out of the loss by -100 (:func:`autotune.tokens.encode`)."""
    return tokens.encode(tokenizer, render_prompt(example.prompt, tokenizer, chat_template), example.label)


def calibration_samples(splits: Splits, tokenizer) -> list[list[int]]:
    """Token ids of the training examples (prompt and answer), in a fixed shuffled order: what a
    calibrated int4 export is fitted to. Never validation or test data."""
    examples = list(splits.train)
    random.Random(0).shuffle(examples)
    return [encode_example(e, tokenizer, splits.config.chat_template)[0] for e in examples]


def load_base_for_training(base: BaseModel, spec: TrainSpec, device: str, dtype: str, trust_remote_code: bool):
    """The base model ready for peft: full precision for LoRA, nf4 for QLoRA."""
    import torch

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
        model = load_causal_lm(base.path, device_map={"": device}, **kwargs)
        # Gradient checkpointing trades time for memory; small models do not need it.
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if kwargs["use_safetensors"]:
        from autotune.checkpoint import load_model

        # One layer read at a time: from_pretrained holds the whole fp32 file beside a bf16 copy while it converts.
        return load_model(base.path, torch_dtype, device, trust_remote_code=trust_remote_code)
    return load_causal_lm(base.path, **kwargs).to(device)





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



def loss_scaler(spec: TrainSpec, device: str, dtype: str):
    """A ``torch.amp.GradScaler`` for training against fp16 weights, None for bf16 and fp32 (fp32's range:
    nothing underflows that fp32 keeps)."""
    if dtype != "float16":
        return None
    import torch

    return torch.amp.GradScaler(device, init_scale=spec.loss_scale, growth_interval=spec.loss_scale_growth)


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Shuffled epochs, cut into ``steps`` batches (an epoch boundary may fall mid-batch)."""
    rng = random.Random(seed)
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        epoch = list(range(n))
        rng.shuffle(epoch)
        stream += epoch
    return [stream[i * batch_size : (i + 1) * batch_size] for i in range(steps)]

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
    resume_from: Path | None = None,
    checkpoint_to: Path | None = None,
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
            :func:`~autotune.memory.check_memory` decides it from the free memory).
        on_step: called after each optimizer step with (step, loss), e.g. for a progress bar.
        resume_from: a stable-phase checkpoint of the same adapter (:mod:`autotune.trajectory`) at or
            before ``spec.stable_steps``: training continues from there, to the same adapter.
        checkpoint_to: where to save the state at ``spec.stable_steps``, for a longer run to continue.
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
    # A model with its own code may not build its mask from packed position ids; padding gives the same loss.
    packed = spec.batching == "packed" and not trust_remote_code
    order = _batches(len(encoded), spec.batch_size, spec.steps, spec.seed)
    scaler = loss_scaler(spec, device, dtype)
    first, losses = trajectory.load(resume_from, model, optimizer, scaler) if resume_from else (0, [])
    skipped = 0
    start = time.perf_counter()
    for step in range(first, spec.steps):
        for group in optimizer.param_groups:  # what LambdaLR(optimizer, spec.lr_factor) sets, from any step
            group["lr"] = spec.learning_rate * spec.lr_factor(step)
        scale = scaler.scale(torch.ones((), device=device)) if scaler else None  # this step's loss scale
        loss = accumulate_gradients(model, [encoded[i] for i in order[step]], tokenizer.pad_token_id, device, packed,
                                    spec.pass_tokens, spec.step_groups, scale)
        if not math.isfinite(loss):
            raise UserError(f"training diverged (loss {loss}) at step {step}; lower the learning rate")
        if scaler:
            scaler.unscale_(optimizer)  # the gradients' true size, for clipping; an overflow is noted
        if spec.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        if scaler:
            before = scaler.get_scale()
            scaler.step(optimizer)  # skipped if the scaled gradients overflowed fp16
            scaler.update()
            skipped += scaler.get_scale() < before
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        trim_heap()  # packed lengths vary per step; without this glibc's heap grows ~0.3 GB by fragmentation
        if checkpoint_to is not None and step + 1 == spec.stable_steps < spec.steps:
            trajectory.save(checkpoint_to, model, optimizer, step + 1, losses, scaler)
        if on_step is not None:
            on_step(step + 1, losses[-1])
    seconds = time.perf_counter() - start

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del model, optimizer, params
    release_memory()
    result = TrainResult(adapter_dir=out_dir, losses=tuple(losses), seconds=seconds, threads=threads,
                         resumed_at_step=first)
    (out_dir / "train_log.json").write_text(json.dumps(
        {"spec": asdict(spec), "losses": losses, "seconds": seconds, "threads": threads, "checkpointing": checkpointing,
         "resumed_at_step": first, "loss_scale": scaler.get_scale() if scaler else None,
         "overflow_steps_skipped": skipped if scaler else None}, indent=1))
    return result

def read_train_log(adapter_dir: Path) -> TrainResult:
    """The :class:`TrainResult` of an adapter trained earlier (for cache hits)."""
    log = json.loads((adapter_dir / "train_log.json").read_text())
    return TrainResult(adapter_dir, tuple(log["losses"]), log["seconds"], log["threads"], log.get("resumed_at_step", 0))
