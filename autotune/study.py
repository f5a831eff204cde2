"""Where a study lives and who may join it: the storage, the study's identity, and what a stopped run left.

- :func:`open_storage`: Optuna's RDB storage for a URL (SQLite by default, PostgreSQL for workers on
  many machines), with heartbeats, so a process that dies mid-trial has its trial failed and retried
  by whichever process runs the study next, and a live one's never is.
- :func:`open_study`: create the study, or load it to resume or join, refusing one line where the
  settings, the model (by content) or the hardware differ from the study's.
- :func:`requeue_interrupted`: a local resume's retries of trials a kill or Ctrl-C cut short.

The search itself (what runs next, a trial's objective) is :mod:`autotune.search`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import optuna

from autotune.constraints import BoundedSampler
from autotune.errors import UserError, first_line
from autotune.search import DIRECTIONS, INTERRUPTED, METRIC_NAMES, SearchSettings, make_sampler


# What makes latencies comparable: every trial of a study is measured on the same kind of device,
# through the same execution provider, with the same thread count. Recorded when a study is created.
HARDWARE_KEYS = ("profile", "execution_provider", "device", "measure_threads")
# Settings a resumed run or a worker must share with the study (the rest it takes from the study).
# model_fingerprint: the weights by content (autotune.models.fingerprint), so another checkpoint behind the
# same path cannot join, and a copy of the model on another machine can.
SETTINGS_KEYS = ("model", "model_fingerprint", "data_fingerprint", "latency_metric")


def hardware_identity(profile: Any, info: Any, threads: int | None) -> dict[str, Any]:
    """The study attributes of :data:`HARDWARE_KEYS` for this process.

    ``threads`` None means "the study's": a resumed run or a worker without ``--threads``
    measures with the thread count the study was created with (:func:`open_study`).
    """
    gpu = info.gpus[0].name if profile.execution_provider == "cuda" and info.gpus else None
    return {"profile": profile.name, "execution_provider": profile.execution_provider,
            "device": gpu or info.cpu_model, "measure_threads": threads}


def per_hardware_name(study: str, identity: dict[str, Any]) -> str:
    """The study that workers with this hardware identity share under ``--per-profile``."""
    from autotune.cache import content_key

    device = content_key(identity["device"], identity["execution_provider"])[:6]
    return f"{study}@{identity['profile']}-{identity['measure_threads']}t-{device}"


def _hardware_difference(name: str, recorded: dict[str, Any], mine: dict[str, Any]) -> str | None:
    """One line naming the first hardware attribute where this process differs from the study."""
    for key in HARDWARE_KEYS:
        if key not in recorded or recorded[key] == mine[key]:
            continue
        if key == "measure_threads":
            return (f"study '{name}' measures latency with {recorded[key]} thread(s), this run with {mine[key]}; "
                    f"pass --threads {recorded[key]}, or --per-profile to join the study "
                    f"'{per_hardware_name(name, mine)}' for this hardware")
        what = {"profile": "hardware profile", "execution_provider": "execution provider", "device": "device"}[key]
        # A profile that also runs here (cpu on a CPU that gets cpu-bf16) can be asked for by name.
        named = f"pass --profile {recorded[key]} if it runs here, or " if key == "profile" else "pass "
        return (f"study '{name}' measures latency on {what} {recorded[key]!r}, this machine's is {mine[key]!r}; "
                f"{named}--per-profile to join the study '{per_hardware_name(name, mine)}' for this hardware instead")
    return None


def open_study(storage: str, name: str, settings: SearchSettings, attrs: dict[str, Any], *,
               free_threads: int = 1, per_hardware: bool = False, join: bool = False) -> optuna.Study:
    """Create the study, or load it to resume or join; refuse to mix settings or hardware.

    ``attrs`` are the study attributes this process would record, :data:`HARDWARE_KEYS`
    included (``measure_threads`` None: the study's, or ``free_threads`` for a new study).
    A process whose hardware differs from the study's refuses with a one-line error, or
    with ``per_hardware`` opens its own :func:`per_hardware_name` study. Joining
    (``join``) an existing study records only the keys compared; a new study records all.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        backend = open_storage(storage)
        recorded = _recorded_attrs(backend, name)
        attrs = dict(attrs)
        if attrs.get("measure_threads") is None:
            attrs["measure_threads"] = (recorded or {}).get("measure_threads", free_threads)
        if recorded is not None:
            _check_settings(name, recorded, attrs)
            difference = _hardware_difference(name, recorded, attrs)
            if difference and not per_hardware:
                raise UserError(difference)
            if difference:
                name = per_hardware_name(name, attrs)
                recorded = _recorded_attrs(backend, name)
                if recorded is not None:
                    _check_settings(name, recorded, attrs)
        if recorded is not None and join:
            attrs = {k: attrs[k] for k in SETTINGS_KEYS + HARDWARE_KEYS if k in attrs}
        sampler = BoundedSampler(make_sampler(settings), backend, settings.bounds)
        study = optuna.create_study(storage=backend, study_name=name, directions=list(DIRECTIONS),
                                    sampler=sampler, load_if_exists=True)
        with warnings.catch_warnings():  # experimental since Optuna 3.2; the dashboard's column names
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(METRIC_NAMES))
        for key, value in attrs.items():
            study.set_user_attr(key, value)
    except UserError:
        raise
    except Exception as exc:  # sqlalchemy raises many kinds; the message says which
        raise UserError(f"--storage: cannot open the study storage ({first_line(exc)}); check the URL and that the server is up") from exc
    return study


def _recorded_attrs(storage: optuna.storages.BaseStorage, name: str) -> dict[str, Any] | None:
    """The user attributes of study ``name``, None if there is no such study yet."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    return storage.get_study_user_attrs(study_id)


def _check_settings(name: str, recorded: dict[str, Any], attrs: dict[str, Any]) -> None:
    for key in SETTINGS_KEYS:
        if key not in recorded or key not in attrs or recorded[key] == attrs[key]:
            continue
        if key == "model_fingerprint":
            raise UserError(
                f"--model {attrs.get('model')}: its files differ from those study '{name}' was run with (content "
                f"{recorded[key]}, here {attrs[key]}); give this machine a copy of the study's model, or use "
                "another --output or --study for this one"
            )
        raise UserError(f"study '{name}' was run with {key}={recorded[key]!r}, this run has {attrs[key]!r}; "
                        "use another --output or --study name, or rerun with the same settings")


HEARTBEAT_S = 10  # env AUTOTUNE_HEARTBEAT_S overrides
MAX_RETRY = 2  # a trial whose process died is run again at most this often
GRACE_S = 30  # env AUTOTUNE_GRACE_S overrides: a trial whose worker is silent this long is failed and retried


def _seconds_from_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} must be a whole number of seconds") from None
    if seconds < 1:
        raise UserError(f"{name}={value!r} must be at least 1 second")
    return seconds


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage for ``url``, with heartbeats (SQLite too): a process that dies mid-trial stops
    beating, and after the grace period any process on the study marks its trial failed
    (``fail_stale_trials``, before each trial) and ``RetryHeartbeatStaleTrialCallback`` queues it again. A trial
    whose process still beats is never failed by another.
    """
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    url = _with_driver(url)
    heartbeat = _seconds_from_env("AUTOTUNE_HEARTBEAT_S", HEARTBEAT_S)
    grace = _seconds_from_env("AUTOTUNE_GRACE_S", GRACE_S)
    if grace <= heartbeat:
        raise UserError(f"AUTOTUNE_GRACE_S ({grace}) must be longer than AUTOTUNE_HEARTBEAT_S ({heartbeat})")
    try:
        with warnings.catch_warnings():  # heartbeats and their retries: experimental since Optuna 2.9 / 3.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat, grace_period=grace,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                # A host that drops packets would otherwise hang until the OS gives up.
                engine_kwargs={"connect_args": {"connect_timeout": 10}} if url.startswith("postgres") else None,
            )
    except ImportError as exc:  # Optuna's message does not say which module is missing
        raise UserError(f"--storage: the database driver for this URL is not installed ({exc.__cause__ or exc}); "
                        "for PostgreSQL: pip install psycopg2-binary") from exc


def _with_driver(url: str) -> str:
    """``url`` with an installed PostgreSQL driver named: SQLAlchemy 2.1 reads a bare postgresql://
    as psycopg 3, while the ``postgres`` extra installs psycopg2 (and postgres:// is Heroku's alias)."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    for driver in ("psycopg2", "psycopg"):
        if importlib.util.find_spec(driver) is not None:
            return f"postgresql+{driver}://{rest}"
    raise UserError("--storage: PostgreSQL needs a driver: pip install psycopg2-binary (or autotune[postgres])")


# What the scheduler fixes when it enqueues a trial (autotune.schedule.Work.attrs): a retry keeps them.
SCHEDULED_ATTRS = ("role", "steps", "trajectory", "from_trial", "export_index", "start")


def requeue_interrupted(study: optuna.Study) -> int:
    """Retry what a stopped run of a local study did not finish; call it holding the output folder
    (:func:`autotune.report.claim_output`), which proves no other process runs this study's trials.

    A trial left RUNNING is then a killed process's: it is failed and queued again as Optuna's
    heartbeat would have done once its grace period passed (``RetryHeartbeatStaleTrialCallback``), only
    without the wait. A trial failed by Ctrl-C is queued again with what the scheduler fixed for it,
    unless a later trial has its parameters. Returns how many trials were queued again.
    """
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        retry(study, trial)  # it copies params and attributes only, which failing the trial did not change
        count += 1
    trials = study.get_trials(deepcopy=False)
    requeued = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        if trial.state != optuna.trial.TrialState.FAIL or trial.user_attrs.get("fail_reason") != INTERRUPTED:
            continue
        retried = trial.number in requeued or any(t.number > trial.number and t.params == trial.params for t in trials)
        if not retried and trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, **{
                k: trial.user_attrs[k] for k in SCHEDULED_ATTRS if k in trial.user_attrs}})
            count += 1
    return count
