"""Packed training steps that compute exactly what padded steps compute, with less work.

A packed step puts its examples in one row, each with its own position ids. Two things would
otherwise make it differ from, or cost more than, the padded batch (one row per example):

- LoRA dropout: :class:`DropoutLayout` draws every mask entry from the entry's coordinates in
  the *padded* batch, so packed, padded and split steps see the same masks.
- Attention: over a packed row, transformers' ``sdpa`` computes the whole row's scores under a
  block-diagonal mask. :func:`packed_attention` computes each example's causal attention on its
  own instead (~half the attention time at 8 short examples per step, the same values).

:func:`consecutive_parts` and :func:`packed_inputs` lay sequences out in passes: training's parts
of a step, and GPTQ's packed calibration forwards (:mod:`autotune.quantize`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from collections.abc import Sequence


class DropoutLayout:
    """Where each token of the current (part of a) batch sits in the step's padded batch, and the step's seed.

    LoRA dropout draws every mask entry from the step's seed, the module, and the entry's
    coordinates in the padded batch (one row per example, see :func:`padded_layout_dropout`),
    so a packed step, or one run in parts (``pass_tokens``), sees exactly the masks of the padded step:
    these change the compute, not the training.
    """

    def __init__(self) -> None:
        self.seed = 0
        # Per thread: the groups of one step may run at once (gradients.accumulate_gradients), each its own part.
        self._local = threading.local()

    @property
    def positions(self):
        """Flat (row * width + column) of each token of this thread's part, in the input's order; None outside one."""
        return getattr(self._local, "positions", None)

    @contextlib.contextmanager
    def batch(self, lengths: Sequence[int], packed: bool, first_row: int = 0, width: int | None = None):
        """Examples of ``lengths`` tokens, rows ``first_row``... of a padded batch ``width`` wide, packed or padded."""
        import torch

        width = width or max(lengths)
        columns = list(lengths) if packed else [max(lengths)] * len(lengths)
        self._local.positions = torch.tensor([(first_row + row) * width + column
                                              for row, n in enumerate(columns) for column in range(n)])
        self._local.index = {}
        try:
            yield
        finally:
            self._local.positions, self._local.index = None, {}

    def index(self, x):
        """int32 coordinates in the padded batch of every element of ``x`` (tokens x features)."""
        import torch

        features = x.shape[-1]
        if self.positions is None:  # outside a training step: the input's own shape is the layout
            return _flat_index(torch.arange(x.numel() // features, device=x.device), features).view(x.shape)
        cache = self._local.index
        if features not in cache:
            cache[features] = _flat_index(self.positions.to(x.device), features)
        return cache[features].view(x.shape)


def _flat_index(positions, features: int):
    import torch

    # int32 wraps past 2**31 elements: harmless for a hash's input.
    return (positions[:, None] * features + torch.arange(features, device=positions.device)).to(torch.int32)


# lowbias32 (C. Wellons): a fast, well-mixed 32-bit integer hash, here a counter-based random stream.
_HASH = tuple(c - 2**32 if c >= 2**31 else c for c in (0x9E3779B9, 0x7FEB352D, 0x846CA68B))  # as int32: torch wraps


def _mix32(value: int) -> int:
    """lowbias32 of a Python int, as a signed int32: a module's seed from the step's."""
    x = value % 2**32
    for shift, multiplier in ((16, _HASH[1]), (15, _HASH[2]), (16, None)):
        x ^= x >> shift
        if multiplier is not None:
            x = x * (multiplier % 2**32) % 2**32
    return x - 2**32 if x >= 2**31 else x


def keep_mask(index, seed: int, p: float):
    """Bernoulli(1 - p) keep-mask, one entry per int32 ``index``, a pure function of (index, seed)."""
    # In place throughout: a handful of activation-sized temporaries per call fragment the heap.
    x = index * _HASH[0]
    x ^= seed
    for shift, multiplier in ((16, _HASH[1]), (15, _HASH[2]), (16, None)):
        x ^= (x >> shift).bitwise_and_((1 << (32 - shift)) - 1)  # a logical shift (torch's >> is arithmetic)
        if multiplier is not None:
            x *= multiplier
    return x.bitwise_and_(0xFFFFFF) >= round(p * 2**24)


def padded_layout_dropout(model) -> DropoutLayout:
    """Route every LoRA dropout of a peft model through one :class:`DropoutLayout`.

    A mask entry is a hash of the step's seed (one draw from torch's generator per step), the
    dropout module, and the entry's coordinates in the padded batch, instead of ``F.dropout``'s
    Bernoulli draw over the input's own shape: packed, padded and split steps get the
    same masks, padding costs no draws, and the hash is ~4x cheaper per entry than CPU
    ``bernoulli_``. The backward keeps the bool mask, not a float copy of the noise.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    layout = DropoutLayout()

    def forward(module, dropout, x):
        if not dropout.training or dropout.p == 0:
            return x
        if layout.positions is None:  # a forward outside accumulate_gradients: a fresh draw
            seed = int(torch.randint(-2**31, 2**31 - 1, ()))
        else:
            seed = _mix32(layout.seed ^ module)  # one stream per module
        keep = keep_mask(layout.index(x), seed, dropout.p)
        return torch.where(keep, x * (1 / (1 - dropout.p)), 0)

    dropouts = [d for m in model.modules() if isinstance(m, LoraLayer) for d in m.lora_dropout.values()
                if isinstance(d, torch.nn.Dropout)]
    for number, dropout in enumerate(dropouts):
        dropout.forward = functools.partial(forward, number, dropout)
    return layout


def computed_tokens(lengths: Sequence[int], packed: bool) -> int:
    """Tokens a forward pass over examples of ``lengths`` computes: their sum packed, rows x longest padded."""
    return sum(lengths) if packed else len(lengths) * max(lengths)


def consecutive_parts(lengths: Sequence[int], packed: bool, pass_tokens: int) -> list[tuple[int, int]]:
    """Consecutive (first, last) example ranges whose computed tokens stay within ``pass_tokens`` (0: one
    range of all; an example longer than that is a range of its own)."""
    parts, first = [], 0
    for last in range(1, len(lengths) + 1):
        if pass_tokens and computed_tokens(lengths[first:last], packed) > pass_tokens and last - first > 1:
            parts.append((first, last - 1))
            first = last - 1
    return parts + [(first, len(lengths))]


def packed_inputs(sequences: Sequence[Sequence[int]], device) -> dict:
    """One row holding ``sequences`` back to back, each with its own position ids (restarting at 0) and
    the cumulative lengths :func:`packed_attention` attends within (``cu_seq_lens_q``)."""
    import torch

    return {"input_ids": torch.tensor([[t for ids in sequences for t in ids]], device=device),
            "position_ids": torch.tensor([[p for ids in sequences for p in range(len(ids))]], device=device),
            "cu_seq_lens_q": torch.tensor([0, *itertools.accumulate(map(len, sequences))], device=device)}


PACKED_ATTENTION = "autotune_packed"  # the attention implementation's name in transformers' registries


def packed_attention(module, query, key, value, attention_mask, *, cu_seq_lens_q=None, **kwargs):
    """transformers' ``sdpa`` attention, each example of a packed row on its own.

    With ``cu_seq_lens_q`` (the examples' cumulative lengths: ``[0, n1, n1 + n2, ...]``, the
    packed-batch argument flash-attention models take), the row's queries, keys and values
    are laid out one example per row, right-padded, and attended causally without a mask:
    a query only reaches keys at or before it, all of its own example, so the values are
    those of the block-diagonal mask, at the cost of the examples' squares instead of the
    row's. Without it, this is plain ``sdpa`` (padded batches, generation). On the CPU it
    computes in fp32 whatever the model's dtype.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    lengths = cu_seq_lens_q.diff()
    rows, width, tokens = len(lengths), int(lengths.max()), query.shape[2]
    row = torch.arange(rows, device=query.device).repeat_interleave(lengths)
    flat = row * width + torch.arange(tokens, device=query.device) - cu_seq_lens_q[:-1].repeat_interleave(lengths)

    def one_example_per_row(x):  # [1, heads, tokens, dim] -> [rows, heads, width, dim]
        heads, dim = x.shape[1], x.shape[3]
        padded = x.new_zeros(heads, rows * width, dim).index_copy(1, flat, x[0])
        return padded.view(heads, rows, width, dim).transpose(0, 1)

    # On CPU in fp32: torch's bf16 flash-attention backward took 2.5x fp32's time at these shapes (with the casts).
    dtype = torch.float32 if query.device.type == "cpu" else query.dtype
    q, k, v = (one_example_per_row(x.to(dtype)) for x in (query, key, value))
    out, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)
    out = out.reshape(rows * width, *out.shape[2:]).index_select(0, flat).to(query.dtype)
    return out.unsqueeze(0), None  # [1, tokens, heads, dim]


def use_packed_attention(model) -> bool:
    """Route an ``sdpa`` model's attention through :func:`packed_attention`; False for any other kind.

    Registered under :data:`PACKED_ATTENTION` with ``sdpa``'s mask builder, so everything but a
    packed call (one given ``cu_seq_lens_q``) runs exactly as before.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    model.set_attn_implementation(PACKED_ATTENTION)
    return True


@contextlib.contextmanager
def packed_attention_in(model):
    """:func:`use_packed_attention` for the duration of the block (yields whether it applies), then the
    model's own attention again."""
    previous = getattr(model.config, "_attn_implementation", None)
    packed = use_packed_attention(model)
    try:
        yield packed
    finally:
        if packed:
            model.set_attn_implementation(previous)
