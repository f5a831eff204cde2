"""int4 grids: the exact weights the export ships.

The builder's plain int4 export (``precision int4``, ``algo_config`` default, CPU) rounds every
Linear weight, and with tied embeddings the shared embedding/lm_head table, with the MLAS
blockwise round-to-nearest in onnxruntime (``quantize_matmul_4bits``). Per block of
``block_size`` consecutive weights along ``in_features``, all in fp32:

- symmetric: ``peak`` = the block's max if ``|max| > |min|`` else its min (a tie picks the min);
  ``scale = peak / -8``; zero point 8.
- asymmetric: ``lo = min(min, 0)``, ``hi = max(max, 0)``; ``scale = (hi - lo) / 15``;
  zero point ``clamp(roundf(-lo / scale), 0, 15)`` (``lo`` itself, i.e. 0, when ``scale == 0``).
- both: ``q = clamp(roundf(w * (1 / scale) + zero_point), 0, 15)`` (``1 / scale`` is 0 when
  ``scale == 0``), where ``roundf`` rounds halves away from zero; the shipped weight is
  ``(q - zero_point) * scale``.

Dividing by the scale instead of multiplying by its fp32 reciprocal, or rounding ties to even
(``torch.round``), moves weights that sit on or next to a rounding tie by one step.
GatherBlockQuantized and MatMulNBits dequantize ``(q - zero_point) * scale`` (zero point 8 when
none is stored), so the embedding rows and the Linear weights the model runs on are exactly these.

:func:`quantize_rtn` reproduces that bit for bit, :func:`fake_quantize` is its training-time
twin, and :func:`write_prequantized` writes a checkpoint whose int4 weights (chosen by us:
calibrated, learned) the builder exports unchanged.

onnxruntime-genai 0.18: the plain *asymmetric* int4 export of a tied model quantizes the lm_head
but wires the embedding's GatherBlockQuantized to the fp32 table, and the model does not load.
The pre-quantized route below exports asymmetric tied models that load.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from autotune.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

# MatMulNBits and GatherBlockQuantized take power-of-two blocks from 16 up.
BLOCK_SIZES = (16, 32, 64, 128, 256)
# The decoder Linears a pre-quantized checkpoint can hold: Llama-style ones (separate q/k/v and gate/up), which the
# builder's quantized-checkpoint loaders map one to one, and Phi-3's fused qkv_proj and gate_up_proj.
_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.([qkvo]|qkv)_proj|mlp\.(gate|up|down|gate_up)_proj)$")
# A fused Linear is written as its parts (rows of the fused weight, in this order): an int4 row depends on that row
# only, so the parts ship exactly the fused weight's int4. (Written fused, the builder 0.18 loaders' split of the
# Olive layout cuts the packed zero points at half the right row.)
_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
_EMBED, _HEAD = "model.embed_tokens", "lm_head"


@dataclass(frozen=True)
class Int4Grid:
    """How the export rounds a weight to int4: blocks of ``block_size`` along in_features."""

    block_size: int = 32
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise UserError(f"int4 block size must be one of {BLOCK_SIZES}, got {self.block_size}")

    def builder_options(self) -> list[str]:
        """The builder's ``KEY=VALUE`` extra options that select this grid."""
        return [f"block_size={self.block_size}", f"is_symmetric={'true' if self.symmetric else 'false'}"]


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field by field has no single truth value
class QuantizedWeight:
    """One weight on an int4 grid.

    ``q`` uint8 ``[out, in]`` in 0..15, ``scales`` float32 ``[out, in // block]``,
    ``zero_points`` uint8 ``[out, in // block]`` (8 everywhere for a symmetric grid).
    """

    q: "torch.Tensor"
    scales: "torch.Tensor"
    zero_points: "torch.Tensor"

    def __post_init__(self) -> None:
        if self.q.dim() != 2 or self.scales.shape != self.zero_points.shape or self.scales.dim() != 2:
            raise ValueError(f"q must be [out, in] and scales/zero_points [out, blocks], got "
                             f"{tuple(self.q.shape)}, {tuple(self.scales.shape)}, {tuple(self.zero_points.shape)}")
        if self.q.shape[0] != self.scales.shape[0] or self.q.shape[1] % self.scales.shape[1]:
            raise ValueError(f"{self.scales.shape[1]} blocks do not tile a [{self.q.shape[0]}, {self.q.shape[1]}] weight")

    @property
    def block_size(self) -> int:
        return self.q.shape[1] // self.scales.shape[1]

    def dequantize(self) -> "torch.Tensor":
        """The float32 weight ``(q - zero_point) * scale``, as MatMulNBits and GatherBlockQuantized compute it."""
        out, blocks = self.scales.shape
        steps = self.q.float().reshape(out, blocks, -1) - self.zero_points.float().unsqueeze(-1)
        return (steps * self.scales.float().unsqueeze(-1)).reshape(out, -1)


def _round_half_away(x: "torch.Tensor") -> "torch.Tensor":
    """C ``roundf`` for x >= 0 (negative x only ever gives <= 0, which the callers clamp to 0).

    ``floor(x + 0.5)`` is not it: x + 0.5 itself rounds (0.49999997 + 0.5 == 1.0 in fp32).
    ``x - floor(x)`` is exact and so is doubling it, so ``floor(2 * (x - floor(x)))`` is 1 exactly
    when the fraction is at least a half (all float ops: a bool-to-float add costs ~10x one).
    """
    import torch

    whole = torch.floor(x)
    fraction = x - whole
    fraction *= 2.0
    return whole.add_(fraction.floor_())


def _grid_of(blocks: "torch.Tensor", grid: Int4Grid) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(scale, zero point) of each block of ``blocks`` ``[out, blocks, block_size]`` (fp32), as floats."""
    import torch

    # amax and amin apart: torch.aminmax over a short last dimension is ~20x slower on the CPU.
    hi, lo = blocks.amax(-1), blocks.amin(-1)
    if grid.symmetric:
        peak = torch.where(hi.abs() > lo.abs(), hi, lo)
        scale = peak / -8.0  # a power of two: exact whether divided or multiplied by the reciprocal
        return scale, torch.full_like(scale, 8.0)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    # Tensor divisors on purpose: CUDA turns division by a Python scalar into a multiply by its
    # reciprocal, which is off by one bit now and then.
    scale = (hi - lo) / torch.full_like(hi, 15.0)
    zero_fp = torch.where(scale != 0, -lo / scale, lo)
    return scale, _round_half_away(zero_fp).clamp_(0.0, 15.0)


def _reciprocal(scale: "torch.Tensor") -> "torch.Tensor":
    """``1 / scale``, 0 where the scale is 0 (an all-zero block), as MLAS computes it."""
    import torch

    return torch.where(scale != 0, torch.ones_like(scale) / scale, torch.zeros_like(scale))


def _rounded(weight: "torch.Tensor", grid: Int4Grid) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(codes ``[out, blocks, block_size]`` as fp32 values 0..15, scale, zero point) of ``weight`` on ``grid``."""
    if weight.dim() != 2 or weight.shape[1] % grid.block_size:
        raise ValueError(f"need a [out, in] weight with in divisible by {grid.block_size}, got {tuple(weight.shape)}")
    out, cols = weight.shape
    blocks = weight.detach().float().reshape(out, cols // grid.block_size, grid.block_size)
    scale, zero = _grid_of(blocks, grid)
    # MLAS multiplies by the reciprocal, then adds the zero point: two roundings, kept apart.
    scaled = blocks * _reciprocal(scale).unsqueeze(-1)
    scaled += zero.unsqueeze(-1)
    return _round_half_away(scaled).clamp_(0.0, 15.0), scale, zero


def quantize_rtn(weight: "torch.Tensor", grid: Int4Grid) -> QuantizedWeight:
    """Round ``weight`` ``[out, in]`` to ``grid`` exactly as the builder's int4 export does.

    Bit-exact to onnxruntime's MLAS quantizer on CPU and CUDA: every step is an fp32 op of
    its own (a fused multiply-add would round once instead of twice, so do not run this
    under ``torch.compile``). Any float dtype in; computed in fp32.
    """
    import torch

    q, scale, zero = _rounded(weight, grid)
    return QuantizedWeight(q.to(torch.uint8).view(weight.shape), scale, zero.to(torch.uint8))


def fake_quantize(weight: "torch.Tensor", grid: Int4Grid) -> "torch.Tensor":
    """``quantize_rtn(weight, grid).dequantize()`` in ``weight``'s dtype, with a straight-through gradient.

    For training against the int4 weights the export will ship: the forward sees them, the
    backward passes the gradient to ``weight`` unchanged. In bf16/fp16 the forward sees them
    rounded to that dtype.
    """
    return _straight_through().apply(weight, grid)


def _dequantized(weight: "torch.Tensor", grid: Int4Grid) -> "torch.Tensor":
    """``quantize_rtn(weight, grid).dequantize()``, without the round trip through uint8 (~4x faster)."""
    q, scale, zero = _rounded(weight, grid)
    q -= zero.unsqueeze(-1)  # the (q - zero point) * scale of :meth:`QuantizedWeight.dequantize`, op for op
    q *= scale.unsqueeze(-1)
    return q.view(weight.shape)


@functools.cache
def _straight_through() -> type:
    # Built on first use so that importing this module does not import torch.
    import torch

    class StraightThrough(torch.autograd.Function):
        @staticmethod
        def forward(ctx, weight, grid):
            return _dequantized(weight, grid).to(weight.dtype)

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    return StraightThrough


def _pack_nibbles(values: "torch.Tensor") -> "torch.Tensor":
    """Two 4-bit values per byte along the last dim, the first in the low nibble (the ORT layout)."""
    import torch

    if values.shape[-1] % 2:
        values = torch.cat([values, torch.zeros_like(values[..., :1])], -1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).contiguous()


def _check_weight(name: str, qw: QuantizedWeight, shape: tuple[int, ...], grid: Int4Grid) -> None:
    import torch

    if tuple(qw.q.shape) != shape:
        raise UserError(f"int4 weight for {name} is {tuple(qw.q.shape)}, the checkpoint's is {shape}")
    if qw.block_size != grid.block_size:
        raise UserError(f"int4 weight for {name} has blocks of {qw.block_size}, the grid's are {grid.block_size}")
    if qw.q.dtype != torch.uint8 or qw.zero_points.dtype != torch.uint8 or int(qw.q.max()) > 15 or int(qw.zero_points.max()) > 15:
        raise UserError(f"int4 weight for {name}: q and zero_points must be uint8 in 0..15")
    if grid.symmetric and bool((qw.zero_points != 8).any()):
        raise UserError(f"int4 weight for {name}: a symmetric grid has zero point 8 everywhere")


def write_prequantized(merged_dir: Path, out_dir: Path, weights: dict[str, QuantizedWeight], grid: Int4Grid) -> Path:
    """Write ``merged_dir`` (an fp32 HF folder) as a checkpoint the builder exports with exactly ``weights``.

    ``weights`` maps Linear names (``model.layers.0.self_attn.q_proj``; ``lm_head`` or
    ``model.embed_tokens`` for a tied table) to their int4 weights; Linear layers left out get
    :func:`quantize_rtn` of their fp32 weight, which is what the plain export would ship.
    Export the result with ``precision int4`` and the usual ``accuracy_level`` (it applies);
    the shipped MatMulNBits dequantize to ``QuantizedWeight.dequantize()`` exactly, scales stay
    fp32 on CPU, and every MatMulNBits gets explicit zero points (8 on a symmetric grid).

    Tied embeddings (SmolLM2, Qwen2.5-0.5B) are written in the builder's ``quant_auto`` format:
    its loader exports the table once, as the lm_head MatMulNBits and the embedding's
    GatherBlockQuantized, both with our int4 (given, or ``quantize_rtn`` of the table). The
    Olive format cannot: its 1D lm_head scales fail GatherBlockQuantized's shape check.
    Untied models are written in the Olive format, whose loader keeps a separate lm_head;
    their embedding stays fp32, as in the plain export. Leave the builder's
    ``shared_embeddings`` at its default: set to false, quant_auto's embedding becomes an fp16
    copy of the dequantized table, no longer exact.

    Raises:
        UserError: a name that is not a supported Linear layer, a shape or block size that
            does not match, a non-8 zero point on a symmetric grid, an already quantized or
            unsupported (neither Llama- nor Phi-3-style) checkpoint.
    """
    import torch
    from safetensors.torch import load_file, save_file

    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    config = json.loads((merged_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise UserError(f"{merged_dir} is already a quantized checkpoint; pass the fp32 merged model")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(merged_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    if not tensors:
        raise UserError(f"no safetensors weights in {merged_dir}")
    tied = bool(config.get("tie_word_embeddings", False))
    if tied:
        tensors.pop(f"{_HEAD}.weight", None)  # a tied checkpoint may store the shared table twice
    elif f"{_HEAD}.weight" not in tensors:
        raise UserError(f"{merged_dir} has no lm_head.weight but its config does not tie embeddings")

    linears = [name[: -len(".weight")] for name in tensors if name.endswith(".weight") and _LINEAR.match(name[: -len(".weight")])]
    unsupported = no_int4_layout({name: tuple(t.shape) for name, t in tensors.items()})
    if unsupported:
        raise UserError(f"write_prequantized handles Llama- and Phi-3-style checkpoints only; no int4 layout for "
                        f"{', '.join(unsupported[:3])}")
    unknown = sorted(set(weights) - set(linears) - {_EMBED, _HEAD})
    if unknown:
        raise UserError(f"no Linear layer named {', '.join(unknown[:3])} in {merged_dir}")
    table = _EMBED if tied else _HEAD  # the int4 table: the shared one, or the separate lm_head
    if not tied and _EMBED in weights:
        raise UserError("the embedding of an untied model stays fp32 in the export; give 'lm_head' instead")
    if tied and _EMBED in weights and _HEAD in weights and weights[_EMBED] is not weights[_HEAD]:
        raise UserError("tied embeddings share one table: give it once, as 'lm_head' or 'model.embed_tokens'")

    chosen: dict[str, QuantizedWeight] = {}
    for name in [*linears, table]:
        fp = tensors.pop(f"{name}.weight")
        given = weights.get(name, weights.get(_HEAD)) if name == table else weights.get(name)
        if given is None:
            given = quantize_rtn(fp, grid)
        _check_weight(name, given, tuple(fp.shape), grid)
        chosen[name] = given

    out = {name: t.contiguous() for name, t in tensors.items()}
    for name, qw in _unfused(chosen, config).items():
        q, scales, zeros = qw.q.cpu(), qw.scales.detach().float().cpu(), qw.zero_points.cpu()
        if tied:
            # quant_auto: q unpacked [out, in]; scales and zeros [out * blocks, 1], output-major.
            out[f"{name}.weight"] = q.contiguous()
            out[f"{name}.scales"] = scales.reshape(-1, 1).contiguous()
            out[f"{name}.zeros"] = zeros.reshape(-1, 1).contiguous()
        else:
            # Olive: q packed along in [out, in / 2]; scales [out, blocks]; zeros packed [out, ceil(blocks / 2)].
            out[f"{name}.qweight"] = _pack_nibbles(q)
            out[f"{name}.scales"] = scales.contiguous()
            out[f"{name}.qzeros"] = _pack_nibbles(zeros)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = {
        "quant_method": "quant_auto" if tied else "olive",
        "bits": 4,
        "group_size": grid.block_size,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for extra in merged_dir.iterdir():
        # Tokenizer, generation config, chat template; not the fp32 weights or their shard index.
        if extra.is_file() and extra.name != "config.json" and not extra.name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
            shutil.copy2(extra, out_dir / extra.name)
    return out_dir


def no_int4_layout(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The matrices among a checkpoint's tensors (name -> shape) that :func:`write_prequantized` has no int4
    layout for: neither a decoder Linear it knows nor the embedding or LM head. Empty: it can write them all."""
    known = {_EMBED, _HEAD}
    return [name for name, shape in shapes.items()
            if len(shape) == 2 and name.removesuffix(".weight") not in known and not _LINEAR.match(name.removesuffix(".weight"))]


def _unfused(weights: dict[str, QuantizedWeight], config: dict) -> dict[str, QuantizedWeight]:
    """``weights`` with each fused Linear replaced by its parts, under the parts' names (row slices)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rows = {"self_attn.qkv_proj": (heads * head_dim, *[(config.get("num_key_value_heads") or heads) * head_dim] * 2)}
    result = {}
    for name, qw in weights.items():
        prefix, _, kind = name.partition(".layers.")
        layer, _, linear = kind.partition(".")
        if linear not in _FUSED:
            result[name] = qw
            continue
        sizes = rows.get(linear) or (qw.q.shape[0] // 2,) * 2  # gate_up_proj: gate, then up, equal halves
        if sum(sizes) != qw.q.shape[0]:
            raise UserError(f"{name} has {qw.q.shape[0]} rows, not the {' + '.join(map(str, sizes))} its config implies")
        first = 0
        for part, size in zip(_FUSED[linear], sizes):
            cut = slice(first, first + size)
            result[f"{prefix}.layers.{layer}.{part}"] = QuantizedWeight(qw.q[cut], qw.scales[cut], qw.zero_points[cut])
            first += size
    return result


# ---------------------------------------------------------------------- calibrated int4 (GPTQ)


def gptq_quantize(model, samples: list[list[int]], grid: Int4Grid, damping: float = 0.01,
                  on_layer: "Callable[[int, int], None] | None" = None,
                  tokens_per_pass: int = 2048) -> dict[str, QuantizedWeight]:
    """Int4 weights for every Linear of the decoder layers and the LM head, chosen by GPTQ on ``samples``.

    GPTQ (Frantar et al., 2022) rounds a weight matrix one input column at a time and moves
    each column's rounding error onto the columns not yet rounded, weighted by the inverse
    Hessian ``H = X^T X`` of the layer's inputs, so the layer's *outputs* on the calibration
    inputs change as little as possible. Layers are done in order, each calibrated on the
    outputs of the layers before it *as quantized*, so later layers correct earlier errors.
    Scales and zero points follow the export's grid (:func:`quantize_rtn` per block, taken
    when the block's first column is reached), so the result ships as plain ``MatMulNBits``.

    Linears that read the same input (q/k/v, gate/up) share one Hessian and are rounded as one
    stacked matrix (GPTQ treats rows independently, so this is the same algorithm, run once).
    The samples run packed, up to ``tokens_per_pass`` tokens per forward, each attending only
    within itself (:func:`~autotune.packing.packed_attention`; one sample per forward for
    models without ``sdpa`` attention).

    The LM head is calibrated too, on the final hidden states: on SmolLM2 (tied, so its int4
    table is also the embedding's) it is most of what int4 costs. Measured on one demo adapter
    (136 test prompts): int8 0.691, rtn int4 0.529, GPTQ of the layers only 0.559, with the
    head 0.669.

    Args:
        model: a causal LM (Llama/Qwen2 layout: ``model.model.layers``, ``model.model.norm``), full precision.
        samples: token ids of the calibration sequences (the task's own training examples).
        grid: block size and symmetry of the int4 export.
        damping: added to the Hessian's diagonal, as a fraction of its mean (numerical stability).
        on_layer: called with (layer index, layer count) as each layer is done.
        tokens_per_pass: most tokens in one packed forward (bounds the activations held at once).

    Returns:
        ``{module name: QuantizedWeight}``, names as in the model's state dict (without ``.weight``).
    """
    import torch

    from autotune.packing import packed_attention_in

    layers = model.model.layers
    prefix = next(name for name, module in model.named_modules() if module is layers) + "."
    result: dict[str, QuantizedWeight] = {}
    with torch.no_grad(), packed_attention_in(model) as packed:
        inputs = _layer_inputs(model, samples, tokens_per_pass if packed else 0)
        for index, layer in enumerate(layers):
            linears = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
            seen: dict[str, torch.Tensor] = {}
            handles = [m.register_forward_hook(functools.partial(_record_input, seen, name)) for name, m in linears.items()]
            groups, hessians, count = None, [], 0
            for args, kwargs in inputs:
                layer(*args, **kwargs)
                if groups is None:  # Linears handed the very same tensor share their input
                    groups = _shared_inputs(seen, list(linears))
                    hessians = [torch.zeros(linears[g[0]].in_features, linears[g[0]].in_features) for g in groups]
                for group, hessian in zip(groups, hessians):
                    x = seen[group[0]].reshape(-1, hessian.shape[0]).float().cpu()
                    hessian.addmm_(x.T, x)
                count += x.shape[0]
                seen.clear()
            for handle in handles:
                handle.remove()
            for group, hessian in zip(groups, hessians):
                stacked = torch.cat([linears[name].weight.detach().float().cpu() for name in group])
                rows = torch.tensor([linears[name].out_features for name in group]).cumsum(0).tolist()
                weight = gptq_weight(stacked, hessian / max(1, count), grid, damping)
                for name, first, last in zip(group, [0, *rows], rows):
                    part = QuantizedWeight(weight.q[first:last], weight.scales[first:last], weight.zero_points[first:last])
                    result[f"{prefix}{index}.{name}"] = part
                    linears[name].weight.copy_(part.dequantize().to(linears[name].weight.dtype))
            del hessians
            inputs = [_run_layer(layer, args, kwargs) for args, kwargs in inputs]  # what the next layer sees
            if on_layer is not None:
                on_layer(index + 1, len(layers))
        # The LM head reads the final norm of the last layer's output (in a tied model its table is the
        # embedding too: the rows the embedding looks up are then GPTQ's, not the nearest rounding).
        lm_head = model.get_output_embeddings()
        hessian = torch.zeros(lm_head.in_features, lm_head.in_features)
        count = 0
        for args, kwargs in inputs:
            hidden = args[0] if args else kwargs["hidden_states"]
            x = model.model.norm(hidden).reshape(-1, lm_head.in_features).float().cpu()
            hessian.addmm_(x.T, x)
            count += x.shape[0]
        result["lm_head"] = gptq_weight(lm_head.weight.detach().float().cpu(), hessian / max(1, count), grid, damping)
    return result


def _record_input(seen: dict, name: str, module, args, output) -> None:
    seen[name] = args[0]


def _shared_inputs(seen: dict, names: list[str]) -> list[list[str]]:
    """``names`` grouped by the input tensor their Linears were called on, in the layer's order."""
    groups: list[list[str]] = []
    for name in names:
        match = next((g for g in groups if seen[g[0]] is seen[name]), None)
        if match is None:
            groups.append([name])
        else:
            match.append(name)
    return groups


def gptq_weight(weight: "torch.Tensor", hessian: "torch.Tensor", grid: Int4Grid, damping: float = 0.01) -> QuantizedWeight:
    """GPTQ of one ``[out, in]`` weight given its input Hessian ``[in, in]`` (the reference algorithm, with
    each block's scale taken from its columns as already updated).

    Errors spread lazily, one int4 block at a time: within a block column by column, then onto
    all later columns in one matrix product (the reference's lazy batch, with the block as its
    width). The weight is worked on transposed, so that each column is contiguous. A code rounds
    ``floor(w / scale + zero + 0.5)``: a value a hair under a half may take the upper code, which is
    as valid a code, and its error is carried on like any other.
    """
    import torch

    w = weight.clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damping * torch.mean(torch.diag(h)) * torch.eye(h.shape[0])
    # The upper Cholesky factor of H^-1: row i holds how column i's error spreads over the columns after it.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out_features, in_features = w.shape
    block = grid.block_size
    wt = w.T.contiguous()  # [in, out]: one row per column of the weight
    codes = torch.zeros_like(wt)
    scales = torch.zeros(in_features // block, out_features)
    zeros = torch.zeros(in_features // block, out_features)
    for start in range(0, in_features, block):
        end = start + block
        w1, hinv1 = wt[start:end], hinv[start:end, start:end]
        scale, zero = _grid_of(w1.T.unsqueeze(1), grid)  # the block's grid, from its columns as updated so far
        scale, zero = scale[:, 0], zero[:, 0]
        scales[start // block], zeros[start // block] = scale, zero
        reciprocal = _reciprocal(scale)
        half_up = zero + 0.5
        errors = torch.empty_like(w1)
        inverse_diagonal = (1 / torch.diag(hinv1)).tolist()
        for i in range(block):  # few ops per column, written in place: at 576 rows each op is mostly overhead
            column, error = w1[i], errors[i]
            q = torch.mul(column, reciprocal, out=codes[start + i])
            q.add_(half_up).floor_().clamp_(0.0, 15.0)
            torch.sub(q, zero, out=error)
            error.mul_(scale)
            torch.sub(column, error, out=error)  # the column minus what ships for it
            error.mul_(inverse_diagonal[i])
            w1[i + 1:].addr_(hinv1[i, i + 1:], error, alpha=-1)
        wt[end:].addmm_(hinv[start:end, end:].T, errors, alpha=-1)
    return QuantizedWeight(codes.T.to(torch.uint8), scales.T.contiguous(), zeros.T.to(torch.uint8))


class _Captured(Exception):
    """Raised by the hook that records the first decoder layer's inputs: the rest of the forward is not needed."""


def _layer_inputs(model, samples: list[list[int]], tokens_per_pass: int = 0) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first decoder layer receives (hidden states, rotary embeddings, masks:
    whatever this architecture passes), with no padding: consecutive samples packed into one row of
    up to ``tokens_per_pass`` tokens, each with its own positions and ``cu_seq_lens_q`` (for
    :func:`~autotune.packing.packed_attention`), or one sample per call when ``tokens_per_pass`` is 0."""
    import torch

    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    from autotune.packing import consecutive_parts, packed_inputs

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            if tokens_per_pass:
                calls = [packed_inputs(samples[first:last], device)
                         for first, last in consecutive_parts([len(ids) for ids in samples], True, tokens_per_pass)]
            else:
                calls = [{"input_ids": torch.tensor([ids], device=device)} for ids in samples]
            for inputs in calls:
                with contextlib.suppress(_Captured):
                    model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return captured


def _run_layer(layer, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    output = layer(*args, **kwargs)
    hidden = output[0] if isinstance(output, tuple) else output
    return (hidden, *args[1:]), kwargs
