"""Choosing under noise: candidates compared paired, on the same validation prompts.

Every candidate of a study answers the same validation prompts, so two candidates are
compared prompt by prompt: only the prompts where exactly one of them is right carry
information (``b``: the first right, the second wrong; ``c``: the reverse). The exact
McNemar test asks whether ``b`` and ``c`` differ by more than chance, and the adjusted Wald
interval of Bonett and Price (2012) bounds the difference of the two accuracies.

The default rule (:data:`RULES` ``smallest-tied``): among the feasible candidates that are
not significantly less accurate than the most accurate one, ship the smallest, then the
fastest. 136 prompts give about +-0.08 at 95%, so chasing the most accurate alone buys
size and latency for noise. Sizes within :data:`SIZE_TOLERANCE` of each other count as
equal, and latencies within :data:`LATENCY_TOLERANCE` (the spread of one model's latency
from trial to trial), so among equals the more accurate one is shipped.
``most-accurate`` keeps the plain rule: the most accurate, ties to the faster, then the smaller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from autotune.measure import Z_95

RULES = {
    "smallest-tied": "the smallest, then the fastest, of the feasible candidates not significantly less accurate "
                     "than the most accurate one (paired exact McNemar test on the validation prompts, 5% level)",
    "most-accurate": "the most accurate feasible candidate (ties: the faster, then the smaller)",
}
ALPHA = 0.05  # significance level of "significantly less accurate"
SIZE_TOLERANCE = 0.05  # sizes within 5% are one size (int4 b32 and b64 differ by 12%, int8 and fp32 by 2x)
LATENCY_TOLERANCE = 0.10  # latencies within 10% are one speed: one model's trials spread that much


@dataclass(frozen=True)
class Candidate:
    """What the rule needs of one measured candidate: its per-prompt correctness and its cost."""

    number: int
    correct: str  # "1"/"0" per validation prompt, in prompt order
    latency_ms: float
    size_mb: float | None

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def accuracy(self) -> float:
        return self.correct.count("1") / self.n if self.n else 0.0


@dataclass(frozen=True)
class Paired:
    """A candidate against a reference on the same prompts: ``diff`` = candidate - reference."""

    b: int  # reference right, candidate wrong
    c: int  # reference wrong, candidate right
    n: int
    p_value: float  # exact two-sided McNemar
    interval: tuple[float, float]  # 95% Bonett-Price interval of the difference

    @property
    def diff(self) -> float:
        return (self.c - self.b) / self.n if self.n else 0.0

    @property
    def significantly_worse(self) -> bool:
        return self.diff < 0 and self.p_value < ALPHA

    def to_dict(self) -> dict:
        return {"diff": self.diff, "interval": list(self.interval), "p_value": self.p_value,
                "reference_only_right": self.b, "candidate_only_right": self.c, "n": self.n}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of ``b`` against ``b + c`` at 1/2."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2**m
    return min(1.0, 2 * tail)


def paired_interval(b: int, c: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Bonett-Price adjusted Wald interval of (c - b) / n, the difference of two paired proportions."""
    if n <= 0:
        return -1.0, 1.0
    p12, p21 = (b + 1) / (n + 2), (c + 1) / (n + 2)
    d = p21 - p12
    half = z * math.sqrt(max(0.0, (p12 + p21 - d * d) / (n + 2)))
    return max(-1.0, d - half), min(1.0, d + half)


def compare(candidate: Candidate, reference: Candidate) -> Paired:
    """``candidate`` against ``reference``, prompt by prompt (they must have answered the same prompts)."""
    if candidate.n != reference.n:
        raise ValueError(f"candidates #{candidate.number} and #{reference.number} answered different prompts")
    b = sum(r == "1" and x == "0" for x, r in zip(candidate.correct, reference.correct))
    c = sum(r == "0" and x == "1" for x, r in zip(candidate.correct, reference.correct))
    return Paired(b, c, candidate.n, mcnemar_exact(b, c), paired_interval(b, c, candidate.n))


def most_accurate(pool: Sequence[Candidate]) -> Candidate | None:
    """The most accurate, ties to the faster, then the smaller."""
    return min(pool, key=lambda m: (-m.accuracy, m.latency_ms, m.size_mb or 0.0), default=None)


@dataclass(frozen=True)
class Ranking:
    """Candidates ranked by a rule: ``order`` best first, each with its comparison to the most accurate."""

    rule: str
    best: Candidate | None  # the most accurate of the pool, the reference of every comparison
    order: tuple[Candidate, ...]
    paired: dict[int, Paired]  # number -> against ``best``

    def tied(self, number: int) -> bool:
        """Not significantly less accurate than the most accurate candidate."""
        return not self.paired[number].significantly_worse

    @property
    def chosen(self) -> Candidate | None:
        return self.order[0] if self.order else None


def rank(pool: Sequence[Candidate], rule: str = "smallest-tied") -> Ranking:
    """Order ``pool`` by ``rule`` (see :data:`RULES`), best first.

    ``smallest-tied``: the candidates tied with the most accurate one come first, each time the
    one :func:`_smallest_then_fastest` picks from those left; the rest follow, most accurate first.
    """
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}")
    best = most_accurate(pool)
    paired = {m.number: compare(m, best) for m in pool} if best else {}
    plain = sorted(pool, key=lambda m: (-m.accuracy, m.latency_ms, m.size_mb or 0.0))
    if rule == "most-accurate":
        return Ranking(rule, best, tuple(plain), paired)
    tied = [m for m in plain if not paired[m.number].significantly_worse]
    order = []
    while tied:
        order.append(_smallest_then_fastest(tied))
        tied.remove(order[-1])
    return Ranking(rule, best, tuple(order + [m for m in plain if paired[m.number].significantly_worse]), paired)


def _smallest_then_fastest(pool: Sequence[Candidate]) -> Candidate:
    """The smallest (sizes within :data:`SIZE_TOLERANCE` equal), then the fastest (within
    :data:`LATENCY_TOLERANCE` equal), then the most accurate of ``pool``."""
    smallest = min(m.size_mb or 0.0 for m in pool)
    pool = [m for m in pool if (m.size_mb or 0.0) <= smallest * (1 + SIZE_TOLERANCE)]
    fastest = min(m.latency_ms for m in pool)
    pool = [m for m in pool if m.latency_ms <= fastest * (1 + LATENCY_TOLERANCE)]
    return min(pool, key=lambda m: (-m.accuracy, m.latency_ms, m.size_mb or 0.0))
