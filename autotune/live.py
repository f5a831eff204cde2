"""What the user watches: rich progress for the stages and a live trial table.

Nothing here decides anything; it renders what the candidate and search stages report
through their callbacks.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence

import optuna
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

# Logs and CI are not terminals; give tables room there instead of rich's 80 columns.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
STAGES = ("train", "merge", "export", "measure")


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

    def start_candidate(self, title: str) -> None:
        for task in self.tasks.values():
            self.progress.remove_task(task)
        self.tasks.clear()
        self.title = title

    def __call__(self, stage: str, fraction: float, detail: str) -> None:
        if stage not in self.tasks:
            for other in self.tasks.values():  # an earlier stage is done once a later one starts
                self.progress.update(other, completed=100)
            self.tasks[stage] = self.progress.add_task("", total=100, stage=stage, detail=detail)
        self.progress.update(self.tasks[stage], completed=fraction * 100, detail=detail)


def fmt(value, spec: str = ".3f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def trial_table(trials: Sequence[optuna.trial.FrozenTrial], metric: str, limit: float | None,
                title: str = "Trials", last: int | None = None) -> Table:
    """Params, accuracy, latency and feasibility of trials (the last ``last`` only)."""
    table = Table(title=title, title_justify="left", header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("candidate", no_wrap=True, overflow="ellipsis", max_width=46)
    for column in ("val acc", f"{metric} ms", "TTFT ms", "tok/s", "MB", "feasible"):
        table.add_column(column, justify="right")
    table.add_column("state", no_wrap=True, overflow="ellipsis", max_width=30)
    rows = list(trials)[-last:] if last else list(trials)
    for t in rows:
        attrs = t.user_attrs
        feasible = attrs.get("feasible")
        state = {"complete": "ok", "fail": f"[red]failed[/]: {attrs.get('fail_reason', '?')}"}.get(
            t.state.name.lower(), t.state.name.lower())
        table.add_row(
            str(t.number),
            attrs.get("candidate", "-"),
            fmt(t.values[0] if t.values else None),
            fmt(t.values[1] if t.values else None, ".1f"),
            fmt(attrs.get("ttft_ms"), ".1f"),
            fmt(attrs.get("tokens_per_s"), ".0f"),
            fmt(attrs.get("size_mb"), ".0f"),
            "-" if feasible is None else ("[green]yes[/]" if feasible else "[red]no[/]"),
            state,
        )
    return table


class SearchView:
    """Live view of a running search: stage bars, recent trials, best so far, time left."""

    def __init__(self, study: optuna.Study, metric: str, limit: float | None, total: int,
                 timeout_s: float | None) -> None:
        self.study = study
        self.metric = metric
        self.limit = limit
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
        best = best_feasible(trials)
        best_line = "best so far: -" if best is None else (
            f"best so far: #{best.number} {best.user_attrs.get('candidate')} "
            f"acc {best.values[0]:.3f}, {self.metric} {best.values[1]:.1f} ms"
        )
        parts: list = [header, best_line, trial_table(trials, self.metric, self.limit, last=12)]
        if not final:
            parts.append(self.stages.progress)
        return Group(*parts)


def best_feasible(trials: Iterable[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial | None:
    """The most accurate feasible trial (ties: lower latency)."""
    ok = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("feasible")]
    return max(ok, key=lambda t: (t.values[0], -t.values[1]), default=None)
