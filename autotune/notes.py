"""The markdown that optuna-dashboard shows: a note per trial and one for the study.

Pure text from what the study records (a trial's values and user attributes, the
selection's report dict), so the notes say exactly what report.json and the trial
table say, in words a person deciding between candidates reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from autotune.bounds import BINDS, KINDS, Bounds, binding_text, trial_figures
from autotune.measure import wilson_interval

INVALID = "<invalid>"
# Measured figures, in the order a reader compares them: (attr, label, spread attr).
LATENCY_ROWS = (
    ("request_p50_ms", "request p50", "request_spread_ms"),
    ("request_p90_ms", "request p90", None),
    ("ttft_ms", "time to first token", "ttft_spread_ms"),
    ("ttft_p50_ms", "time to first token p50", None),
    ("ttft_p90_ms", "time to first token p90", None),
    ("token_p50_ms", "decode per token p50", "token_spread_ms"),
    ("token_p90_ms", "decode per token p90", None),
)
# Stages as candidate.run_candidate times them, and the cached step each belongs to.
STAGE_GROUP = {"train": "train", "merge": "export", "calibrate": "export", "export": "export",
               "load": "measure", "accuracy": "measure", "latency": "measure"}
# Known failure causes and what to do (a message that already ends in "; <fix>" keeps its own).
FIXES = (
    (("out of memory", "killed by signal"),
     "lower `rank`, `batch_size` or `steps` in the search space, use QLoRA, or leave more memory free"),
    (("diverged", " nan", "inf)"), "lower the learning rate (narrow `learning_rate` in the search space)"),
    (("interrupted",), "rerun the same command: the trial is retried from its cache"),
    (("heartbeat",), "nothing to do: another worker retried the candidate"),
    (("builder",), "read the builder.log artifact; if the builder cannot export this model with these options, "
                   "remove them from the search space"),
    (("could not run the model",), "this precision does not run with this execution provider here; remove it from "
                                   "`precision` in the search space"),
    (("longer than",), "score fewer prompts (`--max-eval`), give measuring more time (`--measure-timeout`) or drop "
                       "the slowest precisions from the search space"),
)


def accuracy_text(accuracy: float, n: int | None, invalid: int | None = None) -> str:
    """``0.456 (62 of 136; 95% interval 0.375-0.540)``, the way every accuracy is shown."""
    if not n:
        return f"{accuracy:.3f}"
    correct = round(accuracy * n)
    lo, hi = wilson_interval(correct, n)
    text = f"**{accuracy:.3f}** ({correct} of {n}; 95% Wilson interval {lo:.3f}–{hi:.3f})"
    if invalid:
        text += f", {invalid} invalid answer{'s' if invalid != 1 else ''}"
    return text


def describe(spec: Mapping[str, Any]) -> list[str]:
    """A candidate spec (``asdict(CandidateSpec)``) in words: a bullet for training, one for export.

    Short lines: the dashboard's trial page does not wrap a note's paragraphs.
    """
    export = spec["export"]
    quant = (f" (block size {export['block_size']}, accuracy level {export['accuracy_level']}, "
             f"{export['algo']} quantization)" if export["precision"] in ("int4", "int8") else "")
    train = spec.get("train")
    exported = (f"- **export:** {export['precision']}{quant} for {export['execution_provider']}, "
                "by the onnxruntime-genai builder")
    if not train:
        return ["- **training:** none, the base model as is (zero-shot)", exported]
    method = "QLoRA (base in 4-bit nf4 while training)" if train["method"] == "qlora" else "LoRA"
    modules = {"all-linear": "all linear layers", "attention": "attention projections",
               "mlp": "MLP projections"}.get(train["target_modules"], train["target_modules"])
    return [f"- **training:** {method}, rank {train['rank']}, alpha {train['alpha']:g} "
            f"(scale {train['alpha'] / train['rank']:.2g}), {modules}, dropout {train['dropout']:g}",
            f"- **steps:** {train['steps']} of batch {train['batch_size']} at learning rate "
            f"{train['learning_rate']:.0e}, seed {train['seed']}",
            exported + " (adapter merged into the full-precision base)"]


def fix_for(reason: str) -> str:
    """What to do about a failed candidate."""
    if "; " in reason:
        return reason.rsplit("; ", 1)[1]
    lowered = reason.lower()
    for patterns, fix in FIXES:
        if any(p in lowered for p in patterns):
            return fix
    return "the search went on without this candidate; the message above says what failed"


def confusion_table(confusion: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Rows: true label; columns: the label answered (and invalid answers)."""
    labels = list(confusion)
    answered = labels + sorted({a for row in confusion.values() for a in row} - set(labels))
    header = ["true \\ answered"] + ["invalid" if a == INVALID else a for a in answered]
    rows = [[f"**{t}**"] + [str(confusion[t].get(a, 0)) for a in answered] for t in labels]
    return table(header, rows)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def stage_table(seconds: Mapping[str, float], cached: Sequence[str]) -> list[str]:
    rows = [[stage, f"{s:.1f}", "no"] for stage, s in seconds.items()]
    timed_groups = {STAGE_GROUP.get(stage, "measure") for stage in seconds}  # other stages are the measuring child's
    rows += [[stage, "–", "yes (reused)"] for stage in cached if stage not in timed_groups]
    order = list(STAGE_GROUP)
    rows.sort(key=lambda r: order.index(r[0]) if r[0] in order else len(order))
    return table(["stage", "seconds", "cached"], rows)


def _ms(attrs: Mapping[str, Any], key: str, spread: str | None) -> str | None:
    value = attrs.get(key)
    if value is None:
        return None
    text = f"{value:.1f} ms"
    if spread and attrs.get(spread) is not None:
        text += f" (IQR {attrs[spread]:.1f})"
    return text


def measured_rows(attrs: Mapping[str, Any]) -> list[list[str]]:
    rows = [[label, text] for key, label, spread in LATENCY_ROWS if (text := _ms(attrs, key, spread))]
    cuda = ((attrs.get("spec") or {}).get("export") or {}).get("execution_provider") == "cuda"
    for key, label, unit in (("tokens_per_s", "tokens/s", ""), ("peak_rss_mb", "peak RSS of the measuring process", " MB"),
                             ("gpu_memory_mb", "GPU memory", " MB"), ("size_mb", "size on disk", " MB")):
        if attrs.get(key) is not None:
            rows.append([label, f"{attrs[key]:.0f}{unit}"])
        elif key == "gpu_memory_mb" and cuda and "size_mb" in attrs:  # a CUDA model, measured: NVML could not say
            rows.append([label, "unknown"])
    if attrs.get("final_loss") is not None:
        rows.append(["final training loss (mean of the last 10 steps)", f"{attrs['final_loss']:.3f}"])
    return rows


def feasibility(trial: optuna.trial.FrozenTrial, latency_metric: str, bounds: Bounds) -> str:
    """``**Feasible:** yes (request latency 3.1 ms, bound 10 ms; constraint value -6.9; size 19 MB, ...)``:
    each bound given with the trial's figure and its constraint value (measured - bound, feasible at <= 0)."""
    figures = trial_figures(trial)
    values = dict(zip(KINDS, bounds.constraint_values(figures)))
    limits = dict(bounds.given())
    parts = []
    for kind in KINDS:  # latency always (an objective); size and memory where bounded
        if kind.key == "max_latency_ms":
            text = f"{latency_metric} latency {figures.latency_ms:.1f} ms"
        elif kind in limits:
            what = "size" if kind.key == "max_size_mb" else figures.memory_source
            text = f"{what} {kind.format(figures.value(kind))}"
        else:
            continue
        parts.append(text + (f", bound {limits[kind]:g} {kind.unit}; constraint value {values[kind]:+.1f}"
                             if kind in limits else ", no bound"))
    verdict = "**no**" if bounds.over(figures) else "yes"
    return f"**Feasible:** {verdict} ({'; '.join(parts)}{', feasible at ≤ 0' if limits else ''})"


def trial_note(trial: optuna.trial.FrozenTrial, latency_metric: str, bounds: Bounds = Bounds(),
               figures: Mapping[str, str] | None = None, artifacts: Sequence[str] = ()) -> str:
    """The note of a finished trial: complete, failed, or pruned as a duplicate.

    ``bounds`` are the run's edge bounds; ``figures`` maps a caption to an image URL shown
    inline; ``artifacts`` names the files listed under the trial's Artifacts.
    """
    attrs = trial.user_attrs
    title = f"## Trial {trial.number}: {attrs.get('candidate', 'candidate not sampled')}"
    lines = [title, ""]
    if attrs.get("spec"):
        lines += describe(attrs["spec"]) + [""]
    if "duplicate_of" in attrs:
        return "\n".join(lines + [f"Not measured: the sampler proposed the same candidate as trial "
                                  f"{attrs['duplicate_of']}; its note has the figures.", ""])
    if trial.state == optuna.trial.TrialState.FAIL:
        reason = attrs.get("fail_reason", "the worker stopped sending heartbeats (killed?)")
        lines += [f"**Failed.** {reason}", "", f"**Fix:** {fix_for(reason)}", ""]
    elif trial.state == optuna.trial.TrialState.COMPLETE:
        accuracy, latency = trial.values
        lines += [feasibility(trial, latency_metric, bounds), ""]
        rows = [["accuracy (validation)", accuracy_text(accuracy, attrs.get("eval_examples"), attrs.get("invalid_answers"))],
                [f"latency objective ({latency_metric})", f"{latency:.1f} ms"]] + measured_rows(attrs)
        lines += table(["measured with onnxruntime-genai", "value"], rows) + [""]
        if attrs.get("confusion"):
            lines += ["### Confusion (validation)", ""] + confusion_table(attrs["confusion"]) + [""]
    if attrs.get("stage_seconds") is not None:
        lines += ["### Stages", ""] + stage_table(attrs["stage_seconds"], attrs.get("cached", ())) + [""]
    if figures:
        lines += ["### Figures", ""] + [f"![{caption}]({url})" for caption, url in figures.items()] + [""]
    if artifacts:
        lines += [f"Artifacts of this trial (below): {', '.join(artifacts)}.", ""]
    return "\n".join(lines)


def _test_score(chosen: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(n, invalid answers) of the chosen model's test score: from its ``test`` record, or
    from its confusion table."""
    test = chosen.get("test")
    if isinstance(test, Mapping) and test.get("n"):
        return test["n"], test.get("invalid")
    confusion = chosen.get("test_confusion") or {}
    if not confusion:
        return chosen.get("test_n"), None
    return sum(sum(row.values()) for row in confusion.values()), sum(row.get(INVALID, 0) for row in confusion.values())


BASELINE_NAMES = {"zero_shot": "zero-shot base (same precision)", "majority": "majority class"}


def _baseline_name(key: str) -> str:
    return BASELINE_NAMES.get(key, key.replace("_", " "))


def _baseline_row(name: str, value: Any, n: int | None) -> list[str]:
    if value is None or (isinstance(value, Mapping) and value.get("accuracy") is None):
        reason = value.get("failed") if isinstance(value, Mapping) else None
        return [_baseline_name(name), f"failed{f' ({reason})' if reason else ''}"]
    if not isinstance(value, Mapping):
        return [_baseline_name(name), accuracy_text(value, n)]
    text = accuracy_text(value["accuracy"], value.get("n", n), value.get("invalid"))
    detail = value.get("detail") or value.get("note")
    return [_baseline_name(name), text + (f" — {detail}" if detail else "")]


def baselines(report: Mapping[str, Any]) -> list[list[str]]:
    """Whatever baselines the report carries: ``<name>_test_accuracy`` keys of the chosen
    entry, and ``baselines`` (name -> accuracy or {accuracy, n, ...}, or a list of
    {name, accuracy, n, ...}). They are scored on the same test split as the chosen model,
    so its n applies where theirs is not given."""
    chosen = report["chosen"]
    n, _ = _test_score(chosen)
    rows = [_baseline_row(key.removesuffix("_test_accuracy"), value, n)
            for key, value in chosen.items()
            if key.endswith("_test_accuracy") and key != "test_accuracy" and isinstance(value, (int, float))]
    for found in (report.get("baselines"), chosen.get("baselines")):
        items = [(b["name"], b) for b in found] if isinstance(found, list) else (found or {}).items()
        rows += [_baseline_row(name, value, n) for name, value in items if value is None
                 or isinstance(value, (Mapping, int, float))]
    return rows


# The front table's columns, where the report has them (a report may carry many more).
FRONT_COLUMNS = ("trial", "candidate", "accuracy", "validation_accuracy", "validation_interval", "latency_ms",
                 "latency_spread_ms", "request_p50_ms", "ttft_p50_ms", "token_p50_ms", "size_mb", "memory_mb", "over",
                 "feasible")


def _cell(value: Any, column: str = "") -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, float) for v in value):  # an interval
        return f"{value[0]:.3f}–{value[1]:.3f}"
    if isinstance(value, (list, tuple)):  # the bounds a front member exceeds
        return ", ".join(f"`{v}`" for v in value) or "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.1f}" if column.endswith(("_ms", "_mb")) else f"{value:.3f}"
    return "–" if value is None else str(value)


def _column(name: str) -> str:
    """``latency_spread_ms`` -> ``latency spread (ms)``."""
    for suffix, unit in (("_ms", " (ms)"), ("_mb", " (MB)")):
        if name.endswith(suffix):
            return name.removesuffix(suffix).replace("_", " ") + unit
    return name.replace("_", " ")


def study_note(report: Mapping[str, Any], study_id: int | None = None, feasible: tuple[int, int] | None = None,
               validation_n: int | None = None) -> str:
    """The study's note after selection: the choice, beside baselines, with the bound,
    the re-benchmarked front and the command that reproduces it.

    ``feasible`` is (trials within the bound, complete trials) and ``validation_n`` the
    number of validation prompts, when known.
    """
    chosen = report.get("chosen")
    if not chosen:
        return "\n".join(["## Nothing was chosen", "", str(report.get("why", "no candidate qualified")), "",
                          "Each trial's note says how it failed or why it is infeasible.", ""])
    number = chosen["trial"]
    link = f"[trial {number}](/dashboard/studies/{study_id}/trials?numbers={number})" if study_id is not None else f"trial {number}"
    metric = report.get("latency_metric", "p50")
    latency = chosen.get(f"latency_{metric}_ms", chosen.get("latency_ms"))
    validation_n = chosen.get("validation_n") or validation_n
    lines = [f"## Chosen: trial {number}, {chosen['candidate']}", "",
             f"Open {link}. It ships as `best/` (load it with `og.Model`).", ""] + describe(chosen["spec"])
    lines += ["", "### Test accuracy beside the baselines (held-out test split)", ""]
    rows = [[f"**chosen (trial {number})**", accuracy_text(chosen["test_accuracy"], *_test_score(chosen))]] + baselines(report)
    lines += table(["model", "test accuracy"], rows) + [""]
    details = [f"validation accuracy {accuracy_text(chosen['validation_accuracy'], validation_n)}"]
    if latency is not None:
        details.append(f"{metric} latency {latency:.1f} ms re-benchmarked (range {chosen.get('latency_spread_ms', 0):.1f})")
    size = chosen.get("size_mb", (chosen.get("measured") or {}).get("size_mb"))
    if size is not None:
        details.append(f"{size:.0f} MB on disk")
    sentence = "; ".join(details)
    lines += [sentence[0].upper() + sentence[1:] + ".", "", "### Bounds applied", ""]
    given = Bounds.from_dict(report).given()
    what = {"max_latency_ms": f"{metric} latency", "max_size_mb": "size on disk",
            "max_memory_mb": "peak memory of the measuring process (peak RSS; GPU memory on CUDA)"}
    for kind, limit in given:
        lines.append(f"- `{kind.flag} {limit:g}`: {what[kind.key]} at most {limit:g} {kind.unit}; a trial over it is "
                     "infeasible (its note says so, judged by this bound whatever bounds it ran under).")
    if not given:
        lines.append("- none: no `--max-latency`, `--max-size` or `--max-memory` was given, so the most accurate "
                     "front member was chosen.")
    if feasible:
        lines.append(f"- {feasible[0]} of {feasible[1]} complete trials met {'it' if len(given) < 2 else 'them all'}.")
    lines += [f"- {binding_text(record)}" for record in report.get("bounds") or []]
    lines += ["- Rule: the most accurate feasible member of the re-benchmarked Pareto front; ties go to the lower "
              "latency, then the smaller model." + (f" {BINDS}" if given else ""), ""]
    front = report.get("pareto") or []
    if front:
        columns = [c for c in FRONT_COLUMNS if c in front[0]]
        on = f", accuracy on {validation_n} validation prompts" if validation_n else ""
        lines += [f"### Pareto front: latency re-benchmarked (median of interleaved rounds){on}", ""]
        lines += table([_column(c) for c in columns] + [""],
                       [[_cell(m.get(c), c) for c in columns] + ["**chosen**" if m.get("trial") == number else ""]
                        for m in front]) + [""]
    failed = (report.get("trials") or {}).get("failed") or []
    if failed:
        lines += ["### Failed trials", ""] + [f"- trial {f['number']} {f.get('candidate') or ''}: {f['reason']}"
                                             for f in failed] + [""]
    if report.get("command"):
        lines += ["### Reproduce", "", "```", report["command"], "```", ""]
    return "\n".join(lines)
