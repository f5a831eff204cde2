"""Scale-out throughput: N trials on one PostgreSQL study with one worker vs two.

    python benchmarks/workers.py                  # N=8 trials, 1 worker then 2 workers
    python benchmarks/workers.py --trials 12 --workers 1 2 3

Runs on the tiny random Llama of the tests with a fixed categorical space (12
candidates, 4 adapters) and a fresh throwaway PostgreSQL server (tests/postgres.py).
A coordinator run records the settings once (untimed); each timed run then gets its own
copy of that study and its own empty artifacts folder, so every run starts cold. The
wall time is from starting the workers until the last one exits (start-up included),
and trials/min counts COMPLETE trials. Each worker uses one thread.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import TINY_SPACE as SPACE  # the tests' categorical space: 12 candidates, 4 adapters


def cli(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autotune.cli", *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def timed_run(url: str, template: str, name: str, workers: int, trials: int, tmp: Path) -> dict:
    import optuna

    src = optuna.load_study(study_name=template, storage=url)
    dst = optuna.create_study(study_name=name, storage=url, directions=["maximize", "minimize"])
    for key, value in src.user_attrs.items():
        if not key.startswith(("chosen", "zero_shot")):
            dst.set_user_attr(key, value)
    artifacts = tmp / f"artifacts-{name}"
    launched = datetime.datetime.now()
    start = time.perf_counter()
    procs = [cli("worker", "--storage", url, "--study", name, "--artifacts", str(artifacts), "--trials", str(trials),
                 "-o", str(tmp / f"out-{name}-{i}"), "--threads", "1", log=tmp / f"{name}-{i}.log")
             for i in range(workers)]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - start
    if any(codes):
        bad = codes.index(next(c for c in codes if c))
        sys.exit(f"worker {bad} of run {name} exited {codes[bad]}; see {tmp / f'{name}-{bad}.log'}")
    trials = optuna.load_study(study_name=name, storage=url).trials
    states = [t.state.name for t in trials]
    done = [t for t in trials if t.state.name == "COMPLETE"]
    first = min(t.datetime_start for t in trials if t.datetime_start)
    running = (max(t.datetime_complete for t in done) - first).total_seconds()
    return {"workers": workers, "wall_s": wall, "complete": len(done), "duplicates": states.count("PRUNED"),
            "failed": states.count("FAIL"), "per_min": len(done) / wall * 60,
            "startup_s": (first - launched).total_seconds(), "steady_per_min": len(done) / running * 60,
            "trained": sum("train" in t.user_attrs.get("stage_seconds", {}) for t in done),
            "mean_trial_s": sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done) / len(done)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per run (default: 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default: 1 2)")
    args = parser.parse_args()

    import optuna

    import postgres
    from conftest import LABELS, build_tiny_model, write_jsonl

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="autotune-bench-workers-") as folder:
        tmp = Path(folder)
        os.environ.setdefault("AUTOTUNE_CACHE", str(tmp / "autotune-cache"))
        model = build_tiny_model(tmp / "tiny-llama")
        data = write_jsonl(tmp / "tiny.jsonl", [{"text": f"example number {i} about {label.lower()} things",
                                                 "label": label} for i in range(10) for label in LABELS])
        space = tmp / "space.yaml"
        space.write_text(SPACE)
        server = postgres.start()
        try:
            # Records the settings (and warms the OS file cache); not timed.
            setup = cli("--model", str(model), "--data", str(data), "--space", str(space), "--storage", server.url,
                        "--study", "template", "--artifacts", str(tmp / "artifacts-template"), "--trials", "1",
                        "--max-latency", "1000", "--threads", "1", "-o", str(tmp / "out-template"),
                        log=tmp / "template.log")
            if setup.wait():
                sys.exit(f"the coordinator run failed; see {tmp / 'template.log'}")
            results = [timed_run(server.url, "template", f"w{n}", n, args.trials, tmp) for n in args.workers]
        finally:
            server.stop()

    print(f"tiny model, {args.trials} trials, {os.cpu_count()} CPU cores, 1 thread per worker, PostgreSQL "
          f"(each run: fresh study copy, empty artifacts folder; wall time includes worker start-up)")
    for r in results:
        print(f"  {r['workers']} worker(s): {r['complete']} complete ({r['trained']} trained an adapter), "
              f"{r['duplicates']} duplicate(s), {r['failed']} failed in {r['wall_s']:.1f} s -> "
              f"{r['per_min']:.2f} trials/min; start-up {r['startup_s']:.1f} s, then {r['steady_per_min']:.2f} "
              f"trials/min; mean trial {r['mean_trial_s']:.1f} s")
    base = results[0]
    for r in results[1:]:
        print(f"  speed-up {r['workers']} vs {base['workers']} worker(s): {r['per_min'] / base['per_min']:.2f}x "
              f"(after start-up: {r['steady_per_min'] / base['steady_per_min']:.2f}x)")


if __name__ == "__main__":
    main()
