"""Calibrated int4: GPTQ on the task's own examples, one decoder layer of the model in memory at a time.

GPTQ (Frantar et al., 2022) rounds a weight matrix one input column at a time and moves each
column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian
``H = X^T X`` of the layer's inputs, so the layer's *outputs* on the calibration inputs change as
little as possible. The int4 grid is the export's (:mod:`autotune.quantize`), so the result ships
as plain ``MatMulNBits`` through :func:`~autotune.quantize.write_prequantized`.

:func:`gptq_checkpoint` streams a saved model through memory: the embedding, then each decoder
layer in turn, read from the checkpoint, calibrated, rounded and freed, so a model several times
the size of free RAM still calibrates; :func:`gptq_quantize` does the same on a model already in
memory (the same numbers, bit for bit).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import TYPE_CHECKING

from autotune.checkpoint import Checkpoint, empty_model, loaded, module_names
from autotune.quantize import Int4Grid, QuantizedWeight, _grid_of, _reciprocal
from autotune.memory import trim_heap

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

# Columns whose rounding errors reach the later columns in one product (the reference implementation's 128).
LAZY_COLUMNS = 128


def gptq_checkpoint(folder: Path, samples: list[list[int]], grid: Int4Grid, damping: float = 0.01,
                    on_layer: Callable[[int, int], None] | None = None, tokens_per_pass: int = 2048, *,
                    device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False) -> dict[str, QuantizedWeight]:
    """:func:`gptq_quantize` of the model saved in ``folder``, read one decoder layer at a time.

    The calibration forwards run on ``device`` in ``dtype`` (a GPU profile's training dtype);
    the Hessians and the rounding are fp32 and round the checkpoint's own fp32 weights, so the
    grid stays the export's bit for bit whatever the forwards ran in.
    """
    import torch

    model = empty_model(folder, getattr(torch, dtype), device, trust_remote_code=trust_remote_code)
    return gptq_quantize(model, samples, grid, damping, on_layer, tokens_per_pass, checkpoint=Checkpoint(folder),
                         device=device)


def gptq_quantize(model, samples: list[list[int]], grid: Int4Grid, damping: float = 0.01,
                  on_layer: Callable[[int, int], None] | None = None, tokens_per_pass: int = 2048, *,
                  checkpoint: Checkpoint | None = None, device=None) -> dict[str, QuantizedWeight]:
    """Int4 weights for every Linear of the decoder layers and the LM head, chosen by GPTQ on ``samples``.

    Layers are done in order, each calibrated on the outputs of the layers before it *as
    quantized*, so later layers correct earlier errors. Scales and zero points follow the export's
    grid (:func:`~autotune.quantize.quantize_rtn` per block, taken when the block's first column is
    reached). Linears that read the same input (q/k/v, gate/up) share one Hessian and are rounded
    as one stacked matrix (GPTQ treats rows independently, so this is the same algorithm, run
    once). The samples run packed, up to ``tokens_per_pass`` tokens per forward, each attending only
    within itself (:func:`~autotune.packing.packed_attention`; one sample per forward for models
    without ``sdpa`` attention). One layer's calibration activations are held at a time.

    The LM head is calibrated too, on the final hidden states: on SmolLM2 (tied, so its int4
    table is also the embedding's) it is most of what int4 costs. Measured on one demo adapter
    (136 test prompts): int8 0.691, rtn int4 0.529, GPTQ of the layers only 0.559, with the
    head 0.669.

    Args:
        model: a causal LM (Llama/Qwen2 layout: ``model.model.layers``, ``model.model.norm``), full precision,
            or with ``checkpoint`` an :func:`~autotune.checkpoint.empty_model` whose weights are read from it
            module by module.
        samples: token ids of the calibration sequences (the task's own training examples).
        grid: block size and symmetry of the int4 export.
        damping: added to the Hessian's diagonal, as a fraction of its mean (numerical stability).
        on_layer: called with (layer index, layer count) as each layer is done.
        tokens_per_pass: most tokens in one packed forward (bounds the activations held at once).
        checkpoint: where the weights are, when ``model`` has none.
        device: where to compute (default: where the model's weights are; the CPU for a checkpoint).

    Returns:
        ``{module name: QuantizedWeight}`` on the CPU, names as in the model's state dict (without ``.weight``).
    """
    import torch

    from autotune.packing import packed_attention_in

    device = torch.device(device or ("cpu" if checkpoint is not None else next(model.parameters()).device))
    dtype = next(model.parameters()).dtype
    names = module_names(model)
    layers = model.model.layers
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()

    def resident(module):
        return loaded(module, names[id(module)], checkpoint, dtype, device)

    def fp32_weight(module) -> "torch.Tensor":
        """The weight GPTQ rounds: the checkpoint's fp32 one where the forwards run in a narrower dtype."""
        if checkpoint is not None and module.weight.dtype != torch.float32:
            name = names[id(module)] + "weight"
            return checkpoint.read([name], torch.float32, device)[name]
        return module.weight.detach().float()

    result: dict[str, QuantizedWeight] = {}
    with torch.no_grad(), packed_attention_in(model) as packed:
        with resident(embedding):
            inputs = _layer_inputs(model, samples, tokens_per_pass if packed else 0, device)
        for index, layer in enumerate(layers):
            with resident(layer):
                for name, part in _calibrate_layer(layer, inputs, grid, damping, fp32_weight).items():
                    result[names[id(layer)] + name] = part
                inputs = [_run_layer(layer, args, kwargs) for args, kwargs in inputs]  # what the next layer sees
            trim_heap()  # the layer's weights and Hessians leave the RSS, not just the heap
            if on_layer is not None:
                on_layer(index + 1, len(layers))
        # The LM head reads the final norm of the last layer's output (in a tied model its table is the
        # embedding too: the rows the embedding looks up are then GPTQ's, not the nearest rounding).
        hessian = torch.zeros(head.in_features, head.in_features, device=device)
        count = 0
        with resident(model.model.norm):
            for args, kwargs in inputs:
                hidden = args[0] if args else kwargs["hidden_states"]
                x = model.model.norm(hidden).reshape(-1, head.in_features).float()
                _add_gram(hessian, x)
                count += x.shape[0]
        del inputs
        hessian = _symmetric(hessian).div_(max(1, count))
        result["lm_head"] = _on_cpu(gptq_weight(_head_weight(model, checkpoint, names, device, fp32_weight),
                                                hessian, grid, damping))
    return result


def _calibrate_layer(layer, inputs: list, grid: Int4Grid, damping: float, fp32_weight) -> dict[str, QuantizedWeight]:
    """GPTQ of one decoder layer's Linears on its calibration ``inputs``; each Linear then computes with
    its int4 weights, so that the layer's outputs are what the next layer is calibrated on."""
    import torch

    linears = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(functools.partial(_record_input, seen, name, len(linears)))
               for name, m in linears.items()]
    groups, hessians, count = None, [], 0
    try:
        for args, kwargs in inputs:
            with contextlib.suppress(_Captured):
                layer(*args, **kwargs)
            if groups is None:  # Linears handed the very same tensor share their input
                groups = _shared_inputs(seen, list(linears))
                hessians = [torch.zeros(linears[g[0]].in_features, linears[g[0]].in_features, device=seen[g[0]].device)
                            for g in groups]
            for group, hessian in zip(groups, hessians):
                x = seen[group[0]].reshape(-1, hessian.shape[0]).float()
                _add_gram(hessian, x)
            count += x.shape[0]
            seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    while groups:  # each group's Hessian is freed once it is used
        group, hessian = groups.pop(0), _symmetric(hessians.pop(0)).div_(max(1, count))
        stacked = torch.cat([fp32_weight(linears[name]) for name in group])
        rows = torch.tensor([linears[name].out_features for name in group]).cumsum(0).tolist()
        weight = gptq_weight(stacked, hessian, grid, damping)
        del stacked, hessian
        for name, first, last in zip(group, [0, *rows], rows):
            part = QuantizedWeight(weight.q[first:last], weight.scales[first:last], weight.zero_points[first:last])
            linears[name].weight.copy_(part.dequantize().to(linears[name].weight.dtype))
            result[name] = _on_cpu(part)
    return result


def _add_gram(hessian: "torch.Tensor", x: "torch.Tensor", rows: int = 256) -> None:
    """``hessian += x^T x`` on and above the diagonal only (half the products of the whole square), in bands of
    ``rows`` rows; :func:`_symmetric` fills the rest once the sum is done."""
    for first in range(0, hessian.shape[0], rows):
        hessian[first:first + rows, first:].addmm_(x[:, first:first + rows].T, x[:, first:])


def _symmetric(upper: "torch.Tensor") -> "torch.Tensor":
    """The symmetric matrix whose upper triangle is ``upper``'s, in place (its lower triangle must be zero)."""
    return upper.add_(upper.triu(1).T)


def _head_weight(model, checkpoint: Checkpoint | None, names: dict, device, fp32_weight) -> "torch.Tensor":
    """The LM head's fp32 weight: its own, or the input embedding's table in a tied model (or a checkpoint
    that stores the table once)."""
    import torch

    head = model.get_output_embeddings()
    if checkpoint is None:
        return fp32_weight(head)
    own = names[id(head)] + "weight"
    tied = getattr(model.config, "tie_word_embeddings", False)
    name = own if own in checkpoint and not tied else names[id(model.get_input_embeddings())] + "weight"
    return checkpoint.read([name], torch.float32, device)[name]


def _on_cpu(weight: QuantizedWeight) -> QuantizedWeight:
    return weight if weight.q.device.type == "cpu" else QuantizedWeight(
        weight.q.cpu(), weight.scales.cpu(), weight.zero_points.cpu())


def _record_input(seen: dict, name: str, linears: int, module, args) -> None:
    """A Linear's forward pre-hook: keep its input, and once all ``linears`` of the layer have theirs, stop
    the forward (a calibration pass needs the inputs only: the last Linear's product is never computed)."""
    seen[name] = args[0]
    if len(seen) == linears:
        raise _Captured


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
    each block's scale taken from its columns as already updated), on the device the two are on.

    The reference spreads each column's error ``(w'_j - q_j) / U_jj`` over the later columns by the rows
    of ``U``, the upper Cholesky factor of ``H^-1``. Here the same sums are taken over the original
    weight's errors ``w_j - q_j`` with a factor of ``H`` itself (Chee et al., 2023, "QuIP", Theorem 6:
    GPTQ is LDLQ): with ``H = V V^T``, ``V`` upper triangular, and ``F = V D_V^-1`` (:func:`_feedback`),
    column ``k`` reaches its rounding as ``w_k + sum_{j<k} (w_j - q_j) F_jk``, the reference's value.
    One Cholesky factorisation instead of a factorisation and a triangular inverse: a 2048 x 5632 down
    projection (the 1B's) takes 2.3 s against 3.3 s on one AVX-512 core. The partial sums differ, so a
    block's grid is taken from the reference's partial state, recovered by one triangular solve per block.
    In float64 the codes are the reference's; in fp32 a value within rounding of a code boundary may
    take the other code.

    Errors spread lazily: within an int4 block column by column; then onto the rest of its lazy batch
    (:data:`LAZY_COLUMNS` columns, the reference's width) in one matrix product; and a batch takes the
    errors of every column before it in one product as wide as the batch, as it starts (products this
    wide run near the machine's matrix speed; one per int4 block did not, and cost a 1B model more per
    weight than SmolLM2). The weight is worked on transposed, so that each column is contiguous; a
    batch's rows hold its original columns until it starts and its errors once it is done. A code rounds
    ``floor(w / scale + zero + 0.5)``: a value a hair under a half may take the upper code, which is
    as valid a code, and its error is carried on like any other. Memory: the transposed weight, its
    codes as bytes, a lazy batch of errors and two ``[in, in]`` matrices at a time.
    """
    import torch

    dead = torch.diag(hessian) == 0
    feedback = _feedback(hessian, dead, damping)  # row j: how column j's error moves the columns after it
    out_features, in_features = weight.shape
    block = grid.block_size
    width = max(block, LAZY_COLUMNS)
    wt = weight.T.clone(memory_format=torch.contiguous_format)  # [in, out]: one row per column of the weight
    if dead.any():
        wt[dead] = 0
    codes = torch.empty(in_features, out_features, dtype=torch.uint8, device=wt.device)
    block_codes = torch.empty(block, out_features, dtype=wt.dtype, device=wt.device)
    block_shipped = torch.empty(out_features, dtype=wt.dtype, device=wt.device)
    scales = torch.zeros(in_features // block, out_features, dtype=wt.dtype, device=wt.device)
    zeros = torch.zeros(in_features // block, out_features, dtype=torch.uint8, device=wt.device)
    identity = torch.eye(block, dtype=wt.dtype, device=wt.device)
    for batch in range(0, in_features, width):
        batch_end = min(in_features, batch + width)
        errors = wt[batch:batch_end].clone()  # the original columns, whose errors they become
        wt[batch:batch_end].addmm_(feedback[:batch, batch:batch_end].T, wt[:batch])  # the errors before the batch
        for start in range(batch, batch_end, block):
            end = start + block
            w1, feedback1, errors1 = wt[start:end], feedback[start:end, start:end], errors[start - batch:end - batch]
            # The block's grid, from its columns as the reference has them here (moved by the errors of every
            # column before the block): ``W - (W - w1) F^-1`` over the block, since ``w1`` already holds what
            # the reference adds through the block's own columns.
            unspread = torch.linalg.solve_triangular(feedback1, identity, upper=True, unitriangular=True)
            scale, zero = _grid_of(torch.addmm(errors1, unspread.T, errors1 - w1, alpha=-1).T.unsqueeze(1), grid)
            scale, zero = scale[:, 0], zero[:, 0]
            scales[start // block], zeros[start // block] = scale, zero
            reciprocal = _reciprocal(scale)
            half_up = zero + 0.5
            for i in range(block):  # few ops per column, written in place: at 576 rows each op is mostly overhead
                column, error = w1[i], errors1[i]
                q = torch.mul(column, reciprocal, out=block_codes[i])
                q.add_(half_up).floor_().clamp_(0.0, 15.0)
                shipped = torch.sub(q, zero, out=block_shipped).mul_(scale)
                error.sub_(shipped)  # the original column minus what ships for it
                w1[i + 1:].addr_(feedback1[i, i + 1:], error)
            codes[start:end] = block_codes
            wt[end:batch_end].addmm_(feedback[start:end, end:batch_end].T, errors1)
        wt[batch:batch_end] = errors  # what the later batches take
    return QuantizedWeight(codes.T.contiguous(), scales.T.contiguous(), zeros.T.contiguous())


def _feedback(hessian: "torch.Tensor", dead: "torch.Tensor", damping: float) -> "torch.Tensor":
    """``V_jk / V_kk`` for ``V`` the upper triangular factor of the damped Hessian (``H = V V^T``, ones on
    the diagonal): ``J L J`` for ``L`` the Cholesky factor of ``J H J``, ``J`` the reversal of the order (a
    triangular factor with a positive diagonal is unique). A dead input (never nonzero) gets a one on the
    diagonal and nothing else, so its column neither takes nor gives errors."""
    import torch

    h = hessian.flip(0, 1)  # a copy: the caller's Hessian is left as it was
    reversed_dead = dead.flip(0)
    h[reversed_dead, reversed_dead] = 1
    h.diagonal().add_(damping * torch.mean(torch.diag(h)))
    lower = torch.linalg.cholesky(h)
    del h
    upper = lower.flip(0, 1)
    del lower
    return upper.div_(torch.diag(upper).clone())


class _Captured(Exception):
    """Raised by a hook that has recorded what it was for: the rest of the forward is not needed."""


def _layer_inputs(model, samples: list[list[int]], tokens_per_pass: int = 0, device=None) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first decoder layer receives (hidden states, rotary embeddings, masks:
    whatever this architecture passes), with no padding: consecutive samples packed into one row of
    up to ``tokens_per_pass`` tokens, each with its own positions and ``cu_seq_lens_q`` (for
    :func:`~autotune.packing.packed_attention`), or one sample per call when ``tokens_per_pass`` is 0."""
    import torch

    from autotune.packing import consecutive_parts, packed_inputs

    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = device or model.get_input_embeddings().weight.device
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
