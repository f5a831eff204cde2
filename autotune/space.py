"""The search space: which candidates may be tried, read from YAML, cut to the hardware.

A space file maps each choice to a list (categorical) or a range::

    start: {method: lora, rank: 16, alpha_ratio: 2, learning_rate: 1.0e-3, int4_method: gptq}
    local_first: 2                  # the next 2 new adapters keep the start's categorical choices
    method: [lora, qlora]
    rank: {low: 4, high: 64, log: true}
    alpha_ratio: [1, 2]             # alpha = ratio * rank
    learning_rate: {low: 5.0e-4, high: 3.0e-3, log: true}
    steps: [30, 60, 120]            # rungs: every adapter trains the first; the best continue
    epochs: 2                       # the top rung is at least 2 passes over the training split
    promote: 0.5                    # the share of a rung's adapters that continue to the next
    int4_method: [rtn, int4-aware, gptq]
    precision: [int4, int8, fp32]
    block_size: [32, 64]            # int4/int8 only
    accuracy_level: [0, 4]          # int4/int8 on the CPU only
    symmetric: [true, false]        # int4 only
    int8_layers: [none, last]       # int4 only

An *adapter* is the training choices without the steps; ``steps`` are the rungs of successive
halving (:mod:`autotune.schedule`): an adapter is first trained for ``steps[0]`` and exported the
*screening* way (:meth:`SearchSpace.screening`: int8 on the CPU), the best continue to the next
rung, and the top rung's best gets the other precisions and int4 methods (:meth:`SearchSpace.exports`).
``start`` is the first adapter and int4 export: a recipe known to learn, so the search starts from strength.

:meth:`SearchSpace.restrict` drops what the hardware profile cannot run (QLoRA
without bitsandbytes 4-bit, fp16 on the CPU, ...) and learning rates too low to learn within
the first rung (``min_lr_steps``); :meth:`SearchSpace.suggest` turns an Optuna trial into a
:class:`~autotune.candidate.CandidateSpec`, sampling quantization options only where they apply.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
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
        return self.values[0] if len(self.values) == 1 else trial.suggest_categorical(name, list(self.values))


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

# The adapter: everything that changes the trained weights except the steps (the rungs).
_TRAIN_KEYS = ("method", "rank", "alpha", "alpha_ratio", "learning_rate", "batch_size", "dropout", "target_modules",
               "int4_method")
_EXPORT_KEYS = ("precision", "block_size", "accuracy_level", "algo", "symmetric", "int8_layers")
_OTHER_KEYS = ("steps", "epochs", "promote", "min_lr_steps", "start", "local_first", "seed")
# The start's choices a nearby adapter keeps (:meth:`SearchSpace.local_params`): what kind of adapter it is (method,
# where it attaches, int4-aware with its grid); its numeric knobs are the sampler's.
_LOCAL_KEYS = ("method", "target_modules", "int4_aware", "block_size")
_WHOLE = ("rank", "steps", "batch_size")
_ALLOWED = {"method": METHODS, "target_modules": tuple(TARGET_MODULES), "precision": PRECISIONS, "block_size": BLOCK_SIZES,
            "accuracy_level": (0, 1, 2, 3, 4), "algo": INT4_ALGOS, "int4_method": INT4_METHODS,
            "symmetric": (True, False), "int8_layers": tuple(INT8_LAYERS)}
# The screening export of a plain adapter: the first of these the space allows. int8 keeps an adapter's
# accuracy (within 0.01 of fp32 over seeds) at a quarter of fp32's export and measuring time.
SCREENING_ORDER = ("int8", "fp16", "bf16", "fp32", "int4")
# Exports of an adapter that reached the top rung, best value first (after the screening one).
EXPORT_ORDER = ("int4", "fp32", "bf16", "fp16", "int8")


@dataclass(frozen=True)
class SearchSpace:
    """Every searchable choice. ``alpha`` and ``alpha_ratio`` are exclusive. ``steps`` holds the rungs."""

    method: Param = Choice(("lora",))
    rank: Param = Choice((16,))
    alpha: Param | None = None
    alpha_ratio: Param | None = Choice((2.0,))
    learning_rate: Param = Choice((3e-4,))
    steps: Choice = Choice((150,))
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
    promote: float = 0.5
    min_lr_steps: float | None = None
    epochs: float | None = None  # the top rung trains at least this many passes over the training split (fit_data)
    start: tuple[tuple[str, Any], ...] = ()
    local_first: int = 0  # new adapters after the start that keep its categorical choices (local_params)
    seed: int = 0
    screen: str | None = None  # the screening precision, when a bound ruled out the first of SCREENING_ORDER
    source: str = field(default="", compare=False)
    notes: tuple[str, ...] = field(default=(), compare=False)  # what restrict() dropped, and why

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
        known = _TRAIN_KEYS + _EXPORT_KEYS + _OTHER_KEYS
        params: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                raise UserError(f"{where}: unknown key '{key}' (known: {', '.join(known)})")
            if key == "seed":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise UserError(f"{where}: 'seed' must be a whole number, got {value!r}")
                params[key] = value
            elif key == "promote":
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
                    raise UserError(f"{where}: 'promote' is the share of a rung's adapters that continue, in (0, 1); "
                                    f"got {value!r}")
                params[key] = float(value)
            elif key in ("min_lr_steps", "epochs"):
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                    raise UserError(f"{where}: '{key}' must be a positive number, got {value!r}")
                params[key] = float(value)
            elif key == "start":
                params[key] = _parse_start(value, where)
            elif key == "local_first":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise UserError(f"{where}: 'local_first' is a number of adapters, a whole number >= 0; got {value!r}")
                params[key] = value
            elif key == "steps":
                params[key] = _parse_rungs(value, where)
            else:
                params[key] = _parse_param(key, value, where)
        if "alpha" in params and "alpha_ratio" in params:
            raise UserError(f"{where}: give either 'alpha' or 'alpha_ratio', not both")
        if "alpha" in params:
            params["alpha_ratio"] = None
        return cls(**params, source=where)

    @property
    def rungs(self) -> tuple[int, ...]:
        return self.steps.values

    # ------------------------------------------------------------------ hardware

    def restrict(self, precisions: tuple[str, ...], qlora: bool, execution_provider: str,
                 widths: tuple[int, ...] = (), drop: Sequence[tuple[str, Any, str]] = ()) -> "SearchSpace":
        """Only what the profile can run, block sizes that divide the model's ``widths`` (hidden and
        MLP sizes: the builder quantizes along them), learning rates that can learn within the
        first rung (``min_lr_steps``), and none of the ``drop`` values, each ``(option, value, why)``
        (what the model cannot take: :func:`autotune.capabilities.limits`). Raises if nothing is left
        of a choice; :attr:`notes` says what was dropped and why."""
        where = self.source or "search space"
        notes = list(self.notes)
        blocks = [b for b in _values(self.block_size) if all(w % b == 0 for w in widths)]
        if not blocks:
            raise UserError(f"{where}: no block size in {list(_values(self.block_size))} divides this model's widths "
                            f"{list(widths)}; add one that does, e.g. 16")
        if len(blocks) < len(_values(self.block_size)):
            notes.append(f"block sizes {[b for b in _values(self.block_size) if b not in blocks]} dropped: they do "
                         f"not divide this model's widths {list(widths)}")
        allowed = [p for p in _values(self.precision) if p in precisions]
        if not allowed:
            raise UserError(
                f"{where}: none of the precisions {list(_values(self.precision))} runs on "
                f"{execution_provider} (valid there: {', '.join(precisions)})"
            )
        if len(allowed) < len(_values(self.precision)):
            notes.append(f"precisions {[p for p in _values(self.precision) if p not in allowed]} dropped: they do not "
                         f"run on {execution_provider}")
        methods = [m for m in _values(self.method) if m != "qlora" or qlora]
        if not methods:
            raise UserError(f"{where}: QLoRA is the only method, but this hardware cannot run bitsandbytes 4-bit; add lora")
        if len(methods) < len(_values(self.method)):
            notes.append("QLoRA dropped: bitsandbytes 4-bit does not run on this hardware")
        changes: dict[str, Any] = {"precision": Choice(tuple(allowed)), "method": Choice(tuple(methods)),
                                   "block_size": Choice(tuple(blocks))}
        if "int4" not in allowed:  # the int4 methods have nothing to act on
            changes["int4_method"] = Choice(("rtn",))
        if execution_provider != "cpu":
            changes["accuracy_level"] = Choice((0,))  # a CPU kernel setting; others use their default
        for option, value, why in drop:
            values = _values(changes.get(option, getattr(self, option)))
            kept = tuple(v for v in values if v != value)
            if not kept:
                raise UserError(f"{where}: {option} offers only {value!r}, which this model cannot take ({why})")
            if len(kept) < len(values):
                changes[option] = Choice(kept)
                notes.append(f"{option} {value} dropped: {why}")
        lr = self.learning_rate
        if self.min_lr_steps and _low(lr) * self.rungs[0] < self.min_lr_steps:
            low = self.min_lr_steps / self.rungs[0]
            if _high(lr) < low:
                raise UserError(f"{where}: every learning rate is below {low:.1e}, too low to learn in "
                                f"{self.rungs[0]} steps (min_lr_steps {self.min_lr_steps:g}); raise it or the first rung")
            changes["learning_rate"] = (Range(low, lr.high, lr.log, lr.step) if isinstance(lr, Range)
                                        else Choice(tuple(v for v in lr.values if v >= low)))
            notes.append(f"learning rates below {low:.1e} dropped: too low to learn within the first rung of "
                         f"{self.rungs[0]} steps (min_lr_steps {self.min_lr_steps:g})")
        space = dataclasses.replace(self, **changes)
        start = dict(self.start)
        if start and not space._admits(start):
            notes.append(f"start {start} dropped: not in the space this hardware runs")
            start = {}
        return dataclasses.replace(space, start=tuple(start.items()), notes=tuple(notes))

    def fit_data(self, examples: int) -> "SearchSpace":
        """The top rung made at least :attr:`epochs` passes over ``examples`` training examples (smallest batch)."""
        batch = int(_low(self.batch_size))
        top = math.ceil(self.epochs * examples / batch) if self.epochs else 0
        if top <= self.rungs[-1]:
            return self
        note = f"top rung {self.rungs[-1]} -> {top} steps: {self.epochs:g} epochs of {examples} training examples of batch {batch}"
        return dataclasses.replace(self, steps=Choice(self.rungs[:-1] + (top,)), notes=self.notes + (note,))

    # ------------------------------------------------------------------ sampling

    def suggest(self, trial, execution_provider: str, steps: int | None = None, export: bool = False) -> CandidateSpec:
        """Sample one candidate (define-by-run: each option only where it applies).

        The adapter trains for ``steps`` (default: the first rung). ``export`` False exports it
        the screening way (:meth:`screening`); True samples the export (its ``precision`` is
        fixed by the trial's enqueued parameters, see :mod:`autotune.schedule`).
        """
        train = self.adapter(trial, self.rungs[0] if steps is None else steps)
        if not export:
            return CandidateSpec(train, self.screening(train, execution_provider))
        return CandidateSpec(train, self.export(trial, train, self.precision.suggest(trial, "precision"),
                                                execution_provider))

    def adapter(self, trial, steps: int) -> TrainSpec:
        """The training choices of a trial. ``int4-aware`` is one (it changes the adapter): its int4 block
        size is then a training choice too. QLoRA never draws it (its forward is nf4, not the export's int4)."""
        rank = int(self.rank.suggest(trial, "rank"))
        if self.alpha is not None:
            alpha = float(self.alpha.suggest(trial, "alpha"))
        else:
            alpha = float(self.alpha_ratio.suggest(trial, "alpha_ratio")) * rank
        method = self.method.suggest(trial, "method")
        aware = (method == "lora" and "int4-aware" in self.int4_method.values
                 and Choice((False, True)).suggest(trial, "int4_aware"))
        return TrainSpec(
            method=method,
            rank=rank,
            alpha=alpha,
            dropout=float(self.dropout.suggest(trial, "dropout")),
            learning_rate=float(self.learning_rate.suggest(trial, "learning_rate")),
            steps=steps,
            batch_size=int(self.batch_size.suggest(trial, "batch_size")),
            target_modules=self.target_modules.suggest(trial, "target_modules"),
            seed=self.seed,
            int4_aware=aware,
            int4_block_size=int(self.block_size.suggest(trial, "block_size")) if aware else 32,
        )

    def screening(self, train: TrainSpec, execution_provider: str) -> ExportSpec:
        """How an adapter is exported to be judged at a rung: an int4-aware one at int4 on its own grid
        (what it is made for), any other at the most accurate cheap precision the space allows
        (:attr:`screen` when a bound ruled the others out)."""
        if train.int4_aware:
            return ExportSpec("int4", execution_provider, block_size=train.int4_block_size,
                              accuracy_level=self.accuracy_level.values[0]).normalized()
        return self.screening_at(self.screen or self.screening_order()[0], execution_provider)

    def screening_order(self) -> list[str]:
        """The precisions an adapter may be screened at, most accurate per cost first."""
        return [p for p in SCREENING_ORDER if p in self.precision.values]

    def screening_at(self, precision: str, execution_provider: str) -> ExportSpec:
        """The screening export of a plain adapter at ``precision``: block 32 where allowed, the builder's
        own rounding, no int8 layers."""
        block = 32 if 32 in self.block_size.values else self.block_size.values[0]
        return ExportSpec(precision, execution_provider, block_size=block,
                          accuracy_level=self.accuracy_level.values[0]).normalized()

    def export(self, trial, train: TrainSpec, precision: str, execution_provider: str) -> ExportSpec:
        """The export choices of a trial at ``precision``. An int4-aware adapter's int4 export uses
        exactly its trained grid (symmetric, the builder's default rounding, no int8 layers)."""
        export = ExportSpec(precision=precision, execution_provider=execution_provider)
        if not export.quantized:
            return export.normalized()
        if train.int4_aware:
            block = train.int4_block_size
        else:
            block = int(self.block_size.suggest(trial, "block_size"))
        knobs: dict[str, Any] = dict(block_size=block, accuracy_level=int(self.accuracy_level.suggest(trial, "accuracy_level")))
        if precision == "int4" and not train.int4_aware:
            method = self._export_int4_method().suggest(trial, "int4_method")
            knobs.update(symmetric=self.symmetric.suggest(trial, "symmetric"))
            if method == "gptq":
                knobs.update(calibration="gptq")
            else:
                knobs.update(algo=self.algo.suggest(trial, "algo"), int8_layers=self.int8_layers.suggest(trial, "int8_layers"))
        return ExportSpec(precision=precision, execution_provider=execution_provider, **knobs).normalized()

    def _export_int4_method(self) -> Choice:
        """How a plain adapter's int4 export keeps its accuracy (int4-aware is a training choice)."""
        return Choice(tuple(m for m in self.int4_method.values if m != "int4-aware") or ("rtn",))

    def exports(self, train: TrainSpec, execution_provider: str) -> list[dict[str, Any]]:
        """The exports an adapter that reached the top rung gets, best value first: each a mapping of
        the parameters to fix (``precision``, and the start's int4 knobs for the first int4 export);
        the rest of each is sampled. The screening precision is not repeated; an int4-aware adapter
        gets no other precision (it has learnt the int4 model, not the full-precision one)."""
        if train.int4_aware:
            return []
        screened = self.screening(train, execution_provider).precision
        plan = []
        for precision in EXPORT_ORDER:
            if precision in self.precision.values and precision != screened:
                fixed: dict[str, Any] = {"precision": precision}
                if precision == "int4":
                    fixed.update({k: v for k, v in self.start if k in ("int4_method", "block_size", "symmetric")
                                  and (k != "int4_method" or v in self._export_int4_method().values)})
                plan.append(fixed)
        if "int4" in self.precision.values and screened != "int4":
            plan.append({"precision": "int4"})  # a second int4 export, its knobs sampled
        return plan

    def start_params(self) -> dict[str, Any]:
        """The Optuna parameters of the start adapter (empty if the space declares none)."""
        start = dict(self.start)
        params = {k: start[k] for k in ("method", "rank", "alpha", "alpha_ratio", "learning_rate", "batch_size", "dropout",
                                        "target_modules") if k in start and _sampled(getattr(self, k))}
        if start and start.get("method", "lora") == "lora" and "int4-aware" in self.int4_method.values:
            params["int4_aware"] = start.get("int4_method") == "int4-aware"  # sampled for LoRA: fix it either way
            if params["int4_aware"] and "block_size" in start:
                params["block_size"] = start["block_size"]
        return params

    def local_params(self) -> dict[str, Any]:
        """The parameters a nearby adapter fixes: the start's method, target modules and int4-awareness (with
        its grid) where the space samples them; the sampler draws the numeric ones (rank, alpha, learning rate,
        ...). Empty without a start, or where the space samples none of them."""
        return {k: v for k, v in self.start_params().items() if k in _LOCAL_KEYS}

    def _admits(self, start: dict[str, Any]) -> bool:
        """Whether every choice of ``start`` lies in this space."""
        for key, value in start.items():
            param = getattr(self, key if key != "int4_method" else "int4_method", None)
            if param is None:
                return False
            if isinstance(param, Choice) and value not in param.values:
                return False
            if isinstance(param, Range) and not param.low <= value <= param.high:
                return False
        return True

    def adapter_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The sampled parameters of a trial that decide its adapter (to continue or export it)."""
        names = set(self.train_param_names()) | {"alpha", "int4_aware"}
        if params.get("int4_aware"):
            names.add("block_size")  # the grid it was trained against
        return {k: v for k, v in params.items() if k in names}

    def train_param_names(self) -> tuple[str, ...]:
        """Names of the sampled parameters that change the adapter."""
        return tuple(k for k in _TRAIN_KEYS if isinstance(getattr(self, k), (Choice, Range)) and _sampled(getattr(self, k)))

    def adapters(self) -> int | None:
        """The number of distinct adapters if every training choice is categorical, else ``None``."""
        count = 1
        for key in ("rank", "alpha", "alpha_ratio", "learning_rate", "batch_size", "dropout", "target_modules"):
            param = getattr(self, key)
            if isinstance(param, Range) and _sampled(param):
                return None
            if param is not None:
                count *= len(param.values) if isinstance(param, Choice) else 1
        methods = 0
        for method in self.method.values:
            aware = method == "lora" and "int4-aware" in self.int4_method.values
            methods += 1 + (len(self.block_size.values) if aware else 0)
        return count * methods


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


def _low(param: Param) -> float:
    return param.low if isinstance(param, Range) else min(param.values)


def _high(param: Param) -> float:
    return param.high if isinstance(param, Range) else max(param.values)


def _parse_rungs(value: Any, where: str) -> Choice:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise UserError(f"{where}: 'steps' lists the rungs, whole numbers of steps above 0 (e.g. [30, 60, 120]); "
                        f"got {value!r}")
    return Choice(tuple(sorted(set(values))))


def _parse_start(value: Any, where: str) -> tuple[tuple[str, Any], ...]:
    keys = ("method", "rank", "alpha", "alpha_ratio", "learning_rate", "batch_size", "dropout", "target_modules",
            "int4_method", "block_size", "symmetric")
    if not isinstance(value, dict) or not set(value) <= set(keys):
        raise UserError(f"{where}: 'start' is a mapping of single choices ({', '.join(keys)}); got {value!r}")
    for key, item in value.items():  # each value must be valid as a one-value choice of its key
        _parse_param(key, [item], where)
    return tuple(value.items())


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
