"""Edge bounds (--max-latency, --max-size, --max-memory): the constraint values the study stores,
the selection under them, which bound binds, and the one-line error when nothing meets them.

The rules run in process on made-up trials (fast); the slow tests run the real CLI on the
tiny random Llama, resuming copies of the shared ``tiny_search`` or a small search of their own.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import optuna
import pytest

from conftest import run_cli
from test_search import assert_clean_failure, complete, load_study, search_args

SPEC = {"train": {"method": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.05, "learning_rate": 1e-3, "steps": 3,
                  "batch_size": 4, "target_modules": "all-linear", "seed": 0},
        "export": {"precision": "int4", "execution_provider": "cpu", "block_size": 32, "accuracy_level": 4,
                   "algo": "default"}}


def _figures(number: int, accuracy: float, latency: float, size: float, memory: float = 100.0):
    from autotune.bounds import Figures

    return Figures(number, f"candidate {number}", accuracy, latency, size, memory)


def _key(f):
    """A selection rule's order (here the most-accurate one: more accurate, then faster, then smaller)."""
    return -f.accuracy, f.latency_ms, f.size_mb


def _trial(number: int, accuracy: float, latency: float, size: float, rss: float, provider: str = "cpu",
           gpu: float | None = None) -> optuna.trial.FrozenTrial:
    spec = {**SPEC, "export": {**SPEC["export"], "execution_provider": provider}}
    trial = optuna.trial.create_trial(values=[accuracy, latency], user_attrs={
        "candidate": f"lora r8 {number}", "spec": spec, "size_mb": size, "peak_rss_mb": rss, "gpu_memory_mb": gpu})
    trial.number = number  # create_trial leaves it 0; a study numbers them, these tests need distinct ones
    return trial


# --------------------------------------------------------------------------- rules, in process


def test_constraint_values_one_per_bound() -> None:
    from autotune.bounds import NO_BOUND, Bounds

    fig = _figures(0, 0.5, 42.0, 86.0, memory=700.0)
    assert Bounds(100.0, 60.0, 500.0).constraint_values(fig) == pytest.approx([42.0 - 100.0, 86.0 - 60.0, 700.0 - 500.0])
    # Always one value per kind, in the same order: NSGA-II refuses to compare trials whose counts differ.
    assert Bounds(max_size_mb=60.0).constraint_values(fig) == pytest.approx([NO_BOUND, 26.0, NO_BOUND])
    assert Bounds().constraint_values(fig) == [NO_BOUND] * 3 and NO_BOUND <= 0
    assert [k.flag for k in Bounds(100.0, 60.0, 500.0).over(fig)] == ["--max-size", "--max-memory"]
    assert Bounds(max_latency_ms=42.0, max_size_mb=86.0).meets(fig)  # a figure on its bound is within it
    assert not Bounds(max_memory_mb=500.0).meets(_figures(0, 0.5, 1.0, 1.0, memory=None))  # unmeasured: not shown to fit


@pytest.mark.parametrize("kwargs, message", [
    ({"max_size_mb": 0.0}, "--max-size must be a positive number of megabytes, got 0"),
    ({"max_memory_mb": -5.0}, "--max-memory must be a positive number of megabytes, got -5"),
    ({"max_memory_mb": float("nan")}, "--max-memory must be a positive number of megabytes, got nan"),
    ({"max_latency_ms": 0.0}, "--max-latency must be a positive number of milliseconds, got 0"),
])
def test_bad_bounds_are_one_line_errors(kwargs, message) -> None:
    from autotune.errors import UserError
    from autotune.search import SearchSettings

    with pytest.raises(UserError) as exc:
        SearchSettings(**kwargs)
    assert str(exc.value) == message and exc.value.exit_code == 2


def test_memory_is_peak_rss_on_cpu_and_gpu_memory_on_cuda() -> None:
    from autotune.bounds import Bounds, trial_figures

    cpu = trial_figures(_trial(1, 0.5, 10.0, 20.0, rss=300.0, gpu=900.0))  # a GPU figure on CPU is not the model's
    assert (cpu.memory_mb, cpu.memory_source) == (300.0, "peak RSS")
    cuda = trial_figures(_trial(2, 0.5, 10.0, 20.0, rss=300.0, provider="cuda", gpu=900.0))
    assert (cuda.memory_mb, cuda.memory_source) == (900.0, "GPU memory")
    unmeasured = trial_figures(_trial(3, 0.5, 10.0, 20.0, rss=300.0, provider="cuda"))  # NVML could not say
    assert (unmeasured.memory_mb, unmeasured.memory_source) == (None, "GPU memory")  # unknown, not the host's RSS
    assert not Bounds(max_memory_mb=10_000.0).meets(unmeasured)
    assert Bounds(max_memory_mb=500.0).constraint_values(cpu)[2] == pytest.approx(-200.0)
    assert Bounds(max_memory_mb=500.0).constraint_values(cuda)[2] == pytest.approx(400.0)


def test_size_binds_when_it_excluded_a_more_accurate_candidate() -> None:
    from autotune.bounds import Bounds, outcomes

    accurate, small, fast = _figures(0, 0.70, 30.0, 86.0), _figures(1, 0.60, 40.0, 40.0), _figures(2, 0.50, 5.0, 20.0)
    bounds = Bounds(max_latency_ms=100.0, max_size_mb=60.0)
    latency, size = outcomes(bounds, 1, [accurate, small, fast], [small], key=_key, metric="request")
    assert (latency.binds, latency.what, latency.chosen) == (False, "request p50", 40.0)
    assert size.binds and [c.number for c in size.excluded] == [0] and size.alone == (0,)
    assert size.why == "more accurate" and size.chosen == 40.0
    record = size.to_dict()
    assert record["best_excluded"] == {"trial": 0, "candidate": "candidate 0", "validation_accuracy": 0.7,
                                       "value": 86.0, "preferred_because": "more accurate"}
    # No bound binds when nothing preferred to the choice was excluded.
    assert not any(o.binds for o in outcomes(bounds, 0, [accurate, small, fast], [], key=_key, metric="request"))


def test_binding_uses_the_rebenchmarked_figure_and_counts_a_candidate_over_two_bounds_for_each() -> None:
    from autotune.bounds import Bounds, outcomes

    both = _figures(0, 0.70, 30.0, 86.0)  # over --max-size, and over --max-latency when re-benchmarked
    rebenchmarked = _figures(0, 0.70, 120.0, 86.0)
    chosen = _figures(1, 0.60, 40.0, 40.0)
    latency, size = outcomes(Bounds(100.0, 60.0), 1, [both, chosen], [rebenchmarked, chosen], key=_key, metric="ttft")
    assert latency.binds and size.binds and latency.alone == size.alone == ()
    assert latency.excluded[0].latency_ms == 120.0  # the figure the selection judged it by
    # A tie in accuracy: the faster candidate is preferred, and the reason says so.
    faster = outcomes(Bounds(max_size_mb=60.0), 1, [_figures(0, 0.6, 10.0, 86.0), chosen], [], key=_key, metric="request")
    assert faster[0].why == "faster"
    # Under the smallest-tied rule a smaller candidate, tied in accuracy, can be the one excluded.
    smaller = outcomes(Bounds(max_latency_ms=50.0), 1, [_figures(0, 0.58, 80.0, 20.0), chosen], [],
                       key=lambda f: (f.size_mb,), metric="request")
    assert smaller[0].binds and smaller[0].why == "smaller"


def test_unmet_names_each_bound_nothing_met_with_the_closest_figure() -> None:
    from autotune.bounds import Bounds, fix_for, unmet

    candidates = [_figures(3, 0.5, 12.0, 86.0, memory=700.0), _figures(4, 0.6, 9.0, 120.0, memory=650.0)]
    why, kinds = unmet(Bounds(max_latency_ms=100.0, max_size_mb=60.0), candidates, "request")
    assert why == "no candidate met --max-size 60 MB (smallest: 86.0 MB, #3 candidate 3)"
    assert fix_for(kinds) == "raise the bound or search smaller precisions"
    why, kinds = unmet(Bounds(max_latency_ms=5.0, max_memory_mb=600.0), candidates, "request")
    assert why == ("no candidate met --max-latency 5 ms (fastest: 9.0 ms request p50, #4 candidate 4); "
                   "no candidate met --max-memory 600 MB (leanest: 650 MB peak RSS, #4 candidate 4)")
    assert fix_for(kinds) == "raise the bounds or search faster or smaller precisions"
    # Each bound is met by someone, never both by the same candidate.
    why, _ = unmet(Bounds(max_latency_ms=10.0, max_size_mb=100.0), candidates, "request")
    assert why == ("no candidate met --max-latency 10 ms (fastest within the other bounds: 12.0 ms request p50, "
                   "#3 candidate 3) and --max-size 100 MB (smallest within the other bounds: 120 MB, #4 candidate 4) "
                   "together")


def test_nothing_fits_is_one_line_exit_3_with_a_failure_report(tmp_path: Path) -> None:
    from autotune.errors import UserError
    from autotune.report import select_and_write
    from autotune.search import DIRECTIONS, SearchSettings

    study = optuna.create_study(directions=list(DIRECTIONS))
    for accuracy, latency, size, rss in ((0.5, 3.0, 86.0, 300.0), (0.6, 2.0, 120.0, 320.0)):
        study.add_trial(optuna.trial.create_trial(values=[accuracy, latency], user_attrs={
            "candidate": f"lora int{int(size)}", "spec": SPEC, "size_mb": size, "peak_rss_mb": rss}))
    settings = SearchSettings(max_size_mb=60.0, max_memory_mb=1000.0)
    with pytest.raises(UserError) as exc:  # refused before anything is measured again: no workspace needed
        select_and_write(study, None, settings, tmp_path, hardware={}, profile={}, argv=[])
    assert exc.value.exit_code == 3
    assert str(exc.value) == ("no candidate met --max-size 60 MB (smallest: 86.0 MB, #0 lora int86); "
                              "raise the bound or search smaller precisions")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["chosen"] is None and report["why"].startswith("no candidate met --max-size 60 MB")
    assert (report["max_size_mb"], report["max_memory_mb"], report["max_latency_ms"]) == (60.0, 1000.0, None)
    assert [row["over"] for row in report["trials"]] == [["--max-size"], ["--max-size"]]


def test_notes_state_each_bound_and_which_binds() -> None:
    from autotune.bounds import Bounds, outcomes
    from autotune.notes import study_note, trial_note

    trial = _trial(4, 0.625, 17.2, 78.4, rss=450.0)
    body = trial_note(trial, "request", Bounds(max_latency_ms=14.0, max_size_mb=60.0, max_memory_mb=500.0))
    assert ("**Feasible:** **no** (request latency 17.2 ms, bound 14 ms; constraint value +3.2; size 78.4 MB, "
            "bound 60 MB; constraint value +18.4; peak RSS 450 MB, bound 500 MB; constraint value -50.0, "
            "feasible at ≤ 0)") in body
    assert "**Feasible:** yes (request latency 17.2 ms, no bound)" in trial_note(trial, "request", Bounds())

    size = outcomes(Bounds(max_size_mb=60.0), 1, [_figures(0, 0.7, 30.0, 86.0), _figures(1, 0.6, 40.0, 40.0)], [],
                    key=_key, metric="request")
    member = {"trial": 1, "candidate": "candidate 1", "validation_accuracy": 0.6, "size_mb": 40.0, "memory_mb": 300.0,
              "over": [], "feasible": True}
    report = {"chosen": {**member, "spec": SPEC, "test_accuracy": 0.5}, "latency_metric": "request",
              "max_latency_ms": None, "max_size_mb": 60.0, "max_memory_mb": None,
              "bounds": [o.to_dict() for o in size], "pareto": [member]}
    note = study_note(report, study_id=1, feasible=(1, 2))
    assert "- `--max-size 60`: size on disk at most 60 MB" in note and "- 1 of 2 complete trials met it." in note
    assert ("- --max-size 60 MB (size on disk): chosen model 40.0 MB; **binds**: it excluded #0 candidate 0 "
            "(validation accuracy 0.700, 86.0 MB), more accurate than the chosen model") in note
    assert "| size (MB) | memory (MB) | over | feasible |" in note and "| 40.0 | 300.0 | – | yes |" in note


# --------------------------------------------------------------------------- the real CLI on the tiny model


@pytest.mark.slow
def test_max_size_excludes_the_larger_precision_and_binds(tmp_path: Path, tiny_search: Path, tiny_model_dir,
                                                          tiny_dataset, tiny_space) -> None:
    """Resume the finished tiny search with a --max-size just under the size of the trial the most-accurate
    rule ranks first on the trials' own figures: the same trials, a smaller model chosen, and size reported as
    the bound that binds, naming that trial. (The tiny model's candidates are all tied at chance, so the default
    rule ships the smallest and no size bound binds. A bound binds on the trials' own figures; the selection's
    re-benchmark may reorder near-equal latencies, so the test takes its top trial from those figures.)"""
    out = tmp_path / "out"
    shutil.copytree(tiny_search, out)
    trials = {t.number: t for t in complete(load_study(out))}
    top = min(trials.values(), key=lambda t: (-t.values[0], t.values[1], t.user_attrs["size_mb"]))
    first = {"trial": top.number, "size_mb": top.user_attrs["size_mb"]}
    smallest = min(t.user_attrs["size_mb"] for t in trials.values())
    if first["size_mb"] <= smallest:  # the fastest is the smallest here: no size bound can bind while leaving one
        pytest.skip(f"the top trial #{first['trial']} is already the smallest ({smallest:.1f} MB)")
    limit = (first["size_mb"] + max(s for s in (t.user_attrs["size_mb"] for t in trials.values())
                                    if s < first["size_mb"])) / 2
    proc = run_cli(*search_args(tiny_model_dir, tiny_dataset, tiny_space, out, "--select", "most-accurate",
                                "--max-size", f"{limit:.3f}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming with 6 trial(s) done" in proc.stdout + proc.stderr

    report = json.loads((out / "report.json").read_text())
    chosen = report["chosen"]
    assert chosen["trial"] != first["trial"] and chosen["size_mb"] <= limit < first["size_mb"]
    assert report["max_size_mb"] == pytest.approx(limit, abs=1e-3) and report["max_latency_ms"] == 1000
    assert all(m["size_mb"] <= limit and m["over"] == [] and m["feasible"] for m in report["pareto"])
    latency, size = report["bounds"]
    assert latency["flag"] == "--max-latency" and latency["binds"] is False
    assert size["flag"] == "--max-size" and size["binds"] is True and first["trial"] in size["excluded"]
    assert all(trials[n].user_attrs["size_mb"] > limit for n in size["excluded"])
    assert size["chosen"] == pytest.approx(chosen["size_mb"])
    assert "**binds**: it excluded #" in (out / "MODEL_CARD.md").read_text()
    assert re.search(r"bound --max-size [\d.]+ MB \(size on disk\): chosen model [\d.]+ MB; binds", proc.stdout)
    # Recorded as this run's setting, like --max-latency; the trials keep the figures they were measured with.
    study = load_study(out)
    assert study.user_attrs["max_size_mb"] == pytest.approx(limit, abs=1e-3)
    assert len(complete(study)) == 6
    assert (out / "best" / "genai_config.json").is_file()


@pytest.fixture(scope="module")
def too_small(tmp_path_factory, tiny_model_dir, tiny_dataset, tiny_space):
    """A fresh 2-trial search under a --max-size nothing meets, with a --max-memory all meet."""
    out = tmp_path_factory.mktemp("too-small") / "out"
    return out, run_cli(*search_args(tiny_model_dir, tiny_dataset, tiny_space, out, "--max-size", "0.5",
                                     "--max-memory", "100000", trials=2))


@pytest.mark.slow
def test_nothing_meets_max_size_names_the_bound_and_stores_each_constraint(too_small) -> None:
    from autotune.bounds import NO_BOUND

    out, proc = too_small
    line = assert_clean_failure(proc, 3)
    done = complete(load_study(out))
    assert len(done) == 2
    smallest = min(done, key=lambda t: t.user_attrs["size_mb"])
    assert line == (f"error: no candidate met --max-size 0.5 MB (smallest: {smallest.user_attrs['size_mb']:.1f} MB, "
                    f"#{smallest.number} {smallest.user_attrs['candidate']}); raise the bound or search smaller precisions")
    for t in done:  # measured - bound per bound, as Optuna stores them; memory is the measuring process's peak RSS on CPU
        a, c = t.user_attrs, t.constraints
        assert c == pytest.approx({"max_latency_ms": t.values[1] - 1000, "max_size_mb": a["size_mb"] - 0.5,
                                   "max_memory_mb": a["peak_rss_mb"] - 100000})
        assert c["max_memory_mb"] < 0 < c["max_size_mb"] and list(c.values()) != [NO_BOUND] * 3
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"] is None and report["max_size_mb"] == 0.5
    assert all(row["over"] == ["--max-size"] for row in report["trials"] if row["state"] == "COMPLETE")
    assert not (out / "best").exists()


@pytest.mark.slow
def test_resume_with_a_looser_max_size_selects(too_small, tiny_model_dir, tiny_dataset, tiny_space) -> None:
    """Like --max-latency: the study keeps its trials and this run's bound decides."""
    out, first = too_small
    assert first.returncode == 3
    proc = run_cli(*search_args(tiny_model_dir, tiny_dataset, tiny_space, out, "--max-size", "1000",
                                "--max-memory", "100000", trials=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = load_study(out)
    assert len(complete(study)) == 2 and study.user_attrs["max_size_mb"] == 1000
    report = json.loads((out / "report.json").read_text())
    chosen = report["chosen"]
    assert chosen is not None and report["max_size_mb"] == 1000
    memory = next(b for b in report["bounds"] if b["flag"] == "--max-memory")
    member = next(m for m in report["pareto"] if m["trial"] == chosen["trial"])
    assert memory["what"] == member["memory_source"] == "peak RSS"  # on CPU
    assert memory["chosen"] == member["memory_mb"] > 0  # the re-benchmark's peak RSS
