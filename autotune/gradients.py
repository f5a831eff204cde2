"""One optimizer step's gradients: the batch's answer-token loss, forward and backward, group by group.

A step's examples are cut into consecutive groups (each its own gradient, summed in order) and each group into
passes of bounded tokens, packed into one row or padded. The gradients are the whole batch's whatever the
split, so how the groups run (in turn, or at once on a thread pool) does not change a number.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from autotune.packing import consecutive_parts, packed_inputs



def accumulate_gradients(model, batch: Sequence[tuple[list[int], list[int]]], pad_id: int, device: str, packed: bool,
                         pass_tokens: int = 0, groups: int = 1, loss_scale=None) -> float:
    """Forward and backward of one step's batch; returns its mean answer-token loss (unscaled).

    ``loss_scale`` (a tensor, from :func:`autotune.train.loss_scaler`) multiplies the loss before the
    backward pass, and so every gradient: fp16 training unscales them before the optimizer step.

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
                scaled = loss * share
                if loss_scale is not None:
                    scaled = scaled * loss_scale
                part_grads = torch.autograd.grad(scaled, params, allow_unused=True)
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
