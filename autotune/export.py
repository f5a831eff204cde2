"""Merge an adapter into its base and export a deployable onnxruntime-genai folder.

The export is the onnxruntime-genai model builder, called in-process (it saves several
seconds of imports per export over ``python -m onnxruntime_genai.models.builder``). The
result is a folder an app loads as is with ``og.Model(folder)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from autotune.errors import CandidateError, UserError
from autotune.models import BaseModel
from autotune.quantize import BLOCK_SIZES
from autotune.memory import calibrate_need, export_need, free_memory, merge_need, release_memory

# Bump when a change to this module, autotune.quantize or autotune.gptq changes the models it exports: it is part of
# every export's cache key. 3: GPTQ calibrates on packed samples and rounds Linears sharing an input as one matrix.
# 4: GPTQ's inverse Hessian factor from one Cholesky factorisation, its errors spread in lazy batches of 128 columns.
# 5: GPTQ spreads the original weight's errors by a factor of the Hessian itself (the same codes in exact
# arithmetic; fp32 rounding differs).
CODE_VERSION = 5
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
INT4_ALGOS = ("default", "rtn", "k_quant")
# int8_layers -> the builder's matmul_mixed_precision selectors kept at int8 in an int4 model.
INT8_LAYERS = {"none": "", "last": "last_matmul:int8", "mixed": "last_matmul:int8,mixed_layers:int8"}
CALIBRATIONS = ("none", "gptq")
# Bytes per weight on disk, for the free-disk check before an export.
_BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.1, "int4": 0.6}


@dataclass(frozen=True)
class ExportSpec:
    """The export choices of one candidate.

    ``block_size``, ``accuracy_level``, ``algo`` and ``symmetric`` apply to the weight-only
    quantized precisions (int4, int8) only; ``int8_layers`` and ``calibration`` to int4 only.
    :meth:`normalized` resets what does not apply, so that equal exports hash equally.
    ``accuracy_level`` 0 leaves the builder's default for the EP.

    ``int8_layers`` keeps the most rounding-sensitive MatMuls at int8 inside an int4 model:
    ``last`` the LM head (the tied embedding too), ``mixed`` also llama.cpp's "mixed" set (the
    first and last eighth of the layers and every third layer's qkv/v/down projections).
    ``calibration`` ``gptq`` chooses the int4 weights ourselves, by GPTQ on the task's own
    training prompts (``calibration_samples`` of them, Hessian damping
    ``calibration_damping``, packed ``calibration_tokens_per_pass`` tokens to a forward), and hands
    them to the builder as a pre-quantized checkpoint.
    """

    precision: str = "int4"
    execution_provider: str = "cpu"
    block_size: int = 32
    accuracy_level: int = 4
    algo: str = "default"
    symmetric: bool = True
    int8_layers: str = "none"
    calibration: str = "none"
    calibration_samples: int = 128
    calibration_damping: float = 0.01
    calibration_tokens_per_pass: int = 2048

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision '{self.precision}' (choose from {', '.join(PRECISIONS)})")
        if self.block_size not in BLOCK_SIZES:
            raise UserError(f"int4 block size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UserError(f"accuracy level must be 0-4, got {self.accuracy_level}")
        if self.algo not in INT4_ALGOS:
            raise UserError(f"unknown quantization algo '{self.algo}' (choose from {', '.join(INT4_ALGOS)})")
        if self.int8_layers not in INT8_LAYERS:
            raise UserError(f"unknown int8 layers '{self.int8_layers}' (choose from {', '.join(INT8_LAYERS)})")
        if self.calibration not in CALIBRATIONS:
            raise UserError(f"unknown calibration '{self.calibration}' (choose from {', '.join(CALIBRATIONS)})")
        if self.calibration != "none" and (self.algo != "default" or self.int8_layers != "none"):
            raise UserError("a calibrated int4 export chooses its own weights: use it with algo default and int8 layers none")
        if self.calibration_samples < 1 or not 0 < self.calibration_damping < 1 or self.calibration_tokens_per_pass < 1:
            raise UserError("calibration samples and tokens per pass must be at least 1 and damping in (0, 1)")

    @property
    def quantized(self) -> bool:
        return self.precision in ("int4", "int8")

    def normalized(self) -> "ExportSpec":
        if not self.quantized:
            return ExportSpec(self.precision, self.execution_provider, 32, 0, "default")
        # The calibration constants at their defaults where no calibration runs.
        uncalibrated = {f.name: f.default for f in dataclasses.fields(self) if f.name.startswith("calibration_")}
        if self.precision == "int8":  # the int4 knobs (an asymmetric int8 is not searched either)
            return dataclasses.replace(self, symmetric=True, int8_layers="none", calibration="none", **uncalibrated)
        if self.calibration == "none":
            return dataclasses.replace(self, **uncalibrated)
        return self

    def builder_options(self) -> list[str]:
        """``KEY=VALUE`` extra options for the builder (0.18's names: the old ``int4_*`` ones are ignored)."""
        if not self.quantized:
            return []
        options = [f"block_size={self.block_size}", f"algo_config={self.algo}"]
        if self.accuracy_level:
            options.append(f"accuracy_level={self.accuracy_level}")
        if not self.symmetric:
            options.append("is_symmetric=false")
        if self.int8_layers != "none":
            options.append(f"matmul_mixed_precision={INT8_LAYERS[self.int8_layers]}")
        if self.unshared_embeddings:
            options.append("shared_embeddings=false")
        return options

    @property
    def prequantized(self) -> bool:
        """Whether we write the int4 weights and the builder only packs them (:func:`prequantize`): a
        calibrated export, or an asymmetric rounding that builder 0.18 cannot share with a tied embedding."""
        return self.precision == "int4" and (
            self.calibration != "none" or (not self.symmetric and self.algo != "k_quant" and self.int8_layers == "none"))

    @property
    def unshared_embeddings(self) -> bool:
        """Builder 0.18 writes graphs that do not load for a tied embedding beside an int8 LM head with its
        default/rtn quantizer (k_quant is fine), so those keep the input embedding as its own float table: a
        working model, bigger on disk (measured, so the search sees it). (Its asymmetric int4 of a tied table
        fails too; that one is :attr:`prequantized` instead, and stays shared.)"""
        return self.precision == "int4" and self.algo != "k_quant" and self.int8_layers != "none"

    def label(self) -> str:
        if not self.quantized:
            return self.precision
        extras = [] if self.algo == "default" else [self.algo]
        extras += [] if self.symmetric else ["asym"]
        extras += [] if self.int8_layers == "none" else [f"int8-{self.int8_layers}"]
        extras += [] if self.calibration == "none" else [self.calibration]
        return " ".join([f"{self.precision} b{self.block_size} a{self.accuracy_level}", *extras])


def merge_adapter(base: BaseModel, adapter_dir: Path, out_dir: Path, *, trust_remote_code: bool = False,
                  device: str = "cpu") -> Path:
    """Fold a LoRA/QLoRA adapter into the full-precision base and save it as safetensors, one decoder layer at a time.

    Each Linear the adapter wraps becomes ``W + (B @ A) * scaling`` in fp32, the operations of
    peft's ``merge_and_unload`` in its order (bit for bit the same weights), computed on ``device``.
    Only one layer of the base is in memory at once, so the merge never holds two copies of the model.
    QLoRA adapters are merged into the fp32 base too, never into the 4-bit model: merging there
    re-quantizes, and the builder cannot read the result.

    Raises:
        UserError: an adapter autotune did not train (DoRA, biases, saved modules, per-module ranks), or
            one whose modules are not in the base checkpoint.
    """
    return merge_adapters(base, [(adapter_dir, 1.0)], out_dir, trust_remote_code=trust_remote_code, device=device)


def merge_adapters(base: BaseModel, adapters: Sequence[tuple[Path, float]], out_dir: Path, *,
                   trust_remote_code: bool = False, device: str = "cpu") -> Path:
    """:func:`merge_adapter` for a weighted sum of adapters of one base: ``W + sum_i w_i * (B_i @ A_i) * scaling_i``.

    Weights of ``1 / k`` make the uniform soup of ``k`` fine-tunes (the mean of their updates: Wortsman et al.,
    "Model soups", 2022), one model of the base's size; a single adapter of weight 1 is :func:`merge_adapter`,
    bit for bit. The tokenizer is the first adapter's.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from autotune.checkpoint import Checkpoint, write_checkpoint

    if not adapters:
        raise ValueError("merge_adapters needs at least one adapter")
    config = AutoConfig.from_pretrained(base.path, trust_remote_code=trust_remote_code)
    checkpoint = Checkpoint(base.path)
    # A tied head is the embedding: save_pretrained writes the table once, and so does this.
    skip = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    deltas: dict[str, list] = {}  # module name -> [(A, B, scaling * weight)], in the adapters' order
    for adapter_dir, weight in adapters:
        scaling, pairs = _lora_pairs(adapter_dir, load_file(adapter_dir / "adapter_model.safetensors"))
        unknown = sorted(f"{name}.weight" for name in pairs if f"{name}.weight" not in checkpoint)
        if unknown:
            raise UserError(f"the adapter in {adapter_dir} wraps {', '.join(unknown[:3])}, which {base.path} does not "
                            f"have; merge it into the base it was trained on")
        for name, (a, b) in pairs.items():
            deltas.setdefault(name, []).append((a, b, scaling * weight))  # x 1.0 is exact: peft's scaling

    def merge(tensors: dict) -> dict:  # a function of its own: no loop variable outlives the group
        for name, weight in tensors.items():
            for a, b, scale in deltas.get(name.removesuffix(".weight"), ()):
                weight += (b.to(device) @ a.to(device)) * scale  # peft's get_delta_weight, then its in-place add
        return tensors

    def merged_layers():
        for group in checkpoint.groups():
            tensors = merge(checkpoint.read([name for name in group if name not in skip], torch.float32, device))
            yield tensors
            del tensors  # written: free it before the next group is read

    write_checkpoint(out_dir, merged_layers())
    config.dtype = "float32"  # what the weights now are, whatever the base stored
    config.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(adapters[0][0], trust_remote_code=trust_remote_code).save_pretrained(out_dir)
    if (base.path / "generation_config.json").is_file():
        shutil.copy2(base.path / "generation_config.json", out_dir / "generation_config.json")
    else:  # what save_pretrained writes for a model loaded without one (the builder reads its special tokens)
        GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    release_memory()
    return out_dir


# What a plain LoRA adapter's config may say; anything else changes the merge (DoRA, biases, saved modules, ...).
_PLAIN_LORA = {"peft_type": "LORA", "use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
               "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None,
               "trainable_token_indices": None, "target_parameters": None}


def _lora_pairs(adapter_dir: Path, tensors: dict) -> tuple[float, dict]:
    """(scaling, {module name: (A, B)}) of a plain peft LoRA adapter (names as in the base model's state dict)."""
    import math

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    odd = [key for key, plain in _PLAIN_LORA.items()
           if config.get(key, plain) != plain and (config.get(key) or plain)]  # None, {} and [] say "none" alike
    if odd:
        raise UserError(f"{adapter_dir} is not a plain LoRA adapter ({', '.join(odd)}); merge it with peft's merge_and_unload")
    pairs: dict[str, list] = {}
    for name, tensor in tensors.items():
        module, _, part = name.removeprefix("base_model.model.").rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise UserError(f"{adapter_dir} is not a plain LoRA adapter ({name}); merge it with peft's merge_and_unload")
        pairs.setdefault(module, [None, None])["AB".index(part[0])] = tensor.float()
    rank = config["r"]
    scaling = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)  # peft's update_layer
    return scaling, {module: tuple(pair) for module, pair in pairs.items()}


def prequantize(hf_dir: Path, out_dir: Path, spec: ExportSpec, samples: list[list[int]] = (), *,
                trust_remote_code: bool = False, on_layer=None, device: str = "cpu", dtype: str = "float32") -> Path:
    """Write the int4 weights of ``hf_dir`` ourselves, as a pre-quantized checkpoint in ``out_dir``
    that the builder exports unchanged (see :mod:`autotune.quantize`).

    With ``calibration`` ``gptq`` the weights are chosen by GPTQ on ``samples``, reading the model one
    decoder layer at a time (:func:`~autotune.gptq.gptq_checkpoint`; its forwards on ``device`` in
    ``dtype``); otherwise they are the builder's own rounding (:func:`~autotune.quantize.quantize_rtn`,
    bit-exact), which is how an asymmetric int4 of a tied model keeps one shared int4 table.
    """
    from autotune.quantize import Int4Grid, write_prequantized

    grid = Int4Grid(spec.block_size, spec.symmetric)
    weights = {}
    if spec.calibration == "gptq":
        from autotune.gptq import gptq_checkpoint

        weights = gptq_checkpoint(hf_dir, list(samples[: spec.calibration_samples]), grid, spec.calibration_damping,
                                  on_layer, spec.calibration_tokens_per_pass, device=device, dtype=dtype,
                                  trust_remote_code=trust_remote_code)
        release_memory()
    return write_prequantized(hf_dir, out_dir, weights, grid)


def export_stage_needs(base: BaseModel, spec: ExportSpec, lengths: Sequence[int] = (), rank: int | None = 16) -> dict[str, int]:
    """Bytes each stage after training adds at its peak (:mod:`autotune.memory`), for ``spec`` with calibration
    samples of ``lengths`` tokens: ``merge`` (of an adapter of ``rank``; None: no adapter), ``calibrate`` (a
    pre-quantized int4) and ``export`` (the builder)."""
    needs = {"merge": merge_need(base, rank)} if rank is not None else {}
    if spec.prequantized:
        needs["calibrate"] = calibrate_need(base, spec, lengths)
    needs["export"] = export_need(base, spec)
    return needs


def check_export_memory(base: BaseModel, headroom: float, needs: dict[str, int] | None = None) -> None:
    """Refuse a model whose merge and export cannot fit in free RAM, before that work starts.

    ``needs`` are the stages' predicted peaks (:func:`export_stage_needs`); without them, what the
    cheapest export of ``base`` needs (an int4 whose weights autotune writes: merge, then the builder).

    Raises:
        CandidateError: with the memory needed and free (exit code 2 from the CLI).
    """
    if needs is None:
        needs = export_stage_needs(base, ExportSpec("int4", symmetric=False))
    stage, need = max(needs.items(), key=lambda item: item[1])
    free, _ = free_memory("cpu")
    if need > free * headroom:
        raise CandidateError(
            f"not enough free RAM to {stage} {base.name}: about {need / 2**30:.1f} GiB needed, "
            f"{free / 2**30:.1f} GiB free ({headroom:.0%} usable); close other programs or choose a smaller --model"
        )


def _checkpoint_bytes_per_param(base: BaseModel) -> float:
    try:
        config = json.loads((base.path / "config.json").read_text())
    except (OSError, ValueError):
        return 4.0
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return 2.0 if dtype in ("float16", "bfloat16") else 4.0


def check_free_disk(folder: Path, base: BaseModel, spec: ExportSpec, merged: bool = True) -> None:
    """Refuse an export that cannot fit, before starting it, rather than die halfway."""
    params = base.size_bytes / _checkpoint_bytes_per_param(base)
    need = params * _BYTES_PER_PARAM[spec.precision] + (base.size_bytes if merged else 0)
    need *= 1.3  # builder temp files
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise UserError(
            f"not enough free disk for the {spec.precision} export in {probe}: "
            f"{_human_bytes(free)} free, about {_human_bytes(need)} needed; free space or choose --output elsewhere"
        )


def _human_bytes(n: float) -> str:
    """GiB for large sizes, MB below 1 GiB (so a small disk does not read '0.0 GiB free')."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def export_model(hf_dir: Path, out_dir: Path, spec: ExportSpec, *, work_dir: Path, trust_remote_code: bool = False,
                 log_path: Path | None = None) -> float:
    """Run the genai builder on an HF folder; return the seconds it took.

    The builder's output goes to ``log_path`` (default ``work_dir/builder.log``), kept
    whether the export succeeds or not.

    Raises:
        CandidateError: the builder rejected the model or the options (message kept).
    """
    from onnxruntime_genai.models import builder

    options = spec.builder_options() + [f"hf_remote={'true' if trust_remote_code else 'false'}"]
    log_path = log_path or work_dir / "builder.log"
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # The builder prints a page per export and its quantizer logs harmless ERROR lines
    # ("Gather only supports 4 bits"); keep all of it out of the user's view.
    logging.disable(logging.ERROR)
    try:
        with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            extra = builder.parse_extra_options(
                "", str(hf_dir), str(out_dir), spec.precision, spec.execution_provider, str(work_dir), options
            )
            builder.create_model("", str(hf_dir), str(out_dir), spec.precision, spec.execution_provider, str(work_dir), **extra)
    except (Exception, SystemExit) as exc:  # the builder raises bare Exceptions and may sys.exit
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CandidateError(f"the onnxruntime-genai builder could not export this model at {spec.label()}: {reason}") from exc
    finally:
        logging.disable(logging.NOTSET)
        release_memory()  # the builder's model and graph: without this they stay resident while the model is measured
    if not (out_dir / "genai_config.json").is_file():
        raise CandidateError(f"the builder wrote no genai_config.json (see {log_path})")
    return time.perf_counter() - start
