"""Command line: parse flags, call the stages, print results. Nothing else lives here.

    autotune [--target auto|cpu|cuda|dml] [--max-latency MS] ...   the search (main job)
    autotune candidate --method lora --rank 16 --precision int4     one candidate
    autotune profile                                                 detected hardware
    autotune dashboard [OUT | --storage URL --artifacts DIR]         optuna-dashboard, notes and artifacts
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

from autotune import bounds, flags
from autotune.errors import UserError, check_interrupted, handle_interrupts, interrupted

SUBCOMMANDS = ("candidate", "profile", "dashboard", "search", "worker", "select")


def _quiet_libraries() -> None:
    # The libraries' own progress bars and deprecation chatter would drown our view.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. transformers' GGUF conversion uses plain tqdm
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import logging

    for name in ("bitsandbytes", "onnxruntime", "transformers", "peft", "accelerate", "matplotlib"):
        logging.getLogger(name).setLevel(logging.ERROR)


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


def _hardware(target: str, name: str | None = None):
    from autotune.hardware import probe
    from autotune.profile_choice import TARGETS, choose_profile
    from autotune.profiles import load_profiles

    if target not in TARGETS:
        raise UserError(f"unknown --target '{target}' (choose from {', '.join(TARGETS)})")
    info = probe()
    profile = choose_profile(info, target, load_profiles(), name)
    return info, profile


def _splits(args):
    """The data, loaded and split: cheap and most likely to be wrong, so checked before the hardware probe
    (which imports torch and bitsandbytes: seconds) and before anything is written."""
    from autotune.data import load_splits

    return load_splits(_data_config(args))


def _workspace(args, out: Path, info, profile, splits, root: Path | None = None):
    from autotune.candidate import Workspace
    from autotune.capabilities import check_exportable
    from autotune.export import check_export_memory
    from autotune.hardware import choose_threads
    from autotune.models import resolve_model
    from autotune.study import hardware_identity

    base = resolve_model(args.model, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    check_export_memory(base, profile.memory_headroom)  # a model that cannot fit is refused before any work
    check_exportable(base, args.trust_remote_code)  # and one the builder cannot export at all
    ws = Workspace(
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
        measure_timeout_s=getattr(args, "measure_timeout", None),
        device=hardware_identity(profile, info, args.threads)["device"],
    )
    ws.prompts("validation")  # renders the chat template now: a model without one is bad input, not a failed trial
    return ws


# --------------------------------------------------------------------------- commands


def cmd_candidate(args) -> int:
    from autotune.candidate import CandidateSpec, check_candidate_memory, run_candidate
    from autotune.capabilities import check_candidate
    from autotune.export import ExportSpec
    from autotune.live import console, stage_view
    from autotune.card import candidate_table
    from autotune.report import baselines, output_dir
    from autotune.train import TrainSpec

    splits = _splits(args)
    info, profile = _hardware(args.target, args.profile)
    if args.precision not in profile.precisions:
        raise UserError(f"--precision {args.precision} does not run on {profile.execution_provider} "
                        f"(profile {profile.name}: {', '.join(profile.precisions)})")
    if args.method == "qlora" and not profile.qlora:
        raise UserError(f"--method qlora: profile {profile.name} cannot run bitsandbytes 4-bit; use --method lora")
    train = TrainSpec(method=args.method, rank=args.rank, alpha=args.alpha or 2.0 * args.rank, dropout=args.dropout,
                      learning_rate=args.lr, steps=args.steps, batch_size=args.batch_size,
                      target_modules=args.target_modules, seed=args.seed, batching=args.batching,
                      pass_tokens=args.pass_tokens, step_groups=args.step_groups,
                      int4_aware=args.int4_method == "int4-aware", int4_block_size=args.block_size)
    export = ExportSpec(precision=args.precision, execution_provider=profile.execution_provider,
                        block_size=args.block_size, accuracy_level=args.accuracy_level, algo=args.algo,
                        symmetric=not args.asymmetric, int8_layers=args.int8_layers,
                        calibration="gptq" if args.int4_method == "gptq" else "none").normalized()
    out = output_dir(args.output)
    if args.json:  # stdout carries the JSON record only
        console.file = sys.stderr
    ws = _workspace(args, out, info, profile, splits)
    spec = CandidateSpec(train, export)
    check_candidate(ws.base, spec)  # refused now rather than after training
    check_candidate_memory(ws, spec)  # training and every export stage, before any of them runs
    console.print(f"[bold]data[/] {ws.splits.summary()}   [bold]model[/] {ws.base.name} ({ws.base.architecture})   "
                  f"[bold]profile[/] {profile.name}, {ws.threads} thread(s)")
    floors = []
    with stage_view() as progress:
        progress.start_candidate(spec.describe())
        result = run_candidate(ws, spec, split=args.split, on_stage=progress)
        if not args.no_baseline:
            progress.start_candidate(f"baselines: {CandidateSpec(None, export).describe()}")
            floors = baselines(ws, export, args.split, on_stage=progress)
    if args.json:
        print(json.dumps({"profile": profile.name, "split": args.split, "candidate": result.to_dict(),
                          "baselines": [b.to_dict() for b in floors]}, indent=1))
    else:
        from rich.console import Console

        Console(width=None if sys.stdout.isatty() else 140).print(candidate_table(result, floors, args.split))
    return 0


def cmd_profile(args) -> int:
    from rich.console import Console

    from autotune.hardware import choose_threads
    from autotune.profile_choice import format_profile

    info, profile = _hardware(args.target, args.profile)
    if args.json:
        print(json.dumps({"hardware": info.to_dict(), "profile": profile.to_dict()}, indent=1, default=str))
    else:
        Console().print(format_profile(info, profile, choose_threads(None)))
    return 0


# Flags about this process and machine. Every other flag of the search is the study's: recorded when
# the study is created, and taken from it by a worker or `select` (a worker's own --trials overrides).
LOCAL_FLAGS = ("storage", "study", "output", "artifacts", "threads", "per_profile", "measure_timeout")


def study_config(args: argparse.Namespace) -> dict:
    """The study-wide flags of a search (all but :data:`LOCAL_FLAGS`), as recorded in the study."""
    shared = [name for name in vars(flags.search_parser().parse_args([])) if name not in LOCAL_FLAGS]
    return {name: getattr(args, name, None) for name in shared}


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
    claim: object = None  # the output folder's lock (search and select hold it; workers share theirs)


def _prepare_search(args, argv: list[str], join: bool = False, claim: bool = True) -> SearchContext:
    import secrets

    import yaml

    from autotune import card, report
    from autotune.capabilities import limits
    from autotune.gpu_memory import check_bound
    from autotune.models import model_shape
    from autotune.profile_choice import qlora_enabled
    from autotune.search import SearchSettings
    from autotune.space import SearchSpace, default_space_path
    from autotune.study import hardware_identity, open_study

    # A worker samples with its own seed: with the study's, all workers would propose the same
    # candidates at the same moments, and all but one of those trials would be duplicates.
    settings = SearchSettings(trials=args.trials, timeout_s=args.timeout, latency_metric=args.latency_metric,
                              sampler=args.sampler, seed=secrets.randbelow(2**31) if join else args.seed,
                              siblings=not args.no_siblings, rule=args.select, **bounds.from_args(args))
    space_text = getattr(args, "space_text", None)
    if space_text is None:
        space_path = Path(args.space) if args.space else default_space_path()
        space = SearchSpace.from_yaml(space_path)  # validates before anything is written
        space_text = space_path.read_text()
    else:
        space = SearchSpace.from_dict(yaml.safe_load(space_text), where="the study's search space")
    splits = _splits(args)
    info, profile = _hardware(args.target, args.profile)
    check_bound(settings.bounds.max_memory_mb, profile.execution_provider)
    out = report.output_dir(args.output)
    held = report.claim_output(out) if claim else None  # before the study is touched
    artifacts = Path(args.artifacts).expanduser() if getattr(args, "artifacts", None) else out / "cache"
    ws = _workspace(args, out, info, profile, splits, artifacts)
    shape = model_shape(ws.base)
    cannot = limits(ws.base, profile.execution_provider)  # what this model cannot take there: dropped, each with a note
    space = space.restrict(profile.precisions, qlora_enabled(profile, info), profile.execution_provider,
                           widths=(shape.hidden, shape.intermediate),
                           drop=[(limit.option, limit.value, limit.reason) for limit in cannot])
    space = space.fit_data(len(splits.train))  # the top rung: at least `epochs` passes over this training split
    storage = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    config = {**study_config(args), "space_text": space_text}
    attrs = {"model": ws.base.name, "model_fingerprint": ws.base.fingerprint, "data": ws.splits.summary(),
             "data_fingerprint": ws.splits.fingerprint,
             "target": args.target, "latency_metric": settings.latency_metric,
             **settings.bounds.to_dict(), "hardware": info.to_dict(),
             "versions": card.package_versions(), "command": card.reproduce_command(argv), "config": config,
             **hardware_identity(profile, info, args.threads)}
    # Joining an existing study (worker, select) records only what it compares; a new one records it all.
    study = open_study(storage, args.study, settings, attrs, free_threads=ws.threads,
                       per_hardware=getattr(args, "per_profile", False), join=join)
    ws.threads = study.user_attrs["measure_threads"]  # the study's, when --threads was not given
    args.study = study.study_name  # STUDY@HARDWARE under --per-profile
    return SearchContext(args, argv, settings, info, profile, space, out, ws, storage, study, held)


def _run_trials(ctx: SearchContext) -> None:
    from autotune.dashboard import TrialRecorder, artifact_dir
    from autotune.live import console, search_view
    from autotune.search import Search
    from autotune.study import open_storage, requeue_interrupted

    if not ctx.args.storage:  # a local study, and this process holds its folder: RUNNING trials there are dead
        requeued = requeue_interrupted(ctx.study)
        if requeued:
            console.print(f"resuming: {requeued} interrupted trial(s) queued again")
    search = Search(ctx.ws, ctx.space, ctx.profile.execution_provider, ctx.settings, ctx.study)
    for line in ctx.space.notes + tuple(search.fit_screening()):
        console.print(f"space: {line}")
    done_before = ctx.settings.trials - search.remaining()
    console.print(f"[bold]data[/] {ctx.ws.splits.summary()}   [bold]model[/] {ctx.ws.base.name}   "
                  f"[bold]profile[/] {ctx.profile.name}, {ctx.ws.threads} thread(s)   "
                  f"[bold]study[/] {ctx.args.study} ({ctx.storage.split('://')[0]})"
                  + (f"   resuming with {done_before} trial(s) done" if done_before else ""))
    s = ctx.settings
    recorder = TrialRecorder(ctx.ws, artifact_dir(ctx.out, ctx.args.artifacts), s.latency_metric, s.bounds)
    if rewritten := recorder.judge_again(ctx.study, open_storage(ctx.storage)):
        console.print(f"bounds {s.bounds.describe()}: the notes of {rewritten} trial(s) judged again")
    with search_view(ctx.study, s.latency_metric, s.bounds, s.trials, s.timeout_s, s.rule) as view:
        search.run(on_stage=view.on_stage, on_trial=lambda study, t: (recorder(study, t), view.on_trial(study, t)),
                   on_finish=recorder.attach)
    if search.stopped:
        console.print(f"search: stopped after {s.trials - search.remaining()} of {s.trials} trial(s): {search.stopped}")


def _select(ctx: SearchContext) -> int:
    from autotune.report import select_and_write
    from autotune.study import open_storage

    return select_and_write(ctx.study, ctx.ws, ctx.settings, ctx.out, hardware=ctx.info.to_dict(),
                            profile=ctx.profile.to_dict(), argv=ctx.argv, keep_all=ctx.args.keep_all,
                            shared_storage=bool(ctx.args.storage), storage=open_storage(ctx.storage))


def cmd_search(args, argv: list[str]) -> int:
    ctx = _prepare_search(args, argv)
    _run_trials(ctx)
    return _select(ctx)


def _args_from_study(args) -> argparse.Namespace:
    """A worker's or selector's flags: the study's recorded config plus its own local ones."""
    import optuna

    from autotune.errors import first_line
    from autotune.study import open_storage

    try:
        summaries = optuna.study.get_all_study_summaries(open_storage(args.storage), include_best_trial=False)
    except UserError:
        raise
    except Exception as exc:  # sqlalchemy and the drivers raise many kinds; the message says which
        raise UserError(f"--storage: cannot reach the study storage ({first_line(exc)}); "
                        "check the URL and that the server is up") from exc
    summary = next((s for s in summaries if s.study_name == args.study), None)
    if summary is None:
        names = ", ".join(s.study_name for s in summaries) or "none"
        raise UserError(f"no study '{args.study}' in that storage (studies: {names}); "
                        f"start it with autotune --storage ... --study {args.study}")
    config = summary.user_attrs.get("config")
    if not config:
        raise UserError(f"study '{args.study}' has no recorded settings (not started by autotune)")
    merged = argparse.Namespace(**{**vars(flags.search_parser().parse_args([])), **config})
    for key, value in vars(args).items():  # its own local flags, and the study flags it overrides
        if key in LOCAL_FLAGS or value is not None:
            setattr(merged, key, value)
    return merged


def cmd_worker(args) -> int:
    from autotune.live import console

    ctx = _prepare_search(_args_from_study(args), [], join=True, claim=False)
    if ctx.args.study != args.study:
        console.print(f"this machine's hardware differs from study '{args.study}''s; joining the per-hardware "
                      f"study {ctx.args.study}")
    _run_trials(ctx)
    return 0


def cmd_select(args) -> int:
    joined = _args_from_study(args)
    ctx = _prepare_search(joined, ["select", "--storage", args.storage, "--study", args.study], join=True)
    if not ctx.study.trials:  # --per-profile on hardware that no worker has searched on
        raise UserError(f"study '{ctx.args.study}' has no trials; run `autotune worker --per-profile` on this "
                        "hardware first, or select on a machine like the study's")
    return _select(ctx)


def cmd_dashboard(args) -> int:
    from autotune.dashboard import serve

    return serve(args)


def _interrupted_exit() -> int:
    print("interrupted: completed trials and cached artifacts are kept; rerun the same command to resume",
          file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "search"
    if argv and argv[0] in SUBCOMMANDS:
        argv = argv[1:]
    parser = {
        "candidate": flags.candidate_parser, "profile": flags.profile_parser, "dashboard": flags.dashboard_parser,
        "search": flags.search_parser,
        "worker": lambda: flags.worker_parser("autotune worker", "Join a study from another process or machine; "
                                         "model, data, space and target come from the study.", worker=True),
        "select": lambda: flags.worker_parser("autotune select", "Choose, test and write the best model of a study "
                                         "(same outputs as a single-machine run).", worker=False),
    }[command]()
    args = parser.parse_args(argv)
    _quiet_libraries()
    handlers = {"candidate": cmd_candidate, "profile": cmd_profile, "dashboard": cmd_dashboard,
                "worker": cmd_worker, "select": cmd_select,
                "search": lambda a: cmd_search(a, list(sys.argv[1:] if not argv else argv))}
    if command != "dashboard":  # the dashboard's Ctrl-C is its normal stop (exit 0)
        handle_interrupts()
    try:
        code = handlers[command](args)
        check_interrupted()  # in case a library swallowed the KeyboardInterrupt
        return code
    except UserError as exc:
        if interrupted():  # e.g. the measuring child died of the same Ctrl-C
            return _interrupted_exit()
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever a library wrote
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted_exit()
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC
            print(f"error: disk full while writing {exc.filename or 'output'}; free space and rerun (finished work is kept)",
                  file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
