"""Int4-aware training: a peft model that computes with the int4 weights its export will ship.

:func:`quantization_aware` patches each LoRA-wrapped Linear's forward to use the rounded merged weight with a
straight-through gradient, and rounds the other exported Linears once, in place.
"""

from __future__ import annotations

import threading

from autotune.quantize import Int4Grid, fake_quantize



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
