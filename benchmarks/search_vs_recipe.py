"""Does the search earn its cost? The README's search against the best fixed recipe, on held-out test data.

    python benchmarks/search_vs_recipe.py                              # demo + emotion, seeds 0-2, 2 threads
    python benchmarks/search_vs_recipe.py --datasets demo --seeds 0    # a quick look

For each dataset and seed (the seed is both the split seed and the sampler seed):

1. **search**: the README's first command, run as a user runs it, in a fresh output folder:
   ``autotune --target auto --max-latency 100 --split-seed S --seed S`` (the default budget: 6 trials).
   Its wall includes start-up and selection; its chosen model is scored on the test split by the command itself.
2. **recipe**: one fixed candidate, no search: LoRA r16 / alpha 32 on all linear layers, lr 1e-3, 60 steps of
   batch 8 (the project's default training constants), exported at int8 and at int4 with GPTQ (block 32,
   symmetric), its model chosen between the two by the same rule as the search (on validation). This is the
   recipe a careful user picks: the configuration of benchmarks/int4_recovery.py, whose int8 and GPTQ int4
   exports came within 0.03 of each other over 5 demo and 3 emotion seeds, at the learning rate and step count
   the demo data is learnt in, and it is the search's own start: the search starts where the user would stop.
3. **recipe x compute**: the same recipe trained for as many optimizer steps as the search computed in all
   (a continued run computes only its new steps), so it gets the search's whole training compute.

Each recipe runs in its own cache folder (nothing shared with the search), with the profile and thread count
the search used. Scored on the test split: the chosen model's accuracy with its n and 95% interval, precision,
size, request p50 (as the search re-benchmarked it; for the recipes, the validation measurement's), and wall.
The table and the medians over seeds go to stdout as markdown; every run's record to ``--out``/results.jsonl.

The emotion data (CARER) is read at run time from ``--emotion`` (default ``../shared/data/emotion/train.txt``
beside this checkout), never copied into the repository: sadness, joy, fear and surprise become
Sad/Joy/Fear/Surprise, 250 rows per label (150 train / 50 validation / 50 test).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EMOTION = ROOT.parent / "shared" / "data" / "emotion" / "train.txt"
# How the emotion data is read, spelled once: the search gets it as flags (data_flags), the recipes as a DataConfig.
EMOTION_READING = {"columns": ("text", "label"), "delimiter": ";", "max_per_label": 250,
                   "label_map": (("sadness", "Sad"), ("joy", "Joy"), ("fear", "Fear"), ("surprise", "Surprise"))}
RECIPE = {"rank": 16, "alpha": 32.0, "learning_rate": 1e-3, "steps": 60, "target_modules": "all-linear"}


def data_flags(dataset: str, emotion: Path) -> list[str]:
    """The README command's data flags for ``dataset`` (the demo: none)."""
    if dataset == "demo":
        return []
    r = EMOTION_READING
    return ["--data", str(emotion), "--columns", ",".join(r["columns"]), "--delimiter", r["delimiter"],
            "--max-per-label", str(r["max_per_label"]), "--label-map", ",".join(f"{a}={b}" for a, b in r["label_map"])]


def run_search(out: Path, dataset: str, seed: int, threads: int, emotion: Path, max_latency: float) -> dict:
    """The README's first command; its report and the training it computed."""
    import optuna

    args = [sys.executable, "-m", "autotune.cli", "--target", "auto", "--max-latency", f"{max_latency:g}",
            "--split-seed", str(seed), "--seed", str(seed), "--threads", str(threads), "-o", str(out),
            *data_flags(dataset, emotion)]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (out / "search.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1], "wall_s": wall}
    report = json.loads((out / "report.json").read_text())
    study = optuna.load_study(study_name="autotune", storage=f"sqlite:///{out / 'study.db'}")
    # The optimizer steps the search computed: each trial that trained, from where it resumed.
    steps = sum(t.user_attrs["spec"]["train"]["steps"] - (t.user_attrs.get("resumed_at_step") or 0)
                for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
                if "train" in t.user_attrs.get("stage_seconds", {}))
    chosen = report["chosen"]
    return {"wall_s": wall, "trials": report["trials"]["complete"], "train_steps": steps,
            "profile": report["profile"]["name"], "candidate": chosen["candidate"],
            "precision": chosen["spec"]["export"]["precision"], "test": chosen["test"],
            "size_mb": chosen["size_mb"], "request_p50_ms": chosen["request_p50_ms"],
            "validation_accuracy": chosen["validation_accuracy"]}


def workspace(root: Path, dataset: str, seed: int, threads: int, profile: str | None, emotion: Path):
    """A candidate workspace in ``root`` on the dataset's splits (split seed ``seed``), as the search's CLI makes
    them: the demo, or the emotion data read as :data:`EMOTION_READING`; ``profile`` None: the detected one."""
    from autotune.candidate import Workspace
    from autotune.data import DataConfig, load_splits
    from autotune.hardware import probe
    from autotune.models import resolve_model
    from autotune.profile_choice import choose_profile
    from autotune.profiles import load_profiles

    config = DataConfig(seed=seed) if dataset == "demo" else DataConfig(path=str(emotion), seed=seed, **EMOTION_READING)
    chosen_profile = choose_profile(probe(), "auto", load_profiles(), profile)
    return Workspace(root, resolve_model(None), load_splits(config), train_device=chosen_profile.train_device,
                     train_dtype=chosen_profile.train_dtype, threads=threads, train_threads=threads)


def run_recipe(root: Path, dataset: str, seed: int, steps: int, threads: int, profile: str, emotion: Path) -> dict:
    """The recipe at ``steps``: int8 and GPTQ int4 exports, the rule's choice between them on validation."""
    from autotune.candidate import CandidateSpec, run_candidate
    from autotune.export import ExportSpec
    from autotune.selection import Candidate, rank
    from autotune.train import TrainSpec

    ws = workspace(root, dataset, seed, threads, profile, emotion)
    train = TrainSpec(**{**RECIPE, "steps": steps})
    start = time.perf_counter()
    exports = {"int8": ExportSpec("int8"), "int4 gptq": ExportSpec("int4", calibration="gptq")}
    validation = {name: run_candidate(ws, CandidateSpec(train, e)) for name, e in exports.items()}
    ranking = rank([Candidate(i, r.measurement.accuracy.marks, r.measurement.latency.request_p50_ms,
                              r.measurement.size_mb) for i, r in enumerate(validation.values())])
    name = list(validation)[ranking.chosen.number]
    tests = {n: run_candidate(ws, CandidateSpec(train, e), split="test", with_latency=False).measurement.accuracy
             for n, e in exports.items()}
    wall = time.perf_counter() - start
    chosen = validation[name]
    return {"wall_s": wall, "train_steps": steps, "chosen": name, "test": tests[name].to_dict(),
            "size_mb": chosen.measurement.size_mb, "request_p50_ms": chosen.measurement.latency.request_p50_ms,
            "tests": {n: a.to_dict() for n, a in tests.items()}}


def paired(first: dict, second: dict) -> str:
    """first - second, two accuracy records (``Accuracy.to_dict``) on the same prompts, with its paired 95% interval
    (the selection's own comparison)."""
    from autotune.selection import Candidate, compare

    a, b = first.get("marks", ""), second.get("marks", "")
    if not a or len(a) != len(b):
        return "n/a"
    paired = compare(Candidate(0, a, 0.0, None), Candidate(1, b, 0.0, None))
    return f"{paired.diff:+.3f} [{paired.interval[0]:+.2f}, {paired.interval[1]:+.2f}]"


def accuracy_text(accuracy: dict) -> str:
    """An accuracy record (``Accuracy.to_dict``) as a table cell: the accuracy and its 95% interval."""
    return f"{accuracy['accuracy']:.3f} [{accuracy['interval'][0]:.2f}, {accuracy['interval'][1]:.2f}]"


def run_arguments(description: str, out: str) -> argparse.ArgumentParser:
    """The flags of a benchmark over the demo and emotion data and split seeds; its records go to .cache/``out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--datasets", nargs="+", default=["demo", "emotion"], choices=["demo", "emotion"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--emotion", type=Path, default=EMOTION, help="the emotion data's train.txt (text;label lines)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / ".cache" / out)
    return parser


def main() -> None:
    parser = run_arguments(__doc__.splitlines()[0], "search_vs_recipe")
    parser.add_argument("--max-latency", type=float, default=100.0, help="the README command's bound (ms)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = {(r["dataset"], r["seed"]): r for r in map(json.loads, results.read_text().splitlines())} \
        if results.is_file() else {}
    for dataset in args.datasets:
        for seed in args.seeds:
            if (dataset, seed) in done:  # an interrupted benchmark resumes
                continue
            folder = args.out / f"{dataset}-{seed}"
            shutil.rmtree(folder, ignore_errors=True)  # a run cut short left artifacts that would flatter its walls
            search = run_search(folder / "search", dataset, seed, args.threads, args.emotion, args.max_latency)
            print(f"{dataset} seed {seed} search: {json.dumps(search)}", flush=True)
            record = {"dataset": dataset, "seed": seed, "search": search}
            if "error" not in search:
                record["recipe"] = run_recipe(folder / "recipe", dataset, seed, RECIPE["steps"], args.threads,
                                              search["profile"], args.emotion)
                print(f"{dataset} seed {seed} recipe: {json.dumps(record['recipe'])}", flush=True)
                record["recipe_compute"] = run_recipe(folder / "recipe-compute", dataset, seed,
                                                      max(search["train_steps"], RECIPE["steps"]), args.threads,
                                                      search["profile"], args.emotion)
                print(f"{dataset} seed {seed} recipe x compute: {json.dumps(record['recipe_compute'])}", flush=True)
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
            done[dataset, seed] = record

    print("\n| data | seed | search: chosen | test acc [95% CI] | MB | request ms | wall s | recipe (60 st): chosen "
          "| test acc | wall s | recipe x compute (steps): test acc | wall s | search - recipe [paired 95% CI] "
          "| search - recipe x compute |")
    print("|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for (dataset, seed), r in sorted(done.items()):
        s = r["search"]
        if "error" in s:
            print(f"| {dataset} | {seed} | failed: {s['error']} | | | | {s['wall_s']:.0f} | | | | | |")
            continue
        a, b = r["recipe"], r["recipe_compute"]
        print(f"| {dataset} | {seed} | {s['candidate']} | {accuracy_text(s['test'])} (n={s['test']['n']}) | {s['size_mb']:.0f} "
              f"| {s['request_p50_ms']:.1f} | {s['wall_s']:.0f} | {a['chosen']} | {accuracy_text(a['test'])} | {a['wall_s']:.0f} "
              f"| ({b['train_steps']}) {accuracy_text(b['test'])} | {b['wall_s']:.0f} | {paired(s['test'], a['test'])} | {paired(s['test'], b['test'])} |")
    print()
    for dataset in args.datasets:
        rows = [r for (d, _), r in done.items() if d == dataset and "error" not in r["search"]]
        if not rows:
            continue
        over_recipe = [r["search"]["test"]["accuracy"] - r["recipe"]["test"]["accuracy"] for r in rows]
        over_compute = [r["search"]["test"]["accuracy"] - r["recipe_compute"]["test"]["accuracy"] for r in rows]
        walls = [r["search"]["wall_s"] for r in rows]
        print(f"{dataset}: search - recipe, test accuracy, median over {len(rows)} seeds: "
              f"{statistics.median(over_recipe):+.3f} (each: {', '.join(f'{d:+.3f}' for d in over_recipe)}); "
              f"search - recipe x compute: {statistics.median(over_compute):+.3f} "
              f"(each: {', '.join(f'{d:+.3f}' for d in over_compute)}); search wall median {statistics.median(walls):.0f} s")


if __name__ == "__main__":
    main()
