"""optuna-dashboard as the place where candidates are compared.

While a search runs, :class:`TrialRecorder` gives every finished trial what a person
deciding between candidates needs, using what Optuna and optuna-dashboard provide:

- artifacts (``optuna.artifacts``, a ``FileSystemArtifactStore``): the training loss
  curve and confusion matrix (PNG), the builder log and the trial's measured figures
  (JSON); small files only, never model weights;
- a markdown note (``optuna_dashboard.save_note``) with the candidate in words, its
  figures, confusion table and stages, or why it failed and what to do.

After selection, :func:`write_study_note` puts the choice on the study. ``autotune
dashboard`` (:func:`serve`) opens the study with its artifacts, on this machine only
unless ``--host`` says otherwise.

Training losses are not Optuna intermediate values: ``Trial.report`` raises
``NotImplementedError`` in multi-objective studies, so the curve is an artifact.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import optuna

from autotune import notes
from autotune.candidate import CandidateSpec
from autotune.errors import UserError

ARTIFACTS = "artifacts"  # <output>/artifacts for a local run
SHARED_ARTIFACTS = "dashboard"  # <--artifacts folder>/dashboard when workers share one
MAX_LOG_BYTES = 200_000  # the builder log's tail beyond this is what is kept (a page per export)
DPI = 80
ARTIFACT_ORDER = ("loss-curve.png", "confusion.png", "builder.log", "measurement.json")
NOTES_BOUNDS = "notes_bounds"  # study attribute: the bounds the trial notes judge by


def artifact_dir(output: str | Path | None, shared: str | Path | None = None) -> Path:
    """The artifact store's folder: beside the study of a local run, or in the folder all workers reach."""
    if shared:
        return Path(shared).expanduser() / SHARED_ARTIFACTS
    return Path(output or "autotune-out") / ARTIFACTS


class TrialRecorder:
    """Artifacts and a note for each trial of a search.

    Use :meth:`attach` at the end of the objective (the trial is still running, so
    artifacts can be attached to it), and the recorder itself as an Optuna callback
    (the trial's final state and values are known, so the note can say them).

    Args:
        ws: the search's workspace (adapters, logs).
        folder: the artifact store's folder (:func:`artifact_dir`).
        latency_metric: which latency the objective is (``request``, ``ttft``, ``token``).
        bounds: the run's edge bounds (:class:`autotune.bounds.Bounds`).
    """

    def __init__(self, ws, folder: Path, latency_metric: str, bounds) -> None:
        from optuna.artifacts import FileSystemArtifactStore

        folder.mkdir(parents=True, exist_ok=True)
        self.ws, self.folder = ws, folder
        self.store = FileSystemArtifactStore(str(folder))
        self.latency_metric, self.bounds = latency_metric, bounds
        # Each trial this process runs, from the end of its objective to its callback: the note is written
        # through it (Optuna's public handle on a trial's storage and id) once its state is final.
        self._running: dict[int, optuna.Trial] = {}

    def attach(self, trial: optuna.Trial) -> None:
        """Upload the trial's loss curve, confusion matrix, builder log and measured figures."""
        from optuna.artifacts import upload_artifact

        from autotune.search import INTERRUPTED

        self._running[trial.number] = trial
        attrs = trial.user_attrs
        if "duplicate_of" in attrs or attrs.get("fail_reason") == INTERRUPTED or "spec" not in attrs:
            return  # nothing of its own to show, or Ctrl-C: leave at once
        try:
            with tempfile.TemporaryDirectory(prefix="autotune-artifacts-") as tmp:
                for path, mimetype in self._files(attrs, trial.params, Path(tmp)):
                    upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial,
                                    mimetype=mimetype)
        except Exception as exc:  # a figure must never cost the candidate; say so and go on
            _warn(f"trial {trial.number}: artifacts not saved ({exc})")

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Write the trial's note (an Optuna callback: runs when the trial has ended; :meth:`attach`
        saw it first)."""
        running = self._running.pop(trial.number, None)
        if running is None or not trial.state.is_finished():
            return
        self._write_note(running, trial, study.study_name)

    def _write_note(self, handle: optuna.Trial, trial: optuna.trial.FrozenTrial, study_name: str) -> None:
        """``trial``'s note, written through ``handle`` (an :class:`optuna.Trial` of the same trial)."""
        try:
            from optuna.artifacts import get_all_artifact_meta
            from optuna_dashboard import save_note

            metas = get_all_artifact_meta(handle)
            study_id = handle.storage.get_study_id_from_name(study_name)
            trial_id = handle.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            figures = {m.filename.removesuffix(".png").replace("-", " "): f"/artifacts/{study_id}/{trial_id}/{m.artifact_id}"
                       for m in metas if m.mimetype == "image/png"}
            names = sorted({m.filename for m in metas}, key=lambda n: ARTIFACT_ORDER.index(n) if n in ARTIFACT_ORDER else 99)
            figures = dict(sorted(figures.items(), key=lambda kv: kv[0] != "loss curve"))
            body = notes.trial_note(trial, self.latency_metric, self.bounds, figures, names)
            save_note(handle, body)
        except Exception as exc:
            _warn(f"trial {trial.number}: dashboard note not written ({exc})")

    def judge_again(self, study: optuna.Study, storage: optuna.storages.BaseStorage) -> int:
        """Rewrite the notes of the study's complete trials if they were written under other bounds than this
        run's (a study resumed with another ``--max-*``), so each note's verdict is the one the sampler, the
        live view and the selection reach. ``storage`` is the study's. Returns the notes rewritten."""
        if study.user_attrs.get(NOTES_BOUNDS) == self.bounds.to_dict():
            return 0
        # A handle on each finished trial (optuna.Trial) to write its note through; its sampler samples nothing.
        handles = optuna.load_study(study_name=study.study_name, storage=storage, sampler=optuna.samplers.RandomSampler())
        study_id = storage.get_study_id_from_name(study.study_name)
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        for trial in complete:
            handle = optuna.Trial(handles, storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))
            self._write_note(handle, trial, study.study_name)
        study.set_user_attr(NOTES_BOUNDS, self.bounds.to_dict())
        return len(complete)

    def _files(self, attrs: dict[str, Any], params: dict[str, Any], tmp: Path) -> list[tuple[Path, str]]:
        spec = CandidateSpec.from_dict(attrs["spec"])
        files = []
        train_log = self.ws.adapter_dir(spec.train) / "train_log.json" if spec.train else None
        if train_log is not None and train_log.is_file():
            losses = json.loads(train_log.read_text())["losses"]
            files.append((loss_curve_png(losses, tmp / "loss-curve.png"), "image/png"))
        if attrs.get("confusion"):
            files.append((confusion_png(attrs["confusion"], tmp / "confusion.png"), "image/png"))
        log = self.ws.builder_log(spec)
        if log.is_file():
            files.append((_tail(log, tmp / "builder.log", MAX_LOG_BYTES), "text/plain"))
        if attrs.get("confusion"):
            record = {"params": params, "validation": validation_record(attrs["confusion"]), **attrs}
            (tmp / "measurement.json").write_text(json.dumps(record, indent=1, default=str))
            files.append((tmp / "measurement.json", "application/json"))
        return files


def validation_record(confusion: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Accuracy, n and its 95% Wilson interval, from a confusion table."""
    from autotune.measure import wilson_interval

    n = sum(sum(row.values()) for row in confusion.values())
    correct = sum(row.get(label, 0) for label, row in confusion.items())
    return {"accuracy": correct / n if n else 0.0, "correct": correct, "n": n,
            "wilson_95": list(wilson_interval(correct, n)), "confusion": confusion}


def _tail(source: Path, target: Path, limit: int) -> Path:
    data = source.read_bytes()
    if len(data) > limit:
        data = f"[first {len(data) - limit} bytes left out; the full log is {source}]\n".encode() + data[-limit:]
    target.write_bytes(data)
    return target


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve_png(losses: list[float], path: Path) -> Path:
    """Training loss per step, with its running mean over 10 steps."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3), dpi=DPI)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, c="#9ecae1", lw=1, label="loss per step")
    window = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
    ax.plot(steps, window, c="#1f77b4", lw=2, label="mean of the last 10")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("training of this adapter", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def confusion_png(confusion: dict[str, dict[str, int]], path: Path) -> Path:
    """The validation confusion matrix: true label by row, answer by column (invalid last)."""
    plt = _pyplot()
    labels = list(confusion)
    answered = labels + sorted({a for row in confusion.values() for a in row} - set(labels))
    counts = [[confusion[t].get(a, 0) for a in answered] for t in labels]
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * len(answered), 1.0 + 0.6 * len(labels)), dpi=DPI)
    ax.imshow(counts, cmap="Blues")
    top = max(max(row) for row in counts) or 1
    for i, row in enumerate(counts):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                    color="white" if value > top / 2 else "black")
    ax.set_xticks(range(len(answered)), ["invalid" if a == notes.INVALID else a for a in answered], fontsize=7, rotation=30)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("answered")
    ax.set_ylabel("true")
    ax.set_title("validation", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_study_note(study: optuna.Study, report: dict, storage: optuna.storages.BaseStorage | None = None) -> None:
    """Put the selection (``report.json``'s content) on the study as its dashboard note.

    ``storage`` is the study's: the note links to the chosen trial's page through the study's id (without
    it, the note names the trial). Like a trial's note, it never costs the result: report.json and the chosen
    model are written before it, so a note that cannot be written is a warning.
    """
    from autotune.bounds import Bounds, trial_figures

    try:
        from optuna_dashboard import save_note

        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        chosen = (report.get("chosen") or {}).get("trial")
        bounds = Bounds.from_dict(report)  # this run's: a resumed study may have run its trials under others
        feasible = (sum(bounds.meets(trial_figures(t)) for t in complete), len(complete)) if chosen is not None else None
        n = next((t.user_attrs.get("eval_examples") for t in complete if t.number == chosen), None)
        study_id = storage.get_study_id_from_name(study.study_name) if storage is not None else None
        save_note(study, notes.study_note(report, study_id, feasible, n))
    except Exception as exc:
        _warn(f"study note not written ({exc})")


def _warn(message: str) -> None:
    from autotune.live import console

    console.print(f"[yellow]dashboard: {message}[/]")


def storage_url(output: str | None, storage: str | None) -> str:
    """The study storage of a search's output folder, or the URL given."""
    if storage:
        return storage
    db = Path(output or "autotune-out") / "study.db"
    if not db.is_file():
        raise UserError(f"no study at {db}; run a search first or pass --storage URL")
    return f"sqlite:///{db.resolve()}"


def serve(args) -> int:
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import run_server
    from rich.console import Console

    url = storage_url(args.output, args.storage)
    folder = artifact_dir(args.output, getattr(args, "artifacts", None))
    if getattr(args, "artifacts", None) and not folder.is_dir():
        raise UserError(f"--artifacts: no dashboard artifacts in {folder}; pass the folder the workers were given")
    store = FileSystemArtifactStore(str(folder)) if folder.is_dir() else None
    console = Console(stderr=True)
    shown = "127.0.0.1" if args.host in ("127.0.0.1", "localhost") else args.host
    console.print(
        f"optuna-dashboard on [bold]http://{shown}:{args.port}/dashboard[/] (Ctrl-C stops it)"
        + ("" if args.host in ("127.0.0.1", "localhost") else "  [yellow]reachable from other machines[/]")
    )
    console.print(f"artifacts from {folder}" if store else
                  f"no artifacts folder at {folder}: trial figures will not show (pass --artifacts DIR for a shared study)")
    try:
        run_server(url, host=args.host, port=args.port, artifact_store=store)
    except OSError as exc:
        raise UserError(f"cannot serve on {args.host}:{args.port} ({exc.strerror}); choose another --port") from exc
    except KeyboardInterrupt:
        return 0
    return 0
