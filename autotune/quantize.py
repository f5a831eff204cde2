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
calibrated by :mod:`autotune.gptq`, learned) the builder exports unchanged.

onnxruntime-genai 0.18: the plain *asymmetric* int4 export of a tied model quantizes the lm_head
but wires the embedding's GatherBlockQuantized to the fp32 table, and the model does not load.
The pre-quantized route below exports asymmetric tied models that load.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from autotune.errors import UserError

if TYPE_CHECKING:
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
