"""Choosing under noise: paired comparisons on the same prompts, and the selection rules."""

from __future__ import annotations

import math

import pytest

from autotune.selection import Candidate, compare, mcnemar_exact, paired_interval, rank


def test_mcnemar_exact_is_the_two_sided_binomial_test() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0
    # b=0, c=6: 2 * 0.5**6
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    # b=2, c=10: 2 * sum_{k<=2} C(12,k) / 2**12 = 2 * 79 / 4096
    assert mcnemar_exact(2, 10) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(10, 2) == mcnemar_exact(2, 10)


def test_paired_interval_brackets_the_difference_and_shrinks_with_agreement() -> None:
    low, high = paired_interval(5, 15, 136)
    assert low < 10 / 136 < high
    wide, narrow = paired_interval(20, 30, 136), paired_interval(0, 10, 136)
    assert (wide[1] - wide[0]) > (narrow[1] - narrow[0])
    # Bonett-Price by hand for b=5, c=15, n=136.
    p12, p21 = 6 / 138, 16 / 138
    half = 1.959964 * math.sqrt((p12 + p21 - (p21 - p12) ** 2) / 138)
    assert (low, high) == pytest.approx((p21 - p12 - half, p21 - p12 + half))


def test_compare_counts_only_the_prompts_where_one_is_right() -> None:
    ref = Candidate(0, "1111000011", 10.0, 100.0)
    other = Candidate(1, "1100110011", 10.0, 100.0)
    paired = compare(other, ref)
    assert (paired.b, paired.c, paired.n) == (2, 2, 10) and paired.diff == 0.0
    with pytest.raises(ValueError):
        compare(Candidate(2, "11", 1.0, 1.0), ref)


def _pool() -> list[Candidate]:
    best = "1" * 96 + "0" * 40  # 0.706
    near = "1" * 92 + "0" * 44  # 0.676: 4 prompts fewer, within noise
    poor = "1" * 60 + "0" * 76  # 0.441: far below
    return [Candidate(1, best, 90.0, 519.0),   # fp32
            Candidate(2, near, 58.0, 274.0),   # int8
            Candidate(3, near, 78.0, 88.0),    # int4
            Candidate(4, poor, 70.0, 78.0)]


def test_smallest_tied_ships_the_smallest_model_within_noise() -> None:
    ranking = rank(_pool())
    assert ranking.best.number == 1
    assert ranking.chosen.number == 3  # int4: as accurate as fp32 within noise, a sixth of its size
    assert [m.number for m in ranking.order] == [3, 2, 1, 4]
    assert ranking.tied(1) and ranking.tied(2) and ranking.tied(3) and not ranking.tied(4)
    assert ranking.paired[4].significantly_worse and ranking.paired[4].interval[1] < 0


def test_most_accurate_keeps_the_plain_rule() -> None:
    ranking = rank(_pool(), "most-accurate")
    assert [m.number for m in ranking.order] == [1, 2, 3, 4]  # ties on accuracy: the faster first


def test_empty_pool_chooses_nothing() -> None:
    assert rank([]).chosen is None


def test_within_tolerance_the_more_accurate_of_equals_is_shipped() -> None:
    """Two int8 models of one size and nearly one speed: the more accurate one, not the one a hair faster."""
    best = "1" * 96 + "0" * 40
    near = "1" * 93 + "0" * 43
    ranking = rank([Candidate(1, best, 60.0, 274.0), Candidate(2, near, 57.0, 274.2)])
    assert ranking.chosen.number == 1
    # 20% faster at the same size is faster, not noise.
    assert rank([Candidate(1, best, 60.0, 274.0), Candidate(2, near, 48.0, 274.2)]).chosen.number == 2
