"""Per-request latency of one adapter at int4, int8 and fp32, measured the way the search measures it.

Builds (or reuses, from --output) one LoRA adapter of SmolLM2 and its three exports through the
normal candidate path, then times every validation prompt's own request on each export, in
ABC-CBA order (so a drift of the machine's load hits every precision alike), and prints request,
TTFT and per-token decode p50/p90 per precision, fp32 being the baseline of the same run.

    python benchmarks/latency.py --steps 20 --threads 1 --output /tmp/latency-bench
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

PRECISIONS = ("int4", "int8", "fp32")
FIGURES = ("request_p50_ms", "request_p90_ms", "ttft_p50_ms", "ttft_p90_ms", "token_p50_ms", "token_p90_ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-eval", type=int, default=None, help="validation prompts (default: all)")
    parser.add_argument("--output", default="latency-bench", help="artifact folder (reused between runs)")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from autotune.candidate import CandidateSpec, Workspace, run_candidate
    from autotune.data import DataConfig, load_splits
    from autotune.export import ExportSpec
    from autotune.measure import LatencySettings, measure
    from autotune.models import resolve_model
    from autotune.train import TrainSpec

    ws = Workspace(Path(args.output) / "cache", resolve_model(None), load_splits(DataConfig()), threads=args.threads,
                   max_eval=args.max_eval)
    train = TrainSpec(steps=args.steps)
    specs = {p: CandidateSpec(train, ExportSpec(precision=p)) for p in PRECISIONS}
    for spec in specs.values():  # build, or reuse what an earlier run built
        run_candidate(ws, spec, with_latency=False)
    prompts, answers = ws.prompts("validation")
    runs: dict[str, list] = {p: [] for p in PRECISIONS}
    for precision in PRECISIONS + PRECISIONS[::-1]:
        runs[precision].append(measure(ws.model_dir(specs[precision]), prompts, answers, ws.splits.labels,
                                       threads=args.threads, latency=LatencySettings()))
    print(f"\nLoRA r16, {args.steps} steps; {len(prompts)} validation prompts, {args.threads} thread(s); "
          "ms, median of the two passes (ABC-CBA)")
    print(f"{'precision':<10}{'accuracy':>28}" + "".join(f"{f[:-3]:>17}" for f in FIGURES) + f"{'MB':>6}")
    for precision, measured in runs.items():
        m = measured[0]
        row = [statistics.median(getattr(r.latency, f) for r in measured) for f in FIGURES]
        print(f"{precision:<10}{m.accuracy.describe():>28}" + "".join(f"{v:>17.1f}" for v in row) + f"{m.size_mb:>6.0f}")
    lengths = runs["fp32"][0].latency
    print(f"prompt length p50 / p90: {lengths.prompt_tokens_p50:.0f} / {lengths.prompt_tokens_p90:.0f} tokens")


if __name__ == "__main__":
    main()
