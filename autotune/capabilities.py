"""What a model can take, checked before any work: whether the builder exports it at all, and which
search options it cannot take (each with why), so the space drops them rather than fail trials later.

Both read only the model's config and its weights' names and shapes (the safetensors headers):

- :func:`check_exportable` runs the onnxruntime-genai builder's config-only export, whose model class
  reads every architecture setting the real export reads, in well under a second.
- :func:`limits` names the options the pipeline has no way to run for this checkpoint: a pre-quantized
  int4 (GPTQ, asymmetric rounding) needs an int4 layout for every matrix and the Llama layout GPTQ
  walks; QLoRA on a CPU needs bitsandbytes' 4-bit widths.
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


def limits(base: BaseModel) -> tuple[Limit, ...]:
    """The search options ``base`` cannot take, each with why."""
    from autotune.quantize import no_int4_layout

    shapes = weight_shapes(base)
    found: list[Limit] = []
    unlaid = no_int4_layout(shapes)
    if unlaid:
        why = f"no pre-quantized int4 layout for {', '.join(unlaid[:2])} ({base.architecture})"
        found += [Limit("int4_method", "gptq", why), Limit("symmetric", False, why)]
    elif shapes and not ({"model.norm.weight"} <= set(shapes) and any(n.startswith("model.layers.") for n in shapes)):
        found.append(Limit("int4_method", "gptq", f"GPTQ walks model.layers and model.norm, which {base.architecture} "
                                                  "does not have"))
    return tuple(found)


def check_candidate(base: BaseModel, spec: CandidateSpec) -> None:
    """Refuse one candidate that asks for what ``base`` cannot take (:func:`limits`), before any work.

    Raises:
        UserError: naming the option and why.
    """
    asked = {"int4_method": spec.int4_method, "symmetric": spec.export.symmetric if spec.export.precision == "int4" else True}
    for limit in limits(base):
        if asked[limit.option] == limit.value and spec.export.precision == "int4":
            flag = {"symmetric": "--asymmetric", "int4_method": "--int4-method gptq"}
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

