"""One candidate, end to end: train -> merge -> export -> measure, each step cached.

A candidate is a :class:`CandidateSpec`: training choices (or none, for the zero-shot
base) plus export choices. Its adapter is keyed by (base model, data, training
choices) and its exported folder by (adapter, export choices), so candidates that
share training reuse one adapter, and nothing done once is done again, in this run or
a resumed one.

Workspace layout below ``root``::

    adapters/<train key>/        peft adapter (safetensors) + train_log.json
    models/<export key>/         onnxruntime-genai folder, loadable as is
    measurements/<key>.json      measured figures per (model, split, settings)
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autotune.cache import atomic_dir, atomic_write_text, content_key, sweep_partials
from autotune.data import Splits
from autotune.export import ExportSpec, check_export_memory, check_free_disk, export_model, merge_adapter
from autotune.measure import Accuracy, Latency, LatencySettings, Measurement, measure
from autotune.models import BaseModel
from autotune.train import (TrainResult, TrainSpec, check_memory, read_train_log, render_prompt, tokens_per_step,
                            train_adapter)

# Called as on_stage(stage, fraction_done, detail); stages: train, merge, export, measure.
StageCallback = Callable[[str, float, str], None]


@dataclass(frozen=True)
class CandidateSpec:
    """What to build: ``train=None`` exports the base model as is (the zero-shot baseline)."""

    train: TrainSpec | None
    export: ExportSpec

    def describe(self) -> str:
        export = self.export.label()
        if self.train is None:
            return f"zero-shot base {export}"
        t = self.train
        modules = "" if t.target_modules == "all-linear" else f" {t.target_modules}"
        return f"{t.method} r{t.rank} a{t.alpha:g} lr{t.learning_rate:.0e} {t.steps}st{modules} {export}"


@dataclass(frozen=True)
class CandidateResult:
    """A built and measured candidate."""

    spec: CandidateSpec
    model_dir: Path
    measurement: Measurement
    train: TrainResult | None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    cached: tuple[str, ...] = ()  # stages skipped because their artifact already existed

    def to_dict(self) -> dict:
        return {
            "spec": asdict(self.spec),
            "model_dir": str(self.model_dir),
            "measurement": self.measurement.to_dict(),
            "train_seconds": self.train.seconds if self.train else None,
            "final_loss": self.train.final_loss if self.train else None,
            "stage_seconds": self.stage_seconds,
            "cached": list(self.cached),
        }


@dataclass
class Workspace:
    """Everything a candidate needs besides its spec: model, data, hardware settings, folders."""

    root: Path
    base: BaseModel
    splits: Splits
    train_device: str = "cpu"
    train_dtype: str = "float32"
    threads: int | None = None  # measuring threads: fixed for a study, so latencies compare
    train_threads: int | None = None  # None: the cores free when each training starts
    trust_remote_code: bool = False
    latency: LatencySettings = field(default_factory=LatencySettings)
    max_eval: int | None = None  # score on the first N prompts of a split (balanced by the splitter)
    memory_headroom: float = 0.8  # fraction of free RAM / VRAM a candidate may use (from the profile)
    measure_timeout_s: float = 900.0  # a model that slow to score is a failed candidate, not a hung search

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        sweep_partials(self.root)  # half-written artifacts of a killed run are never trusted
        self._prompts: dict[str, tuple[list[str], list[str]]] = {}

    def train_key(self, spec: TrainSpec) -> str:
        return content_key("adapter", self.base.fingerprint, self.splits.fingerprint, spec, self.train_device, self.train_dtype)

    def export_key(self, spec: CandidateSpec) -> str:
        source = self.train_key(spec.train) if spec.train else f"base:{self.base.fingerprint}"
        return content_key("model", source, spec.export.normalized())

    def adapter_dir(self, spec: TrainSpec) -> Path:
        return self.root / "adapters" / self.train_key(spec)

    def model_dir(self, spec: CandidateSpec) -> Path:
        return self.root / "models" / self.export_key(spec)

    def prompts(self, split: str) -> tuple[list[str], list[str]]:
        """Rendered prompts and true labels of a split (chat template applied if asked)."""
        if split not in self._prompts:
            examples = list(getattr(self.splits, split))[: self.max_eval]
            tokenizer = None
            if self.splits.config.chat_template:
                from autotune.train import load_tokenizer

                tokenizer = load_tokenizer(self.base, self.trust_remote_code)
            rendered = [render_prompt(e.prompt, tokenizer, self.splits.config.chat_template) for e in examples]
            self._prompts[split] = (rendered, [e.label for e in examples])
        return self._prompts[split]


def run_candidate(
    ws: Workspace,
    spec: CandidateSpec,
    *,
    split: str = "validation",
    with_latency: bool = True,
    on_stage: StageCallback | None = None,
) -> CandidateResult:
    """Build (or reuse) the candidate's model folder and measure it on ``split``."""
    notify = on_stage or (lambda stage, fraction, detail: None)
    seconds: dict[str, float] = {}
    cached: list[str] = []
    model_dir = ws.model_dir(spec)
    train_result = None

    if spec.train is not None:
        adapter = ws.adapter_dir(spec.train)
        with _lock(adapter):  # another worker may be training the same adapter right now
            train_result, trained_s = _train_cached(ws, spec, adapter, model_dir, notify)
        if trained_s is None:
            cached.append("train")
        elif trained_s:
            seconds["train"] = trained_s

    with _lock(model_dir):
        exported = _export_cached(ws, spec, model_dir, notify, seconds)
    if not exported:
        cached.append("export")

    notify("measure", 0.0, f"accuracy on {split}" + (" + latency" if with_latency else ""))
    measurement, was_cached = _measure_cached(ws, spec, model_dir, split, with_latency)
    if was_cached:
        cached.append("measure")
    else:
        seconds.update(measurement.stage_seconds)
    notify("measure", 1.0, "done")
    return CandidateResult(spec, model_dir, measurement, train_result, seconds, tuple(cached))


def _lock(path: Path):
    """A cross-process lock beside an artifact (works on a shared folder too)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


def _train_cached(ws: Workspace, spec: CandidateSpec, adapter: Path, model_dir: Path, notify):
    """(result, seconds): seconds is None on a cache hit, 0.0 when the export makes training moot."""
    if (adapter / "train_log.json").is_file():
        return read_train_log(adapter), None
    if (model_dir / "genai_config.json").is_file():
        return None, 0.0
    checkpointing = check_memory(ws.base, spec.train, ws.train_device, ws.train_dtype, ws.memory_headroom,
                                 tokens_per_step(ws.splits, spec.train))
    notify("train", 0.0, "loading base model" + (" (gradient checkpointing: memory is short)" if checkpointing else ""))
    start = time.perf_counter()
    with atomic_dir(adapter) as tmp:
        train_adapter(
            ws.base, ws.splits, spec.train, tmp,
            device=ws.train_device, dtype=ws.train_dtype, threads=ws.train_threads,
            trust_remote_code=ws.trust_remote_code, checkpointing=checkpointing,
            on_step=lambda step, loss: notify("train", step / spec.train.steps, f"step {step} loss {loss:.3f}"),
        )
    return read_train_log(adapter), time.perf_counter() - start


def _export_cached(ws: Workspace, spec: CandidateSpec, model_dir: Path, notify, seconds: dict) -> bool:
    """Merge and export unless the folder exists; True if it was built now."""
    if (model_dir / "genai_config.json").is_file():
        return False
    check_free_disk(model_dir.parent, ws.base, spec.export, merged=spec.train is not None)
    check_export_memory(ws.base, ws.memory_headroom)
    # Named <model>.tmp-merge-*: a partial of this model, under its lock (held here), so the next start's
    # sweep removes a killed run's merged copy but never a live worker's.
    with tempfile.TemporaryDirectory(prefix=f"{model_dir.name}.tmp-merge-", dir=model_dir.parent) as work:
        source = ws.base.path
        if spec.train is not None:
            notify("merge", 0.0, "merging adapter into the base")
            start = time.perf_counter()
            source = merge_adapter(ws.base, ws.adapter_dir(spec.train), Path(work) / "merged",
                                   trust_remote_code=ws.trust_remote_code)
            seconds["merge"] = time.perf_counter() - start
        notify("export", 0.0, f"onnxruntime-genai builder, {spec.export.label()}")
        with atomic_dir(model_dir) as tmp:
            seconds["export"] = export_model(source, tmp, spec.export, work_dir=Path(work) / "builder",
                                             trust_remote_code=ws.trust_remote_code)
    return True


def _measure_cached(ws: Workspace, spec: CandidateSpec, model_dir: Path, split: str, with_latency: bool):
    prompts, answers = ws.prompts(split)
    latency = ws.latency if with_latency else None
    provider = spec.export.execution_provider
    threads = ws.threads or 1
    key = content_key("measure", ws.export_key(spec), prompts, answers, latency, provider, threads)
    path = ws.root / "measurements" / f"{key}.json"
    if path.is_file():
        return measurement_from_dict(json.loads(path.read_text())), True
    result = measure(model_dir, prompts, answers, ws.splits.labels, provider=provider, threads=threads, latency=latency,
                     timeout_s=ws.measure_timeout_s)
    atomic_write_text(path, json.dumps(result.to_dict(), indent=1))
    return result, False


def measurement_from_dict(record: dict) -> Measurement:
    """Inverse of :meth:`Measurement.to_dict`."""
    latency = Latency(**record["latency"]) if record.get("latency") else None
    return Measurement(
        accuracy=Accuracy(**record["accuracy"]),
        latency=latency,
        peak_rss_mb=record["peak_rss_mb"],
        size_mb=record["size_mb"],
        seconds=record["seconds"],
        threads=record["threads"],
        provider=record["provider"],
        stage_seconds=record.get("stage_seconds", {}),
        gpu_memory_mb=record.get("gpu_memory_mb"),
    )
