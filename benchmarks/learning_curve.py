"""How far the data is from its plateau: the start trained on part of the training split, on all of it, and longer.

    python benchmarks/learning_curve.py                             # demo + emotion, split seeds 0-2, 2 threads
    python benchmarks/learning_curve.py --datasets demo --seeds 0 --fractions 0.5 0.75 1
    python benchmarks/learning_curve.py --fractions 1 --step-factors 1 2   # the top rung against twice as long

Whether the validation examples would be worth more as training data once the search has chosen: the case for a
refit of the choice on train + validation (built and measured at d12c2f4, not shipped: benchmarks/README.md, "Refit
on train + validation"). For each dataset and split seed, the space's start (LoRA r16 / alpha 32 / lr 1e-3, all linear
layers) is trained for the default space's top rung on the full split (120 steps on the demo's 408 training examples,
150 on the emotion data's 600), and for the same steps on a label-balanced share of its training examples
(``--fractions``), or for a multiple of the top rung's steps (``--step-factors``: whether the finalist would gain
from training longer; the longer run resumes from the shorter one's checkpoint, as the search continues an adapter),
and exported the screening way (int8 on a CPU). Scored on the validation split only: accuracy with its n and 95%
interval, the mean log-probability of the right label, and each run's accuracy minus the full split's at the top
rung, paired on the same prompts. Trained adapters are cached in ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from neighbours import START, score, top_rung  # noqa: E402
from search_vs_recipe import accuracy_text, paired, run_arguments, workspace  # noqa: E402


def run(out: Path, dataset: str, seed: int, fraction: float, factor: float, threads: int, emotion: Path) -> dict:
    """The start at ``factor`` x the full split's top rung, trained on ``fraction`` of the training examples."""
    from autotune.candidate import CandidateSpec, run_candidate
    from autotune.data import balanced
    from autotune.export import ExportSpec
    from autotune.train import TrainSpec

    ws = workspace(out / f"{dataset}-{seed}-{fraction:g}", dataset, seed, threads, None, emotion)
    steps = round(factor * top_rung(len(ws.splits.train)))
    if fraction < 1:  # a split of its own: its fingerprint keys the adapter apart from the full split's
        part = tuple(balanced(ws.splits.train, round(fraction * len(ws.splits.train))))
        ws.splits = dataclasses.replace(ws.splits, train=part, fingerprint=f"{ws.splits.fingerprint}-sub{fraction:g}")
    train = TrainSpec(**START, steps=steps, target_modules="all-linear")
    result = run_candidate(ws, CandidateSpec(train, ExportSpec("int8")), with_latency=False)
    return {"dataset": dataset, "seed": seed, "fraction": fraction, "factor": factor, "examples": len(ws.splits.train),
            "steps": steps, **score(ws, result.measurement)}


def label(fraction: float, factor: float) -> str:
    """A run's column: its share of the training split, and its multiple of the top rung's steps where not 1."""
    return f"{fraction:g} of train" + (f", {factor:g}x steps" if factor != 1 else "")


def main() -> None:
    parser = run_arguments(__doc__.splitlines()[0], "learning_curve")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.75, 1.0])
    parser.add_argument("--step-factors", nargs="+", type=float, default=[1.0],
                        help="multiples of the top rung's steps to train for (1: the top rung)")
    args = parser.parse_args()
    runs = [(fraction, factor) for fraction in sorted(set(args.fractions) | {1.0})
            for factor in sorted(set(args.step_factors) | {1.0})]
    rows = []
    for dataset in args.datasets:
        for seed in args.seeds:
            for fraction, factor in runs:
                rows.append(run(args.out, dataset, seed, fraction, factor, args.threads, args.emotion))
                print(json.dumps({k: rows[-1][k] for k in ("dataset", "seed", "fraction", "examples", "steps")}
                                 | {"accuracy": round(rows[-1]["accuracy"]["accuracy"], 3),
                                    "signal": round(rows[-1]["signal"], 3)}), flush=True)

    than = "each share minus the full split" if set(args.step_factors) <= {1.0} else \
        "each run minus the full split at the top rung"
    print(f"\nValidation accuracy [95% CI] (n), mean log-prob of the right label; {than} (paired, 95% CI):\n")
    print("| data | seed | steps | " + " | ".join(label(*r) for r in runs) + " |")
    print("|---|---:|---:|" + "---:|" * len(runs))
    by_run = {(r["dataset"], r["seed"], r["fraction"], r["factor"]): r for r in rows}
    for (dataset, seed, fraction, factor), whole in by_run.items():
        if (fraction, factor) != (1.0, 1.0):
            continue
        cells = []
        for share, times in runs:
            r = by_run[dataset, seed, share, times]
            cell = f"{accuracy_text(r['accuracy'])} (n={r['accuracy']['n']}, {r['examples']} examples), {r['signal']:.3f}"
            cells.append(cell if (share, times) == (1.0, 1.0) else f"{cell}; {paired(r['accuracy'], whole['accuracy'])}")
        print(f"| {dataset} | {seed} | {whole['steps']} | " + " | ".join(cells) + " |")
    print()
    for dataset in args.datasets:
        for fraction, factor in runs:
            if (fraction, factor) == (1.0, 1.0):
                continue
            mine = [r for r in rows if r["dataset"] == dataset and (r["fraction"], r["factor"]) == (fraction, factor)]
            what = f"{fraction:g} of train - all of it" if factor == 1 else f"{label(fraction, factor)} - the top rung"
            measures = [("accuracy", lambda r: r["accuracy"]["accuracy"])]
            if factor != 1:  # training longer trades calibration for accuracy: the log-prob the search ranks on
                measures.append(("label log-prob", lambda r: r["signal"]))
            for name, value in measures:
                diffs = [value(r) - value(by_run[dataset, r["seed"], 1.0, 1.0]) for r in mine]
                print(f"{dataset}, {what}, over {len(mine)} seeds: {name} median "
                      f"{statistics.median(diffs):+.3f} (each {', '.join(f'{d:+.3f}' for d in diffs)})")

if __name__ == "__main__":
    main()
