"""The measuring child: a model folder in, a generator loop out (onnxruntime-genai only, no torch).

Run as ``python -m autotune.generate REQUEST.json RESULT.json`` by :func:`autotune.measure.run_child`: the request
names the model folder, the prompts, the labels, the thread count and the provider; the result holds each
request's answer, its times, and (when asked) each label's log-probability, read after the clock stops.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def run_requests(request: dict) -> dict:
    """The measuring loop: a model folder in, one timed request per prompt out (onnxruntime-genai only)."""
    import time

    import onnxruntime_genai as og

    from autotune.gpu_memory import GpuMemory

    start = time.perf_counter()
    gpu = GpuMemory() if request["provider"] == "cuda" else None  # the devices' memory before the model loads
    config = og.Config(request["model_dir"])
    config.clear_providers()
    if request["provider"] != "cpu":
        config.append_provider(request["provider"])
    session = {"intra_op_num_threads": request["threads"], "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    labels = request["labels"]
    alone = [[int(t) for t in tokenizer.encode(label)] for label in labels]  # before the BOS is switched on
    label_ids = request.get("label_ids") or [alone] * len(request["prompts"])
    tokenizer.update_options(add_special_tokens="true")  # the BOS training put in front, where the model has one
    max_new = request.get("max_new_tokens") or max(len(ids) for row in label_ids for ids in row) + 3  # label, punctuation, end
    stop_at_newline = request.get("stop_at_newline", True)
    kv_floor = _kv_cache_floor(Path(request["model_dir"]))

    def run(prompt: str, index: int) -> tuple[dict, list[int]]:
        """One request, timed as an app runs it: tokenize, prefill, generate to the stop, decode."""
        t0 = time.perf_counter()
        ids = tokenizer.encode(prompt)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=max(len(ids) + max_new, kv_floor))
        generator = og.Generator(model, params)
        generator.append_tokens(ids)  # prefill
        tokens: list[int] = []
        steps: list[float] = []
        scores: list[float] = []
        if request["restrict_to_labels"]:
            scores = _label_scores(generator, len(ids), label_ids[index])
            answer = labels[max(range(len(labels)), key=scores.__getitem__)]
            ttft = time.perf_counter() - t0
        else:
            generator.generate_next_token()
            ttft = time.perf_counter() - t0
            tokens.append(int(generator.get_next_tokens()[0]))
            while not generator.is_done() and len(tokens) < max_new:
                t1 = time.perf_counter()
                generator.generate_next_token()
                steps.append(time.perf_counter() - t1)
                tokens.append(int(generator.get_next_tokens()[0]))
                if stop_at_newline and "\n" in tokenizer.decode(tokens).lstrip():
                    break
            answer = tokenizer.decode(tokens)
        timing = {"answer": answer, "prompt_tokens": len(ids), "request_s": time.perf_counter() - t0,
                  "ttft_s": ttft, "step_s": steps}
        if request.get("score_labels") and not scores:  # after the clock stops: not part of the request
            generator.rewind_to(len(ids) - 1)  # recompute the prompt's last position: its logits
            generator.append_tokens(ids[-1:])
            scores = _label_scores(generator, len(ids), label_ids[index])
        if scores:
            timing["label_logprobs"] = [float(v) for v in scores]
        return timing, tokens

    loaded = time.perf_counter()
    warm = [0] * request["warmup"]  # first requests pay one-off allocations; they are not timed
    if request.get("warm_each_length"):
        # A GPU provider pays ~75 ms more on the first prefill of each new prompt length (an H200, CUDA: 98-104 ms
        # against 24 ms once the length was seen); a served app pays that once per length, not per request.
        first = {}
        for index, prompt in enumerate(request["prompts"]):
            first.setdefault(len(tokenizer.encode(prompt)), index)
        warm += list(first.values())
    for index in warm:
        run(request["prompts"][index], index)
    warmed = time.perf_counter()
    requests, token_ids = [], []
    for index, prompt in enumerate(request["prompts"]):
        timing, tokens = run(prompt, index)
        requests.append(timing)
        token_ids.append(tokens)
    return {
        "requests": requests,
        "token_ids": token_ids,
        "peak_rss_mb": _peak_rss_mb(),
        "gpu_memory_mb": gpu.peak_mb() if gpu else None,
        "seconds": time.perf_counter() - start,
        "stage_seconds": {"load": loaded - start, "warmup": warmed - loaded, "requests": time.perf_counter() - warmed},
    }


def _kv_cache_floor(model_dir: Path) -> int:
    """The shortest ``max_length`` the model's KV cache may have: a sliding-window model's (Gemma 2/3) local
    layers keep a cache of their window, which onnxruntime-genai refuses to make smaller ("KV cache capacity
    must be at least local_window_size"), within the model's context; 0 for full attention."""
    config = json.loads((model_dir / "genai_config.json").read_text())
    window = int(config["model"]["decoder"].get("sliding_window", {}).get("window_size", 0))
    return min(window, int(config["search"].get("max_length") or window))


def _label_scores(generator, prompt_length: int, label_ids: list[list[int]]) -> list[float]:
    """Each label's total log-prob after the prompt (teacher-forced).

    Called right after the generator computed the prompt's last position; each label is
    appended, scored from the logits and rewound, so the prompt is computed once.
    """
    import numpy as np  # a dependency of onnxruntime-genai

    def log_softmax(row):
        row = row.astype(np.float64) - row.max()
        return row - np.log(np.exp(row).sum())

    first = log_softmax(generator.get_output("logits")[0, -1])
    scores = []
    for ids in label_ids:
        total = first[ids[0]]
        if len(ids) > 1:
            generator.append_tokens(ids)
            logits = generator.get_output("logits")[0]  # row k predicts token k + 1 of the label
            total += sum(log_softmax(logits[k])[ids[k + 1]] for k in range(len(ids) - 1))
            generator.rewind_to(prompt_length)
        scores.append(float(total))
    return scores


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
    Path(sys.argv[2]).write_text(json.dumps(run_requests(_request)))
