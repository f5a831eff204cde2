"""The space's start against adapters near it and against their soups, at the top rung, on validation.

    python benchmarks/neighbours.py                           # demo + emotion, split seeds 0-2, 2 threads
    python benchmarks/neighbours.py --datasets demo --seeds 0

What the search could gain on the adapter it ships. For each dataset and split seed, every adapter below is trained
for the default space's top rung (120 steps on the demo's 408 training examples, 150 on the emotion data's 600:
``SearchSpace.fit_data``) and exported the screening way (int8 on a CPU), and so is each *uniform soup* of the start
with one or both neighbours: the mean of their LoRA updates merged into the base
(:func:`autotune.export.merge_adapters`), one model of the base's size. The baseline is the start itself, trained
as long, in the same run. Scored on the validation split only (what the search decides on; the test split stays
for benchmarks/search_vs_recipe.py): accuracy with its n and 95% interval, the mean log-probability of the right
label (the search's ranking signal), and each candidate's accuracy minus the start's, paired on the same prompts.

The neighbours are two adapters the default search screened and which beat or nearly beat the start on validation:
alpha 16 (half the start's update scale) and r12 / alpha 16 / lr 7.9e-4 (the adapter demo seed 2's search
shipped; ``benchmarks/README.md``, "Search against a fixed recipe"). Trained adapters are cached in ``--out``.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from search_vs_recipe import accuracy_text, paired, run_arguments, workspace  # noqa: E402

START = {"rank": 16, "alpha": 32.0, "learning_rate": 1e-3}
NEIGHBOURS = {"alpha 16": {"rank": 16, "alpha": 16.0, "learning_rate": 1e-3},
              "r12 a16 lr7.9e-4": {"rank": 12, "alpha": 16.0, "learning_rate": 7.9e-4}}


def top_rung(examples: int) -> int:
    from autotune.space import SearchSpace, default_space_path

    return SearchSpace.from_yaml(default_space_path()).fit_data(examples).rungs[-1]


def score(ws, measurement) -> dict:
    _, answers = ws.prompts("validation")
    return {"accuracy": measurement.accuracy.to_dict(), "signal": measurement.label_logprob(answers, ws.splits.labels)}


def measure_soup(ws, adapters: list, folder: Path) -> dict:
    """The uniform soup of ``adapters`` (trained adapter folders), merged, exported at int8 and scored (cached)."""
    from autotune.export import ExportSpec, export_model, merge_adapters
    from autotune.measure import measure

    record = folder / "score.json"
    if record.is_file():
        return json.loads(record.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as work:
        merged = merge_adapters(ws.base, [(a, 1 / len(adapters)) for a in adapters], Path(work) / "merged")
        export_model(merged, Path(work) / "model", ExportSpec("int8"), work_dir=Path(work) / "builder")
        prompts, answers = ws.prompts("validation")
        result = score(ws, measure(Path(work) / "model", prompts, answers, ws.splits.labels, threads=ws.threads,
                                   latency=None, label_ids=ws.label_ids("validation")))
    record.write_text(json.dumps(result))
    return result


def run(out: Path, dataset: str, seed: int, threads: int, emotion: Path) -> dict:
    from autotune.candidate import CandidateSpec, run_candidate
    from autotune.export import ExportSpec
    from autotune.train import TrainSpec

    ws = workspace(out / f"{dataset}-{seed}", dataset, seed, threads, None, emotion)
    steps = top_rung(len(ws.splits.train))
    adapters = {"start": START, **NEIGHBOURS}
    scores, dirs = {}, {}
    for name, knobs in adapters.items():
        train = TrainSpec(**{**knobs, "steps": steps, "target_modules": "all-linear"})
        scores[name] = score(ws, run_candidate(ws, CandidateSpec(train, ExportSpec("int8")), with_latency=False).measurement)
        dirs[name] = ws.adapter_dir(train)
    for k in range(1, len(NEIGHBOURS) + 1):
        for names in itertools.combinations(NEIGHBOURS, k):
            label = "soup: start + " + " + ".join(names)
            scores[label] = measure_soup(ws, [dirs["start"], *(dirs[n] for n in names)],
                                         out / f"{dataset}-{seed}" / "soups" / "+".join(names).replace(" ", "_"))
    return {"dataset": dataset, "seed": seed, "steps": steps, "scores": scores}


def main() -> None:
    parser = run_arguments(__doc__.splitlines()[0], "neighbours")
    args = parser.parse_args()
    rows = []
    for dataset in args.datasets:
        for seed in args.seeds:
            rows.append(run(args.out, dataset, seed, args.threads, args.emotion))
            print(f"{dataset} seed {seed}: " + json.dumps({k: (round(v["accuracy"]["accuracy"], 3), round(v["signal"], 3))
                                                            for k, v in rows[-1]["scores"].items()}), flush=True)

    names = list(rows[0]["scores"])
    print("\nValidation accuracy [95% CI] (n), mean log-prob of the right label, and accuracy minus the start's "
          "(paired, 95% CI):\n")
    print("| data | seed | steps | " + " | ".join(names) + " |")
    print("|---|---:|---:|" + "---:|" * len(names))
    for r in rows:
        start = r["scores"]["start"]
        cells = []
        for name in names:
            s = r["scores"][name]
            a = s["accuracy"]
            cell = f"{accuracy_text(a)} (n={a['n']}), {s['signal']:.3f}"
            cells.append(cell if name == "start" else f"{cell}; {paired(s['accuracy'], start['accuracy'])}")
        print(f"| {r['dataset']} | {r['seed']} | {r['steps']} | " + " | ".join(cells) + " |")
    print()
    for dataset in args.datasets:
        mine = [r for r in rows if r["dataset"] == dataset]
        for name in names[1:]:
            acc = [r["scores"][name]["accuracy"]["accuracy"] - r["scores"]["start"]["accuracy"]["accuracy"] for r in mine]
            sig = [r["scores"][name]["signal"] - r["scores"]["start"]["signal"] for r in mine]
            print(f"{dataset}, {name} - start over {len(mine)} seeds: accuracy median {statistics.median(acc):+.3f} "
                  f"(each {', '.join(f'{d:+.3f}' for d in acc)}), log-prob median {statistics.median(sig):+.3f} "
                  f"(each {', '.join(f'{d:+.3f}' for d in sig)})")


if __name__ == "__main__":
    main()
