"""Command line: parse flags, call the stages, print results. Nothing else lives here.

    autotune [--target auto|cpu|cuda|dml] [--max-latency MS] ...   the search (main job)
    autotune candidate --method lora --rank 16 --precision int4     one candidate
    autotune profile                                                 detected hardware
    autotune dashboard [OUT | --storage URL]                         optuna-dashboard
    autotune worker --storage URL --study NAME                       join a study from another machine
    autotune select --storage URL --study NAME                       choose and write the best of a study
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from autotune.errors import UserError

SUBCOMMANDS = ("candidate", "profile", "dashboard", "search", "worker", "select")
DEFAULT_OUTPUT = "autotune-out"


def _quiet_libraries() -> None:
    # The libraries' own progress bars and deprecation chatter would drown our view.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import logging

    for name in ("bitsandbytes", "onnxruntime", "transformers", "peft", "accelerate", "matplotlib"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------- parsers


def _add_model_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="base model: a local HF folder, a .gguf file or a hub id (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--data", default="demo", help="dataset: .jsonl, .json or .csv/.txt (default: the embedded tone demo)")
    g.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    g.add_argument("--label-column", default="label", help="column holding the label (default: label)")
    g.add_argument("--columns", help="names for the columns of a CSV without a header, e.g. text,label")
    g.add_argument("--delimiter", help="CSV delimiter, e.g. ';' (default: sniffed from the first line)")
    g.add_argument("--template", help="prompt template ending with {label} (default: '### Text: {text}\\n### The tone is:\\n{label}')")
    g.add_argument("--chat-template", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--label-map", help="rename and select labels, e.g. sadness=Sad,joy=Joy (unmapped labels are dropped)")
    g.add_argument("--max-per-label", type=int, help="use at most N rows per label")
    g.add_argument("--max-eval", type=int, help="score on at most N prompts of each split (default: all)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation/test split (default: 0)")
    s = p.add_argument_group("hardware and safety")
    s.add_argument("--target", default="auto", help="auto, cpu, cuda or dml (default: auto)")
    s.add_argument("--threads", type=int, help="CPU threads for training and measuring (default: the cores free now)")
    s.add_argument("--output", "-o", default=DEFAULT_OUTPUT, help=f"output folder (default: {DEFAULT_OUTPUT})")
    s.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code to run (off by default)")
    s.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (off by default: safetensors only)")


def _search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autotune",
        description="Search LoRA/QLoRA fine-tunes and onnxruntime-genai exports for the most accurate model "
        "that meets a latency bound on this hardware. Subcommands: candidate, profile, dashboard, worker, select "
        "(autotune SUBCOMMAND --help).",
    )
    _add_model_data_args(p)
    g = p.add_argument_group("search")
    g.add_argument("--max-latency", type=float, help="hard latency bound in ms (of --latency-metric)")
    g.add_argument("--latency-metric", default="p50", choices=["ttft", "p50", "p90"], help="ttft, or per-token p50/p90 (default: p50)")
    g.add_argument("--trials", type=int, default=12, help="candidates to evaluate in all, counting a resumed study's (default: 12)")
    g.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    g.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "random"], help="constrained multivariate TPE (default), NSGA-II or random")
    g.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    g.add_argument("--space", help="search space YAML (default: search_spaces/default.yaml)")
    g.add_argument("--storage", help="Optuna storage URL (default: sqlite in the output folder)")
    g.add_argument("--study", default="autotune", help="study name (default: autotune)")
    g.add_argument("--artifacts", help="folder for adapters and exported models that all workers reach (default: OUTPUT/cache)")
    g.add_argument("--keep-all", action="store_true", help="keep every candidate's model folder, not only the Pareto front's")
    g.add_argument("--no-siblings", action="store_true", help="do not queue a new adapter's other precisions as extra trials")
    return p


def _candidate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autotune candidate",
        description="Build one candidate (fine-tune, merge, export with the onnxruntime-genai builder) and "
        "measure it with onnxruntime-genai, beside the zero-shot base at the same precision.",
    )
    _add_model_data_args(p)
    t = p.add_argument_group("training")
    t.add_argument("--method", default="lora", choices=["lora", "qlora"], help="LoRA, or QLoRA on an nf4 base (default: lora)")
    t.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    t.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    t.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05)")
    t.add_argument("--lr", type=float, default=3e-4, help="learning rate (default: 3e-4)")
    t.add_argument("--steps", type=int, default=150, help="optimizer steps (default: 150)")
    t.add_argument("--batch-size", type=int, default=8, help="batch size (default: 8)")
    t.add_argument("--target-modules", default="all-linear", choices=["all-linear", "attention", "mlp"], help="layers that get LoRA (default: all-linear)")
    t.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    t.add_argument("--batching", default="padded", choices=["padded", "packed"],
                   help="padded rows, or a step's examples packed into one row without padding (default: padded)")
    e = p.add_argument_group("export")
    e.add_argument("--precision", default="int4", choices=["fp32", "fp16", "bf16", "int8", "int4"], help="export precision (default: int4)")
    e.add_argument("--block-size", type=int, default=32, help="int4/int8 block size (default: 32)")
    e.add_argument("--accuracy-level", type=int, default=4, help="int4/int8 MatMul accuracy level: 0 builder default, 1 fp32 .. 4 int8 (default: 4)")
    e.add_argument("--algo", default="default", choices=["default", "rtn", "k_quant"], help="int4/int8 quantization algorithm (default: default)")
    o = p.add_argument_group("output")
    o.add_argument("--split", default="test", choices=["validation", "test"], help="split to score on (default: test)")
    o.add_argument("--no-baseline", action="store_true", help="skip the zero-shot base")
    o.add_argument("--json", action="store_true", help="print the measured record as JSON on stdout")
    return p


def _profile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autotune profile", description="Show the detected hardware and the profile chosen for --target.")
    p.add_argument("--target", default="auto", help="auto, cpu, cuda or dml (default: auto)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    return p


def _worker_parser(prog: str, description: str, worker: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--storage", required=True, help="the study's Optuna storage URL, e.g. postgresql://user:pass@host/db")
    p.add_argument("--study", default="autotune", help="study name (default: autotune)")
    p.add_argument("--artifacts", help="shared folder for adapters and exported models (default: OUTPUT/cache)")
    p.add_argument("--output", "-o", default=DEFAULT_OUTPUT, help=f"local output folder (default: {DEFAULT_OUTPUT})")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores free now)")
    if worker:
        p.add_argument("--trials", type=int, help="override the study's total trial count")
        p.add_argument("--per-profile", action="store_true",
                       help="if this machine's hardware profile differs from the study's, join STUDY@PROFILE instead of refusing")
    return p


def _dashboard_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autotune dashboard", description="Open the study in optuna-dashboard.")
    p.add_argument("output", nargs="?", default=DEFAULT_OUTPUT, help=f"output folder of a search (default: {DEFAULT_OUTPUT})")
    p.add_argument("--storage", help="Optuna storage URL instead of the output folder's study.db")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    return p


# --------------------------------------------------------------------------- shared setup


def _data_config(args):
    from autotune.data import DEFAULT_TEMPLATE, DataConfig, parse_label_map

    columns = tuple(c.strip() for c in args.columns.split(",")) if args.columns else ()
    return DataConfig(
        path=args.data,
        text_column=args.text_column,
        label_column=args.label_column,
        columns=columns,
        delimiter=args.delimiter,
        template=(args.template.replace("\\n", "\n") if args.template else DEFAULT_TEMPLATE),
        chat_template=args.chat_template,
        label_map=parse_label_map(args.label_map) if args.label_map else (),
        max_per_label=args.max_per_label,
        seed=args.split_seed,
    )


def _hardware(target: str):
    from autotune import hardware

    if target not in hardware.TARGETS:
        raise UserError(f"unknown --target '{target}' (choose from {', '.join(hardware.TARGETS)})")
    info = hardware.probe()
    profile = hardware.choose_profile(info, target, hardware.load_profiles())
    return info, profile


def _output_dir(path: str) -> Path:
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


def _workspace(args, out: Path, profile, root: Path | None = None):
    from autotune.candidate import Workspace
    from autotune.data import load_splits
    from autotune.export import check_export_memory
    from autotune.hardware import choose_threads
    from autotune.models import resolve_model

    splits = load_splits(_data_config(args))  # cheap and most likely to be wrong: check first
    base = resolve_model(args.model, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    check_export_memory(base, profile.memory_headroom)  # a model that cannot fit is refused before any work
    return Workspace(
        root=root or out / "cache",
        base=base,
        splits=splits,
        train_device=profile.train_device,
        train_dtype=profile.train_dtype,
        threads=choose_threads(args.threads),
        train_threads=args.threads,
        trust_remote_code=args.trust_remote_code,
        max_eval=args.max_eval,
        memory_headroom=profile.memory_headroom,
    )


# --------------------------------------------------------------------------- commands


def cmd_candidate(args) -> int:
    from autotune.candidate import CandidateSpec, run_candidate
    from autotune.export import ExportSpec
    from autotune.live import StageProgress, console
    from autotune.report import candidate_table
    from autotune.train import TrainSpec

    info, profile = _hardware(args.target)
    if args.precision not in profile.precisions:
        raise UserError(f"--precision {args.precision} does not run on {profile.execution_provider} "
                        f"(profile {profile.name}: {', '.join(profile.precisions)})")
    if args.method == "qlora" and not profile.qlora:
        raise UserError(f"--method qlora: profile {profile.name} cannot run bitsandbytes 4-bit; use --method lora")
    train = TrainSpec(method=args.method, rank=args.rank, alpha=args.alpha or 2.0 * args.rank, dropout=args.dropout,
                      learning_rate=args.lr, steps=args.steps, batch_size=args.batch_size,
                      target_modules=args.target_modules, seed=args.seed, batching=args.batching)
    export = ExportSpec(precision=args.precision, execution_provider=profile.execution_provider,
                        block_size=args.block_size, accuracy_level=args.accuracy_level, algo=args.algo).normalized()
    out = _output_dir(args.output)
    ws = _workspace(args, out, profile)
    console.print(f"[bold]data[/] {ws.splits.summary()}   [bold]model[/] {ws.base.name} ({ws.base.architecture})   "
                  f"[bold]profile[/] {profile.name}, {ws.threads} thread(s)")
    specs = [CandidateSpec(train, export)]
    if not args.no_baseline:
        specs.append(CandidateSpec(None, export))
    results = []
    progress = StageProgress()
    with progress.progress:
        for spec in specs:
            progress.start_candidate(spec.describe())
            console.print(f"[bold]candidate[/] {spec.describe()}")
            results.append(run_candidate(ws, spec, split=args.split, on_stage=progress))
    if args.json:
        print(json.dumps({"profile": profile.name, "split": args.split, "candidate": results[0].to_dict(),
                          "zero_shot": results[1].to_dict() if len(results) > 1 else None}, indent=1))
    else:
        from rich.console import Console

        Console(width=None if sys.stdout.isatty() else 140).print(candidate_table(results, args.split))
    return 0


def cmd_profile(args) -> int:
    from rich.console import Console

    from autotune.hardware import choose_threads, format_profile

    info, profile = _hardware(args.target)
    if args.json:
        print(json.dumps({"hardware": info.to_dict(), "profile": profile.to_dict()}, indent=1, default=str))
    else:
        Console().print(format_profile(info, profile, choose_threads(None)))
    return 0


def default_space_path() -> Path:
    from autotune.hardware import default_profiles_dir

    return default_profiles_dir().parent / "search_spaces" / "default.yaml"


# Flags a worker takes from the study instead of its own command line.
SHARED_FLAGS = ("model", "data", "text_column", "label_column", "columns", "delimiter", "template", "chat_template",
                "label_map", "max_per_label", "max_eval", "split_seed", "target", "trust_remote_code", "allow_pickle",
                "max_latency", "latency_metric", "trials", "timeout", "sampler", "seed", "no_siblings", "keep_all")


@dataclass
class SearchContext:
    """Everything a search, a worker or a selection needs, built once from the flags."""

    args: argparse.Namespace
    argv: list[str]
    settings: object
    info: object
    profile: object
    space: object
    out: Path
    ws: object
    storage: str
    study: object


def _prepare_search(args, argv: list[str], join: bool = False) -> SearchContext:
    import yaml

    from autotune import report
    from autotune.hardware import qlora_enabled
    from autotune.search import SearchSettings, open_study
    from autotune.space import SearchSpace

    settings = SearchSettings(trials=args.trials, timeout_s=args.timeout, max_latency_ms=args.max_latency,
                              latency_metric=args.latency_metric, sampler=args.sampler, seed=args.seed,
                              siblings=not args.no_siblings)
    info, profile = _hardware(args.target)
    space_text = getattr(args, "space_text", None)
    if space_text is None:
        space_path = Path(args.space) if args.space else default_space_path()
        space = SearchSpace.from_yaml(space_path)  # validates before anything is written
        space_text = space_path.read_text()
    else:
        space = SearchSpace.from_dict(yaml.safe_load(space_text), where="the study's search space")
    space = space.restrict(profile.precisions, qlora_enabled(profile, info), profile.execution_provider)
    out = _output_dir(args.output)
    artifacts = Path(args.artifacts).expanduser() if getattr(args, "artifacts", None) else out / "cache"
    ws = _workspace(args, out, profile, artifacts)
    storage = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    config = {k: getattr(args, k, None) for k in SHARED_FLAGS}
    config["space_text"] = space_text
    attrs = {"model": ws.base.name, "data": ws.splits.summary(), "data_fingerprint": ws.splits.fingerprint,
             "target": args.target, "profile": profile.name, "latency_metric": settings.latency_metric,
             "max_latency_ms": settings.max_latency_ms, "hardware": info.to_dict(),
             "versions": report.package_versions(), "command": report.reproduce_command(argv), "config": config}
    if join:  # a worker adds itself; the study's own record stays as its creator wrote it
        attrs = {k: attrs[k] for k in ("profile", "model", "data_fingerprint", "latency_metric")}
    study = open_study(storage, args.study, settings, attrs)
    return SearchContext(args, argv, settings, info, profile, space, out, ws, storage, study)


def _run_trials(ctx: SearchContext) -> None:
    from autotune.live import SearchView, console
    from autotune.search import Search, requeue_interrupted

    if not ctx.args.storage:  # one process owns a local SQLite study: RUNNING trials there are dead
        requeued = requeue_interrupted(ctx.study)
        if requeued:
            console.print(f"resuming: {requeued} interrupted trial(s) queued again")
    search = Search(ctx.ws, ctx.space, ctx.profile.execution_provider, ctx.settings, ctx.study)
    done_before = ctx.settings.trials - search.remaining()
    console.print(f"[bold]data[/] {ctx.ws.splits.summary()}   [bold]model[/] {ctx.ws.base.name}   "
                  f"[bold]profile[/] {ctx.profile.name}, {ctx.ws.threads} thread(s)   "
                  f"[bold]study[/] {ctx.args.study} ({ctx.storage.split('://')[0]})"
                  + (f"   resuming with {done_before} trial(s) done" if done_before else ""))
    s = ctx.settings
    with SearchView(ctx.study, s.latency_metric, s.max_latency_ms, s.trials, s.timeout_s) as view:
        search.run(on_stage=view.on_stage, on_trial=view.on_trial)


def _select(ctx: SearchContext) -> int:
    import optuna
    from rich.console import Console

    from autotune import report
    from autotune.candidate import CandidateSpec, run_candidate
    from autotune.live import console, trial_table

    study, settings, out, ws = ctx.study, ctx.settings, ctx.out, ctx.ws
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    out_console = Console(width=None if sys.stdout.isatty() else 140)
    if not complete:
        out_console.print(trial_table(trials, settings.latency_metric, settings.max_latency_ms, title="All trials failed"))
        report.write_failure_report(out, trials, "every candidate failed")
        raise UserError(f"every candidate failed; reasons are in {out / 'report.json'}", exit_code=1)
    front_trials = report.feasible_front(study, settings.max_latency_ms)
    if not front_trials:
        fastest = min(complete, key=lambda t: t.values[1])
        out_console.print(trial_table(complete, settings.latency_metric, settings.max_latency_ms, title="No feasible trial"))
        report.write_failure_report(out, trials, "no candidate met --max-latency")
        raise UserError(
            f"no candidate met --max-latency {settings.max_latency_ms:g} ms; the fastest found was #{fastest.number} "
            f"{fastest.user_attrs.get('candidate')} at {fastest.values[1]:.1f} ms ({settings.latency_metric}); "
            "raise the bound or search faster precisions", exit_code=3)
    console.print(f"re-benchmarking {len(front_trials)} Pareto candidate(s), interleaved ...")
    front = report.rebenchmark(ws, front_trials, settings.latency_metric, settings.max_latency_ms)
    chosen = report.choose(front)
    out_console.print(report.final_table(front, chosen, settings.latency_metric))
    if chosen is None:
        report.write_failure_report(out, trials, "no Pareto candidate met --max-latency when re-benchmarked")
        raise UserError(f"re-benchmarked, no candidate stays within --max-latency {settings.max_latency_ms:g} ms "
                        "(the first timings were optimistic); raise the bound a little", exit_code=3)
    console.print("scoring the chosen model and the zero-shot base on the held-out test split ...")
    test = run_candidate(ws, chosen.spec, split="test", with_latency=False)
    zero_shot = run_candidate(ws, CandidateSpec(None, chosen.spec.export), split="test", with_latency=False)
    # Finished trials are immutable in Optuna; the choice is recorded on the study.
    study.set_user_attr("chosen_trial", chosen.trial.number)
    study.set_user_attr("chosen_test_accuracy", test.measurement.accuracy.accuracy)
    study.set_user_attr("zero_shot_test_accuracy", zero_shot.measurement.accuracy.accuracy)
    result = report.write_outputs(out, ws, study, front, chosen, test, zero_shot, ctx.info.to_dict(),
                                  ctx.profile.to_dict(), settings.latency_metric, settings.max_latency_ms, ctx.argv)
    if not ctx.args.keep_all:
        report.prune(ws, study, [m.trial for m in front], keep_specs=[zero_shot.spec])
    c = result["chosen"]
    out_console.print(
        f"[bold green]chosen[/] #{chosen.trial.number} {c['candidate']}\n"
        f"  test accuracy [bold]{c['test_accuracy']:.3f}[/]   validation {c['validation_accuracy']:.3f}   "
        f"zero-shot base (test) {c['zero_shot_test_accuracy']:.3f}\n"
        f"  {settings.latency_metric} {chosen.latency_ms:.1f} ms   size {chosen.size_mb:.0f} MB\n"
        f"  wrote {out / 'best'} (load with og.Model), report.json, MODEL_CARD.md, pareto.csv, pareto.png\n"
        f"  compare candidates: autotune dashboard {out}" + (" --storage URL" if ctx.args.storage else ""))
    return 0


def cmd_search(args, argv: list[str]) -> int:
    ctx = _prepare_search(args, argv)
    _run_trials(ctx)
    return _select(ctx)


def _args_from_study(args) -> argparse.Namespace:
    """A worker's or selector's flags: the study's recorded config plus its own local ones."""
    import optuna

    from autotune.search import _first_line, open_storage

    try:
        summaries = optuna.study.get_all_study_summaries(open_storage(args.storage), include_best_trial=False)
    except UserError:
        raise
    except Exception as exc:  # sqlalchemy and the drivers raise many kinds; the message says which
        raise UserError(f"--storage: cannot reach the study storage ({_first_line(exc)}); "
                        "check the URL and that the server is up") from exc
    summary = next((s for s in summaries if s.study_name == args.study), None)
    if summary is None:
        names = ", ".join(s.study_name for s in summaries) or "none"
        raise UserError(f"no study '{args.study}' in that storage (studies: {names}); "
                        f"start it with autotune --storage ... --study {args.study}")
    config = summary.user_attrs.get("config")
    if not config:
        raise UserError(f"study '{args.study}' has no recorded settings (not started by autotune)")
    merged = argparse.Namespace(**config)
    for key in ("storage", "study", "output", "artifacts", "threads"):
        setattr(merged, key, getattr(args, key, None))
    merged.space = None
    merged.study_profile = summary.user_attrs.get("profile")  # not a flag: read by cmd_worker
    merged.study_names = {s.study_name for s in summaries}
    return merged


def cmd_worker(args) -> int:
    import secrets

    from autotune.live import console

    joined = _args_from_study(args)
    if args.trials is not None:
        joined.trials = args.trials
    join = True
    _, profile = _hardware(joined.target)
    if joined.study_profile and joined.study_profile != profile.name:
        per_profile = f"{args.study}@{profile.name}"
        if not args.per_profile:
            raise UserError(f"study '{args.study}' measures latency on hardware profile {joined.study_profile}, "
                            f"this machine's profile is {profile.name}; pass --per-profile to join the study "
                            f"'{per_profile}' for this hardware instead")
        console.print(f"this machine's profile ({profile.name}) differs from the study's "
                      f"({joined.study_profile}); joining the per-profile study {per_profile}")
        join = per_profile in joined.study_names  # the first worker of a profile records the settings
        joined.study = args.study = per_profile
    if join:
        # Every worker samples with its own seed: with the study's, all workers would propose the
        # same candidates at the same moments, and all but one of those trials would be duplicates.
        joined.seed = secrets.randbelow(2**31)
    ctx = _prepare_search(joined, [], join=join)
    _run_trials(ctx)
    return 0


def cmd_select(args) -> int:
    joined = _args_from_study(args)
    ctx = _prepare_search(joined, ["select", "--storage", args.storage, "--study", args.study], join=True)
    return _select(ctx)


def cmd_dashboard(args) -> int:
    from autotune.dashboard import serve

    return serve(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "search"
    if argv and argv[0] in SUBCOMMANDS:
        argv = argv[1:]
    parser = {
        "candidate": _candidate_parser, "profile": _profile_parser, "dashboard": _dashboard_parser,
        "search": _search_parser,
        "worker": lambda: _worker_parser("autotune worker", "Join a study from another process or machine; "
                                         "model, data, space and target come from the study.", worker=True),
        "select": lambda: _worker_parser("autotune select", "Choose, test and write the best model of a study "
                                         "(same outputs as a single-machine run).", worker=False),
    }[command]()
    args = parser.parse_args(argv)
    _quiet_libraries()
    handlers = {"candidate": cmd_candidate, "profile": cmd_profile, "dashboard": cmd_dashboard,
                "worker": cmd_worker, "select": cmd_select,
                "search": lambda a: cmd_search(a, list(sys.argv[1:] if not argv else argv))}
    try:
        return handlers[command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: completed trials and cached artifacts are kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC
            print(f"error: disk full while writing {exc.filename or 'output'}; free space and rerun (finished work is kept)",
                  file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
