"""After the search: re-benchmark the front, choose, test beside honest baselines, and write what ships.

Outputs in ``OUT/``: ``best/`` (the chosen onnxruntime-genai folder, loadable as is),
``report.json``, ``MODEL_CARD.md``, ``pareto.csv`` and ``pareto.png``. Every accuracy
goes with its n and a 95% Wilson interval.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import re
import shlex
import shutil
import statistics
import sys
import dataclasses
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import optuna
from rich.console import Console
from rich.table import Table

from autotune.bounds import (BINDS, Bounds, Figures, Outcome, binding_text, fix_for, memory_of, outcomes, trial_figures,
                             unmet)
from autotune.cache import atomic_dir, atomic_write_text, file_lock
from autotune.candidate import CandidateResult, CandidateSpec, Workspace, run_candidate
from autotune.dashboard import write_study_note
from autotune.errors import UserError
from autotune.export import ExportSpec
from autotune.live import console, fmt, trial_table
from autotune.measure import Accuracy, Latency, LatencySettings, format_accuracy, measure, score, wilson_interval
from autotune.search import SearchSettings, preference

PACKAGES = ("autotune", "torch", "transformers", "peft", "bitsandbytes", "onnxruntime", "onnxruntime-genai",
            "onnxruntime-genai-cuda", "onnxruntime-genai-directml", "optuna")
LATENCY_FIELDS = tuple(f.name for f in fields(Latency))


@dataclass(frozen=True)
class FrontMember:
    """A Pareto-front trial with its re-benchmarked latency."""

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

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(round(self.accuracy * self.n), self.n)

    @property
    def figures(self) -> Figures:
        return Figures(self.trial.number, self.spec.describe(), self.accuracy, self.latency_ms, self.size_mb,
                       self.memory_mb, self.memory_source)


@dataclass(frozen=True)
class Baseline:
    """What the task scores without fine-tuning, on the same prompts as the chosen model."""

    name: str
    detail: str
    accuracy: Accuracy

    def to_dict(self) -> dict:
        return {"name": self.name, "detail": self.detail, **self.accuracy.to_dict()}


def feasible_front(study: optuna.Study, bounds: Bounds) -> list[optuna.trial.FrozenTrial]:
    """Non-dominated completed trials within every bound of *this* run (a resumed study may
    have been started with others)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if bounds.meets(trial_figures(t))]

    def dominated(t) -> bool:
        return any(o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values for o in done)

    return [t for t in done if not dominated(t)]


def benchmark_sample(prompts: list[str], answers: list[str], size: int) -> tuple[list[str], list[str]]:
    """``size`` prompts spread evenly over the range of lengths (shortest to longest), fixed for a split."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), prompts[i]))
    if len(order) > size > 1:
        order = [order[round(k * (len(order) - 1) / (size - 1))] for k in range(size)]
    return [prompts[i] for i in order], [answers[i] for i in order]


def rebenchmark(ws: Workspace, members: list[optuna.trial.FrozenTrial], metric: str, bounds: Bounds) -> list[FrontMember]:
    """Time the front members' requests again on a fixed sample of validation prompts, interleaved
    round by round, so slow drifts of the machine (heat, other load) hit every member alike; the
    median of the rounds counts, so one loaded moment does not decide. Memory is a peak: the
    highest of the rounds counts; size on disk is the trial's (it does not change)."""
    settings = LatencySettings(warmup=1, sample=ws.latency.sample, rounds=ws.latency.rounds)
    prompts, answers = benchmark_sample(*ws.prompts("validation"), settings.sample)
    specs = {t.number: CandidateSpec.from_dict(t.user_attrs["spec"]) for t in members}
    for t in members:  # an earlier selection under other bounds may have pruned its folder: export it again
        if not (ws.model_dir(specs[t.number]) / "genai_config.json").is_file():
            run_candidate(ws, specs[t.number])
    rounds: dict[int, list[Latency]] = {t.number: [] for t in members}
    peaks: dict[int, list[tuple[float, float | None]]] = {t.number: [] for t in members}
    for _ in range(settings.rounds):
        for t in members:
            spec = specs[t.number]
            timed = measure(ws.model_dir(spec), prompts, answers, ws.splits.labels, provider=spec.export.execution_provider,
                            threads=ws.threads or 1, latency=settings, timeout_s=ws.measure_timeout_s)
            rounds[t.number].append(timed.latency)
            peaks[t.number].append((timed.peak_rss_mb, timed.gpu_memory_mb))
    result = []
    for t in members:
        spec, values = specs[t.number], [lat.metric(metric) for lat in rounds[t.number]]
        gpu = [g for _, g in peaks[t.number] if g is not None]
        rss = max(r for r, _ in peaks[t.number])
        memory, source = memory_of(spec.export.execution_provider, rss, max(gpu, default=None))
        measured = trial_figures(t)
        if source != measured.memory_source:  # e.g. NVML answered for the trial, not now: the trial's figure
            memory, source = measured.memory_mb, measured.memory_source
        judged = dataclasses.replace(measured, latency_ms=statistics.median(values), memory_mb=memory,
                                     memory_source=source)
        over = tuple(k.flag for k in bounds.over(judged))
        result.append(FrontMember(
            trial=t, spec=spec, accuracy=t.values[0], n=t.user_attrs.get("eval_examples", 0),
            latency_ms=judged.latency_ms, latency_spread_ms=max(values) - min(values),
            latency={k: statistics.median(getattr(lat, k) for lat in rounds[t.number]) for k in LATENCY_FIELDS},
            size_mb=t.user_attrs.get("size_mb", 0.0), memory_mb=memory, memory_source=source, over=over,
            feasible=not over))
    return result


def choose(members: list[FrontMember]) -> FrontMember | None:
    """The best feasible member, by the one rule the search uses too (:func:`autotune.search.preference`)."""
    return min((m for m in members if m.feasible), key=lambda m: preference(m.accuracy, m.latency_ms, m.size_mb),
               default=None)


def baselines(ws: Workspace, export: ExportSpec, split: str, on_stage=None) -> list[Baseline]:
    """The floor a fine-tune must clear, on ``split``: the majority class of the training split, the
    base at ``export``'s precision told the labels in an instruction, and the same base with its
    answer restricted to the label its logits score highest."""
    _, answers = ws.prompts(split)
    counts = Counter(e.label for e in ws.splits.train)
    majority = max(ws.splits.labels, key=counts.__getitem__)
    base = CandidateSpec(None, export)
    told, restricted = (run_candidate(ws, base, split=split, with_latency=False, on_stage=on_stage,
                                      prompt_style="instruction", restrict_to_labels=restrict).measurement.accuracy
                        for restrict in (False, True))
    return [
        Baseline("majority class", f"always {majority}, the most frequent label in train",
                 score([majority] * len(answers), answers, ws.splits.labels)),
        Baseline("base, labels named in an instruction", base.describe(), told),
        Baseline("base, answer restricted to the labels", f"{base.describe()}, highest-scoring label", restricted),
    ]


def select_and_write(study: optuna.Study, ws: Workspace, settings: SearchSettings, out: Path, *, hardware: dict,
                     profile: dict, argv: list[str], keep_all: bool = False, shared_storage: bool = False,
                     storage: optuna.storages.BaseStorage | None = None) -> int:
    """The select stage: re-benchmark the feasible front, choose, score the choice and the baselines
    on the test split, write the outputs and print the summary; 0, or a UserError saying why not.
    ``storage`` is the study's (the dashboard note links the chosen trial through it)."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    out_console = Console(width=None if sys.stdout.isatty() else 140)
    metric, bounds = settings.latency_metric, settings.bounds
    if not complete:
        out_console.print(trial_table(trials, metric, bounds, title="All trials failed"))
        write_failure_report(out, trials, "every candidate failed", bounds)
        raise UserError(f"every candidate failed; reasons are in {out / 'report.json'}", exit_code=1)
    front_trials = feasible_front(study, bounds)
    if not front_trials:
        out_console.print(trial_table(complete, metric, bounds, title="No feasible trial"))
        why, kinds = unmet(bounds, [trial_figures(t) for t in complete], metric)
        write_failure_report(out, trials, why, bounds)
        raise UserError(f"{why}; {fix_for(kinds)}", exit_code=3)
    console.print(f"re-benchmarking {len(front_trials)} Pareto candidate(s), interleaved ...")
    front = rebenchmark(ws, front_trials, metric, bounds)
    chosen = choose(front)
    out_console.print(final_table(front, chosen, metric, bounds))
    if chosen is None:  # only latency and memory are measured again
        why, _ = unmet(bounds, [m.figures for m in front], metric)
        write_failure_report(out, trials, f"re-benchmarked, {why}", bounds)
        raise UserError(f"re-benchmarked, {why} (the first measurements were optimistic); "
                        "raise the bound a little", exit_code=3)
    console.print("scoring the chosen model and the baselines on the held-out test split ...")
    test = run_candidate(ws, chosen.spec, split="test", with_latency=False)
    floors = baselines(ws, chosen.spec.export, "test")
    # Finished trials are immutable in Optuna; the choice is recorded on the study.
    study.set_user_attr("chosen_trial", chosen.trial.number)
    study.set_user_attr("chosen_test_accuracy", test.measurement.accuracy.accuracy)
    study.set_user_attr("chosen_baselines", {b.name: b.accuracy.accuracy for b in floors})
    judged = outcomes(bounds, chosen.trial.number, [trial_figures(t) for t in complete], [m.figures for m in front],
                      key=lambda f: preference(f.accuracy, f.latency_ms, f.size_mb), metric=metric)
    result = write_outputs(out, ws, study, front, chosen, test, floors, hardware, profile, metric, bounds, judged, argv)
    write_study_note(study, result, storage)  # the dashboard's view of the same result
    if not keep_all:
        prune(ws, study, [m.trial for m in front], keep_specs=[CandidateSpec(None, chosen.spec.export)])
    c = result["chosen"]
    out_console.print(
        f"[bold green]chosen[/] #{chosen.trial.number} {c['candidate']}\n"
        f"  test accuracy [bold]{test.measurement.accuracy.describe()}[/]\n"
        + "".join(f"  baseline: {b.name}: {b.accuracy.describe()}\n" for b in floors)
        + f"  {metric} p50 {chosen.latency_ms:.1f} ms (re-benchmarked)   request p50/p90 "
        f"{chosen.latency['request_p50_ms']:.1f} / {chosen.latency['request_p90_ms']:.1f} ms   size {chosen.size_mb:.0f} MB"
        f"   {chosen.memory_source} {fmt(chosen.memory_mb, '.0f')} MB\n"
        + "".join(f"  bound {binding_text(o.to_dict(), mark='')}\n" for o in judged)
        + f"  wrote {out / 'best'} (load with og.Model), report.json, MODEL_CARD.md, pareto.csv, pareto.png\n"
        f"  compare candidates: autotune dashboard {out}" + (" --storage URL" if shared_storage else ""))
    return 0


def output_dir(path: str) -> Path:
    """The output folder, created and checked writable before any work (a one-line error if not)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--output {out} is not writable ({exc.strerror}); choose another folder") from exc
    return out


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
                  bounds: Bounds, judged: list[Outcome], argv: list[str]) -> dict:
    """Write best/, report.json, MODEL_CARD.md, pareto.csv and pareto.png; return the report."""
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
        "latency_metric": metric,
        **bounds.to_dict(),
        "bounds": [o.to_dict() for o in judged],
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
    _write_plot(out / "pareto.png", trials, front, chosen, metric, bounds.max_latency_ms)
    atomic_write_text(out / "MODEL_CARD.md", model_card(report))
    return report


def _member_dict(m: FrontMember) -> dict:
    """A front member's figures: validation accuracy with n and interval, re-benchmarked latency."""
    return {"trial": m.trial.number, "candidate": m.spec.describe(), "validation_accuracy": m.accuracy,
            "validation_n": m.n, "validation_interval": list(m.interval), "latency_ms": m.latency_ms,
            "latency_spread_ms": m.latency_spread_ms, **{k: m.latency[k] for k in LATENCY_FIELDS},
            "size_mb": m.size_mb, "memory_mb": m.memory_mb, "memory_source": m.memory_source, "over": list(m.over),
            "feasible": m.feasible}


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
        f"Chosen by autotune from {report['trials']['complete']} measured candidates as the most accurate one "
        + ("within the bounds below." if report["bounds"] else "found."),
        "",
    ]
    if report["bounds"]:
        lines += ["## Bounds", "", BINDS, ""] + [f"- {binding_text(b)}" for b in report["bounds"]] + [""]
    lines += ["## Choices", "", f"- candidate: {c['candidate']}"]
    spec = c["spec"]
    if spec.get("train"):
        lines += [f"- training: {', '.join(f'{k}={v}' for k, v in spec['train'].items())}"]
    lines += [f"- export: {', '.join(f'{k}={v}' for k, v in spec['export'].items())}", "",
              "## Accuracy", "", "Exact label by greedy generation; 95% Wilson intervals.", "",
              "| model | accuracy |", "| --- | --- |",
              f"| this model, test split | {_accuracy_text(c['test'])} |",
              f"| this model, validation split | {_accuracy_text(val)} |"]
    lines += [f"| baseline: {b['name']} ({b['detail']}), test split | {_accuracy_text(b)} |" for b in c["baselines"]]
    lines += ["", "## Latency and size", "",
              "Per request (tokenize, prefill, generation to the stop, decode), p50 / p90 across the validation prompts.", "",
              "| metric | value |", "| --- | --- |",
              f"| request | {fmt(m['request_p50_ms'], '.1f')} / {fmt(m['request_p90_ms'], '.1f')} ms |",
              f"| time to first token | {fmt(m['ttft_p50_ms'], '.1f')} / {fmt(m['ttft_p90_ms'], '.1f')} ms |",
              f"| decode per token | {fmt(m['token_p50_ms'], '.1f')} / {fmt(m['token_p90_ms'], '.1f')} ms |",
              f"| prompt length | {fmt(m['prompt_tokens_p50'], '.0f')} / {fmt(m['prompt_tokens_p90'], '.0f')} tokens |",
              f"| re-benchmarked {metric} p50 | {c['latency_ms']:.1f} ms (range {c['latency_spread_ms']:.1f}) |",
              f"| peak RSS of the measuring process | {fmt(m['peak_rss_mb'], '.0f')} MB |",
              *([f"| GPU memory of the measuring process | {m['gpu_memory_mb']:.0f} MB |"]
                if m.get("gpu_memory_mb") else []),
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
            with file_lock(folder):  # the lock file stays: deleting it could let two holders in
                shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def _interval_text(accuracy: float, interval) -> str:
    return f"{accuracy:.3f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def final_table(front: list[FrontMember], chosen: FrontMember | None, metric: str, bounds: Bounds = Bounds()) -> Table:
    table = Table(title=f"Pareto front (requests re-benchmarked, interleaved; objective {metric} p50; "
                  f"bounds: {bounds.describe()})", title_justify="left", header_style="bold")
    for column in ("#", "candidate", "val acc [95% CI]", "request p50/p90", "TTFT p50", "decode p50", "range", "MB",
                   "mem MB", "feasible", ""):
        table.add_column(column, justify="left" if column in ("candidate", "") else "right")
    for m in sorted(front, key=lambda m: m.latency_ms):
        lat = m.latency
        table.add_row(str(m.trial.number), m.spec.describe(), _interval_text(m.accuracy, m.interval),
                      f"{lat['request_p50_ms']:.1f} / {lat['request_p90_ms']:.1f}", f"{lat['ttft_p50_ms']:.1f}",
                      f"{lat['token_p50_ms']:.1f}", f"{m.latency_spread_ms:.1f}", f"{m.size_mb:.0f}",
                      fmt(m.memory_mb, ".0f"),
                      "yes" if m.feasible else f"[red]no[/]: {', '.join(f.removeprefix('--max-') for f in m.over)}",
                      "[bold green]chosen[/]" if chosen is not None and m.trial.number == chosen.trial.number else "")
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
    ] + [(f"baseline: {b.name}", b.accuracy.describe()) for b in floors]
    for name, value in rows:
        table.add_row(name, value)
    return table


def write_failure_report(out: Path, trials, why: str, bounds: Bounds) -> None:
    """A report.json that says why nothing was chosen, trial by trial (``over``: the bounds of this run it exceeds)."""
    rows = [{"number": t.number, "state": t.state.name, "candidate": t.user_attrs.get("candidate"),
             "values": t.values, "feasible": t.user_attrs.get("feasible"), "reason": t.user_attrs.get("fail_reason"),
             "over": ([k.flag for k in bounds.over(trial_figures(t))]
                      if t.state == optuna.trial.TrialState.COMPLETE else None)}
            for t in trials if t.state != optuna.trial.TrialState.WAITING and "duplicate_of" not in t.user_attrs]
    atomic_write_text(out / "report.json", json.dumps({"chosen": None, "why": why, **bounds.to_dict(), "trials": rows},
                                                      indent=1))
