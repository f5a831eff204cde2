"""Edge bounds: the hard limits a shipped model must meet.

``--max-latency MS`` (the latency objective), ``--max-size MB`` (the exported folder on disk)
and ``--max-memory MB`` (peak memory of the measuring process). Each is a constraint of the
Optuna study, and the front, the choice and the report respect all of them. This module
says what a bound is, what a candidate's figure for it is, and what the bounds did to the
choice; search.py stores the constraint values, report.py writes what it says.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autotune.errors import UserError

if TYPE_CHECKING:  # the CLI imports this module for its flags: no Optuna before it is needed
    import optuna

NO_BOUND = -1.0  # constraint value of a bound not given: always feasible (Optuna: <= 0)
RSS, GPU = "peak RSS", "GPU memory"
BINDS = ("A bound *binds* when it excluded a candidate the selection rule ranks above the chosen one, by the "
         "trials' own measurements.")


@dataclass(frozen=True)
class Kind:
    """One kind of bound: its flag, unit, help, and the words for its best figure."""

    key: str  # field of Bounds, study attribute and report.json key
    flag: str
    unit: str
    help: str
    closest: str  # the best figure among candidates ("fastest: 12 ms")
    hint: str  # precisions to search when nothing meets it

    @property
    def name(self) -> str:
        """``latency``, ``size``, ``memory``: for narrow table cells."""
        return self.flag.removeprefix("--max-")

    def format(self, value: float | None) -> str:
        """``12.3 ms``, ``5.4 MB``, ``250 MB``: enough digits to compare with a bound."""
        if value is None:
            return "not measured"
        return f"{value:.1f} {self.unit}" if self.unit == "ms" or value < 100 else f"{value:.0f} {self.unit}"


KINDS = (
    Kind("max_latency_ms", "--max-latency", "ms", "hard latency bound in ms: the p50 across validation prompts of "
         "--latency-metric (default metric: the whole request)", "fastest", "faster"),
    Kind("max_size_mb", "--max-size", "MB", "hard bound in MB on the exported model folder's size on disk",
         "smallest", "smaller"),
    Kind("max_memory_mb", "--max-memory", "MB", "hard bound in MB on the peak memory of the process that runs the "
         "model: GPU memory on CUDA (via NVML), peak RSS otherwise", "leanest", "smaller"),
)
UNIT_WORDS = {"ms": "milliseconds", "MB": "megabytes"}


@dataclass(frozen=True)
class Figures:
    """What the bounds are checked against, for one candidate (a trial, or a re-benchmarked front member)."""

    number: int
    candidate: str
    accuracy: float
    latency_ms: float
    size_mb: float | None
    memory_mb: float | None
    memory_source: str = RSS

    def value(self, kind: Kind) -> float | None:
        return {"max_latency_ms": self.latency_ms, "max_size_mb": self.size_mb,
                "max_memory_mb": self.memory_mb}[kind.key]

    def shown(self, kind: Kind, metric: str) -> str:
        """``12.3 ms request p50``, ``86 MB``, ``700 MB peak RSS``."""
        value = self.value(kind)
        if value is None:
            return "not measured"
        suffix = {"max_latency_ms": f" {metric} p50", "max_memory_mb": f" {self.memory_source}"}.get(kind.key, "")
        return kind.format(value) + suffix


def memory_of(provider: str | None, peak_rss_mb: float | None, gpu_memory_mb: float | None) -> tuple[float | None, str]:
    """--max-memory's figure: on CUDA the GPU memory of the measuring process (the model lives there; None
    where it could not be measured: unknown, never the host's RSS in its place), otherwise its peak RSS."""
    if provider == "cuda":
        return gpu_memory_mb, GPU
    return peak_rss_mb, RSS


def attrs_figures(number: int, accuracy: float, latency_ms: float, attrs: Mapping[str, Any]) -> Figures:
    """The figures of a trial from its objective values and user attributes (:func:`autotune.search.trial_attrs`)."""
    provider = ((attrs.get("spec") or {}).get("export") or {}).get("execution_provider")
    memory, source = memory_of(provider, attrs.get("peak_rss_mb"), attrs.get("gpu_memory_mb"))
    return Figures(number, attrs.get("candidate", "?"), accuracy, latency_ms, attrs.get("size_mb"), memory, source)


def trial_figures(trial: optuna.trial.FrozenTrial) -> Figures:
    """The figures a complete trial was measured with."""
    return attrs_figures(trial.number, trial.values[0], trial.values[1], trial.user_attrs)


@dataclass(frozen=True)
class Bounds:
    """The bounds of a run; None: not bounded."""

    max_latency_ms: float | None = None
    max_size_mb: float | None = None
    max_memory_mb: float | None = None

    def __post_init__(self) -> None:
        for kind, limit in self.given():
            if not limit > 0:  # also NaN
                raise UserError(f"{kind.flag} must be a positive number of {UNIT_WORDS[kind.unit]}, got {limit:g}")

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "Bounds":
        """From a study's or report's attributes (keys absent in older ones: not bounded)."""
        return cls(**{k.key: record.get(k.key) for k in KINDS})

    def to_dict(self) -> dict[str, float | None]:
        return {k.key: getattr(self, k.key) for k in KINDS}

    def given(self) -> list[tuple[Kind, float]]:
        return [(k, getattr(self, k.key)) for k in KINDS if getattr(self, k.key) is not None]

    def constraint_values(self, figures: Figures) -> list[float]:
        """Optuna's constraint values, one per kind in :data:`KINDS` order: measured - bound (<= 0 feasible),
        :data:`NO_BOUND` where none is given. A fixed length: NSGA-II refuses to compare trials whose
        constraint counts differ, and a resumed study may be given other bounds."""
        values = []
        for kind in KINDS:
            limit, value = getattr(self, kind.key), figures.value(kind)
            values.append(NO_BOUND if limit is None else (limit if value is None else value - limit))
        return values

    def over(self, figures: Figures) -> list[Kind]:
        """The bounds ``figures`` exceed (a figure not measured cannot show it meets its bound)."""
        return [k for k, limit in self.given() if (v := figures.value(k)) is None or v > limit]

    def meets(self, figures: Figures) -> bool:
        return not self.over(figures)

    def describe(self) -> str:
        return ", ".join(f"{k.flag} {limit:g} {k.unit}" for k, limit in self.given()) or "none"


def add_arguments(group) -> None:
    """The bound flags of the search (an argparse group); each alone or together with the others."""
    for kind in KINDS:
        group.add_argument(kind.flag, type=float, metavar=kind.unit.upper(), help=kind.help)


def from_args(args) -> dict[str, float | None]:
    """The bounds of parsed flags (:func:`add_arguments`), as the fields of :class:`Bounds`."""
    return {k.key: getattr(args, k.flag.removeprefix("--").replace("-", "_"), None) for k in KINDS}


def fix_for(kinds: Sequence[Kind]) -> str:
    hints = list(dict.fromkeys(k.hint for k in kinds))
    return f"raise the bound{'s' if len(kinds) > 1 else ''} or search {' or '.join(hints)} precisions"


def unmet(bounds: Bounds, candidates: Sequence[Figures], metric: str) -> tuple[str, list[Kind]]:
    """Why no candidate meets ``bounds``, with the closest figure for each bound at fault, and those bounds.

    The bounds named are those no candidate meets alone, each with the best figure any candidate
    has ("no candidate met --max-size 60 MB (smallest: 86 MB, #4 ...)"). When each is met by some
    candidate but none meets all, every bound is named, each with the best figure among the
    candidates within the other bounds (or among all, if none is).
    """
    given = bounds.given()
    alone = [(k, limit) for k, limit in given if not any(Bounds(**{k.key: limit}).meets(c) for c in candidates)]
    clauses = []
    for kind, limit in alone or given:
        pool = [c for c in candidates if c.value(kind) is not None]
        where = kind.closest
        if not alone:  # each bound is met by some candidate: the closest among those within the others
            others = Bounds(**{k.key: v for k, v in given if k != kind})
            if within := [c for c in pool if others.meets(c)]:
                pool, where = within, f"{kind.closest} within the other bounds"
        best = min(pool, key=lambda c: c.value(kind), default=None)
        clauses.append(f"{kind.flag} {limit:g} {kind.unit}" + (
            "" if best is None else f" ({where}: {best.shown(kind, metric)}, #{best.number} {best.candidate})"))
    kinds = [k for k, _ in (alone or given)]
    if alone:
        return "; ".join(f"no candidate met {c}" for c in clauses), kinds
    return f"no candidate met {' and '.join(clauses)} together", kinds


@dataclass(frozen=True)
class Outcome:
    """One bound given to a run, the chosen model's figure against it, and whether it binds.

    ``excluded``: the candidates preferred to the chosen one that exceed this bound, best first;
    ``alone``: the numbers of those within every other bound (raising this bound alone admits them);
    ``why``: why the first of them is preferred ("more accurate", "as accurate and faster", ...).
    """

    kind: Kind
    limit: float
    what: str  # the figure bounded: "request p50", "size on disk", "peak RSS" or "GPU memory"
    chosen: float | None
    excluded: tuple[Figures, ...]
    alone: tuple[int, ...]
    why: str = ""

    @property
    def binds(self) -> bool:
        return bool(self.excluded)

    def to_dict(self) -> dict[str, Any]:
        first = self.excluded[0] if self.excluded else None
        return {"bound": self.kind.key, "flag": self.kind.flag, "limit": self.limit, "unit": self.kind.unit,
                "what": self.what, "chosen": self.chosen, "binds": self.binds,
                "excluded": [c.number for c in self.excluded], "alone": list(self.alone),
                "best_excluded": None if first is None else {
                    "trial": first.number, "candidate": first.candidate, "validation_accuracy": first.accuracy,
                    "value": first.value(self.kind), "preferred_because": self.why}}


def outcomes(bounds: Bounds, chosen: int, measured: Sequence[Figures], judged: Sequence[Figures],
             key: Callable[[Figures], tuple], metric: str) -> list[Outcome]:
    """Each bound given, against the chosen trial, and whether it *binds*.

    A bound binds the choice when it excluded a candidate the selection rule prefers to the
    chosen one: a trial ranked above the chosen trial by ``key`` (its place in the rule's order,
    :func:`autotune.selection.rank`, without bounds) on the trials' own measurements (``measured``: every complete trial, measured alike in the
    search), whose figure as the selection judged it (the re-benchmarked one for the front
    members in ``judged``, the trial's for the rest) exceeds that bound. Without that bound
    the choice could have been a better one. A trial over several bounds counts for each
    (``alone`` lists those over this bound only: raising it alone admits them).
    """
    by_number = {c.number: c for c in measured}
    rank = key(by_number[chosen])
    as_judged = by_number | {c.number: c for c in judged}
    preferred = [as_judged[c.number] for c in sorted(measured, key=key) if key(c) < rank]
    mine = as_judged[chosen]
    result = []
    for kind, limit in bounds.given():
        excluded = tuple(c for c in preferred if kind in bounds.over(c))
        alone = tuple(c.number for c in excluded if bounds.over(c) == [kind])
        what = {"max_latency_ms": f"{metric} p50", "max_size_mb": "size on disk"}.get(kind.key, mine.memory_source)
        why = _why_preferred(by_number[excluded[0].number], by_number[chosen]) if excluded else ""
        result.append(Outcome(kind, limit, what, mine.value(kind), excluded, alone, why))
    return result


def _why_preferred(better: Figures, chosen: Figures) -> str:
    """What ``better`` has over ``chosen`` that the selection rule ranked it above (as the trials measured them)."""
    if better.accuracy > chosen.accuracy and (better.size_mb or 0.0) >= (chosen.size_mb or 0.0):
        return "more accurate"
    if (better.size_mb or 0.0) < (chosen.size_mb or 0.0):
        return "smaller"
    return "faster" if better.latency_ms < chosen.latency_ms else "more accurate"


def binding_text(record: Mapping[str, Any], mark: str = "**") -> str:
    """An :meth:`Outcome.to_dict` record in words: the bound, the chosen model's figure, whether it
    binds (``mark``: markdown bold around "binds")."""
    kind = next(k for k in KINDS if k.key == record["bound"])
    text = f"{kind.flag} {record['limit']:g} {kind.unit} ({record['what']}): chosen model {kind.format(record['chosen'])}"
    first = record.get("best_excluded")
    if not record["binds"] or first is None:
        return text + "; does not bind"
    value = kind.format(first["value"])
    others = len(record["excluded"]) - 1
    because = f"{first['preferred_because']} than" if first.get("preferred_because") else "preferred to"
    return (text + f"; {mark}binds{mark}: it excluded #{first['trial']} {first['candidate']} (validation accuracy "
            f"{first['validation_accuracy']:.3f}, {value}), {because} the chosen model"
            + (f", and {others} more" if others else "")
            + ("" if first["trial"] in record["alone"] else " (another bound excluded it too)"))
