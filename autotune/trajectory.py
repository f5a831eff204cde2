"""Stable-phase checkpoints: how a longer training run continues a shorter one.

Under the ``wsd`` schedule (:class:`~autotune.train.TrainSpec`) a run of N steps does
not depend on N before its decay starts (:attr:`~autotune.train.TrainSpec.stable_steps`):
the learning rate, the batches and the dropout masks of step k are the same for every
N whose decay starts after k. So a run saves its state where its decay starts, and a
longer run of the same adapter resumes from the latest such checkpoint instead of step
0, and trains exactly the adapter a fresh run would (tests/test_train.py checks it bit
for bit). This is what lets the search screen adapters with short runs and continue the
promising ones (:mod:`autotune.schedule`).

A checkpoint is a folder: the trainable (LoRA) weights, the optimizer state and torch's
random state (each step draws its dropout seed from it) in one safetensors file, and the
step, the losses so far, the optimizer's settings and (fp16 training) the loss scaler's state
in JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from autotune.cache import atomic_dir, file_lock

CHECKPOINT = "checkpoint.safetensors"
STATE = "state.json"


def step_dir(trajectory: Path, step: int) -> Path:
    """The checkpoint of ``trajectory`` after ``step`` optimizer steps."""
    return trajectory / f"step-{step}"


def latest(trajectory: Path, at_most: int) -> Path | None:
    """The complete checkpoint with the most steps, at most ``at_most``; None if there is none."""
    steps = []
    for folder in trajectory.glob("step-*") if trajectory.is_dir() else ():
        tail = folder.name.removeprefix("step-")
        if tail.isdigit() and int(tail) <= at_most and (folder / STATE).is_file():
            steps.append(int(tail))
    return step_dir(trajectory, max(steps)) if steps else None


def save(folder: Path, model, optimizer, step: int, losses: list[float], scaler=None) -> None:
    """Write the trainable weights and the optimizer state after ``step`` steps into ``folder``."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"param/{name}": p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    state = optimizer.state_dict()
    for index, entries in state["state"].items():
        for key, value in entries.items():
            tensors[f"optimizer/{index}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng/torch"] = torch.get_rng_state()
    # Whole or not at all, and never swept from under the writer (cache.sweep_partials takes the lock).
    with file_lock(folder), atomic_dir(folder) as tmp:
        save_file(tensors, str(tmp / CHECKPOINT))
        (tmp / STATE).write_text(json.dumps({"step": step, "losses": losses, "param_groups": state["param_groups"],
                                             "scaler": scaler.state_dict() if scaler else None}))


def load(folder: Path, model, optimizer, scaler=None) -> tuple[int, list[float]]:
    """Restore what :func:`save` wrote into ``model``, ``optimizer`` and ``scaler``; return (step, losses)."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(folder / CHECKPOINT))
    meta = json.loads((folder / STATE).read_text())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(tensors[f"param/{name}"])
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng/torch"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    return meta["step"], list(meta["losses"])
