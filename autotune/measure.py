"""Measure an exported model with onnxruntime-genai: task accuracy and per-request latency.

Measuring runs in a child process (``python -m autotune.generate``, :mod:`autotune.generate`) that imports only
onnxruntime-genai, as a deployed app would. That keeps the peak-memory figure honest
(no torch in the process), isolates a crashing runtime from the search, and pins the
thread count.

Each prompt is one request, timed as an app runs it: tokenize, prefill, greedy
generation to the stop (a newline or the token budget), decode. Accuracy: the first
label the answer names, as a person reads it (:func:`normalize_answer`: case, whitespace,
bullets and punctuation aside, whole words only), must be the right one; an answer that
names no label is invalid and counts as wrong. Latency: the requests' own
times, after untimed warm-up ones: request, time to first token and per-token decode,
as p50/p90 across prompts. The raw answers are kept, so a changed scoring rule
re-scores a stored measurement without generating again.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from autotune.cache import folder_size
from autotune.errors import CandidateError

# Bump when the child's generation, stop rule, label scoring or timing changes: it is part of
# the measurement cache key. A change in normalize_answer/score needs no bump (answers are re-scored on load).
# 3: each request also scores every label teacher-forced (label_logprobs). 4: prompts are encoded with the
# tokenizer's special tokens (the BOS training saw), labels are scored as the ids they follow the prompt with, and a
# sliding-window model's KV cache holds its window. 5: GPU memory is None when unknown (autotune.gpu_memory), never 0.
# 6: a GPU provider first warms each prompt length once (autotune.generate).
MEASURE_VERSION = 6
# --latency-metric -> the Latency field it optimises and bounds (--max-latency).
LATENCY_METRICS = {"request": "request_p50_ms", "ttft": "ttft_p50_ms", "token": "token_p50_ms"}
Z_95 = 1.959964  # two-sided 95% normal quantile


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); (0, 1) when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def format_accuracy(accuracy: float, n: int, interval: Sequence[float]) -> str:
    """``0.449 (n=136, 95% CI 0.37-0.53)``: how every accuracy is shown."""
    return f"{accuracy:.3f} (n={n}, 95% CI {interval[0]:.2f}-{interval[1]:.2f})"


@dataclass(frozen=True)
class LatencySettings:
    """How latency is sampled: ``warmup`` untimed requests before the timed ones; the front's
    re-benchmark times ``sample`` prompts spread over lengths, ``rounds`` times, interleaved."""

    warmup: int = 2
    sample: int = 16
    rounds: int = 3


@dataclass(frozen=True)
class Accuracy:
    """Exact-label accuracy by greedy generation, with its sample size."""

    accuracy: float
    n: int
    correct: int
    invalid: int
    confusion: dict[str, dict[str, int]]  # true label -> predicted label (or "<invalid>") -> count
    predictions: tuple[str, ...] = ()
    marks: str = ""  # "1" where the prompt was answered right, "0" where not, in prompt order


    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of the accuracy."""
        return wilson_interval(self.correct, self.n)

    def describe(self) -> str:
        return format_accuracy(self.accuracy, self.n, self.interval)

    def to_dict(self) -> dict:
        """The figures without the per-prompt predictions, plus the interval; the marks stay, so two models
        scored on the same prompts can be compared paired from their records."""
        record = {k: v for k, v in asdict(self).items() if k != "predictions"}
        record["interval"] = list(self.interval)
        return record


@dataclass(frozen=True)
class Request:
    """One prompt's own request, as the accuracy loop ran it (times in milliseconds)."""

    answer: str  # the raw generated text (or the chosen label, when answers are restricted to labels)
    prompt_tokens: int
    request_ms: float  # tokenize + prefill + generation to the stop + decode
    ttft_ms: float  # tokenize + prefill + first token
    token_ms: tuple[float, ...]  # each decode step after the first token
    label_logprobs: tuple[float, ...] = ()  # per label: log-prob of its tokens after the prompt (teacher-forced)


@dataclass(frozen=True)
class Latency:
    """Latency across the timed requests, in milliseconds: p50/p90 across prompts.

    ``token_*`` pools every decode step of every request; ``prompt_tokens_*`` says how
    long the timed prompts were.
    """

    request_p50_ms: float
    request_p90_ms: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    token_p50_ms: float
    token_p90_ms: float
    tokens_per_s: float
    prompt_tokens_p50: float
    prompt_tokens_p90: float
    requests: int

    def metric(self, name: str) -> float:
        """The figure ``--latency-metric name`` optimises (request, ttft or token)."""
        return getattr(self, LATENCY_METRICS[name])


@dataclass(frozen=True)
class Measurement:
    """Everything measured on one exported model."""

    accuracy: Accuracy
    latency: Latency | None
    peak_rss_mb: float
    size_mb: float
    seconds: float
    threads: int
    provider: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    gpu_memory_mb: float | None = None  # device memory of the measuring process (CUDA; None: unknown, autotune.gpu_memory)
    requests: tuple[Request, ...] = ()  # per prompt, in prompt order: raw answer and timings

    def to_dict(self) -> dict:
        record = asdict(self)
        record["accuracy"] = self.accuracy.to_dict()
        return record

    def label_logprob(self, answers: Sequence[str], labels: Sequence[str]) -> float | None:
        """Mean over prompts of the log-probability the model gives the right label's tokens after the
        prompt (teacher-forced, from the exported model's logits): a lower-variance signal of how well a
        candidate has learnt the task than its accuracy. None where the labels were not scored."""
        index = {label: i for i, label in enumerate(labels)}
        values = [r.label_logprobs[index[a]] for r, a in zip(self.requests, answers, strict=True) if r.label_logprobs]
        return sum(values) / len(values) if values and len(values) == len(answers) else None

    @classmethod
    def from_dict(cls, record: dict, answers: Sequence[str], labels: Sequence[str]) -> "Measurement":
        """Inverse of :meth:`to_dict`; the accuracy is scored again from the stored raw answers."""
        requests = tuple(Request(**{**r, "token_ms": tuple(r["token_ms"]),
                                    "label_logprobs": tuple(r.get("label_logprobs", ()))})
                         for r in record["requests"])
        values = {f.name: record[f.name] for f in fields(cls) if f.name in record}
        return cls(**{**values, "requests": requests,
                      "accuracy": score([r.answer for r in requests], answers, labels),
                      "latency": Latency(**record["latency"]) if record.get("latency") else None})


def measure(
    model_dir: Path,
    prompts: Sequence[str],
    answers: Sequence[str],
    labels: Sequence[str],
    *,
    provider: str = "cpu",
    threads: int = 1,
    latency: LatencySettings | None = LatencySettings(),
    restrict_to_labels: bool = False,
    score_labels: bool = True,
    label_ids: Sequence[Sequence[Sequence[int]]] | None = None,
    timeout_s: float | None = None,
) -> Measurement:
    """Score ``prompts`` against ``answers``, timing each request, in a fresh process.

    Args:
        model_dir: an onnxruntime-genai folder (``genai_config.json`` inside).
        prompts: rendered prompts, each ending where the answer starts.
        answers: the true label of each prompt.
        labels: the label set (for validity and the confusion table).
        provider: execution provider: ``cpu``, ``cuda`` or ``dml``.
        threads: intra-op threads of the session.
        latency: warm-up settings; ``None`` skips the warm-up and the latency summary
            (the per-request times are still kept).
        restrict_to_labels: instead of generating, answer with the label whose tokens
            the model scores highest after the prompt (teacher-forced total log-prob).
        score_labels: after each timed request, also score every label teacher-forced
            (:attr:`Request.label_logprobs`; not timed).
        label_ids: per prompt, the ids of each label as it follows that prompt
            (:func:`autotune.tokens.label_ids`): what restricted answers and label scores score, and what
            sizes the answer budget. ``None``: each label as the runtime's tokenizer encodes it alone.
        timeout_s: a child still running after this is stopped; ``None``: :func:`timeout_for`.

    Raises:
        CandidateError: the runtime could not load or run the model.
    """
    request = {
        "model_dir": str(model_dir),
        "provider": provider,
        "threads": threads,
        "prompts": list(prompts),
        "labels": list(labels),
        "warmup": latency.warmup if latency and prompts else 0,
        "warm_each_length": bool(latency and prompts) and provider != "cpu",
        "restrict_to_labels": restrict_to_labels,
        "score_labels": score_labels,
        "label_ids": None if label_ids is None else [[list(map(int, ids)) for ids in row] for row in label_ids],
    }
    if timeout_s is None:
        labels_scored = len(labels) if restrict_to_labels or score_labels else 0
        warmups = request["warmup"] + (len(prompts) if request["warm_each_length"] else 0)  # at most one per prompt
        timeout_s = timeout_for(model_dir, len(prompts) + warmups, labels_scored)
    raw = run_child(request, timeout_s)
    requests = tuple(Request(r["answer"], r["prompt_tokens"], r["request_s"] * 1000, r["ttft_s"] * 1000,
                             tuple(t * 1000 for t in r["step_s"]), tuple(r.get("label_logprobs", ())))
                     for r in raw["requests"])
    return Measurement(
        accuracy=score([r.answer for r in requests], answers, labels),
        latency=summarize_latency(requests) if latency is not None and requests else None,
        peak_rss_mb=raw["peak_rss_mb"],
        size_mb=folder_size(model_dir) / 2**20,
        seconds=raw["seconds"],
        stage_seconds=raw["stage_seconds"],
        gpu_memory_mb=raw.get("gpu_memory_mb"),
        threads=threads,
        provider=provider,
        requests=requests,
    )


# The measuring child's time limit, scaled from what it measured for SmolLM2-135M (2026-12-03, 1 thread, the 2-core
# machine at load 4): int4 (86 MB) loaded in 0.8 s, requests 0.22 s median, 0.26 s slowest of 16; fp32 (519 MB)
# 4.5 s, 0.32 s, 0.39 s. The limit allows 6-16x that: a hung runtime is stopped, a slow machine is not.
TIMEOUT_FIXED_S = 60.0
TIMEOUT_LOAD_S_PER_MB = 0.05
TIMEOUT_REQUEST_S = 1.0
TIMEOUT_REQUEST_S_PER_MB = 0.01


def timeout_for(model_dir: Path, requests: int, labels_scored: int = 0) -> float:
    """Seconds the measuring child may take: load the model, then ``requests`` requests (each scoring
    ``labels_scored`` labels on top when answers are restricted to the labels), all scaled by the model's
    size on disk, which is what each decode step reads."""
    mb = folder_size(model_dir) / 2**20
    per_request = (TIMEOUT_REQUEST_S + TIMEOUT_REQUEST_S_PER_MB * mb) * (1 + labels_scored)
    return TIMEOUT_FIXED_S + TIMEOUT_LOAD_S_PER_MB * mb + requests * per_request


def run_child(request: dict, timeout_s: float | None = None) -> dict:
    """Run the genai measuring loop in a child process and return its raw record."""
    with tempfile.TemporaryDirectory(prefix="autotune-measure-") as tmp:
        req_path, out_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req_path.write_text(json.dumps(request))
        env = dict(os.environ, OMP_NUM_THREADS=str(request["threads"]))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "autotune.generate", str(req_path), str(out_path)],
                capture_output=True, text=True, timeout=timeout_s, env=env,
            )
        except subprocess.TimeoutExpired as exc:
            raise CandidateError(f"measuring took longer than {timeout_s:.0f} s and was stopped") from exc
        if proc.returncode != 0 or not out_path.is_file():
            lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"exit code {proc.returncode}"
            if proc.returncode < 0:
                reason = f"killed by signal {-proc.returncode} (out of memory?)"
            raise CandidateError(f"onnxruntime-genai could not run the model in {request['model_dir']}: {reason}")
        return json.loads(out_path.read_text())


SCORING_RULE = ("the first label the answer names counts, read as a person reads it (case, whitespace, bullets and "
                "punctuation aside, whole words only); an answer that names no label counts as wrong")


def normalize_answer(text: str, labels: Sequence[str]) -> str | None:
    """The label an answer names first, or ``None`` if it names none: read as a person reads it.

    Case, whitespace, bullets and punctuation do not count, and a label counts only as a whole word
    (or words): "Joy.", " joy", "- Joy:", "**joy**" and "I think joy" all name "Joy"; "Joyful" names
    none. Where two labels start at the same place, the longer one ("Very Sad" over "Sad").
    """
    lowered = text.lower()
    found = []
    for label in labels:
        match = re.search(rf"(?<![0-9a-z]){re.escape(label.lower())}(?![0-9a-z])", lowered)
        if match:
            found.append((match.start(), -len(label), label))
    return min(found)[2] if found else None


def score(generated: Sequence[str], answers: Sequence[str], labels: Sequence[str]) -> Accuracy:
    """Accuracy and per-label confusion of generated answers."""
    confusion: dict[str, dict[str, int]] = {label: {} for label in labels}
    invalid = 0
    predictions, marks = [], []
    for text, truth in zip(generated, answers, strict=True):
        predicted = normalize_answer(text, labels)
        key = predicted if predicted is not None else "<invalid>"
        confusion.setdefault(truth, {})
        confusion[truth][key] = confusion[truth].get(key, 0) + 1
        invalid += predicted is None
        marks.append("1" if predicted == truth else "0")
        predictions.append(key)
    n, correct = len(answers), marks.count("1")
    return Accuracy(correct / n if n else 0.0, n, correct, invalid, confusion, tuple(predictions), "".join(marks))


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1] if 1 <= q <= 99 else ordered[-1]


def summarize_latency(requests: Sequence[Request]) -> Latency:
    """p50/p90 across the requests; decode steps are pooled over all of them."""
    totals = [r.request_ms for r in requests]
    ttft = [r.ttft_ms for r in requests]
    steps = [t for r in requests for t in r.token_ms] or ttft  # every answer stopped at once: no step to time
    lengths = [float(r.prompt_tokens) for r in requests]
    return Latency(
        request_p50_ms=statistics.median(totals),
        request_p90_ms=_percentile(totals, 90),
        ttft_p50_ms=statistics.median(ttft),
        ttft_p90_ms=_percentile(ttft, 90),
        token_p50_ms=statistics.median(steps),
        token_p90_ms=_percentile(steps, 90),
        tokens_per_s=1000 / statistics.fmean(steps),
        prompt_tokens_p50=statistics.median(lengths),
        prompt_tokens_p90=_percentile(lengths, 90),
        requests=len(requests),
    )


@dataclass(frozen=True)
class Parity:
    """Greedy tokens of an export against PyTorch's on the same prompts."""

    n: int
    mismatched: tuple[int, ...]  # indices of prompts whose greedy tokens differ

    @property
    def ok(self) -> bool:
        return not self.mismatched


def parity_check(hf_dir: Path, model_dir: Path, prompts: Sequence[str], *, new_tokens: int = 8,
                 trust_remote_code: bool = False) -> Parity:
    """Compare greedy generation of an exported model with the HF checkpoint it came from.

    Meant for fp32 exports, whose greedy tokens should match PyTorch's exactly; the
    prompt ids come from each side's own tokenizer, so a tokenizer mismatch fails too.
    """
    import torch
    from transformers import AutoTokenizer

    from autotune.models import load_causal_lm

    raw = run_child({
        "model_dir": str(model_dir), "provider": "cpu", "threads": 1, "prompts": list(prompts),
        "labels": ["x"], "warmup": 0, "restrict_to_labels": False, "max_new_tokens": new_tokens,
        "stop_at_newline": False,
    })
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
    model = load_causal_lm(hf_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    mismatched = []
    for index, (prompt, theirs) in enumerate(zip(prompts, raw["token_ids"], strict=True)):
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tokenizer.eos_token_id)
        ours = out[0, ids["input_ids"].shape[1]:].tolist()
        # genai stops before the length limit at an end token; compare what both produced.
        ours = ours[: len(theirs)] if len(theirs) < len(ours) and theirs and theirs[-1] in eos else ours
        if ours != theirs:
            mismatched.append(index)
    return Parity(n=len(prompts), mismatched=tuple(mismatched))


# --------------------------------------------------------------------------- child process
