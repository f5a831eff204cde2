"""Safetensors checkpoints streamed one group of tensors (a decoder layer) at a time.

The merge and GPTQ hold one decoder layer of a model at once, never the whole model:
:class:`Checkpoint` reads the tensors a stage asks for with ``pread`` (a memory-mapped file's
pages would count in the process's RSS until the file is closed), :func:`write_checkpoint`
writes a model one group per shard, with the index that transformers and the onnxruntime-genai
builder read, and :func:`empty_model` is a model of the checkpoint's architecture without
weights, whose modules :func:`loaded` fills from the checkpoint one at a time.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from autotune.errors import UserError

if TYPE_CHECKING:
    import torch

INDEX = "model.safetensors.index.json"
_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")


class Checkpoint:
    """The tensors of a Hugging Face folder's ``*.safetensors`` files, read on demand."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        self._files: dict[str, Path] = {}
        for path in sorted(self.folder.glob("*.safetensors")):
            with safe_open(path, framework="pt") as handle:  # reads the header only
                self._files.update(dict.fromkeys(handle.keys(), path))
        if not self._files:
            raise UserError(f"no safetensors weights in {self.folder}")

    @property
    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def groups(self) -> list[list[str]]:
        """The tensor names by decoder layer (``...layers.<i>.``), in file order; every other tensor (the
        embedding, the final norm, an untied head) is a group of its own."""
        groups: dict[str, list[str]] = {}
        for name in self._files:
            match = _LAYER.match(name)
            groups.setdefault(match.group(1) if match else name, []).append(name)
        return list(groups.values())

    def read(self, names: Iterable[str], dtype: "torch.dtype | None" = None, device="cpu") -> dict[str, "torch.Tensor"]:
        """The tensors ``names``, in ``dtype`` (default: as stored) on ``device``, each its own memory."""
        from safetensors import safe_open

        names = list(names)
        missing = [name for name in names if name not in self._files]
        if missing:
            raise UserError(f"{self.folder} has no tensor {', '.join(missing[:3])}; pass the model's own checkpoint")
        tensors = {}
        for path in dict.fromkeys(self._files[name] for name in names):
            with safe_open(path, framework="pt", backend="pread") as handle:
                for name in names:
                    if self._files[name] == path:
                        tensor = handle.get_tensor(name)
                        tensors[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
        return {name: tensors[name] for name in names}


def write_checkpoint(out_dir: Path, groups: Iterable[dict[str, "torch.Tensor"]]) -> Path:
    """Write each group of tensors as a shard of its own (``model-00001.safetensors``, ...) and the index
    mapping every tensor to its shard; a group is written, and may be freed, before the next is made."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = number = 0
    # Not enumerate(): its cached result tuple holds the last group while the next one is being made.
    for group in groups:
        number += 1
        if not group:
            continue
        shard = f"model-{number:05d}.safetensors"
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in group.items()}
        save_file(tensors, str(out_dir / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del group, tensors  # before the next group is made
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX).write_text(json.dumps(index, indent=1))
    return out_dir


def empty_model(folder: Path, dtype: "torch.dtype", device="cpu", *, trust_remote_code: bool = False):
    """The causal LM of ``folder``'s config, its parameters on the meta device (no memory) and its computed
    buffers (rotary frequencies) real, on ``device``, in ``dtype``, ready for :func:`loaded`."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device(device), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def load_model(folder: Path, dtype: "torch.dtype", device="cpu", *, trust_remote_code: bool = False):
    """``AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)`` on ``device``, read one decoder layer at a time.

    The same weights, converted the same way (``Tensor.to``), but from_pretrained maps every file
    whole and keeps it mapped while it converts: an fp32 checkpoint loaded in bf16 peaks at 6 bytes
    a parameter (the bf16 copy plus the fp32 pages read), this at 2 plus one layer in fp32.
    """
    model = empty_model(folder, dtype, device, trust_remote_code=trust_remote_code)
    checkpoint = Checkpoint(folder)
    expected = set(model.state_dict())
    for group in checkpoint.groups():  # disjoint groups: each tensor is read once
        tensors = checkpoint.read([name for name in group if name in expected], dtype, device)
        model.load_state_dict(tensors, strict=False, assign=True)
        del tensors
    model.tie_weights()  # a tied head shares the embedding's table, as from_pretrained leaves it
    missing = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if missing:
        raise UserError(f"{folder} has no tensor {', '.join(missing[:3])}; pass a complete Hugging Face checkpoint")
    return model


@contextlib.contextmanager
def loaded(module, prefix: str, checkpoint: Checkpoint | None, dtype: "torch.dtype", device) -> Iterator[None]:
    """``module``'s weights read from ``checkpoint`` (its state-dict names under ``prefix``) for the block, then
    freed (back on the meta device). With no checkpoint the module is already in memory, and stays."""
    if checkpoint is None:
        yield
        return
    keys = list(module.state_dict())
    tensors = checkpoint.read([prefix + key for key in keys], dtype, device)
    module.load_state_dict({key: tensors[prefix + key] for key in keys}, strict=True, assign=True)
    del tensors
    try:
        yield
    finally:
        module.to("meta")


def module_names(model) -> dict[int, str]:
    """Each module's state-dict prefix (``model.layers.0.``), by ``id``."""
    return {id(module): f"{name}." if name else "" for name, module in model.named_modules()}
