"""One candidate, end to end: train -> merge -> export -> measure, each step cached.

A candidate is a :class:`CandidateSpec`: training choices (or none, for the zero-shot
base) plus export choices. Its adapter is keyed by (base model, data, training
choices) and its exported folder by (adapter, export choices), so candidates that
share training reuse one adapter, and nothing done once is done again, in this run or
a resumed one.

Keys also name the versions of the code and libraries that shape each artifact
(:data:`ADAPTER_LIBRARIES`, :data:`EXPORT_LIBRARIES`, :data:`MEASURE_LIBRARIES`), so an
upgrade rebuilds rather than reuses. Anything that goes wrong inside one candidate
reaches the caller as a :class:`~autotune.errors.CandidateError` with the reason.

Workspace layout below ``root``::

    adapters/<train key>/        peft adapter (safetensors) + train_log.json
    models/<export key>/         onnxruntime-genai folder, loadable as is
    measurements/<key>.json      measured figures per (model, split, settings, device)
    logs/<export key>.builder.log  what the genai builder printed (kept when the export fails too)
"""

from __future__ import annotations

import contextlib
import errno
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autotune import cache, export, tokens, train, trajectory
from autotune.cache import atomic_dir, atomic_write_text, content_key, file_lock, sweep_partials
from autotune.data import Splits, instruction_prompt
from autotune.errors import CandidateError, UserError, check_interrupted, first_line
from autotune.export import (ExportSpec, check_export_memory, check_free_disk, export_model, export_stage_needs,
                             merge_adapter, prequantize)
from autotune.measure import MEASURE_VERSION, LatencySettings, Measurement, measure
from autotune.memory import StageMemory, check_memory, measure_need, memory_need, stage_peak, tokens_per_step
from autotune.models import BaseModel
from autotune.train import TrainResult, TrainSpec, read_train_log, train_adapter

# Called as on_stage(stage, fraction_done, detail); stages: train, merge, export, measure.
StageCallback = Callable[[str, float, str], None]
# The libraries whose versions shape each artifact, and so are part of its cache key.
ADAPTER_LIBRARIES = ("torch", "transformers", "peft")  # + bitsandbytes for QLoRA
EXPORT_LIBRARIES = ("onnxruntime-genai", "onnx", "onnx-ir", "transformers")
MEASURE_LIBRARIES = ("onnxruntime-genai", "onnxruntime")
# How an int4 export keeps its accuracy: rtn (the builder rounds the trained weights), int4-aware
# (the adapter is trained against that rounding), gptq (we choose the int4 weights, calibrated on the task).
INT4_METHODS = ("rtn", "int4-aware", "gptq")


@dataclass(frozen=True)
class CandidateSpec:
    """What to build: ``train=None`` exports the base model as is (the zero-shot baseline)."""

    train: TrainSpec | None
    export: ExportSpec

    def __post_init__(self) -> None:
        t, e = self.train, self.export
        if t is not None and t.int4_aware and e.precision == "int4":
            grid = (e.block_size, e.symmetric, e.algo, e.int8_layers, e.calibration)
            if grid != (t.int4_block_size, True, "default", "none", "none"):
                raise UserError(f"an int4-aware adapter exports at int4 on the grid it was trained against (symmetric, "
                                f"block {t.int4_block_size}, default rounding, no int8 layers, no calibration); "
                                f"drop the other int4 options")

    @classmethod
    def from_dict(cls, record: dict) -> "CandidateSpec":
        """Inverse of ``dataclasses.asdict`` (what a trial stores as its ``spec`` attribute)."""
        return cls(TrainSpec(**record["train"]) if record.get("train") else None, ExportSpec(**record["export"]))

    @property
    def int4_method(self) -> str:
        """One of :data:`INT4_METHODS`: how this candidate's int4 weights were made (an int8 or fp32
        export of an int4-aware adapter is still ``int4-aware``: its adapter was trained that way)."""
        if self.train is not None and self.train.int4_aware:
            return "int4-aware"
        return "gptq" if self.export.calibration == "gptq" else "rtn"

    def describe(self) -> str:
        export = self.export.label()
        if self.train is None:
            return f"zero-shot base {export}"
        t = self.train
        modules = "" if t.target_modules == "all-linear" else f" {t.target_modules}"
        aware = f" int4-aware b{t.int4_block_size}" if t.int4_aware else ""
        return f"{t.method} r{t.rank} a{t.alpha:g} lr{t.learning_rate:.0e} {t.steps}st{modules}{aware} {export}"


@dataclass(frozen=True)
class CandidateResult:
    """A built and measured candidate."""

    spec: CandidateSpec
    model_dir: Path
    measurement: Measurement
    train: TrainResult | None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    cached: tuple[str, ...] = ()  # stages skipped because their artifact already existed
    stage_memory: dict[str, StageMemory] = field(default_factory=dict)  # each stage run now: predicted and measured peak

    def to_dict(self) -> dict:
        return {
            "spec": asdict(self.spec),
            "model_dir": str(self.model_dir),
            "measurement": self.measurement.to_dict(),
            "train_seconds": self.train.seconds if self.train else None,
            "final_loss": self.train.final_loss if self.train else None,
            "stage_seconds": self.stage_seconds,
            "cached": list(self.cached),
            "stage_memory": {stage: memory.to_dict() for stage, memory in self.stage_memory.items()},
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
    max_eval: int | None = None  # score on N prompts of a split, its labels balanced (autotune.data.balanced)
    memory_headroom: float = 0.8  # fraction of free RAM / VRAM a candidate may use (from the profile)
    # A model that slow to score is a failed candidate, not a hung search; None: from the model's size and the
    # number of prompts (autotune.measure.timeout_for).
    measure_timeout_s: float | None = None
    # What measures latency and memory: the GPU's name on CUDA, else the CPU's model (a study's `device`). Part of
    # every measurement's key: machines sharing an artifacts folder never serve each other's latencies.
    device: str | None = None  # None: this machine's (autotune.hardware.device_name)

    def __post_init__(self) -> None:
        if self.measure_timeout_s is not None and not self.measure_timeout_s > 0:
            raise UserError(f"--measure-timeout must be a positive number of seconds, got {self.measure_timeout_s:g}")
        if self.device is None:
            from autotune.hardware import device_name

            self.device = device_name(self.train_device == "cuda")
        self.root.mkdir(parents=True, exist_ok=True)
        sweep_partials(self.root)  # half-written artifacts of a killed run are never trusted
        self._prompts: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
        self._label_ids: dict[tuple[str, str], list[list[list[int]]]] = {}
        self._tokenizer = None
        self._calibration: list[list[int]] | None = None

    def train_key(self, spec: TrainSpec) -> str:
        libraries = ADAPTER_LIBRARIES + (("bitsandbytes",) if spec.method == "qlora" else ())
        code = (cache.SCHEMA_VERSION, train.CODE_VERSION, tokens.CODE_VERSION, cache.library_versions(*libraries))
        return content_key("adapter", code, self.base.fingerprint, self.splits.fingerprint, spec, self.train_device,
                           self.train_dtype)

    def trajectory_dir(self, spec: TrainSpec) -> Path:
        """Where the stable-phase checkpoints of ``spec``'s adapter at any length live (:mod:`autotune.trajectory`):
        the adapter's key without its steps."""
        libraries = ADAPTER_LIBRARIES + (("bitsandbytes",) if spec.method == "qlora" else ())
        code = (cache.SCHEMA_VERSION, train.CODE_VERSION, tokens.CODE_VERSION, cache.library_versions(*libraries))
        lengthless = {k: v for k, v in asdict(spec).items() if k != "steps"}
        key = content_key("trajectory", code, self.base.fingerprint, self.splits.fingerprint, lengthless,
                          self.train_device, self.train_dtype)
        return self.root / "trajectories" / key

    def export_key(self, spec: CandidateSpec) -> str:
        source = self.train_key(spec.train) if spec.train else f"base:{self.base.fingerprint}"
        # tokens: a calibrated export is fitted to tokenized training examples.
        code = (cache.SCHEMA_VERSION, export.CODE_VERSION, tokens.CODE_VERSION, cache.library_versions(*EXPORT_LIBRARIES))
        # GPTQ's forwards run where training does, in its dtype on a GPU: its weights depend on that.
        calibrated_on = self.calibration_device() if spec.export.calibration != "none" else None
        return content_key("model", code, source, spec.export.normalized(), calibrated_on)

    def calibration_device(self) -> tuple[str, str]:
        """(device, dtype) of the merge and GPTQ's forwards: the training device, in its dtype on a GPU (the
        rounding itself is fp32 everywhere); fp32 on the CPU, where bf16 would only save the copy of a layer."""
        return (self.train_device, self.train_dtype if self.train_device == "cuda" else "float32")

    def adapter_dir(self, spec: TrainSpec) -> Path:
        return self.root / "adapters" / self.train_key(spec)

    def model_dir(self, spec: CandidateSpec) -> Path:
        return self.root / "models" / self.export_key(spec)

    def builder_log(self, spec: CandidateSpec) -> Path:
        return self.root / "logs" / f"{self.export_key(spec)}.builder.log"

    def calibration_samples(self) -> list[list[int]]:
        """What a calibrated int4 export is fitted to (:func:`autotune.train.calibration_samples`), tokenized once:
        the memory check and the export both need it."""
        if self._calibration is None:
            self._calibration = train.calibration_samples(self.splits, self.tokenizer())
        return self._calibration

    def tokenizer(self):
        """The base model's tokenizer (:func:`autotune.train.load_tokenizer`), loaded once."""
        if self._tokenizer is None:
            self._tokenizer = train.load_tokenizer(self.base, self.trust_remote_code)
        return self._tokenizer

    def prompts(self, split: str, style: str = "template") -> tuple[list[str], list[str]]:
        """Rendered prompts and true labels of a split, ``max_eval`` of them with the labels balanced (cached).

        ``style="template"``: the data template (chat template applied if asked), what candidates
        are trained on; ``"instruction"``: an instruction naming the labels, in the model's chat
        template where it has one (the zero-shot baselines).
        """
        if (split, style) not in self._prompts:
            tokenizer = None
            if self.splits.config.chat_template or style == "instruction":
                tokenizer = self.tokenizer()
            if style == "instruction":
                examples = self.splits.examples(split, self.max_eval)
                rendered = [instruction_prompt(e.prompt, self.splits.labels, tokenizer) for e in examples]
                self._prompts[split, style] = (rendered, [e.label for e in examples])
            else:
                self._prompts[split, style] = self.splits.prompts(split, tokenizer, self.max_eval)
        return self._prompts[split, style]

    def label_ids(self, split: str, style: str = "template") -> list[list[list[int]]]:
        """Per prompt of :meth:`prompts`, the ids of each label as it follows that prompt (cached): what a right
        answer is generated as, and what answers restricted to the labels score (:func:`autotune.tokens.label_ids`)."""
        if (split, style) not in self._label_ids:
            tokenizer = self.tokenizer()
            self._label_ids[split, style] = [[tokens.label_ids(tokenizer, prompt, label) for label in self.splits.labels]
                                             for prompt in self.prompts(split, style)[0]]
        return self._label_ids[split, style]


def run_candidate(
    ws: Workspace,
    spec: CandidateSpec,
    *,
    split: str = "validation",
    with_latency: bool = True,
    on_stage: StageCallback | None = None,
    prompt_style: str = "template",
    restrict_to_labels: bool = False,
) -> CandidateResult:
    """Build (or reuse) the candidate's model folder and measure it on ``split``.

    ``prompt_style`` and ``restrict_to_labels`` choose how it is asked and how it answers
    (see :meth:`Workspace.prompts` and :func:`autotune.measure.measure`); the baselines use them.

    Raises:
        CandidateError: anything went wrong inside this candidate (a diverged loss, out of
            memory, a builder or runtime error), with the reason; other candidates may still work.
    """
    with _candidate_errors():
        notify = _notifier(on_stage)
        model_dir, train_result, seconds, cached, peaks = _build(ws, spec, notify)
        notify("measure", 0.0, f"accuracy on {split}" + (" + latency" if with_latency else ""))
        measurement, was_cached = _measure_cached(ws, spec, model_dir, split, with_latency, prompt_style,
                                                  restrict_to_labels)
        if was_cached:
            cached.append("measure")
        else:
            seconds.update(measurement.stage_seconds)
            # Its own process, after the export (so the weights' size on disk is known).
            peaks["measure"] = StageMemory(measure_need(model_dir, spec.export.precision),
                                           int(measurement.peak_rss_mb * 2**20))
        notify("measure", 1.0, "done")
        return CandidateResult(spec, model_dir, measurement, train_result, seconds, tuple(cached), peaks)


def build(ws: Workspace, spec: CandidateSpec, on_stage: StageCallback | None = None) -> Path:
    """Build (or reuse) the candidate's model folder without measuring it; raises as :func:`run_candidate`."""
    with _candidate_errors():
        return _build(ws, spec, _notifier(on_stage))[0]


@contextlib.contextmanager
def _candidate_errors():
    """Turn any failure inside a candidate into a :class:`CandidateError` with the reason."""
    try:
        check_interrupted()
        yield
    except CandidateError:
        check_interrupted()  # a measuring child stopped by Ctrl-C is the user's stop, not this candidate's failure
        raise
    except UserError as exc:  # raised by a stage about this candidate (e.g. its loss diverged)
        raise CandidateError(str(exc)) from exc
    except MemoryError as exc:
        raise CandidateError("out of memory while building the candidate") from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:  # a full disk fails every later candidate too: stop, keep what is done
            raise
        raise CandidateError(f"{type(exc).__name__}: {first_line(exc)}") from exc
    except Exception as exc:  # torch's OutOfMemoryError, a library's RuntimeError, ...: this candidate's failure
        reason = "out of memory" if "out of memory" in str(exc).lower() else first_line(exc)
        raise CandidateError(f"{type(exc).__name__}: {reason}") from exc


def _notifier(on_stage: StageCallback | None) -> StageCallback:
    def notify(stage: str, fraction: float, detail: str) -> None:
        check_interrupted()  # each stage and training step is a point to stop at
        if on_stage is not None:
            on_stage(stage, fraction, detail)
    return notify


def _build(ws: Workspace, spec: CandidateSpec, notify: StageCallback):
    """Train (or reuse) the adapter and export (or reuse) the model: (folder, train result, seconds, cached,
    each stage's memory)."""
    seconds: dict[str, float] = {}
    peaks: dict[str, StageMemory] = {}
    cached: list[str] = []
    model_dir = ws.model_dir(spec)
    train_result = None
    if spec.train is not None:
        adapter = ws.adapter_dir(spec.train)
        with file_lock(adapter):  # another worker may be training the same adapter right now
            train_result, trained_s = _train_cached(ws, spec, adapter, model_dir, notify, peaks)
        if trained_s is None:
            cached.append("train")
        elif trained_s:
            seconds["train"] = trained_s
    with file_lock(model_dir):
        exported = _export_cached(ws, spec, model_dir, notify, seconds, peaks)
    if not exported:
        cached.append("export")
    return model_dir, train_result, seconds, cached, peaks


def check_candidate_memory(ws: Workspace, spec: CandidateSpec) -> None:
    """Refuse a candidate whose training or whose merge and export cannot fit in free memory, before any of
    it runs (each stage checks again when it starts, against the memory free then).

    Raises:
        CandidateError: the stage that does not fit, with the memory needed and free.
    """
    if spec.train is not None:
        check_memory(ws.base, spec.train, ws.train_device, ws.train_dtype, ws.memory_headroom,
                     tokens_per_step(ws.splits, spec.train))
    samples = ws.calibration_samples() if spec.export.calibration == "gptq" else []
    lengths = [len(ids) for ids in samples]
    check_export_memory(ws.base, ws.memory_headroom,
                        export_stage_needs(ws.base, spec.export, lengths, spec.train and spec.train.rank))


def _train_cached(ws: Workspace, spec: CandidateSpec, adapter: Path, model_dir: Path, notify, peaks: dict):
    """(result, seconds): seconds is None on a cache hit, 0.0 when the export makes training moot."""
    if (adapter / "train_log.json").is_file():
        return read_train_log(adapter), None
    if (model_dir / "genai_config.json").is_file():
        return None, 0.0
    step_tokens = tokens_per_step(ws.splits, spec.train)
    checkpointing = check_memory(ws.base, spec.train, ws.train_device, ws.train_dtype, ws.memory_headroom, step_tokens)
    # A shorter run of this adapter saved its state where its decay began: continue from the latest one.
    runs = ws.trajectory_dir(spec.train)
    resume = trajectory.latest(runs, spec.train.stable_steps)
    detail = f", continuing from step {resume.name.removeprefix('step-')}" if resume else ""
    notify("train", 0.0, "loading base model" + detail
           + (" (gradient checkpointing: memory is short)" if checkpointing else ""))
    start = time.perf_counter()
    save = trajectory.step_dir(runs, spec.train.stable_steps)
    need = memory_need(ws.base, spec.train, ws.train_dtype, step_tokens, checkpointing)
    with atomic_dir(adapter) as tmp, stage_peak(peaks, "train", need, ws.train_device):
        train_adapter(
            ws.base, ws.splits, spec.train, tmp,
            device=ws.train_device, dtype=ws.train_dtype, threads=ws.train_threads,
            trust_remote_code=ws.trust_remote_code, checkpointing=checkpointing,
            on_step=lambda step, loss: notify("train", step / spec.train.steps, f"step {step} loss {loss:.3f}"),
            resume_from=resume, checkpoint_to=None if resume == save else save,
        )
    return read_train_log(adapter), time.perf_counter() - start


def _export_cached(ws: Workspace, spec: CandidateSpec, model_dir: Path, notify, seconds: dict, peaks: dict) -> bool:
    """Merge and export unless the folder exists; True if it was built now."""
    if (model_dir / "genai_config.json").is_file():
        return False
    check_free_disk(model_dir.parent, ws.base, spec.export, merged=spec.train is not None)
    gptq = spec.export.calibration == "gptq"
    samples = ws.calibration_samples() if gptq else []
    needs = export_stage_needs(ws.base, spec.export, [len(ids) for ids in samples], spec.train and spec.train.rank)
    check_export_memory(ws.base, ws.memory_headroom, needs)
    device, dtype = ws.calibration_device()
    # Named <model>.tmp-merge-*: a partial of this model, under its lock (held here), so the next start's
    # sweep removes a killed run's merged copy but never a live worker's.
    with tempfile.TemporaryDirectory(prefix=f"{model_dir.name}.tmp-merge-", dir=model_dir.parent) as work:
        source = ws.base.path
        if spec.train is not None:
            notify("merge", 0.0, "merging adapter into the base")
            start = time.perf_counter()
            with stage_peak(peaks, "merge", needs["merge"]):
                source = merge_adapter(ws.base, ws.adapter_dir(spec.train), Path(work) / "merged",
                                       trust_remote_code=ws.trust_remote_code, device=device)
            seconds["merge"] = time.perf_counter() - start
        if spec.export.prequantized:
            notify("calibrate", 0.0, f"GPTQ on {spec.export.calibration_samples} training examples" if gptq
                   else "rounding to the int4 grid")
            start = time.perf_counter()
            with stage_peak(peaks, "calibrate", needs["calibrate"]):
                source = prequantize(source, Path(work) / "prequantized", spec.export, samples,
                                     trust_remote_code=ws.trust_remote_code, device=device, dtype=dtype,
                                     on_layer=lambda i, n: notify("calibrate", i / n, f"layer {i} of {n}"))
            seconds["calibrate"] = time.perf_counter() - start
        notify("export", 0.0, f"onnxruntime-genai builder, {spec.export.label()}")
        with atomic_dir(model_dir) as tmp, stage_peak(peaks, "export", needs["export"]):
            seconds["export"] = export_model(source, tmp, spec.export, work_dir=Path(work) / "builder",
                                             trust_remote_code=ws.trust_remote_code, log_path=ws.builder_log(spec))
    return True


def _measure_cached(ws: Workspace, spec: CandidateSpec, model_dir: Path, split: str, with_latency: bool,
                    prompt_style: str = "template", restrict_to_labels: bool = False):
    prompts, answers = ws.prompts(split, prompt_style)
    label_ids = ws.label_ids(split, prompt_style)
    latency = ws.latency if with_latency else None
    provider = spec.export.execution_provider
    threads = ws.threads or 1
    key = content_key("measure", cache.SCHEMA_VERSION, MEASURE_VERSION, cache.library_versions(*MEASURE_LIBRARIES),
                      ws.export_key(spec), prompts, answers, label_ids, latency, provider, threads, restrict_to_labels,
                      ws.device)
    path = ws.root / "measurements" / f"{key}.json"
    if path.is_file():  # scored again from the stored raw answers: a changed scoring rule applies at once
        return Measurement.from_dict(json.loads(path.read_text()), answers, ws.splits.labels), True
    result = measure(model_dir, prompts, answers, ws.splits.labels, provider=provider, threads=threads, latency=latency,
                     restrict_to_labels=restrict_to_labels, label_ids=label_ids, timeout_s=ws.measure_timeout_s)
    atomic_write_text(path, json.dumps(result.to_dict(), indent=1))
    return result, False
