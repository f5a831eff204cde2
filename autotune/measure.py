"""Measure an exported model with onnxruntime-genai: task accuracy and latency.

Measuring runs in a child process (``python -m autotune.measure``) that imports only
onnxruntime-genai, as a deployed app would. That keeps the peak-memory figure honest
(no torch in the process), isolates a crashing runtime from the search, and pins the
thread count.

Accuracy: greedy generation for each prompt; the first line of the answer, stripped of
punctuation, must equal a label (case-insensitive). Anything else is an invalid answer
and counts as wrong. Latency: after warm-up, a fixed prompt generates a fixed number of
tokens several times; time to first token (prefill + first sample) and every decode
step are timed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autotune.cache import folder_size
from autotune.errors import CandidateError


@dataclass(frozen=True)
class LatencySettings:
    """How latency is sampled: ``repeats`` timed runs after ``warmup`` untimed ones."""

    new_tokens: int = 32
    warmup: int = 2
    repeats: int = 5


@dataclass(frozen=True)
class Accuracy:
    """Exact-label accuracy by greedy generation."""

    accuracy: float
    n: int
    invalid: int
    confusion: dict[str, dict[str, int]]  # true label -> predicted label (or "<invalid>") -> count
    predictions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Latency:
    """Latency figures of one model on one prompt, in milliseconds.

    ``*_spread`` is the interquartile range over the timed runs (TTFT) or over all
    decode steps (per-token), so two candidates can be compared with their noise.
    """

    ttft_ms: float
    ttft_spread_ms: float
    token_p50_ms: float
    token_p90_ms: float
    token_spread_ms: float
    tokens_per_s: float
    prompt_tokens: int
    runs: int


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
    gpu_memory_mb: float | None = None  # device memory of the measuring process (CUDA, via NVML)

    def to_dict(self) -> dict:
        record = asdict(self)
        record["accuracy"].pop("predictions", None)
        return record


def measure(
    model_dir: Path,
    prompts: Sequence[str],
    answers: Sequence[str],
    labels: Sequence[str],
    *,
    provider: str = "cpu",
    threads: int = 1,
    latency: LatencySettings | None = LatencySettings(),
    latency_prompt: str | None = None,
    timeout_s: float | None = None,
) -> Measurement:
    """Score ``prompts`` against ``answers`` and time generation, in a fresh process.

    Args:
        model_dir: an onnxruntime-genai folder (``genai_config.json`` inside).
        prompts: rendered prompts, each ending where the answer starts.
        answers: the true label of each prompt.
        labels: the label set (for validity and the confusion table).
        provider: execution provider: ``cpu``, ``cuda`` or ``dml``.
        threads: intra-op threads of the session.
        latency: sampling settings; ``None`` skips the latency runs.
        latency_prompt: the prompt to time; default the median-length prompt.

    Raises:
        CandidateError: the runtime could not load or run the model.
    """
    if latency is not None and latency_prompt is None and prompts:
        latency_prompt = sorted(prompts, key=len)[len(prompts) // 2]
    request = {
        "model_dir": str(model_dir),
        "provider": provider,
        "threads": threads,
        "prompts": list(prompts),
        "labels": list(labels),
        "latency": asdict(latency) if latency else None,
        "latency_prompt": latency_prompt,
    }
    raw = run_child(request, timeout_s)
    accuracy = score(raw["answers"], answers, labels)
    return Measurement(
        accuracy=accuracy,
        latency=summarize_latency(raw["latency"]) if raw["latency"] else None,
        peak_rss_mb=raw["peak_rss_mb"],
        size_mb=folder_size(model_dir) / 2**20,
        seconds=raw["seconds"],
        stage_seconds=raw["stage_seconds"],
        gpu_memory_mb=raw.get("gpu_memory_mb"),
        threads=threads,
        provider=provider,
    )


def run_child(request: dict, timeout_s: float | None = None) -> dict:
    """Run the genai measuring loop in a child process and return its raw record."""
    with tempfile.TemporaryDirectory(prefix="autotune-measure-") as tmp:
        req_path, out_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req_path.write_text(json.dumps(request))
        env = dict(os.environ, OMP_NUM_THREADS=str(request["threads"]))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "autotune.measure", str(req_path), str(out_path)],
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


def normalize_answer(text: str, labels: Sequence[str]) -> str | None:
    """The label an answer names, or ``None`` if it names none.

    The first non-empty line counts; "Joy.", " joy" and "Joy, clearly" all name "Joy".
    """
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line.strip(" \t\"'`*.,:;!?()[]")
    lowered = line.lower()
    for label in sorted(labels, key=len, reverse=True):
        name = label.lower()
        if lowered == name or (lowered.startswith(name) and not lowered[len(name)].isalnum()):
            return label
    return None


def score(generated: Sequence[str], answers: Sequence[str], labels: Sequence[str]) -> Accuracy:
    """Accuracy and per-label confusion of generated answers."""
    confusion: dict[str, dict[str, int]] = {label: {} for label in labels}
    correct = invalid = 0
    predictions = []
    for text, truth in zip(generated, answers, strict=True):
        predicted = normalize_answer(text, labels)
        key = predicted if predicted is not None else "<invalid>"
        confusion.setdefault(truth, {})
        confusion[truth][key] = confusion[truth].get(key, 0) + 1
        invalid += predicted is None
        correct += predicted == truth
        predictions.append(key)
    n = len(answers)
    return Accuracy(correct / n if n else 0.0, n, invalid, confusion, tuple(predictions))


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``correct / n`` (95% for ``z=1.96``).

    Unlike the normal approximation it stays inside [0, 1] and is usable at 0 or n
    successes and for small n. ``n == 0`` gives the uninformative (0, 1).
    """
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1] if 1 <= q <= 99 else ordered[-1]


def summarize_latency(raw: dict) -> Latency:
    ttft = [t * 1000 for t in raw["ttft_s"]]
    steps = [t * 1000 for run in raw["step_s"] for t in run]
    if not steps:  # the model stopped at once every time: no decode step to time
        steps = ttft
    return Latency(
        ttft_ms=statistics.median(ttft),
        ttft_spread_ms=_percentile(ttft, 75) - _percentile(ttft, 25),
        token_p50_ms=statistics.median(steps),
        token_p90_ms=_percentile(steps, 90),
        token_spread_ms=_percentile(steps, 75) - _percentile(steps, 25),
        tokens_per_s=1000 / statistics.fmean(steps),
        prompt_tokens=raw["prompt_tokens"],
        runs=len(ttft),
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw = run_child({
        "model_dir": str(model_dir), "provider": "cpu", "threads": 1, "prompts": list(prompts),
        "labels": ["x"], "latency": None, "max_new_tokens": new_tokens, "stop_at_newline": False,
    })
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
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


def _child(request: dict) -> dict:
    """The measuring loop: a model folder in, a generator loop out (onnxruntime-genai only)."""
    import time

    import onnxruntime_genai as og

    start = time.perf_counter()
    config = og.Config(request["model_dir"])
    config.clear_providers()
    if request["provider"] != "cpu":
        config.append_provider(request["provider"])
    session = {"intra_op_num_threads": request["threads"], "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    label_len = max(len(tokenizer.encode(label)) for label in request["labels"])
    max_new = request.get("max_new_tokens") or label_len + 3  # room for a label, punctuation, end token
    stop_at_newline = request.get("stop_at_newline", True)

    def generate(ids, new_tokens: int, force_length: bool) -> tuple[list[int], float, list[float]]:
        params = og.GeneratorParams(model)
        options = {"do_sample": False, "max_length": len(ids) + new_tokens}
        if force_length:  # latency runs time a fixed number of decode steps
            options["min_length"] = len(ids) + new_tokens
        params.set_search_options(**options)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(ids)  # prefill
        generator.generate_next_token()
        ttft = time.perf_counter() - t0
        tokens = [int(generator.get_next_tokens()[0])]
        steps = []
        while not generator.is_done() and len(tokens) < new_tokens:
            t0 = time.perf_counter()
            generator.generate_next_token()
            steps.append(time.perf_counter() - t0)
            tokens.append(int(generator.get_next_tokens()[0]))
            if stop_at_newline and not force_length and "\n" in tokenizer.decode(tokens).lstrip():
                break
        return tokens, ttft, steps

    loaded = time.perf_counter()
    gpu_peak = [_gpu_memory_mb()] if request["provider"] == "cuda" else None
    answers, token_ids = [], []
    for prompt in request["prompts"]:
        tokens, _, _ = generate(tokenizer.encode(prompt), max_new, force_length=False)
        token_ids.append(tokens)
        answers.append(tokenizer.decode(tokens))
    scored = time.perf_counter()

    latency = None
    if request["latency"]:
        settings = request["latency"]
        ids = tokenizer.encode(request["latency_prompt"])
        for _ in range(settings["warmup"]):
            generate(ids, settings["new_tokens"], force_length=True)
        runs = [generate(ids, settings["new_tokens"], force_length=True) for _ in range(settings["repeats"])]
        latency = {"ttft_s": [r[1] for r in runs], "step_s": [r[2] for r in runs], "prompt_tokens": len(ids)}
    if gpu_peak is not None:
        gpu_peak.append(_gpu_memory_mb())
    return {
        "answers": answers,
        "token_ids": token_ids,
        "latency": latency,
        "peak_rss_mb": _peak_rss_mb(),
        "gpu_memory_mb": max((g for g in gpu_peak or [] if g is not None), default=None),
        "seconds": time.perf_counter() - start,
        "stage_seconds": {"load": loaded - start, "accuracy": scored - loaded, "latency": time.perf_counter() - scored},
    }


def _gpu_memory_mb() -> float | None:
    """GPU memory this process holds now (NVML, from nvidia-ml-py); None if unavailable.

    onnxruntime's CUDA arena keeps what it took, so the value after generation is the peak.
    """
    try:
        import pynvml

        pynvml.nvmlInit()
        used = 0
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory:
                    used += proc.usedGpuMemory
        return used / 2**20
    except Exception:  # no NVML, no driver, no permission: the figure is simply absent
        return None


def _peak_rss_mb() -> float:
    """Peak resident memory of this process since it started (exec'd) as this program."""
    try:  # Linux: VmHWM resets at exec, unlike ru_maxrss, which keeps the forking parent's peak
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil

    info = psutil.Process().memory_info()
    return getattr(info, "peak_wset", info.rss) / 2**20  # Windows has a peak; elsewhere current RSS


if __name__ == "__main__":
    _request = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(_child(_request)))
