"""What a search writes and prints about its choice: the final table, report.json, MODEL_CARD.md,
pareto.csv and pareto.png, beside ``best/`` (:func:`write_outputs`).

Every accuracy goes with its n and a 95% Wilson interval; every candidate compared with the
most accurate one goes with the paired difference, its 95% interval and whether they are tied
(:mod:`autotune.selection`).
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import re
import shlex
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import optuna
from rich.table import Table

from autotune.bounds import BINDS, Bounds, Figures, Outcome, binding_text, trial_figures
from autotune.cache import atomic_dir, atomic_write_text
from autotune.candidate import CandidateResult, CandidateSpec, Workspace
from autotune.live import fmt
from autotune.measure import SCORING_RULE, Accuracy, Latency, format_accuracy, wilson_interval
from autotune.selection import ALPHA, RULES, Paired, Ranking

PACKAGES = ("autotune", "torch", "transformers", "peft", "bitsandbytes", "onnxruntime", "onnxruntime-genai",
            "onnxruntime-genai-cuda", "onnxruntime-genai-directml", "optuna")
LATENCY_FIELDS = tuple(f.name for f in fields(Latency))


@dataclass(frozen=True)
class FrontMember:
    """A re-benchmarked candidate (a Pareto-front trial, or one the selection rule ranked first), with its
    comparison to the most accurate candidate on the same validation prompts."""

    trial: optuna.trial.FrozenTrial
    spec: CandidateSpec
    accuracy: float
    n: int  # validation prompts behind the accuracy
    latency_ms: float  # the objective (--latency-metric), median of the re-benchmark rounds
    latency_spread_ms: float  # its range over the rounds
    latency: dict[str, float]  # every Latency figure, median of the rounds
    size_mb: float
    memory_mb: float | None  # --max-memory's figure: the re-benchmark's, or the trial's if it measured none
    memory_source: str  # peak RSS, or GPU memory (CUDA)
    over: tuple[str, ...]  # the flags of the bounds it exceeds
    feasible: bool
    paired: Paired | None = None  # against the most accurate feasible candidate (None: dropped by the re-benchmark)

    @property
    def tied(self) -> bool:
        """Not significantly less accurate than the most accurate feasible candidate."""
        return self.paired is not None and not self.paired.significantly_worse

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(round(self.accuracy * self.n), self.n)

    @property
    def figures(self) -> Figures:
        return Figures(self.trial.number, self.spec.describe(), self.accuracy, self.latency_ms, self.size_mb,
                       self.memory_mb, self.memory_source)


@dataclass(frozen=True)
class Baseline:
    """What the task scores without fine-tuning, on the same prompts as the chosen model (``accuracy`` None:
    it could not be run, ``failed`` says why)."""

    name: str
    detail: str
    accuracy: Accuracy | None
    failed: str = ""

    def describe(self) -> str:
        return f"failed ({self.failed})" if self.accuracy is None else self.accuracy.describe()

    def to_dict(self) -> dict:
        if self.accuracy is None:
            return {"name": self.name, "detail": self.detail, "accuracy": None, "failed": self.failed}
        return {"name": self.name, "detail": self.detail, **self.accuracy.to_dict()}


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
                  test: CandidateResult, floors: list[Baseline], hardware: dict, profile: dict, metric: str,
                  bounds: Bounds, judged: list[Outcome], argv: list[str], ranking: Ranking,
                  dropped: dict[int, str] | None = None) -> dict:
    """Write best/, report.json, MODEL_CARD.md, pareto.csv and pareto.png; return the report. ``dropped``:
    the candidates left out of the selection because they failed when run again, and why."""
    with atomic_dir(out / "best") as tmp:
        shutil.copytree(ws.model_dir(chosen.spec), tmp, dirs_exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    failed = [{"number": t.number, "candidate": t.user_attrs.get("candidate"),
               "reason": t.user_attrs.get("fail_reason", "worker stopped sending heartbeats (killed?); retried")}
              for t in trials if t.state == optuna.trial.TrialState.FAIL]
    accuracy = test.measurement.accuracy
    report = {
        "chosen": {
            **_member_dict(chosen),
            "spec": chosen.trial.user_attrs["spec"],
            "test": accuracy.to_dict(),
            "test_accuracy": accuracy.accuracy,
            "baselines": [b.to_dict() for b in floors],
            "measured": {k: chosen.trial.user_attrs.get(k)
                         for k in (*LATENCY_FIELDS, "peak_rss_mb", "gpu_memory_mb", "size_mb")},
        },
        "selection": {"rule": ranking.rule, "says": RULES[ranking.rule], "alpha": ALPHA,
                      "most_accurate": ranking.best.number if ranking.best else None,
                      "tied": [m.trial.number for m in front if m.tied],
                      "note": "validation accuracies of the chosen model and its rivals carry the winner's curse: "
                              "the test split, used once for the choice, says what it scores"},
        "latency_metric": metric,
        **bounds.to_dict(),
        "bounds": [o.to_dict() for o in judged],
        "pareto": [_member_dict(m) for m in front],
        "dropped": [{"trial": n, "reason": why} for n, why in (dropped or {}).items()],
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
    _write_plot(out / "pareto.png", trials, front, chosen, metric, bounds.max_latency_ms)
    atomic_write_text(out / "MODEL_CARD.md", model_card(report))
    return report


def _member_dict(m: FrontMember) -> dict:
    """A front member's figures: validation accuracy with n and interval, re-benchmarked latency."""
    return {"trial": m.trial.number, "candidate": m.spec.describe(), "validation_accuracy": m.accuracy,
            "validation_n": m.n, "validation_interval": list(m.interval), "latency_ms": m.latency_ms,
            "latency_spread_ms": m.latency_spread_ms, **{k: m.latency[k] for k in LATENCY_FIELDS},
            "size_mb": m.size_mb, "memory_mb": m.memory_mb, "memory_source": m.memory_source, "over": list(m.over),
            "feasible": m.feasible, "vs_most_accurate": m.paired.to_dict() if m.paired else None, "tied": m.tied}


def _write_csv(path: Path, front: list[FrontMember]) -> None:
    rows = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in _member_dict(m).items()} for m in front]
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
    ax.set_xlabel(f"{metric} p50 (ms)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _accuracy_text(record: dict) -> str:
    return format_accuracy(record["accuracy"], record["n"], record["interval"])


def model_card(report: dict) -> str:
    c = report["chosen"]
    m = c["measured"]
    metric = report["latency_metric"]
    val = {"accuracy": c["validation_accuracy"], "n": c["validation_n"], "interval": c["validation_interval"]}
    lines = [
        f"# {Path(report['model']).name} fine-tuned for {report['data'].split('labels ')[-1]}",
        "",
        f"Chosen by autotune from {report['trials']['complete']} measured candidates: "
        f"{report['selection']['says']}" + (", within the bounds below." if report["bounds"] else "."),
        "",
        "## How it was chosen", "",
        "Each candidate against the most accurate one, on the same validation prompts: the difference of "
        "accuracy with its 95% interval (Bonett-Price) and the exact McNemar p-value; *tied*: not significantly "
        f"less accurate (p >= {report['selection']['alpha']:g}). {report['selection']['note'].capitalize()}.", "",
        "| trial | candidate | validation accuracy | vs most accurate | p | MB | request p50 ms | |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(report["pareto"], key=lambda r: (r["size_mb"], r["latency_ms"])):
        vs = r["vs_most_accurate"]
        diff = "-" if vs is None else _interval_text(vs["diff"], vs["interval"], signed=True)
        mark = "chosen" if r["trial"] == c["trial"] else "tied" if r["tied"] else ""
        lines.append(f"| {r['trial']} | {r['candidate']} | {_interval_text(r['validation_accuracy'], r['validation_interval'])} "
                     f"| {diff} | {'-' if vs is None else format(vs['p_value'], '.2f')} | {r['size_mb']:.0f} "
                     f"| {r['request_p50_ms']:.1f} | {mark} |")
    lines.append("")
    if report["bounds"]:
        lines += ["## Bounds", "", BINDS, ""] + [f"- {binding_text(b)}" for b in report["bounds"]] + [""]
    lines += ["## Choices", "", f"- candidate: {c['candidate']}"]
    spec = c["spec"]
    if spec.get("train"):
        lines += [f"- training: {', '.join(f'{k}={v}' for k, v in spec['train'].items())}"]
    lines += [f"- export: {', '.join(f'{k}={v}' for k, v in spec['export'].items())}", "",
              "## Accuracy", "", f"By greedy generation: {SCORING_RULE}; 95% Wilson intervals. The baselines are "
              "scored by the same rule.", "",
              "| model | accuracy |", "| --- | --- |",
              f"| this model, test split | {_accuracy_text(c['test'])} |",
              f"| this model, validation split | {_accuracy_text(val)} |"]
    lines += [f"| baseline: {b['name']} ({b['detail']}), test split | "
              f"{'failed: ' + b['failed'] if b.get('failed') else _accuracy_text(b)} |" for b in c["baselines"]]
    lines += ["", "## Latency and size", "",
              "Per request (tokenize, prefill, generation to the stop, decode), p50 / p90 across the validation prompts.", "",
              "| metric | value |", "| --- | --- |",
              f"| request | {fmt(m['request_p50_ms'], '.1f')} / {fmt(m['request_p90_ms'], '.1f')} ms |",
              f"| time to first token | {fmt(m['ttft_p50_ms'], '.1f')} / {fmt(m['ttft_p90_ms'], '.1f')} ms |",
              f"| decode per token | {fmt(m['token_p50_ms'], '.1f')} / {fmt(m['token_p90_ms'], '.1f')} ms |",
              f"| prompt length | {fmt(m['prompt_tokens_p50'], '.0f')} / {fmt(m['prompt_tokens_p90'], '.0f')} tokens |",
              f"| re-benchmarked {metric} p50 | {c['latency_ms']:.1f} ms (range {c['latency_spread_ms']:.1f}) |",
              f"| peak RSS of the measuring process | {fmt(m['peak_rss_mb'], '.0f')} MB |",
              *([f"| GPU memory of the measuring process | {gpu_text(m.get('gpu_memory_mb'))} |"]
                if spec["export"].get("execution_provider") == "cuda" or m.get("gpu_memory_mb") is not None else []),
              f"| size on disk | {fmt(m['size_mb'], '.0f')} MB |", "",
              "## Data", "", report["data"], "",
              "## Hardware", "", f"profile `{report['profile'].get('name')}`; " +
              ", ".join(f"{k}: {v}" for k, v in report["hardware"].items() if k in ("os", "cpu_model", "logical_cores", "ram_gb", "gpus")),
              "", "## Versions", "", ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
              "## Reproduce", "", "```", report["command"], "```", "",
              "## Use", "", "```python", "import onnxruntime_genai as og",
              "model = og.Model('best')  # this folder", "tokenizer = og.Tokenizer(model)",
              "tokenizer.update_options(add_special_tokens='true')  # the BOS it was trained with, where it has one",
              "```", ""]
    if report["trials"]["failed"]:
        lines += ["## Failed candidates", ""] + [f"- #{f['number']} {f['candidate']}: {f['reason']}" for f in report["trials"]["failed"]] + [""]
    return "\n".join(lines)


def gpu_text(value: float | None) -> str:
    """``812 MB``, or why there is no figure."""
    return "unknown (NVML could not measure it here)" if value is None else f"{value:.0f} MB"


def _interval_text(value: float, interval, signed: bool = False) -> str:
    """``0.640 [0.56, 0.72]``, or signed for a difference: ``-0.022 [-0.08, +0.04]``."""
    sign = "+" if signed else ""
    return f"{value:{sign}.3f} [{interval[0]:{sign}.2f}, {interval[1]:{sign}.2f}]"


FINAL_COLUMNS = ("#", "candidate", "val acc [95% CI]", "vs best [95% CI]", "request p50/p90", "TTFT p50",
                 "decode p50", "range", "MB", "mem MB", "feasible", "")


def final_table(front: list[FrontMember], chosen: FrontMember | None, metric: str, bounds: Bounds = Bounds(),
                rule: str = "smallest-tied") -> Table:
    """The re-benchmarked candidates, smallest first, each against the most accurate one (paired on the
    validation prompts; "tied": not significantly less accurate), the choice marked."""
    table = Table(title=f"Candidates (requests re-benchmarked, interleaved; objective {metric} p50; bounds: "
                  f"{bounds.describe()}). Chosen: {RULES[rule]}", title_justify="left", header_style="bold")
    for column in FINAL_COLUMNS:
        table.add_column(column, justify="left" if column in ("candidate", "") else "right")
    for m in sorted(front, key=lambda m: (m.size_mb, m.latency_ms)):
        lat = m.latency
        mark = ("[bold green]chosen[/]" if chosen is not None and m.trial.number == chosen.trial.number
                else "tied" if m.tied else "")
        table.add_row(str(m.trial.number), m.spec.describe(), _interval_text(m.accuracy, m.interval),
                      "-" if m.paired is None else _interval_text(m.paired.diff, m.paired.interval, signed=True),
                      f"{lat['request_p50_ms']:.1f} / {lat['request_p90_ms']:.1f}", f"{lat['ttft_p50_ms']:.1f}",
                      f"{lat['token_p50_ms']:.1f}", f"{m.latency_spread_ms:.1f}", f"{m.size_mb:.0f}",
                      fmt(m.memory_mb, ".0f"),
                      "yes" if m.feasible else f"[red]no[/]: {', '.join(f.removeprefix('--max-') for f in m.over)}",
                      mark)
    return table


def candidate_table(result: CandidateResult, floors: list[Baseline], split: str) -> Table:
    """One measured candidate, its latency figures, and the baselines on the same prompts."""
    table = Table(title=f"Measured with onnxruntime-genai on the {split} split (ms; p50 / p90 across prompts)",
                  title_justify="left", header_style="bold")
    table.add_column("")
    table.add_column(result.spec.describe())
    m, lat = result.measurement, result.measurement.latency
    rows = [
        ("accuracy", m.accuracy.describe()),
        ("invalid answers", str(m.accuracy.invalid)),
        ("request", f"{lat.request_p50_ms:.1f} / {lat.request_p90_ms:.1f} ms"),
        ("time to first token", f"{lat.ttft_p50_ms:.1f} / {lat.ttft_p90_ms:.1f} ms"),
        ("decode per token", f"{lat.token_p50_ms:.1f} / {lat.token_p90_ms:.1f} ms"),
        ("prompt length", f"{lat.prompt_tokens_p50:.0f} / {lat.prompt_tokens_p90:.0f} tokens"),
        ("peak RSS", f"{m.peak_rss_mb:.0f} MB"),
        ("size on disk", f"{m.size_mb:.0f} MB"),
        ("final train loss", fmt(result.train.final_loss if result.train else None)),
        ("model folder", str(result.model_dir)),
    ] + [(f"baseline: {b.name}", b.describe()) for b in floors]
    for name, value in rows:
        table.add_row(name, value)
    return table


def write_failure_report(out: Path, trials, why: str, bounds: Bounds, dropped: dict[int, str] | None = None) -> None:
    """A report.json that says why nothing was chosen, trial by trial (``over``: the bounds of this run it exceeds;
    ``reason``: why it failed, or why the selection dropped it)."""
    rows = []
    for t in trials:
        if t.state == optuna.trial.TrialState.WAITING or "duplicate_of" in t.user_attrs:
            continue
        over = [k.flag for k in bounds.over(trial_figures(t))] if t.state == optuna.trial.TrialState.COMPLETE else None
        rows.append({"number": t.number, "state": t.state.name, "candidate": t.user_attrs.get("candidate"),
                     "values": t.values, "feasible": None if over is None else not over,
                     "reason": (dropped or {}).get(t.number, t.user_attrs.get("fail_reason")), "over": over})
    atomic_write_text(out / "report.json", json.dumps({"chosen": None, "why": why, **bounds.to_dict(), "trials": rows},
                                                      indent=1))
