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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from autotune.data import Example, Splits, render_prompt
from autotune.errors import CandidateError, UserError
from autotune.models import BaseModel

# Bump when a change to this module changes the adapters it trains: it is part of every adapter's cache key.
CODE_VERSION = 1
METHODS = ("lora", "qlora")
TARGET_MODULES = {
    "all-linear": "all-linear",
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj", "gate_up_proj"],
}


@dataclass(frozen=True)
class TrainSpec:
    """The training choices of one candidate (everything that changes the adapter).

    ``alpha`` is the LoRA scale numerator: the update is scaled by ``alpha / rank``.
    ``target_modules`` is ``all-linear``, ``attention`` or ``mlp``.
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

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}' (choose from {', '.join(METHODS)})")
        if self.target_modules not in TARGET_MODULES:
            raise UserError(f"unknown target modules '{self.target_modules}' (choose from {', '.join(TARGET_MODULES)})")
        for name in ("rank", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.alpha <= 0 or self.learning_rate <= 0 or not 0 <= self.dropout < 1:
            raise UserError("alpha and learning rate must be positive and dropout in [0, 1)")


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


def check_memory(base: BaseModel, spec: TrainSpec, device: str, dtype: str, headroom: float) -> None:
    """Refuse to start training that would not fit in free RAM / VRAM (before loading anything).

    The estimate is the frozen weights at the training precision (nf4 for QLoRA) plus a
    third for activations, LoRA weights and optimizer state, which is generous for the
    short prompts of classification data.
    """
    import psutil

    fp32_bytes = base.size_bytes
    per_weight = 0.15 if spec.method == "qlora" else (0.5 if dtype in ("bfloat16", "float16") else 1.0)
    need = fp32_bytes * per_weight * 1.33 + 2**28
    if device == "cuda":
        import torch

        free = torch.cuda.mem_get_info()[0]
        where = "GPU memory"
    else:
        free = psutil.virtual_memory().available
        where = "RAM"
    if need > free * headroom:
        raise CandidateError(
            f"not enough free {where} to train {spec.method} on {base.name}: about {need / 2**30:.1f} GiB needed, "
            f"{free / 2**30:.1f} GiB free ({headroom:.0%} usable); close other programs or use --method qlora"
        )


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
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a LoRA/QLoRA adapter and save it (peft format, safetensors) in ``out_dir``.

    Args:
        base: the base checkpoint.
        splits: the data; only ``splits.train`` is used.
        spec: the training choices.
        out_dir: where the adapter is saved (written by the caller atomically).
        device: ``cpu`` or ``cuda``.
        dtype: training dtype of the frozen base weights (``float32``, ``bfloat16``, ``float16``).
        threads: torch intra-op threads; ``None`` picks the cores free right now.
        on_step: called after each optimizer step with (step, loss), e.g. for a progress bar.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from autotune.hardware import choose_threads

    threads = choose_threads(threads)
    torch.set_num_threads(threads)
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    tokenizer = load_tokenizer(base, trust_remote_code)
    encoded = [encode_example(e, tokenizer, splits.config.chat_template) for e in splits.train]

    model = load_base_for_training(base, spec, device, dtype, trust_remote_code)
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
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0)
    warmup = max(1, int(spec.steps * spec.warmup_fraction))

    def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, spec.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    order = _batches(len(encoded), spec.batch_size, spec.steps, spec.seed)
    losses: list[float] = []
    start = time.perf_counter()
    for step, indices in enumerate(order):
        input_ids, labels, attention = _collate([encoded[i] for i in indices], tokenizer.pad_token_id, device)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        if not torch.isfinite(loss):
            raise UserError(f"training diverged (loss {loss.item()}) at step {step}; lower the learning rate")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    seconds = time.perf_counter() - start

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    result = TrainResult(adapter_dir=out_dir, losses=tuple(losses), seconds=seconds, threads=threads)
    (out_dir / "train_log.json").write_text(
        json.dumps({"spec": asdict(spec), "losses": losses, "seconds": seconds, "threads": threads}, indent=1)
    )
    return result


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


def _collate(items: Sequence[tuple[list[int], list[int]]], pad_id: int, device: str):
    import torch

    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, target) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(target)] = torch.tensor(target)
        attention[row, : len(ids)] = 1
    return input_ids.to(device), labels.to(device), attention.to(device)
