"""The CUDA path on a real GPU: a short search, then one adapter's exports on CPU vs CUDA.

    pip uninstall -y onnxruntime-genai && pip install -e '.[cuda]'
    python benchmarks/cuda.py --trials 4

1. ``autotune --target cuda`` on the embedded default for a few trials (LoRA/QLoRA trained
   on the GPU in the profile's dtype, ``-e cuda`` exports, accuracy and per-request
   latency with the CUDA provider); prints each trial's figures and per-stage seconds.
2. One LoRA adapter and one QLoRA adapter trained on the GPU, exported CPU int4, CPU fp32,
   CUDA int4 and CUDA fp16 (QLoRA: CUDA only) and each measured with its own provider,
   side by side: accuracy (n, 95% interval), request / TTFT / decode p50, memory, size.
3. Cold prefill shapes: the base model's int4 export on the profile's provider, 48 validation
   prompts timed in one process twice (a KV cache sized per request, as autotune's measure
   does, then at one fixed length), and 30 prompts of new lengths: what the first request of a
   new prompt length costs against a warm one.

``--target cpu`` runs the same script without a GPU (the CPU rows only), as the baseline
on a machine that has none. Needs an NVIDIA GPU and onnxruntime-genai-cuda for
``--target cuda``; without them it stops with the same one-line error as
``autotune --target cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _row(label: str, result) -> dict:
    m = result.measurement
    lat = m.latency
    low, high = m.accuracy.interval
    return {"candidate": label, "provider": m.provider, "accuracy": m.accuracy.accuracy, "n": m.accuracy.n,
            "ci95": [round(low, 3), round(high, 3)], "request_p50_ms": lat.request_p50_ms,
            "request_p90_ms": lat.request_p90_ms, "ttft_p50_ms": lat.ttft_p50_ms, "token_p50_ms": lat.token_p50_ms,
            "peak_rss_mb": m.peak_rss_mb, "gpu_memory_mb": m.gpu_memory_mb, "size_mb": m.size_mb,
            "stage_seconds": {k: round(v, 2) for k, v in result.stage_seconds.items()},
            "stage_memory": {k: v.to_dict() for k, v in result.stage_memory.items()}}


def _mb(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def _print_rows(rows: list[dict]) -> None:
    print(f"{'candidate':<34}{'provider':<9}{'acc':>6} {'95% CI':<12}{'req p50':>8}{'req p90':>8}{'TTFT':>7}"
          f"{'tok p50':>8}{'RSS MB':>7}{'GPU MB':>7}{'MB':>5}  stage seconds")
    for r in rows:
        gpu = f"{r['gpu_memory_mb']:.0f}" if r["gpu_memory_mb"] else "-"
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_seconds"].items())
        print(f"{r['candidate']:<34}{r['provider']:<9}{r['accuracy']:>6.3f} {r['ci95'][0]:.2f}-{r['ci95'][1]:.2f}"
              f"{'':<3}{r['request_p50_ms']:>8.2f}{r['request_p90_ms']:>8.2f}{r['ttft_p50_ms']:>7.2f}"
              f"{r['token_p50_ms']:>8.2f}{r['peak_rss_mb']:>7.0f}{gpu:>7}{r['size_mb']:>5.0f}  {stages}")
        if r.get("stage_memory"):  # each stage run now: predicted / measured peak
            print("    peak MB predicted/measured: " + ", ".join(
                f"{k} {_mb(v['predicted_mb'])}/{_mb(v['measured_mb'])} {v['where']}" for k, v in r["stage_memory"].items()))


def search(out: Path, args) -> list[dict]:
    """``autotune --target ...`` as a user runs it; the study's trials as rows."""
    cmd = [sys.executable, "-m", "autotune.cli", "--target", args.target, "--max-latency", str(args.max_latency),
           "--trials", str(args.trials), "--max-eval", str(args.max_eval), "-o", str(out), "--keep-all"]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--space", args.space] if args.space else []
    print("$ autotune", " ".join(cmd[4:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout[-6000:], proc.stderr[-3000:] if proc.returncode else "", sep="\n")
    print(f"search exit {proc.returncode} in {time.perf_counter() - start:.0f} s")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="autotune", storage=f"sqlite:///{out / 'study.db'}")
    rows = []
    for t in study.trials:
        a = t.user_attrs
        row = {"trial": t.number, "state": t.state.name, "candidate": a.get("candidate"),
               "fail_reason": a.get("fail_reason"), "stage_seconds": a.get("stage_seconds", {})}
        if t.state.name == "COMPLETE":
            row.update(accuracy=t.values[0], latency_ms=t.values[1],
                       n=a.get("eval_examples"), **{k: a.get(k) for k in ("request_p50_ms", "request_p90_ms", "ttft_p50_ms",
                                                "token_p50_ms", "peak_rss_mb", "gpu_memory_mb", "size_mb")})
        rows.append(row)
    return rows


def _workspace(out: Path, args, profile, max_eval: int):
    """A workspace on the embedded data for ``profile``'s training device."""
    from autotune.candidate import Workspace
    from autotune.data import DataConfig, load_splits
    from autotune.hardware import choose_threads
    from autotune.models import resolve_model

    return Workspace(out, resolve_model(args.model), load_splits(DataConfig()), train_device=profile.train_device,
                     train_dtype=profile.train_dtype, threads=choose_threads(None), max_eval=max_eval)


def compare(out: Path, args, info, profile) -> list[dict]:
    """One LoRA and one QLoRA adapter trained here, each export measured with its provider."""
    from autotune.candidate import CandidateSpec, run_candidate
    from autotune.export import ExportSpec
    from autotune.profile_choice import qlora_enabled
    from autotune.train import TrainSpec

    ws = _workspace(out, args, profile, args.max_eval)
    # (provider, precision, calibration): GPTQ's forwards run where training does (on the GPU in its dtype).
    exports = [("cpu", "int4", "none"), ("cpu", "int4", "gptq"), ("cpu", "fp32", "none")]
    if profile.execution_provider == "cuda":
        exports += [("cuda", "int4", "none"), ("cuda", "int4", "gptq"), ("cuda", "fp16", "none")]
    plan = [(TrainSpec(rank=16, alpha=32, steps=args.steps), exports)]
    if qlora_enabled(profile, info):
        plan.append((TrainSpec(method="qlora", rank=16, alpha=32, steps=args.steps),
                     [e for e in exports if e[0] == profile.execution_provider]))
    rows = []
    for train, targets in plan:
        for provider, precision, calibration in targets:
            spec = CandidateSpec(train, ExportSpec(precision=precision, execution_provider=provider,
                                                   accuracy_level=4 if provider == "cpu" else 0,
                                                   calibration=calibration).normalized())
            result = run_candidate(ws, spec)
            gptq = " gptq" if calibration == "gptq" else ""
            rows.append(_row(f"{train.method} r16 {precision}{gptq}", result))
            print(f"  {rows[-1]['candidate']} on {provider}: {rows[-1]['accuracy']:.3f}, "
                  f"request p50 {rows[-1]['request_p50_ms']:.2f} ms", flush=True)
    return rows


def prefill_shapes(out: Path, args, profile) -> dict:
    """Each request of the base model's int4 export timed in one process, first and second pass: on CUDA the first
    prefill of a new prompt length is the slow one."""
    import statistics

    import onnxruntime_genai as og

    from autotune.candidate import CandidateSpec, run_candidate
    from autotune.export import ExportSpec

    provider = profile.execution_provider
    ws = _workspace(out, args, profile, 48)
    export = ExportSpec(precision="int4", execution_provider=provider, accuracy_level=4 if provider == "cpu" else 0)
    model_dir = run_candidate(ws, CandidateSpec(None, export.normalized())).model_dir
    config = og.Config(str(model_dir))
    config.clear_providers()
    if provider != "cpu":
        config.append_provider(provider)
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    tokenizer.update_options(add_special_tokens="true")
    prompts = [tokenizer.encode(p) for p in ws.prompts("validation")[0][:48]]
    new_tokens = 6

    def request_ms(ids, max_length: int) -> float:
        start = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=max_length)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        for _ in range(new_tokens):
            if generator.is_done():
                break
            generator.generate_next_token()
        return (time.perf_counter() - start) * 1000

    longest = max(len(ids) for ids in prompts)
    request_ms(prompts[0], len(prompts[0]) + new_tokens)  # the session's own first run
    rows = {}
    for name, fixed in (("KV per request, first pass", 0), ("KV per request, second pass", 0),
                        ("KV fixed, first pass", longest + new_tokens), ("KV fixed, second pass", longest + new_tokens)):
        times = [request_ms(ids, fixed or len(ids) + new_tokens) for ids in prompts]
        rows[name] = times
    rows["KV fixed at 200, 30 new lengths"] = [request_ms(prompts[0][:1] * k, 200) for k in range(60, 90)]
    print(f"\nCold prefill shapes: int4 base model on {provider}, {len(prompts)} validation prompts of "
          f"{len({len(ids) for ids in prompts})} lengths, {new_tokens} new tokens")
    summary = {}
    for name, times in rows.items():
        p50, p90 = statistics.median(times), statistics.quantiles(times, n=10)[-1]
        summary[name] = {"p50_ms": round(p50, 1), "p90_ms": round(p90, 1), "max_ms": round(max(times), 1)}
        print(f"  {name:<34} p50 {p50:7.1f}  p90 {p90:7.1f}  max {max(times):7.1f} ms")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--max-eval", type=int, default=64)
    parser.add_argument("--max-latency", type=float, default=50.0)
    parser.add_argument("--model", help="base model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--space", help="search space YAML for the search (default: search_spaces/default.yaml)")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from autotune.errors import UserError
    from autotune.hardware import probe
    from autotune.profile_choice import choose_profile
    from autotune.profiles import load_profiles

    info = probe()
    try:
        profile = choose_profile(info, args.target, load_profiles())
    except UserError as exc:
        sys.exit(f"error: {exc}")
    out = Path(args.out or tempfile.mkdtemp(prefix="autotune-cuda-"))
    gpus = ", ".join(f"{g.name} ({g.vram_gb:.0f} GB, sm{g.compute_capability[0]}{g.compute_capability[1]})"
                     for g in info.gpus) or "none"
    print(f"GPU: {gpus}; CPU: {info.cpu_model}; profile {profile.name}, train dtype {profile.train_dtype}", flush=True)
    record: dict = {"gpu": gpus, "cpu": info.cpu_model, "profile": profile.name}

    if not args.skip_search:
        record["search"] = search(out / "search", args)
        print(f"\n{'#':>3} {'candidate':<50}{'acc':>6}{'req p50':>8}{'TTFT':>7}{'tok p50':>8}{'GPU MB':>7}  stage seconds")
        for r in record["search"]:
            stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stage_seconds"].items())
            if r["state"] != "COMPLETE":
                print(f"{r['trial']:>3} {r['candidate'] or '-':<50} {r['state']} {r['fail_reason'] or ''}")
                continue
            gpu = f"{r['gpu_memory_mb']:.0f}" if r.get("gpu_memory_mb") else "-"
            print(f"{r['trial']:>3} {r['candidate']:<50}{r['accuracy']:>6.3f}{r['request_p50_ms'] or 0:>8.2f}"
                  f"{r['ttft_p50_ms'] or 0:>7.2f}{r['token_p50_ms'] or 0:>8.2f}{gpu:>7}  {stages}")

    if not args.skip_compare:
        print(f"\nLoRA / QLoRA r16, {args.steps} steps, trained on {profile.train_device} ({profile.train_dtype}); "
              f"validation, first {args.max_eval} prompts", flush=True)
        record["compare"] = compare(out / "compare", args, info, profile)
        _print_rows(record["compare"])
    if not args.skip_prefill:
        record["prefill"] = prefill_shapes(out / "prefill", args, profile)
    (out / "cuda.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
