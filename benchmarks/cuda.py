"""The CUDA path on a real GPU: a short search, then one adapter's latency on CPU vs CUDA.

    pip uninstall -y onnxruntime-genai && pip install -e '.[cuda]'
    python benchmarks/cuda.py --trials 4

1. ``autotune --target cuda`` on the embedded default for a few trials (QLoRA/LoRA trained
   on the GPU in the profile's dtype, ``-e cuda`` exports, latency with the CUDA provider);
   prints each trial's candidate, figures and per-stage seconds.
2. One LoRA r16 adapter trained on the GPU, exported four ways (CPU int4, CPU fp32, CUDA
   int4, CUDA fp16) and measured with the matching provider, side by side.

Needs an NVIDIA GPU and onnxruntime-genai-cuda; on a machine without them it stops with
the same one-line error as ``autotune --target cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--max-eval", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from autotune.candidate import CandidateSpec, Workspace, run_candidate
    from autotune.data import DataConfig, load_splits
    from autotune.errors import UserError
    from autotune.export import ExportSpec
    from autotune.hardware import choose_profile, load_profiles, probe
    from autotune.models import resolve_model
    from autotune.train import TrainSpec

    info = probe()
    try:
        profile = choose_profile(info, "cuda", load_profiles())
    except UserError as exc:
        sys.exit(f"error: {exc}")
    out = Path(args.out or tempfile.mkdtemp(prefix="autotune-cuda-"))
    print(f"GPU: {', '.join(f'{g.name} ({g.vram_gb:.0f} GB, sm{g.compute_capability[0]}{g.compute_capability[1]})' for g in info.gpus)}; "
          f"profile {profile.name}, train dtype {profile.train_dtype}")

    # 1. the search, as a user runs it
    cmd = [sys.executable, "-m", "autotune.cli", "--target", "cuda", "--max-latency", "50", "--trials", str(args.trials),
           "--max-eval", str(args.max_eval), "-o", str(out / "search"), "--keep-all"]
    print("$", " ".join(cmd[2:]), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout[-4000:], proc.stderr[-2000:] if proc.returncode else "", sep="\n")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="autotune", storage=f"sqlite:///{out / 'search' / 'study.db'}")
    print(f"{'#':>3} {'candidate':<48}{'acc':>6}{'req ms':>8}{'ttft ms':>9}{'GPU MB':>8}  stage seconds")
    for t in study.trials:
        a = t.user_attrs
        if t.state.name != "COMPLETE":
            print(f"{t.number:>3} {a.get('candidate', '-'):<48} {t.state.name} {a.get('fail_reason', '')}")
            continue
        stages = ", ".join(f"{k} {v:.1f}" for k, v in a.get("stage_seconds", {}).items())
        print(f"{t.number:>3} {a['candidate']:<48}{t.values[0]:>6.3f}{a['request_p50_ms']:>8.2f}{a['ttft_p50_ms']:>9.1f}"
              f"{(a.get('gpu_memory_mb') or 0):>8.0f}  {stages}")

    # 2. one adapter, CPU vs CUDA exports
    ws = Workspace(out / "compare", resolve_model(None), load_splits(DataConfig()), train_device="cuda",
                   train_dtype=profile.train_dtype, threads=1, max_eval=args.max_eval)
    train = TrainSpec(rank=16, alpha=32, steps=args.steps)
    rows = []
    for provider, precision in (("cpu", "int4"), ("cpu", "fp32"), ("cuda", "int4"), ("cuda", "fp16")):
        result = run_candidate(ws, CandidateSpec(train, ExportSpec(precision=precision, execution_provider=provider,
                                                                   accuracy_level=4 if provider == "cpu" else 0)))
        m = result.measurement
        rows.append({"provider": provider, "precision": precision, "accuracy": m.accuracy.accuracy,
                     "request_p50_ms": m.latency.request_p50_ms, "ttft_ms": m.latency.ttft_p50_ms,
                     "token_p50_ms": m.latency.token_p50_ms,
                     "tokens_per_s": m.latency.tokens_per_s, "gpu_memory_mb": m.gpu_memory_mb,
                     "size_mb": m.size_mb, "stage_seconds": result.stage_seconds})
    print(f"\nLoRA r16, {args.steps} steps trained on the GPU; validation ({args.max_eval} prompts)")
    print(f"{'provider':<9}{'precision':<10}{'acc':>6}{'TTFT ms':>9}{'p50 ms':>8}{'tok/s':>7}{'GPU MB':>8}{'MB':>6}")
    for r in rows:
        print(f"{r['provider']:<9}{r['precision']:<10}{r['accuracy']:>6.3f}{r['ttft_ms']:>9.1f}{r['token_p50_ms']:>8.2f}"
              f"{r['tokens_per_s']:>7.0f}{(r['gpu_memory_mb'] or 0):>8.0f}{r['size_mb']:>6.0f}")
    (out / "cuda.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
