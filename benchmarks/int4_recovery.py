"""How much of the int8 accuracy each int4 method keeps, at the same training budget.

    python benchmarks/int4_recovery.py                       # 5 seeds on the demo data, 3 on the emotion data
    python benchmarks/int4_recovery.py --demo-seeds 2 --emotion-seeds 0 --steps 30   # a quick look
    python benchmarks/int4_recovery.py --bf16-seeds 0        # without the bf16-training rows
    python benchmarks/int4_recovery.py --rows bf16           # only the bf16 rows, e.g. beside a --rows fp32 run
                                                             # (stages are cached: a last plain run prints both)

For each dataset and seed, on SmolLM2-135M-Instruct (LoRA r16 / alpha 32, all linear layers, lr 1e-3,
``--steps`` steps of batch 8, dropout 0.05), it builds:

- the plain adapter, exported at fp32, int8 (block 32) and int4 by the builder's rounding (``rtn``), and at
  int4 calibrated by GPTQ on 128 training examples (``gptq``);
- the int4-aware adapter (same seed and budget, trained against the symmetric block-32 int4 grid), exported
  at int4 (``int4-aware``) and at int8;
- on the first ``--bf16-seeds`` seeds, the plain adapter trained against bf16 frozen weights (the ``cpu-bf16``
  and CUDA profiles' training dtype), exported at int8 and at int4 (rtn, gptq), and compared paired with the
  fp32-trained adapter of the same seed: the per-seed differences on the same test prompts, their mean with a
  95% t-interval over seeds, and each seed's paired interval. On a CPU without AVX512-BF16 or AMX, torch
  emulates bf16 (same rounding, many times slower): the accuracy answer holds, its timing does not;

and scores every export on the dataset's test split by greedy generation with onnxruntime-genai (1 thread).
The table gives each method's mean accuracy over seeds with its range, its gap to the plain adapter's int8
export, its difference from plain rtn int4 with two standard errors (of the difference of means, seeds
unpaired, and of the paired per-seed differences), and its extra time (training or calibration seconds
over the plain adapter's). Every stage is cached under ``$AUTOTUNE_CACHE/bench-int4`` by its inputs and the
code and library versions that shape it, so an interrupted run resumes.

The emotion data (CARER, ``text;label`` lines) is read at run time from ``--emotion`` (default
``../shared/data/emotion/train.txt`` beside this checkout), never copied into the repository: sadness, joy,
fear and surprise become Sad/Joy/Fear/Surprise, 250 rows per label (150 train / 50 validation / 50 test).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autotune import cache, export, train  # noqa: E402
from autotune.candidate import EXPORT_LIBRARIES, MEASURE_LIBRARIES  # noqa: E402
from autotune.data import DataConfig, load_splits  # noqa: E402
from autotune.export import ExportSpec, export_model, merge_adapter, prequantize  # noqa: E402
from autotune.measure import MEASURE_VERSION, measure  # noqa: E402
from autotune.models import resolve_model  # noqa: E402
from autotune.selection import Candidate, compare  # noqa: E402
from autotune.train import TrainSpec, train_adapter  # noqa: E402

EMOTION = ROOT.parent / "shared" / "data" / "emotion" / "train.txt"
LABEL_MAP = (("sadness", "Sad"), ("joy", "Joy"), ("fear", "Fear"), ("surprise", "Surprise"))
GRID_BLOCK = 32
# method -> (adapter, export)
ROWS = {
    "fp32 (plain adapter)": ("plain", ExportSpec("fp32")),
    "int8 (plain adapter)": ("plain", ExportSpec("int8", block_size=GRID_BLOCK)),
    "int4 rtn": ("plain", ExportSpec("int4", block_size=GRID_BLOCK)),
    "int4 gptq": ("plain", ExportSpec("int4", block_size=GRID_BLOCK, calibration="gptq")),
    "int4 int4-aware": ("aware", ExportSpec("int4", block_size=GRID_BLOCK)),
    "int8 (int4-aware adapter)": ("aware", ExportSpec("int8", block_size=GRID_BLOCK)),
}
# the plain adapter trained against bf16 frozen weights, beside its fp32-trained row
BF16_ROWS = {
    "int8 (plain adapter)": ("plain-bf16", ROWS["int8 (plain adapter)"][1]),
    "int4 rtn": ("plain-bf16", ROWS["int4 rtn"][1]),
    "int4 gptq": ("plain-bf16", ROWS["int4 gptq"][1]),
}
# two-sided 95% t quantiles by degrees of freedom (past 10 the normal's 1.96 is within 12%)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


class Bench:
    """The stages of one (dataset, seed), each cached in its own folder."""

    def __init__(self, root: Path, base, splits, name: str, seed: int, steps: int, threads: int) -> None:
        self.root, self.base, self.splits, self.name = root, base, splits, name
        self.seed, self.steps, self.threads = seed, steps, threads

    def spec(self, adapter: str) -> TrainSpec:
        return TrainSpec(rank=16, alpha=32.0, learning_rate=1e-3, steps=self.steps, batch_size=8, dropout=0.05,
                         seed=self.seed, int4_aware=adapter == "aware", int4_block_size=GRID_BLOCK)

    @staticmethod
    def dtype(adapter: str) -> str:
        return "bfloat16" if adapter.endswith("-bf16") else "float32"

    def adapter(self, adapter: str) -> tuple[Path, float]:
        """The trained adapter and its training seconds."""
        settings = {"dataset": self.name, "data": self.splits.fingerprint, "seed": self.seed, "rank": 16, "alpha": 32.0,
                    "lr": 1e-3, "steps": self.steps, "batch": 8, "dropout": 0.05,
                    "dtype": self.dtype(adapter),
                    **({"method": "int4-aware", "block": GRID_BLOCK} if adapter == "aware" else {"method": "plain"})}
        key = cache.content_key("int4-bench-adapter", train.CODE_VERSION,
                                cache.library_versions("torch", "transformers", "peft"), self.base.fingerprint, settings)
        out = self.root / "adapters" / key
        if not (out / "train_log.json").is_file():
            with cache.atomic_dir(out) as tmp:
                train_adapter(self.base, self.splits, self.spec(adapter), tmp, dtype=self.dtype(adapter),
                              threads=self.threads)
        return out, train.read_train_log(out).seconds

    def model(self, adapter: str, spec: ExportSpec) -> tuple[Path, float]:
        """The exported genai folder and its calibration seconds (0 without calibration)."""
        adapter_dir, _ = self.adapter(adapter)
        key = cache.content_key("int4-bench-model", export.CODE_VERSION, cache.library_versions(*EXPORT_LIBRARIES),
                                adapter_dir.name, spec)
        out = self.root / "models" / key
        if not (out / "genai_config.json").is_file():
            with tempfile.TemporaryDirectory(dir=self.root) as work:
                source = merge_adapter(self.base, adapter_dir, Path(work) / "merged")
                start = time.perf_counter()
                if spec.prequantized:
                    source = prequantize(source, Path(work) / "prequantized", spec, self.calibration_samples())
                seconds = time.perf_counter() - start
                with cache.atomic_dir(out) as tmp:
                    export_model(source, tmp, spec, work_dir=Path(work) / "builder")
                (out / "calibration_seconds.txt").write_text(f"{seconds:.1f}")
        return out, float((out / "calibration_seconds.txt").read_text())

    def calibration_samples(self) -> list[list[int]]:
        return train.calibration_samples(self.splits, train.load_tokenizer(self.base))

    def accuracy(self, model_dir: Path) -> tuple[float, int, str]:
        """Test accuracy, n, and the per-prompt marks ("1" right, "0" wrong) for paired comparisons."""
        prompts, answers = self.splits.prompts("test")
        key = cache.content_key("int4-bench-measure", MEASURE_VERSION, cache.library_versions(*MEASURE_LIBRARIES),
                                model_dir.name, prompts, answers)
        path = self.root / "measurements" / f"{key}.json"
        if not path.is_file():
            result = measure(model_dir, prompts, answers, self.splits.labels, threads=self.threads, latency=None)
            cache.atomic_write_text(path, json.dumps({"accuracy": result.accuracy.accuracy, "n": result.accuracy.n,
                                                      "marks": result.accuracy.marks}))
        record = json.loads(path.read_text())
        return record["accuracy"], record["n"], record["marks"]


def two_se_unpaired(a: list[float], b: list[float]) -> float:
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return 2 * math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))


def two_se_paired(a: list[float], b: list[float]) -> float:
    diffs = [x - y for x, y in zip(a, b)]
    return 2 * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-seeds", type=int, default=5)
    parser.add_argument("--emotion-seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", choices=("all", "fp32", "bf16"), default="all",
                        help="build every row, or only the fp32-trained or the bf16-trained ones (tables need all)")
    parser.add_argument("--bf16-seeds", type=int, default=3,
                        help="seeds (the first of each dataset) that also train the plain adapter in bf16")
    parser.add_argument("--emotion", type=Path, default=EMOTION, help="the emotion data's train.txt (text;label lines)")
    args = parser.parse_args()
    root = cache.cache_root() / "bench-int4"
    base = resolve_model(None)
    datasets = [("demo", DataConfig(), args.demo_seeds)]
    if args.emotion_seeds:
        if not args.emotion.is_file():
            raise SystemExit(f"--emotion {args.emotion}: no such file; point it at the emotion data's train.txt")
        datasets.append(("emotion", DataConfig(path=str(args.emotion), delimiter=";", columns=("text", "label"),
                                               max_per_label=250, label_map=LABEL_MAP), args.emotion_seeds))
    for name, config, seeds in datasets:
        if not seeds:
            continue
        splits = load_splits(config)
        table: dict[str, list[float]] = {row: [] for row in ROWS}
        extra: dict[str, list[float]] = {row: [] for row in ROWS}
        n = 0
        bf16: dict[str, list[tuple[str, str]]] = {row: [] for row in BF16_ROWS}  # (fp32 marks, bf16 marks) per seed
        for seed in range(seeds):
            bench = Bench(root, base, splits, name, seed, args.steps, args.threads)
            marks: dict[str, str] = {}
            if args.rows != "bf16":
                plain_s = bench.adapter("plain")[1]
                for row, (adapter, spec) in ROWS.items():
                    model_dir, calibration_s = bench.model(adapter, spec)
                    accuracy, n, marks[row] = bench.accuracy(model_dir)
                    table[row].append(accuracy)
                    extra[row].append(calibration_s + (bench.adapter(adapter)[1] - plain_s if adapter == "aware" else 0.0))
                    print(f"{name} seed {seed} {row}: {accuracy:.3f} (n={n})", flush=True)
            if seed < args.bf16_seeds and args.rows != "fp32":
                for row, (adapter, spec) in BF16_ROWS.items():
                    accuracy, n, bf16_marks = bench.accuracy(bench.model(adapter, spec)[0])
                    if row in marks:
                        bf16[row].append((marks[row], bf16_marks))
                    fp32_s = f", fp32 {plain_s:.0f} s" if marks else ""
                    print(f"{name} seed {seed} {row}, bf16 training: {accuracy:.3f} (n={n}; training "
                          f"{bench.adapter(adapter)[1]:.0f} s{fp32_s})", flush=True)
        if args.rows == "bf16":
            continue
        int8, rtn = table["int8 (plain adapter)"], table["int4 rtn"]
        print(f"\n{name}: SmolLM2-135M, LoRA r16/a32, {args.steps} steps of batch 8, lr 1e-3; {seeds} seeds; "
              f"test n={n}; {args.threads} thread(s)")
        print(f"| method | mean | range | - plain int8 | - rtn int4 | 2 SE (unpaired / paired) | extra s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for row, values in table.items():
            mean = statistics.mean(values)
            print(f"| {row} | {mean:.3f} | {min(values):.3f}-{max(values):.3f} | {mean - statistics.mean(int8):+.3f} "
                  f"| {mean - statistics.mean(rtn):+.3f} | {two_se_unpaired(values, rtn):.3f} / {two_se_paired(values, rtn):.3f} "
                  f"| {statistics.mean(extra[row]):.0f} |")
        print()
        if any(bf16.values()):
            print_bf16(name, bf16, n)


def print_bf16(name: str, pairs: dict[str, list[tuple[str, str]]], n: int) -> None:
    """bf16-trained minus fp32-trained, paired on the same seed and the same test prompts."""
    seeds = len(next(iter(pairs.values())))
    print(f"{name}: bf16 training - fp32 training, the plain adapter, {seeds} paired seed(s), test n={n} each")
    print("| export | fp32 mean | bf16 mean | mean diff [95% t, seeds] | per seed: diff [paired 95%] (McNemar p) |")
    print("|---|---:|---:|---:|---|")
    for row, seed_pairs in pairs.items():
        # each seed's bf16 adapter against its fp32 one, prompt by prompt (autotune.selection's paired test)
        paired = [compare(Candidate(1, bf16, 0.0, None), Candidate(0, fp32, 0.0, None)) for fp32, bf16 in seed_pairs]
        diffs = [p.diff for p in paired]
        cells = [f"{p.diff:+.3f} [{p.interval[0]:+.3f}, {p.interval[1]:+.3f}] ({p.p_value:.2f})" for p in paired]
        mean = statistics.mean(diffs)
        half = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
        accuracy = [statistics.mean(m.count("1") / len(m) for m in side) for side in zip(*seed_pairs)]
        print(f"| {row} | {accuracy[0]:.3f} | {accuracy[1]:.3f} | {mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}] "
              f"| {'; '.join(cells)} |")
    print()


if __name__ == "__main__":
    main()
