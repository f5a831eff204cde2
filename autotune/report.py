"""After the search: re-benchmark the front, choose, test, and write what ships.

Outputs in ``OUT/``: ``best/`` (the chosen onnxruntime-genai folder, loadable as is),
``report.json``, ``MODEL_CARD.md``, ``pareto.csv`` and ``pareto.png``.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import re
import shlex
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from rich.table import Table

from autotune.cache import atomic_dir, atomic_write_text
from autotune.candidate import CandidateResult, CandidateSpec, Workspace
from autotune.export import ExportSpec
from autotune.live import fmt
from autotune.measure import LatencySettings, measure
from autotune.search import LATENCY_METRICS
from autotune.train import TrainSpec

PACKAGES = ("autotune", "torch", "transformers", "peft", "bitsandbytes", "onnxruntime", "onnxruntime-genai",
            "onnxruntime-genai-cuda", "onnxruntime-genai-directml", "optuna")


@dataclass
class FrontMember:
    """A Pareto-front trial with its re-benchmarked latency."""

    trial: optuna.trial.FrozenTrial
    spec: CandidateSpec
    accuracy: float
    latency_ms: float
    latency_spread_ms: float
    size_mb: float
    feasible: bool


def spec_from_attrs(attrs: dict[str, Any]) -> CandidateSpec:
    spec = attrs["spec"]
    train = TrainSpec(**spec["train"]) if spec.get("train") else None
    return CandidateSpec(train=train, export=ExportSpec(**spec["export"]))


def feasible_front(study: optuna.Study, limit: float | None) -> list[optuna.trial.FrozenTrial]:
    """Non-dominated completed trials whose latency meets ``limit`` (the bound of *this* run:
    a resumed study may have been started with another one)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if limit is None or t.values[1] <= limit]

    def dominated(t) -> bool:
        return any(o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values for o in done)

    return [t for t in done if not dominated(t)]


def rebenchmark(ws: Workspace, members: list[optuna.trial.FrozenTrial], metric: str, limit: float | None,
                rounds: int = 3) -> list[FrontMember]:
    """Time the front members again, interleaved round by round, so slow drifts of the
    machine (heat, other load) hit every member alike; the median of rounds counts."""
    prompts, _ = ws.prompts("validation")
    prompt = sorted(prompts, key=len)[len(prompts) // 2]
    samples: dict[int, list[float]] = {t.number: [] for t in members}
    settings = LatencySettings(new_tokens=ws.latency.new_tokens, warmup=1, repeats=ws.latency.repeats)
    for _ in range(rounds):
        for t in members:
            spec = spec_from_attrs(t.user_attrs)
            timed = measure(ws.model_dir(spec), [], [], ws.splits.labels, provider=spec.export.execution_provider,
                            threads=ws.threads or 1, latency=settings, latency_prompt=prompt)
            samples[t.number].append(getattr(timed.latency, LATENCY_METRICS[metric]))
    result = []
    for t in members:
        values = samples[t.number]
        latency = statistics.median(values)
        result.append(FrontMember(
            trial=t, spec=spec_from_attrs(t.user_attrs), accuracy=t.values[0], latency_ms=latency,
            latency_spread_ms=max(values) - min(values), size_mb=t.user_attrs.get("size_mb", 0.0),
            feasible=limit is None or latency <= limit,
        ))
    return result


def choose(members: list[FrontMember]) -> FrontMember | None:
    """The most accurate feasible member; ties: lower latency, then smaller size."""
    feasible = [m for m in members if m.feasible]
    return min(feasible, key=lambda m: (-m.accuracy, m.latency_ms, m.size_mb), default=None)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def redact(text: str) -> str:
    """Hide the password of any URL (``postgresql://user:secret@host`` -> ``user:***@host``)."""
    return re.sub(r"(\w+://[^:/@\s]+):[^\s/]*@", r"\1:***@", text)


def reproduce_command(argv: list[str]) -> str:
    """The command line that reproduces this run, with credentials removed."""
    return redact("autotune " + " ".join(shlex.quote(a) for a in argv))


def write_outputs(out: Path, ws: Workspace, study: optuna.Study, front: list[FrontMember], chosen: FrontMember,
                  test: CandidateResult, zero_shot: CandidateResult, hardware: dict, profile: dict, metric: str,
                  limit: float | None, argv: list[str]) -> dict:
    """Write best/, report.json, MODEL_CARD.md, pareto.csv and pareto.png; return the report."""
    with atomic_dir(out / "best") as tmp:
        shutil.copytree(ws.model_dir(chosen.spec), tmp, dirs_exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    failed = [{"number": t.number, "candidate": t.user_attrs.get("candidate"),
               "reason": t.user_attrs.get("fail_reason", "worker stopped sending heartbeats (killed?); retried")}
              for t in trials if t.state == optuna.trial.TrialState.FAIL]
    report = {
        "chosen": {
            "trial": chosen.trial.number,
            "candidate": chosen.spec.describe(),
            "spec": chosen.trial.user_attrs["spec"],
            "validation_accuracy": chosen.accuracy,
            "test_accuracy": test.measurement.accuracy.accuracy,
            "test_confusion": test.measurement.accuracy.confusion,
            "zero_shot_test_accuracy": zero_shot.measurement.accuracy.accuracy,
            f"latency_{metric}_ms": chosen.latency_ms,
            "latency_spread_ms": chosen.latency_spread_ms,
            "measured": {k: chosen.trial.user_attrs.get(k) for k in
                         ("ttft_ms", "ttft_spread_ms", "token_p50_ms", "token_p90_ms", "tokens_per_s", "peak_rss_mb", "size_mb")},
        },
        "latency_metric": metric,
        "max_latency_ms": limit,
        "pareto": [_member_dict(m) for m in front],
        "trials": {"complete": len([t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]), "failed": failed},
        "model": ws.base.name,
        "data": ws.splits.summary(),
        "hardware": hardware,
        "profile": profile,
        "versions": package_versions(),
        "command": reproduce_command(argv),
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=str))
    _write_csv(out / "pareto.csv", front)
    _write_plot(out / "pareto.png", trials, front, chosen, metric, limit)
    atomic_write_text(out / "MODEL_CARD.md", model_card(report))
    return report


def _member_dict(m: FrontMember) -> dict:
    return {"trial": m.trial.number, "candidate": m.spec.describe(), "accuracy": m.accuracy,
            "latency_ms": m.latency_ms, "latency_spread_ms": m.latency_spread_ms, "size_mb": m.size_mb,
            "feasible": m.feasible}


def _write_csv(path: Path, front: list[FrontMember]) -> None:
    rows = [_member_dict(m) for m in front]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)


def _write_plot(path: Path, trials, front: list[FrontMember], chosen: FrontMember, metric: str, limit: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.scatter([t.values[1] for t in done], [t.values[0] for t in done], c="#bbbbbb", label="trials")
    ordered = sorted(front, key=lambda m: m.latency_ms)
    ax.plot([m.latency_ms for m in ordered], [m.accuracy for m in ordered], "o-", c="#1f77b4", label="Pareto front (re-benchmarked)")
    ax.scatter([chosen.latency_ms], [chosen.accuracy], s=160, facecolors="none", edgecolors="#d62728", linewidths=2, label="chosen")
    if limit:
        ax.axvline(limit, ls="--", c="#d62728", lw=1, label=f"max latency {limit:g} ms")
    ax.set_xlabel(f"latency {metric} (ms)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_card(report: dict) -> str:
    c = report["chosen"]
    m = c["measured"]
    metric = report["latency_metric"]
    lines = [
        f"# {Path(report['model']).name} fine-tuned for {report['data'].split('labels ')[-1]}",
        "",
        f"Chosen by autotune from {report['trials']['complete']} measured candidates as the most accurate one "
        + (f"within {report['max_latency_ms']:g} ms ({report['latency_metric']})." if report["max_latency_ms"] else "found."),
        "",
        "## Choices",
        "",
        f"- candidate: {c['candidate']}",
    ]
    spec = c["spec"]
    if spec.get("train"):
        lines += [f"- training: {', '.join(f'{k}={v}' for k, v in spec['train'].items())}"]
    lines += [f"- export: {', '.join(f'{k}={v}' for k, v in spec['export'].items())}", "",
              "## Metrics", "", "| metric | value |", "| --- | --- |",
              f"| test accuracy | {c['test_accuracy']:.3f} |",
              f"| validation accuracy | {c['validation_accuracy']:.3f} |",
              f"| zero-shot base, test accuracy | {c['zero_shot_test_accuracy']:.3f} |",
              f"| time to first token | {fmt(m['ttft_ms'], '.1f')} ms (IQR {fmt(m['ttft_spread_ms'], '.1f')}) |",
              f"| per-token latency p50 / p90 | {fmt(m['token_p50_ms'], '.1f')} / {fmt(m['token_p90_ms'], '.1f')} ms |",
              f"| re-benchmarked {metric} | {c['latency_' + metric + '_ms']:.1f} ms "
              f"(range {c['latency_spread_ms']:.1f}) |",
              f"| tokens/s | {fmt(m['tokens_per_s'], '.0f')} |",
              f"| peak RSS of the measuring process | {fmt(m['peak_rss_mb'], '.0f')} MB |",
              f"| size on disk | {fmt(m['size_mb'], '.0f')} MB |", "",
              "## Data", "", report["data"], "",
              "## Hardware", "", f"profile `{report['profile'].get('name')}`; " +
              ", ".join(f"{k}: {v}" for k, v in report["hardware"].items() if k in ("os", "cpu_model", "logical_cores", "ram_gb", "gpus")),
              "", "## Versions", "", ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
              "## Reproduce", "", "```", report["command"], "```", "",
              "## Use", "", "```python", "import onnxruntime_genai as og",
              "model = og.Model('best')  # this folder", "tokenizer = og.Tokenizer(model)", "```", ""]
    if report["trials"]["failed"]:
        lines += ["## Failed candidates", ""] + [f"- #{f['number']} {f['candidate']}: {f['reason']}" for f in report["trials"]["failed"]] + [""]
    return "\n".join(lines)


def prune(ws: Workspace, study: optuna.Study, keep: list[optuna.trial.FrozenTrial], keep_specs=()) -> int:
    """Delete this study's exported folders that are off the front; adapters and records stay.

    Only folders of this study's finished trials go (a shared artifacts folder may hold other
    studies' models, and running workers' exports), each under its lock.
    """
    from autotune.candidate import _lock

    keep_keys = {t.user_attrs.get("model_key") for t in keep} | {ws.export_key(s) for s in keep_specs}
    busy = {t.user_attrs.get("model_key") for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))}
    removed = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)):
        key = t.user_attrs.get("model_key")
        if not key or key in keep_keys or key in busy:
            continue
        folder = ws.root / "models" / key
        if folder.is_dir():
            with _lock(folder):  # the lock file stays: deleting it could let two holders in
                shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def final_table(front: list[FrontMember], chosen: FrontMember | None, metric: str) -> Table:
    table = Table(title="Pareto front (latency re-benchmarked, interleaved)", title_justify="left", header_style="bold")
    for column in ("#", "candidate", "val acc", f"{metric} ms", "range ms", "size MB", "feasible", ""):
        table.add_column(column, justify="left" if column in ("candidate", "") else "right")
    for m in sorted(front, key=lambda m: m.latency_ms):
        table.add_row(str(m.trial.number), m.spec.describe(), f"{m.accuracy:.3f}", f"{m.latency_ms:.1f}",
                      f"{m.latency_spread_ms:.1f}", f"{m.size_mb:.0f}", "yes" if m.feasible else "[red]no[/]",
                      "[bold green]chosen[/]" if chosen is not None and m.trial.number == chosen.trial.number else "")
    return table


def candidate_table(results: list[CandidateResult], split: str) -> Table:
    """One measured candidate beside its zero-shot base."""
    table = Table(title=f"Measured with onnxruntime-genai on the {split} split", title_justify="left", header_style="bold")
    table.add_column("")
    for r in results:
        table.add_column("zero-shot base" if r.spec.train is None else "candidate", justify="right")
    rows = [
        ("model", lambda r: r.spec.describe()),
        ("accuracy", lambda r: f"{r.measurement.accuracy.accuracy:.3f} ({r.measurement.accuracy.n} prompts)"),
        ("invalid answers", lambda r: str(r.measurement.accuracy.invalid)),
        ("time to first token", lambda r: f"{r.measurement.latency.ttft_ms:.1f} ms ± {r.measurement.latency.ttft_spread_ms:.1f}"),
        ("per-token p50 / p90", lambda r: f"{r.measurement.latency.token_p50_ms:.1f} / {r.measurement.latency.token_p90_ms:.1f} ms"),
        ("tokens/s", lambda r: f"{r.measurement.latency.tokens_per_s:.0f}"),
        ("peak RSS", lambda r: f"{r.measurement.peak_rss_mb:.0f} MB"),
        ("size on disk", lambda r: f"{r.measurement.size_mb:.0f} MB"),
        ("final train loss", lambda r: fmt(r.train.final_loss if r.train else None)),
        ("model folder", lambda r: str(r.model_dir)),
    ]
    for name, get in rows:
        table.add_row(name, *(get(r) for r in results))
    return table


def write_failure_report(out: Path, trials, why: str) -> None:
    """A report.json that says why nothing was chosen, trial by trial."""
    rows = [{"number": t.number, "state": t.state.name, "candidate": t.user_attrs.get("candidate"),
             "values": t.values, "feasible": t.user_attrs.get("feasible"), "reason": t.user_attrs.get("fail_reason")}
            for t in trials if t.state != optuna.trial.TrialState.WAITING and "duplicate_of" not in t.user_attrs]
    atomic_write_text(out / "report.json", json.dumps({"chosen": None, "why": why, "trials": rows}, indent=1))
