"""The search space: which candidates may be tried, read from YAML, cut to the hardware.

A space file maps each choice to a list (categorical) or a range::

    method: [lora, qlora]
    rank: {low: 4, high: 64, log: true}
    alpha_ratio: [0.5, 1, 2]        # alpha = ratio * rank
    learning_rate: {low: 1.0e-4, high: 1.0e-3, log: true}
    int4_method: [rtn, int4-aware, gptq]
    precision: [int4, int8, fp32]
    block_size: [32, 64]            # int4/int8 only
    accuracy_level: [0, 4]          # int4/int8 on the CPU only
    symmetric: [true, false]        # int4 only
    int8_layers: [none, last]       # int4 only

:meth:`SearchSpace.restrict` drops what the hardware profile cannot run (QLoRA
without bitsandbytes 4-bit, fp16 on the CPU, ...), and :meth:`SearchSpace.suggest`
turns an Optuna trial into a :class:`~autotune.candidate.CandidateSpec`, sampling the
quantization options only for quantized precisions so invalid combinations are never
sampled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from autotune.candidate import INT4_METHODS, CandidateSpec
from autotune.errors import UserError
from autotune.export import BLOCK_SIZES, INT4_ALGOS, INT8_LAYERS, PRECISIONS, ExportSpec
from autotune.train import METHODS, TARGET_MODULES, TrainSpec


@dataclass(frozen=True)
class Choice:
    """A categorical choice."""

    values: tuple

    def suggest(self, trial, name: str):
        if len(self.values) == 1:
            return self.values[0]
        return trial.suggest_categorical(name, list(self.values))


@dataclass(frozen=True)
class Range:
    """A numeric range; integer when both ends are integers."""

    low: float
    high: float
    log: bool = False
    step: float | None = None

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def suggest(self, trial, name: str):
        if self.low == self.high:
            return self.low
        if self.is_int:
            return trial.suggest_int(name, self.low, self.high, log=self.log, step=int(self.step or 1))
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)


Param = Union[Choice, Range]

_TRAIN_KEYS = ("method", "rank", "alpha", "alpha_ratio", "learning_rate", "steps", "batch_size", "dropout", "target_modules",
               "int4_method")
_EXPORT_KEYS = ("precision", "block_size", "accuracy_level", "algo", "symmetric", "int8_layers")
_WHOLE = ("rank", "steps", "batch_size")
_ALLOWED = {
    "method": METHODS,
    "target_modules": tuple(TARGET_MODULES),
    "precision": PRECISIONS,
    "block_size": BLOCK_SIZES,
    "accuracy_level": (0, 1, 2, 3, 4),
    "algo": INT4_ALGOS,
    "int4_method": INT4_METHODS,
    "symmetric": (True, False),
    "int8_layers": tuple(INT8_LAYERS),
}


@dataclass(frozen=True)
class SearchSpace:
    """Every searchable choice. ``alpha`` and ``alpha_ratio`` are exclusive."""

    method: Param = Choice(("lora",))
    rank: Param = Choice((16,))
    alpha: Param | None = None
    alpha_ratio: Param | None = Choice((2.0,))
    learning_rate: Param = Choice((3e-4,))
    steps: Param = Choice((150,))
    batch_size: Param = Choice((8,))
    dropout: Param = Choice((0.05,))
    target_modules: Param = Choice(("all-linear",))
    precision: Param = Choice(("int4",))
    block_size: Param = Choice((32,))
    accuracy_level: Param = Choice((4,))
    algo: Param = Choice(("default",))
    int4_method: Param = Choice(("rtn",))
    symmetric: Param = Choice((True,))
    int8_layers: Param = Choice(("none",))
    seed: int = 0
    source: str = field(default="", compare=False)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SearchSpace":
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError as exc:
            raise UserError(f"--space {path}: no such file; check the path, or leave --space out for the default space") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UserError(f"--space {path}: not valid YAML{at} ({problem}); fix the syntax: each choice is "
                            "'key: [a, b]' or 'key: {low: x, high: y}'") from exc
        if not isinstance(raw, dict):
            raise UserError(f"--space {path}: must be a mapping of choice -> list or range")
        return cls.from_dict(raw, where=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "search space") -> "SearchSpace":
        known = _TRAIN_KEYS + _EXPORT_KEYS + ("seed",)
        params: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                raise UserError(f"{where}: unknown key '{key}' (known: {', '.join(known)})")
            if key == "seed":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise UserError(f"{where}: 'seed' must be a whole number, got {value!r}")
                params[key] = value
                continue
            params[key] = _parse_param(key, value, where)
        if "alpha" in params and "alpha_ratio" in params:
            raise UserError(f"{where}: give either 'alpha' or 'alpha_ratio', not both")
        if "alpha" in params:
            params["alpha_ratio"] = None
        return cls(**params, source=where)

    # ------------------------------------------------------------------ hardware

    def restrict(self, precisions: tuple[str, ...], qlora: bool, execution_provider: str,
                 widths: tuple[int, ...] = ()) -> "SearchSpace":
        """Only what the profile can run, and block sizes that divide the model's ``widths``
        (hidden and MLP sizes: the builder quantizes along them). Raises if nothing is left of a choice."""
        where = self.source or "search space"
        blocks = [b for b in _values(self.block_size) if all(w % b == 0 for w in widths)]
        if not blocks:
            raise UserError(f"{where}: no block size in {list(_values(self.block_size))} divides this model's widths "
                            f"{list(widths)}; add one that does, e.g. 16")
        allowed = [p for p in _values(self.precision) if p in precisions]
        if not allowed:
            raise UserError(
                f"{where}: none of the precisions {list(_values(self.precision))} runs on "
                f"{execution_provider} (valid there: {', '.join(precisions)})"
            )
        methods = [m for m in _values(self.method) if m != "qlora" or qlora]
        if not methods:
            raise UserError(f"{where}: QLoRA is the only method, but this hardware cannot run bitsandbytes 4-bit; add lora")
        changes: dict[str, Any] = {"precision": Choice(tuple(allowed)), "method": Choice(tuple(methods)),
                                   "block_size": Choice(tuple(blocks))}
        if "int4" not in allowed:  # the int4 methods have nothing to act on
            changes["int4_method"] = Choice(("rtn",))
        if execution_provider != "cpu":
            changes["accuracy_level"] = Choice((0,))  # a CPU kernel setting; others use their default
        return dataclasses.replace(self, **changes)

    def suggest(self, trial, execution_provider: str) -> CandidateSpec:
        """Sample one candidate (define-by-run: each option only where it applies).

        ``int4_method`` is drawn with the training choices, since ``int4-aware`` changes the
        adapter: its int4 block size is then a training choice too, and an int4 export of that
        adapter uses exactly that grid (symmetric, the builder's default rounding, no int8
        layers). QLoRA never draws ``int4-aware`` (its forward is nf4, not the export's int4).
        """
        rank = int(self.rank.suggest(trial, "rank"))
        if self.alpha is not None:
            alpha = float(self.alpha.suggest(trial, "alpha"))
        else:
            alpha = float(self.alpha_ratio.suggest(trial, "alpha_ratio")) * rank
        method = self.method.suggest(trial, "method")
        int4_method = self._int4_method(method).suggest(trial, "int4_method" if method == "lora" else f"int4_method_{method}")
        aware = int4_method == "int4-aware"
        grid_block = int(self.block_size.suggest(trial, "block_size")) if aware else 32
        train = TrainSpec(
            method=method,
            rank=rank,
            alpha=alpha,
            dropout=float(self.dropout.suggest(trial, "dropout")),
            learning_rate=float(self.learning_rate.suggest(trial, "learning_rate")),
            steps=int(self.steps.suggest(trial, "steps")),
            batch_size=int(self.batch_size.suggest(trial, "batch_size")),
            target_modules=self.target_modules.suggest(trial, "target_modules"),
            seed=self.seed,
            int4_aware=aware,
            int4_block_size=grid_block,
        )
        precision = self.precision.suggest(trial, "precision")
        export = ExportSpec(precision=precision, execution_provider=execution_provider)
        if export.quantized:
            knobs = dict(
                block_size=grid_block if aware else int(self.block_size.suggest(trial, "block_size")),
                accuracy_level=int(self.accuracy_level.suggest(trial, "accuracy_level")),
            )
            if precision == "int4" and int4_method == "gptq":
                knobs.update(symmetric=self.symmetric.suggest(trial, "symmetric"), calibration="gptq")
            elif precision == "int4" and not aware:
                knobs.update(symmetric=self.symmetric.suggest(trial, "symmetric"), algo=self.algo.suggest(trial, "algo"),
                             int8_layers=self.int8_layers.suggest(trial, "int8_layers"))
            export = ExportSpec(precision=precision, execution_provider=execution_provider, **knobs)
        return CandidateSpec(train=train, export=export.normalized())

    def _int4_method(self, method: str) -> Choice:
        """The int4 methods open to a training method (QLoRA cannot be int4-aware)."""
        if method == "lora":
            return self.int4_method
        return Choice(tuple(m for m in self.int4_method.values if m != "int4-aware") or ("rtn",))

    def training_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The sampled parameters of a trial that decide its adapter (to queue its siblings)."""
        names = set(self.train_param_names()) | {"alpha", "int4_method_qlora"}
        if params.get("int4_method") == "int4-aware":
            names.add("block_size")  # the grid it was trained against
        return {k: v for k, v in params.items() if k in names}

    def train_param_names(self) -> tuple[str, ...]:
        """Names of the sampled parameters that change the adapter."""
        return tuple(k for k in _TRAIN_KEYS if isinstance(getattr(self, k), (Choice, Range)) and _sampled(getattr(self, k)))

    def size(self) -> int | None:
        """An upper bound on the distinct candidates if every choice is categorical, else ``None``.

        (An rtn and a gptq trial of one adapter at int8 or fp32 are the same model, counted twice.)
        """
        params = [getattr(self, k) for k in _TRAIN_KEYS[:-1] + _EXPORT_KEYS[1:] if getattr(self, k) is not None]
        if any(isinstance(p, Range) for p in params):
            return None
        n = {k: len(getattr(self, k).values) for k in ("block_size", "accuracy_level", "algo", "symmetric", "int8_layers")}
        shared = 1
        for key in ("rank", "alpha", "alpha_ratio", "learning_rate", "steps", "batch_size", "dropout", "target_modules"):
            if getattr(self, key) is not None:
                shared *= len(getattr(self, key).values)
        total = 0
        for method in self.method.values:
            for int4_method in self._int4_method(method).values:
                aware = int4_method == "int4-aware"
                exports = 0
                for precision in _values(self.precision):
                    if precision == "int4":
                        exports += n["accuracy_level"] * (1 if aware else n["block_size"] * n["symmetric"] * (
                            1 if int4_method == "gptq" else n["algo"] * n["int8_layers"]))
                    elif precision == "int8":
                        exports += n["accuracy_level"] * (1 if aware else n["block_size"])
                    else:
                        exports += 1
                total += shared * exports * (n["block_size"] if aware else 1)
        return total


def default_space_path() -> Path:
    """The shipped default space: ``search_spaces/default.yaml`` beside the shipped hardware profiles."""
    from autotune.profiles import default_profiles_dir

    return default_profiles_dir().parent / "search_spaces" / "default.yaml"


def _sampled(param: Param) -> bool:
    return isinstance(param, Range) and param.low != param.high or isinstance(param, Choice) and len(param.values) > 1


def _values(param: Param) -> tuple:
    if isinstance(param, Choice):
        return param.values
    raise UserError("precision and method must be lists, not ranges")


def _parse_param(key: str, value: Any, where: str) -> Param:
    if isinstance(value, dict):
        extra = set(value) - {"low", "high", "log", "step"}
        if extra or "low" not in value or "high" not in value:
            raise UserError(f"{where}: '{key}' range needs low and high (and optional log, step); got {sorted(value)}")
        if key in _ALLOWED:
            raise UserError(f"{where}: '{key}' is categorical; give a list like {list(_ALLOWED[key])}")
        low, high = value["low"], value["high"]
        if not all(isinstance(v, (int, float)) for v in (low, high)) or low > high:
            raise UserError(f"{where}: '{key}' range is empty or not numeric (low {low}, high {high}); make low <= high")
        if value.get("log") and low <= 0:
            raise UserError(f"{where}: '{key}' log range must start above 0")
        step = value.get("step")
        if step is not None and (value.get("log") or not isinstance(step, (int, float)) or step <= 0):
            raise UserError(f"{where}: '{key}' step must be a positive number and cannot go with log: true")
        if key in _WHOLE and not (isinstance(low, int) and isinstance(high, int)):
            raise UserError(f"{where}: '{key}' range must have whole-number ends, got {low} and {high}")
        return Range(low, high, bool(value.get("log", False)), value.get("step"))
    values = tuple(value) if isinstance(value, list) else (value,)
    if not values:
        raise UserError(f"{where}: '{key}' is an empty list; give at least one value")
    allowed = _ALLOWED.get(key)
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise UserError(f"{where}: '{key}' value {bad[0]!r} is not one of {', '.join(map(str, allowed))}")
    elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 or key == "dropout" and v == 0)
                 for v in values):
        raise UserError(f"{where}: '{key}' values must be positive numbers, got {list(values)}")
    if key in _WHOLE and not all(isinstance(v, int) for v in values):
        raise UserError(f"{where}: '{key}' values must be whole numbers, got {list(values)}")
    if key == "dropout" and not all(0 <= v < 1 for v in values):
        raise UserError(f"{where}: 'dropout' values must be in [0, 1), got {list(values)}")
    return Choice(values)
