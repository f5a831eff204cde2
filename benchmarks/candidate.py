"""Per-stage wall time and peak memory of one candidate: the default model beside a tiny one.

    python benchmarks/candidate.py                 # SmolLM2-135M (embedded) and the tiny model
    python benchmarks/candidate.py --only tiny     # just the tiny model (seconds)
    python benchmarks/candidate.py --steps 150 --precision int4
    python benchmarks/candidate.py --only default --steps 20 --emotion ../shared/data/emotion/train.txt

Stages are run one by one with the same functions the pipeline uses (nothing cached:
each run works in a fresh temporary folder). Peak memory is the resident set of this
process while the stage runs, sampled every 20 ms; the accuracy and latency stages run
in the measuring child process, whose own peak is reported by the child. CPU is the
user + system seconds of the stage (this process, or the measuring child).
``--emotion`` trains on the issue-13 setup of ``vs_olive.py`` instead of the demo data.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


class PeakRSS:
    """Peak RSS (MB), wall and CPU seconds of this process during a ``with`` block."""

    def __enter__(self):
        self.peak = psutil.Process().memory_info().rss
        self.cpu = time.process_time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        self.start = time.perf_counter()
        return self

    def _poll(self):
        proc = psutil.Process()
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, proc.memory_info().rss)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.cpu = time.process_time() - self.cpu
        self._stop.set()
        self._thread.join()
        self.peak_mb = self.peak / 2**20


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(model_spec: str | None, steps: int, precision: str, tmp: Path, threads: int,
        data=None) -> dict[str, tuple[float, float, float]]:
    from autotune.data import DataConfig, load_splits
    from autotune.export import ExportSpec, export_model, merge_adapter
    from autotune.measure import LatencySettings, measure
    from autotune.models import resolve_model
    from autotune.train import TrainSpec, train_adapter

    stages: dict[str, tuple[float, float, float]] = {}
    with PeakRSS() as m:
        base = resolve_model(model_spec)
        splits = load_splits(data or DataConfig())
    stages["load"] = (m.seconds, m.cpu, m.peak_mb)
    with PeakRSS() as m:
        train_adapter(base, splits, TrainSpec(steps=steps), tmp / "adapter", threads=threads)
    stages["train"] = (m.seconds, m.cpu, m.peak_mb)
    with PeakRSS() as m:
        merge_adapter(base, tmp / "adapter", tmp / "merged")
    stages["merge"] = (m.seconds, m.cpu, m.peak_mb)
    with PeakRSS() as m:
        export_model(tmp / "merged", tmp / "model", ExportSpec(precision=precision), work_dir=tmp / "work")
    stages["export"] = (m.seconds, m.cpu, m.peak_mb)
    prompts = [e.prompt for e in splits.test]
    answers = [e.label for e in splits.test]
    cpu = children_cpu()
    m = measure(tmp / "model", prompts, answers, splits.labels, threads=threads, latency=LatencySettings())
    stages["measure"] = (m.stage_seconds["warmup"] + m.stage_seconds["requests"], children_cpu() - cpu, m.peak_rss_mb)
    stages["_result"] = (m.accuracy.accuracy, m.latency.request_p50_ms, m.accuracy.n)
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["default", "tiny"], help="run one model only")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--precision", default="int4")
    parser.add_argument("--threads", type=int, default=None, help="default: the cores free now")
    parser.add_argument("--emotion", type=Path, help="the emotion data's train.txt: the issue-13 setup of vs_olive.py")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from autotune.hardware import choose_threads

    threads = choose_threads(args.threads)
    data = None
    if args.emotion:
        from vs_olive import emotion_config

        data = emotion_config(args.emotion)
    results = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        if args.only != "default":
            from conftest import build_tiny_model

            tiny = build_tiny_model(tmp / "tiny-model")
            results["tiny (2 layers, hidden 64)"] = run(str(tiny), args.steps, args.precision, tmp / "tiny", threads, data)
        if args.only != "tiny":
            results["SmolLM2-135M-Instruct"] = run(None, args.steps, args.precision, tmp / "default", threads, data)
    names = list(results)
    print(f"\nLoRA r16, {args.steps} steps of batch 8, {args.precision} export, {threads} thread(s), "
          f"{psutil.cpu_count(logical=False)} physical cores")
    print(f"{'stage':<10}" + "".join(f"{n + ' s':>32}{'CPU s':>8}{'peak MB':>10}" for n in names))
    for stage in ("load", "train", "merge", "export", "measure"):
        print(f"{stage:<10}" + "".join(f"{results[n][stage][0]:>32.1f}{results[n][stage][1]:>8.1f}{results[n][stage][2]:>10.0f}"
                                       for n in names))
    print(f"{'test acc':<10}" + "".join(f"{results[n]['_result'][0]:>32.3f}{'':>18}" for n in names)
          + f"   (n={results[names[0]]['_result'][2]})")
    print(f"{'req p50 ms':<10}" + "".join(f"{results[n]['_result'][1]:>32.1f}{'':>18}" for n in names))
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
