"""What a model can take, checked before any work: whether the builder exports it at all, and which
search options it cannot take (each with why), so the space drops them rather than fail trials later.

Both read only the model's config and its weights' names and shapes (the safetensors headers):

- :func:`check_exportable` runs the onnxruntime-genai builder's config-only export, whose model class
  reads every architecture setting the real export reads, in well under a second.
- :func:`limits` names the options the pipeline has no way to run for this checkpoint: a pre-quantized
  int4 (GPTQ, asymmetric rounding) needs an int4 layout for every matrix and the Llama layout GPTQ
  walks; on CUDA, a tied embedding needs an even number of int4 blocks per row (:data:`CUDA_ODD_BLOCKS`).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from autotune.errors import UserError
from autotune.models import BaseModel

if TYPE_CHECKING:
    from autotune.candidate import CandidateSpec

# onnxruntime's CUDA GatherBlockQuantized (the int4 embedding a tied model shares with its LM head) finds a zero point
# by the flat block index (microsoft/onnxruntime#32663), but 4-bit zero points are packed with each row padded to a
# whole byte (the layout microsoft/onnxruntime#26506 taught the CPU kernel): with an odd number of blocks per row,
# rows read their neighbours' zero points. On an H200 (onnxruntime-gpu 1.31.1) SmolLM2 (576 = 9 blocks of 64) scored
# 0.301 at int4 blocks of 64 with zero points where the same adapter scored 0.699 at blocks of 32. Every int4 we
# pre-quantize has zero points (GPTQ, asymmetric); the builder's own symmetric rounding has none, but the block size is
# dropped for every int4 there rather than split by how the int4 is made: it saves ~5 MB on SmolLM2.
CUDA_ODD_BLOCKS = ("onnxruntime's CUDA kernel for an int4 embedding shared with the LM head misreads zero points when "
                   "a row has an odd number of blocks ({hidden} / {block} = {count})")

# Known reasons behind a builder failure, by architecture, for a clearer line than the builder's own error.
KNOWN_EXPORT_FAILURES = {
    "Gemma3ForCausalLM": "the builder reads Gemma 3's RoPE settings in transformers 4's flat form (rope_type at the "
                         "top), and transformers 5 gives them nested per layer type",
}


@dataclass(frozen=True)
class Limit:
    """A value of a search option this model cannot take, and why (one line)."""

    option: str  # a SearchSpace field: int4_method, symmetric, method
    value: object
    reason: str


def weight_shapes(base: BaseModel) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the model's safetensors files (headers only, no weights read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(Path(base.path).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                shapes[name] = tuple(weights.get_slice(name).get_shape())
    return shapes


def limits(base: BaseModel, execution_provider: str = "cpu") -> tuple[Limit, ...]:
    """The search options ``base`` cannot take on ``execution_provider``, each with why."""
    from autotune.quantize import BLOCK_SIZES, no_int4_layout

    shapes = weight_shapes(base)
    found: list[Limit] = []
    unlaid = no_int4_layout(shapes)
    if unlaid:
        why = f"no pre-quantized int4 layout for {', '.join(unlaid[:2])} ({base.architecture})"
        found += [Limit("int4_method", "gptq", why), Limit("symmetric", False, why)]
    elif shapes and not ({"model.norm.weight"} <= set(shapes) and any(n.startswith("model.layers.") for n in shapes)):
        found.append(Limit("int4_method", "gptq", f"GPTQ walks model.layers and model.norm, which {base.architecture} "
                                                  "does not have"))
    embedding = next((shape for name, shape in shapes.items() if name.endswith("embed_tokens.weight")), None)
    if execution_provider == "cuda" and embedding and "lm_head.weight" not in shapes:  # tied: one int4 table
        hidden = embedding[1]
        found += [Limit("block_size", block, CUDA_ODD_BLOCKS.format(hidden=hidden, block=block, count=hidden // block))
                  for block in BLOCK_SIZES if hidden % block == 0 and hidden // block % 2]
    return tuple(found)


def check_candidate(base: BaseModel, spec: CandidateSpec) -> None:
    """Refuse one candidate that asks for what ``base`` cannot take (:func:`limits`), before any work.

    Raises:
        UserError: naming the option and why.
    """
    asked = {"int4_method": spec.int4_method, "symmetric": spec.export.symmetric if spec.export.precision == "int4" else True,
             "block_size": spec.export.block_size}
    for limit in limits(base, spec.export.execution_provider):
        if asked[limit.option] == limit.value and spec.export.precision == "int4":
            flag = {"symmetric": "--asymmetric", "int4_method": "--int4-method gptq", "block_size": f"--block-size {limit.value}"}
            raise UserError(f"this model cannot take {flag[limit.option]}: {limit.reason}")


def check_exportable(base: BaseModel, trust_remote_code: bool = False) -> None:
    """Refuse a model the onnxruntime-genai builder cannot export at all, before any training.

    A model that passed is remembered (by its fingerprint and the builder's and transformers' versions),
    so a resumed run or another worker does not ask again.

    Raises:
        UserError: with the builder's reason (or the known one), and the fix.
    """
    from autotune.cache import atomic_write_text, cache_root, content_key, library_version, library_versions

    passed = cache_root() / "exportable" / content_key(
        base.fingerprint, trust_remote_code, library_versions("onnxruntime-genai", "transformers"))
    if passed.is_file():
        return
    from onnxruntime_genai.models import builder

    with tempfile.TemporaryDirectory(prefix="autotune-probe-") as tmp:
        options = ["config_only=true", f"hf_remote={'true' if trust_remote_code else 'false'}"]
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                extra = builder.parse_extra_options("", str(base.path), tmp, "int4", "cpu", f"{tmp}/cache", options)
                builder.create_model("", str(base.path), tmp, "int4", "cpu", f"{tmp}/cache", **extra)
        except (Exception, SystemExit) as exc:  # the builder raises bare Exceptions (KeyError, ...) and may exit
            why = KNOWN_EXPORT_FAILURES.get(base.architecture) or f"{type(exc).__name__}: {str(exc).strip() or '?'}"
            raise UserError(
                f"--model {base.name}: onnxruntime-genai {library_version('onnxruntime-genai')}'s builder cannot export "
                f"this {base.architecture} as transformers {library_version('transformers')} reads it ({why}); "
                "choose a model of another family") from exc
        if not (Path(tmp) / "genai_config.json").is_file():
            raise UserError(f"--model {base.name}: the onnxruntime-genai builder wrote no config for {base.architecture}; "
                            "choose a model of another family")
    atomic_write_text(passed, base.architecture)

