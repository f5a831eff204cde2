"""What the user watches: rich progress for the stages and a live trial table on a terminal,
one plain line per stage and per trial elsewhere (a log file, a pipe, CI).

Nothing here decides anything; it renders what the candidate and search stages report
through their callbacks.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

import optuna
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from autotune.bounds import Bounds, trial_figures
from autotune.search import best_trial, counted_trials

# On a terminal, progress goes to stderr and redraws in place. When stdout is not a terminal
# (``autotune ... > log.txt``, CI, nohup), progress is plain lines on stdout, so the log holds it;
# tables get room there instead of rich's 80 columns, and rich writes no control codes.
INTERACTIVE = sys.stdout.isatty()
console = Console(file=sys.stderr if INTERACTIVE else sys.stdout, width=None if INTERACTIVE else 140)
STAGES = ("train", "merge", "calibrate", "export", "measure")


class StageProgress:
    """A progress bar per stage of the candidate being built; use as ``on_stage``."""

    def __init__(self) -> None:
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.fields[stage]:<8}"), BarColumn(bar_width=30),
            TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), TextColumn("{task.fields[detail]}"),
            console=console, transient=False,
        )
        self.tasks: dict[str, int] = {}
        self.title = ""

    def __enter__(self) -> "StageProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start_candidate(self, title: str) -> None:
        for task in self.tasks.values():
            self.progress.remove_task(task)
        self.tasks.clear()
        self.title = title
        if title:
            self.progress.console.print(f"[bold]candidate[/] {title}")

    def __call__(self, stage: str, fraction: float, detail: str) -> None:
        if stage not in self.tasks:
            for other in self.tasks.values():  # an earlier stage is done once a later one starts
                self.progress.update(other, completed=100)
            self.tasks[stage] = self.progress.add_task("", total=100, stage=stage, detail=detail)
        self.progress.update(self.tasks[stage], completed=fraction * 100, detail=detail)


def fmt(value, spec: str = ".3f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def over_bounds(trial: optuna.trial.FrozenTrial, bounds: Bounds) -> list[str] | None:
    """The names (latency, size, memory) of the bounds a complete trial exceeds, judged by ``bounds`` (a
    resumed run's may differ from those the trial ran with); None for a trial without figures."""
    if trial.state != optuna.trial.TrialState.COMPLETE:
        return None
    return [k.name for k in bounds.over(trial_figures(trial))]


def trial_table(trials: Sequence[optuna.trial.FrozenTrial], metric: str, bounds: Bounds,
                title: str = "Trials", last: int | None = None) -> Table:
    """Params, accuracy, latency, size, memory and feasibility of trials (the last ``last`` only)."""
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("role")  # screen: a new adapter; continue: trained on; export: another precision
    table.add_column("candidate", no_wrap=True, overflow="ellipsis", max_width=46)
    for column in ("val acc", f"{metric} ms", "TTFT ms", "req p90 ms", "MB", "mem MB", "feasible"):
        table.add_column(column, justify="right")
    table.add_column("state", no_wrap=True, overflow="ellipsis", max_width=30)
    rows = list(trials)[-last:] if last else list(trials)
    for t in rows:
        attrs = t.user_attrs
        over = over_bounds(t, bounds)
        state = {"complete": "ok", "fail": f"[red]failed[/]: {attrs.get('fail_reason', '?')}",
                 "pruned": f"skipped: {skipped(attrs)}"}.get(t.state.name.lower(), t.state.name.lower())
        table.add_row(
            str(t.number),
            attrs.get("role", "-"),
            attrs.get("candidate", "-"),
            fmt(t.values[0] if t.values else None),
            fmt(t.values[1] if t.values else None, ".1f"),
            fmt(attrs.get("ttft_p50_ms"), ".1f"),
            fmt(attrs.get("request_p90_ms"), ".1f"),
            fmt(attrs.get("size_mb"), ".0f"),
            fmt(trial_figures(t).memory_mb if over is not None else None, ".0f"),
            "-" if over is None else ("[red]no[/]: " + ", ".join(over) if over else "[green]yes[/]"),
            state,
        )
    return table


class SearchView:
    """Live view of a running search: stage bars, recent trials, best so far, time left."""

    def __init__(self, study: optuna.Study, metric: str, bounds: Bounds, total: int,
                 timeout_s: float | None, rule: str = "smallest-tied") -> None:
        self.study = study
        self.metric = metric
        self.bounds = bounds
        self.rule = rule
        self.total = total
        self.timeout_s = timeout_s
        self.started = time.monotonic()
        self.stages = StageProgress()
        self.live = Live(self._render(), console=console, refresh_per_second=2, transient=False)

    def __enter__(self) -> "SearchView":
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.update(self._render(final=True))
        self.live.__exit__(*exc)
        if not console.is_terminal:  # rich ends the last render with a newline only on terminals
            console.line()

    def on_stage(self, stage: str, fraction: float, detail: str) -> None:
        self.stages(stage, fraction, detail)
        self.live.update(self._render())

    def on_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.stages.start_candidate("")
        self.live.update(self._render())

    def _render(self, final: bool = False):
        trials = [t for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()]
        done = len(trials)
        elapsed = time.monotonic() - self.started
        left = ""
        if self.timeout_s:
            left = f", {max(0, self.timeout_s - elapsed) / 60:.1f} min left of the timeout"
        header = f"[bold]trial {min(done + 1, self.total)} of {self.total}[/] ({elapsed / 60:.1f} min elapsed{left})"
        best = best_trial(trials, self.bounds, self.rule)  # the run's bounds and rule, as selection will judge
        best_line = "best so far: -" if best is None else (
            f"best so far: #{best.number} {best.user_attrs.get('candidate')} "
            f"acc {best.values[0]:.3f}, {self.metric} {best.values[1]:.1f} ms"
        )
        parts: list = [header, best_line, trial_table(trials, self.metric, self.bounds, last=12)]
        if not final:
            parts.append(self.stages.progress)
        return Group(*parts)


class PlainStages:
    """Stage progress as plain lines: one when a candidate starts, one when each of its stages does."""

    def __init__(self, started: float | None = None, prefix: str = "") -> None:
        self.started = time.monotonic() if started is None else started
        self.prefix = prefix
        self.stage: str | None = None

    def __enter__(self) -> "PlainStages":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def line(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed // 60:3.0f}:{elapsed % 60:04.1f}] {text}", file=console.file, flush=True)

    def start_candidate(self, title: str) -> None:
        self.stage = None
        if title:
            self.line(f"candidate {title}")

    def __call__(self, stage: str, fraction: float, detail: str) -> None:
        if stage != self.stage:  # training reports every step; a log wants the stage once
            self.stage = stage
            self.line(f"{self.prefix}{stage}: {detail}")


class PlainView:
    """A running search as plain lines: each stage as it starts, each trial as it ends."""

    def __init__(self, study: optuna.Study, metric: str, bounds: Bounds, total: int,
                 timeout_s: float | None, rule: str = "smallest-tied") -> None:
        self.study = study
        self.metric = metric
        self.bounds = bounds
        self.total = total
        self.stages = PlainStages()

    def __enter__(self) -> "PlainView":
        self.stages.line(f"search: {self.total} trial(s), latency metric {self.metric}")
        return self

    def __exit__(self, *exc) -> None:
        pass

    def on_stage(self, stage: str, fraction: float, detail: str) -> None:
        if stage != self.stages.stage:
            running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            mine = [t for t in running if t.user_attrs.get("worker", "").endswith(f":{os.getpid()}")]
            self.stages.prefix = f"trial {mine[-1].number} " if mine else ""
        self.stages(stage, fraction, detail)

    def on_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.stages.start_candidate("")
        attrs = trial.user_attrs
        if trial.state == optuna.trial.TrialState.COMPLETE:
            over = over_bounds(trial, self.bounds)
            verdict = f"over the {' and '.join(over)} bound{'s' * (len(over) > 1)}" if over else "feasible"
            outcome = f"acc {trial.values[0]:.3f}  {self.metric} {trial.values[1]:.1f} ms  {verdict}"
        elif trial.state == optuna.trial.TrialState.PRUNED:
            outcome = f"skipped ({skipped(attrs)})"
        else:
            outcome = f"failed: {attrs.get('fail_reason', trial.state.name.lower())}"
        done = len(counted_trials(study.get_trials(deepcopy=False)))
        took = f" in {trial.duration.total_seconds():.0f} s" if trial.duration else ""
        self.stages.line(f"trial {trial.number} ({attrs.get('role', '-')}, {done} of {self.total} done){took}: "
                         f"{attrs.get('candidate', '-')}  {outcome}")


def skipped(attrs: dict) -> str:
    """Why a pruned trial built nothing: a duplicate, or an export its configuration rules out."""
    if "duplicate_of" in attrs:
        return f"same candidate as trial {attrs['duplicate_of']}"
    return attrs.get("excluded", "pruned")


def stage_view() -> StageProgress | PlainStages:
    """Stage progress for ``autotune candidate``: bars on a terminal, plain lines elsewhere."""
    return StageProgress() if INTERACTIVE else PlainStages()


def search_view(study: optuna.Study, metric: str, bounds: Bounds, total: int,
                timeout_s: float | None, rule: str = "smallest-tied") -> SearchView | PlainView:
    """The live view of a search on a terminal, plain lines elsewhere."""
    return (SearchView if INTERACTIVE else PlainView)(study, metric, bounds, total, timeout_s, rule)
