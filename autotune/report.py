"""After the search: choose under noise, test beside honest baselines, and write what ships.

The select stage re-benchmarks the candidates that matter (the Pareto front and the ones the
selection rule ranks first), applies the rule (:mod:`autotune.selection`: by default the
smallest, then the fastest, of the feasible candidates not significantly less accurate than
the most accurate one), scores the choice and the baselines on the held-out test split, and
writes ``best/`` with report.json, MODEL_CARD.md, pareto.csv and pareto.png (:mod:`autotune.card`).
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import sys
from collections import Counter
from pathlib import Path

import optuna
from rich.console import Console

from autotune.bounds import Bounds, binding_text, fix_for, memory_of, outcomes, trial_figures, unmet
from autotune.cache import atomic_write_text, file_lock
from autotune.constraints import feasible
from autotune.candidate import CandidateSpec, Workspace, run_candidate
from autotune.card import LATENCY_FIELDS, Baseline, FrontMember, final_table, write_failure_report, write_outputs
from autotune.dashboard import write_study_note
from autotune.errors import CandidateError, UserError, check_interrupted
from autotune.export import ExportSpec
from autotune.live import console, fmt, trial_table
from autotune.measure import Latency, LatencySettings, measure, score
from autotune.search import SearchSettings, selection_candidate
from autotune.selection import RULES, Ranking, rank

REBENCHMARK_FIRST = 3  # candidates of the rule's order re-benchmarked beside the front, in each round of choosing


def pareto(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The non-dominated trials (more accurate, lower latency) among ``trials``."""
    def dominated(t) -> bool:
        return any(o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values for o in trials)

    return [t for t in trials if not dominated(t)]


def feasible_pool(study: optuna.Study, bounds: Bounds) -> list[optuna.trial.FrozenTrial]:
    """The complete trials within every bound of *this* run (a resumed study may have been started with
    others), measured prompt by prompt (what the paired comparison needs)."""
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if feasible(t, bounds) and t.user_attrs.get("correct")]


def benchmark_sample(prompts: list[str], answers: list[str], size: int) -> tuple[list[str], list[str]]:
    """``size`` prompts spread evenly over the range of lengths (shortest to longest), fixed for a split."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), prompts[i]))
    if len(order) > size > 1:
        order = [order[round(k * (len(order) - 1) / (size - 1))] for k in range(size)]
    return [prompts[i] for i in order], [answers[i] for i in order]


def drop(trial: optuna.trial.FrozenTrial, why: str, exc: CandidateError, dropped: dict[int, str]) -> None:
    """Leave a candidate that failed out of the selection, with one line saying which and why (a Ctrl-C
    that stopped its measuring child stops the selection instead)."""
    check_interrupted()
    dropped[trial.number] = f"{why}: {exc}"
    console.print(f"[yellow]dropped #{trial.number} {trial.user_attrs.get('candidate', '?')} from the selection: "
                  f"{why} ({exc})[/]", soft_wrap=True)


def rebenchmark(ws: Workspace, members: list[optuna.trial.FrozenTrial], metric: str, bounds: Bounds,
                dropped: dict[int, str] | None = None) -> list[FrontMember]:
    """Time the front members' requests again on a fixed sample of validation prompts, interleaved
    round by round, so slow drifts of the machine (heat, other load) hit every member alike; the
    median of the rounds counts, so one loaded moment does not decide. Memory is a peak: the
    highest of the rounds counts; size on disk is the trial's (it does not change). A member whose
    export or measuring fails (a timeout, out of memory) is left out and named in ``dropped``."""
    dropped = {} if dropped is None else dropped
    settings = LatencySettings(warmup=1, sample=ws.latency.sample, rounds=ws.latency.rounds)
    prompts, answers = benchmark_sample(*ws.prompts("validation"), settings.sample)
    specs = {t.number: CandidateSpec.from_dict(t.user_attrs["spec"]) for t in members}
    label_ids = dict(zip(ws.prompts("validation")[0], ws.label_ids("validation")))  # as the trials measured them
    for t in members:  # an earlier selection under other bounds may have pruned its folder: export it again
        if not (ws.model_dir(specs[t.number]) / "genai_config.json").is_file():
            try:
                run_candidate(ws, specs[t.number])
            except CandidateError as exc:
                drop(t, "exporting it again failed", exc, dropped)
    members = [t for t in members if t.number not in dropped]
    rounds: dict[int, list[Latency]] = {t.number: [] for t in members}
    peaks: dict[int, list[tuple[float, float | None]]] = {t.number: [] for t in members}
    for _ in range(settings.rounds):
        for t in members:
            spec = specs[t.number]
            if t.number in dropped:
                continue
            try:
                timed = measure(ws.model_dir(spec), prompts, answers, ws.splits.labels,
                                provider=spec.export.execution_provider, threads=ws.threads or 1, latency=settings,
                                label_ids=[label_ids[p] for p in prompts], timeout_s=ws.measure_timeout_s)
            except CandidateError as exc:
                drop(t, "its re-benchmark failed", exc, dropped)
                continue
            rounds[t.number].append(timed.latency)
            peaks[t.number].append((timed.peak_rss_mb, timed.gpu_memory_mb))
    result = []
    for t in (t for t in members if t.number not in dropped):
        spec, values = specs[t.number], [lat.metric(metric) for lat in rounds[t.number]]
        gpu = [g for _, g in peaks[t.number] if g is not None]
        rss = max(r for r, _ in peaks[t.number])
        memory, source = memory_of(spec.export.execution_provider, rss, max(gpu, default=None))
        measured = trial_figures(t)
        if memory is None:  # e.g. NVML answered for the trial, not now: the trial's figure
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


def choose(ws: Workspace, pool: list[optuna.trial.FrozenTrial], metric: str, bounds: Bounds, rule: str,
           benched: dict[int, FrontMember] | None = None,
           dropped: dict[int, str] | None = None) -> tuple[list[FrontMember], FrontMember | None, Ranking]:
    """Apply the selection rule to ``pool``, re-benchmarking as it goes: the Pareto front and the rule's
    first :data:`REBENCHMARK_FIRST` candidates, again until the rule's first choice has been
    re-benchmarked and still meets the bounds (a re-benchmark only ever measures latency and memory
    again, so it can only drop a candidate). Returns the re-benchmarked members, each compared with the
    most accurate candidate, the choice (None if nothing is left) and the final ranking.

    ``benched`` (number -> member) and ``dropped`` (number -> why: it failed when run again) carry what is
    known from an earlier call, so choosing again after the choice failed re-benchmarks only what is new."""
    by_number = {t.number: t for t in pool}
    benched = {} if benched is None else benched
    dropped = {} if dropped is None else dropped
    while True:
        alive = [t for t in pool if t.number not in dropped and (t.number not in benched or benched[t.number].feasible)]
        ranking = rank([selection_candidate(t, metric, benched[t.number].latency_ms if t.number in benched else None)
                        for t in alive], rule)
        if ranking.chosen is None or ranking.chosen.number in benched:
            break
        todo = [t for t in pareto(alive) + [by_number[c.number] for c in ranking.order[:REBENCHMARK_FIRST]]
                if t.number not in benched]
        todo = list({t.number: t for t in todo}.values())
        console.print(f"re-benchmarking {len(todo)} candidate(s), interleaved ...")
        benched.update((m.trial.number, m) for m in rebenchmark(ws, todo, metric, bounds, dropped))
    members = [dataclasses.replace(m, paired=ranking.paired.get(number)) for number, m in benched.items()
               if number not in dropped]
    chosen = next((m for m in members if ranking.chosen and m.trial.number == ranking.chosen.number), None)
    return members, chosen, ranking


def baselines(ws: Workspace, export: ExportSpec, split: str, on_stage=None) -> list[Baseline]:
    """The floor a fine-tune must clear, on ``split``: the majority class of the training split, the
    base at ``export``'s precision told the labels in an instruction, and the same base with its
    answer restricted to the label its logits score highest."""
    _, answers = ws.prompts(split)
    counts = Counter(e.label for e in ws.splits.train)
    majority = max(ws.splits.labels, key=counts.__getitem__)
    base = CandidateSpec(None, export)
    floors = [Baseline("majority class", f"always {majority}, the most frequent label in train",
                       score([majority] * len(answers), answers, ws.splits.labels))]
    for name, detail, restrict in (("base, labels named in an instruction", base.describe(), False),
                                   ("base, answer restricted to the labels", f"{base.describe()}, highest-scoring label",
                                    True)):
        try:
            floors.append(Baseline(name, detail, run_candidate(
                ws, base, split=split, with_latency=False, on_stage=on_stage, prompt_style="instruction",
                restrict_to_labels=restrict).measurement.accuracy))
        except CandidateError as exc:  # reported as failed; the choice and the other baselines stand
            check_interrupted()
            console.print(f"[yellow]baseline {name} failed: {exc}[/]", soft_wrap=True)
            floors.append(Baseline(name, detail, None, failed=str(exc)))
    return floors


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
    pool = feasible_pool(study, bounds)
    if not pool:
        out_console.print(trial_table(complete, metric, bounds, title="No feasible trial"))
        why, kinds = unmet(bounds, [trial_figures(t) for t in complete], metric)
        write_failure_report(out, trials, why, bounds)
        raise UserError(f"{why}; {fix_for(kinds)}", exit_code=3)
    benched: dict[int, FrontMember] = {}
    dropped: dict[int, str] = {}  # members that failed when run again (a timeout, out of memory): left out
    while True:
        front, chosen, ranking = choose(ws, pool, metric, bounds, settings.rule, benched, dropped)
        if chosen is None:
            break
        console.print("scoring the chosen model and the baselines on the held-out test split ...")
        try:
            test = run_candidate(ws, chosen.spec, split="test", with_latency=False)
            break
        except CandidateError as exc:
            drop(chosen.trial, "its test run failed", exc, dropped)
    out_console.print(final_table(front, chosen, metric, bounds, settings.rule))
    if chosen is None and all(t.number in dropped for t in pool):
        write_failure_report(out, trials, "every feasible candidate failed when run again", bounds, dropped)
        raise UserError(f"every feasible candidate failed when run again in the selection ("
                        f"{'; '.join(f'#{n}: {why}' for n, why in dropped.items())}); reasons are in "
                        f"{out / 'report.json'}", exit_code=1)
    if chosen is None:  # only latency and memory are measured again
        why, _ = unmet(bounds, [m.figures for m in front], metric)
        write_failure_report(out, trials, f"re-benchmarked, {why}", bounds)
        raise UserError(f"re-benchmarked, {why} (the first measurements were optimistic); "
                        "raise the bound a little", exit_code=3)
    floors = baselines(ws, chosen.spec.export, "test")
    # Finished trials are immutable in Optuna; the choice is recorded on the study.
    study.set_user_attr("chosen_trial", chosen.trial.number)
    study.set_user_attr("chosen_test_accuracy", test.measurement.accuracy.accuracy)
    study.set_user_attr("chosen_baselines", {b.name: b.accuracy.accuracy if b.accuracy else None for b in floors})
    # A bound binds when the rule, on the trials' own figures and without bounds, ranks above the choice a
    # candidate that this bound excluded.
    unbounded = rank([selection_candidate(t, metric) for t in complete if t.user_attrs.get("correct")], settings.rule)
    position = {c.number: i for i, c in enumerate(unbounded.order)}
    judged = outcomes(bounds, chosen.trial.number, [trial_figures(t) for t in complete if t.number in position],
                      [m.figures for m in front], key=lambda f: (position[f.number],), metric=metric)
    result = write_outputs(out, ws, study, front, chosen, test, floors, hardware, profile, metric, bounds, judged, argv,
                           ranking, dropped)
    write_study_note(study, result, storage)  # the dashboard's view of the same result
    if not keep_all:
        prune(ws, study, [m.trial for m in front], keep_specs=[CandidateSpec(None, chosen.spec.export)])
    c = result["chosen"]
    out_console.print(
        f"[bold green]chosen[/] #{chosen.trial.number} {c['candidate']}\n"
        f"  rule: {RULES[settings.rule]}\n"
        f"  test accuracy [bold]{test.measurement.accuracy.describe()}[/]\n"
        + "".join(f"  baseline: {b.name}: {b.describe()}\n" for b in floors)
        + f"  {metric} p50 {chosen.latency_ms:.1f} ms (re-benchmarked)   request p50/p90 "
        f"{chosen.latency['request_p50_ms']:.1f} / {chosen.latency['request_p90_ms']:.1f} ms   size {chosen.size_mb:.0f} MB"
        f"   {chosen.memory_source} {fmt(chosen.memory_mb, '.0f', 'unknown')}{' MB' * (chosen.memory_mb is not None)}\n"
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


OWNER = ".autotune-owner"  # who holds an output folder (the lock beside it is what holds it)


def claim_output(out: Path):
    """Hold ``out`` for this process: a second search or selection on the same folder refuses in one line
    instead of trampling this one's study and ``best/``. The lock is the OS's and goes with the process,
    however it ends (kill -9 included). Returns it: keep a reference for as long as the folder is used."""
    import datetime
    import os
    import socket

    from filelock import Timeout

    lock = file_lock(out / ".autotune")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        owner = out / OWNER
        holder = owner.read_text().strip() if owner.is_file() else "another autotune process"
        raise UserError(f"--output {out} is in use by {holder}; wait for it to finish or choose another --output "
                        "(more processes on one study: --storage URL and `autotune worker`)") from None
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    atomic_write_text(out / OWNER, f"autotune (pid {os.getpid()} on {socket.gethostname()}, since {started})")
    return lock


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


