"""How far the data is from its plateau: the start trained on part of the training split and on all of it.

    python benchmarks/learning_curve.py                             # demo + emotion, split seeds 0-2, 2 threads
    python benchmarks/learning_curve.py --datasets demo --seeds 0 --fractions 0.5 0.75 1

Whether the validation examples would be worth more as training data once the search has chosen: the case for a
refit of the choice on train + validation (built and measured at d12c2f4, not shipped: benchmarks/README.md, "Refit
on train + validation"). For each dataset and split seed, the space's start (LoRA r16 / alpha 32 / lr 1e-3, all linear
layers) is trained for the default space's top rung on the full split (120 steps on the demo's 408 training examples,
150 on the emotion data's 600), and for the same steps on a label-balanced share of its training examples
(``--fractions``), and exported the screening way (int8 on a CPU). Scored on the validation split only: accuracy with its n and 95%
interval, the mean log-probability of the right label, and each share's accuracy minus the full split's, paired on
the same prompts. Trained adapters are cached in ``--out``.
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


def run(out: Path, dataset: str, seed: int, fraction: float, threads: int, emotion: Path) -> dict:
    """The start at the full split's top rung, trained on ``fraction`` of the training examples."""
    from autotune.candidate import CandidateSpec, run_candidate
    from autotune.data import balanced
    from autotune.export import ExportSpec
    from autotune.train import TrainSpec

    ws = workspace(out / f"{dataset}-{seed}-{fraction:g}", dataset, seed, threads, None, emotion)
    steps = top_rung(len(ws.splits.train))
    if fraction < 1:  # a split of its own: its fingerprint keys the adapter apart from the full split's
        part = tuple(balanced(ws.splits.train, round(fraction * len(ws.splits.train))))
        ws.splits = dataclasses.replace(ws.splits, train=part, fingerprint=f"{ws.splits.fingerprint}-sub{fraction:g}")
    train = TrainSpec(**START, steps=steps, target_modules="all-linear")
    result = run_candidate(ws, CandidateSpec(train, ExportSpec("int8")), with_latency=False)
    return {"dataset": dataset, "seed": seed, "fraction": fraction, "examples": len(ws.splits.train), "steps": steps,
            **score(ws, result.measurement)}


def main() -> None:
    parser = run_arguments(__doc__.splitlines()[0], "learning_curve")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.75, 1.0])
    args = parser.parse_args()
    fractions = sorted(set(args.fractions) | {1.0})
    rows = []
    for dataset in args.datasets:
        for seed in args.seeds:
            for fraction in fractions:
                rows.append(run(args.out, dataset, seed, fraction, args.threads, args.emotion))
                print(json.dumps({k: rows[-1][k] for k in ("dataset", "seed", "fraction", "examples", "steps")}
                                 | {"accuracy": round(rows[-1]["accuracy"]["accuracy"], 3),
                                    "signal": round(rows[-1]["signal"], 3)}), flush=True)

    print("\nValidation accuracy [95% CI] (n), mean log-prob of the right label; each share minus the full split "
          "(paired, 95% CI):\n")
    print("| data | seed | steps | " + " | ".join(f"{f:g} of train" for f in fractions) + " |")
    print("|---|---:|---:|" + "---:|" * len(fractions))
    by_run = {(r["dataset"], r["seed"], r["fraction"]): r for r in rows}
    for (dataset, seed, fraction), whole in by_run.items():
        if fraction != 1.0:
            continue
        cells = []
        for share in fractions:
            r = by_run[dataset, seed, share]
            cell = f"{accuracy_text(r['accuracy'])} (n={r['accuracy']['n']}, {r['examples']} examples), {r['signal']:.3f}"
            cells.append(cell if share == 1.0 else f"{cell}; {paired(r['accuracy'], whole['accuracy'])}")
        print(f"| {dataset} | {seed} | {whole['steps']} | " + " | ".join(cells) + " |")
    print()
    for dataset in args.datasets:
        for fraction in fractions[:-1]:
            mine = [r for r in rows if r["dataset"] == dataset and r["fraction"] == fraction]
            acc = [r["accuracy"]["accuracy"] - by_run[dataset, r["seed"], 1.0]["accuracy"]["accuracy"] for r in mine]
            print(f"{dataset}, {fraction:g} of train - all of it, over {len(mine)} seeds: accuracy median "
                  f"{statistics.median(acc):+.3f} (each {', '.join(f'{d:+.3f}' for d in acc)})")


if __name__ == "__main__":
    main()
