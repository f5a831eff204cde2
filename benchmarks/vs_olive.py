"""One candidate beside Microsoft Olive's LoRA -> merge -> int4 workflow, on the same data and budget.

    python benchmarks/vs_olive.py                                 # autotune at the issue's budget, seed 0
    python benchmarks/vs_olive.py --seeds 0 1 2 --baseline-code /work/main   # and an older checkout, interleaved
    python benchmarks/vs_olive.py --steps 20                      # a quick look
    python benchmarks/vs_olive.py --seeds 0 1 2 --baseline-code OLD      # accuracy against an older checkout, 3 seeds
    python benchmarks/vs_olive.py --pass-tokens 0                         # this checkout, each step in one pass

Setup (issue 13): SmolLM2-135M-Instruct, LoRA r16 / alpha 32 on all linear layers, 150 steps of batch 8,
lr 3e-4, int4 export (block 32, accuracy level 4); 600 balanced training phrases of the public emotion data
(CARER, ``text;label`` lines; sadness/joy/fear/surprise renamed Sad/Joy/Fear/Surprise), scored by greedy
generation on 160 test phrases. The data is read at run time from ``--data`` (default
``../shared/data/emotion/train.txt`` beside this checkout); it is never copied into the repository.
autotune's stratified splitter takes 250 rows per label: 150 train / 50 validation / 50 test per label, and
``--max-eval 160`` scores the first 160 test phrases.

Each autotune run is ``autotune candidate --no-baseline --json`` in a fresh output folder (nothing cached),
run the way a user runs it. Wall is the command's, CPU the user + system seconds of its process tree (less
sensitive than wall to other work on a shared machine); peak RSS is the largest sum of resident memory over the
command's whole process tree (sampled every 50 ms), so a stage moved into a child process still counts;
tokens/s counts the real (unpadded) tokens of the 150 x 8 training examples over the training seconds.

Olive is not a dependency. Its figures below were recorded on 2026-11-28 on 2-core machines of this project
(Olive 0.13 with onnxruntime-genai 0.14.1, the only genai version its chain ran with; 2 threads; one run after
the other), from the same HF folder autotune converts SmolLM2 into, and scored on the same 160 test phrases.
They are printed for context, as recorded, and no ratio is taken to them.
The figures were recorded without their config file; this reproduces the setup issue 13 describes
(the cookbook's LoRA -> MergeAdapterWeights -> ModelBuilder chain with the issue's hyper-parameters)::

    pip install olive-ai==0.13.* onnxruntime-genai==0.14.1
    olive run --config olive_lora_int4.json

    {"input_model": {"type": "HfModel", "model_path": "<the smollm2 HF folder in autotune's cache>"},
     "data_configs": [{"name": "train", "type": "HuggingfaceContainer",
        "load_dataset_config": {"data_name": "json", "data_files": "train600.jsonl", "split": "train"},
        "pre_process_data_config": {"strategy": "join", "max_seq_len": 96,
                                    "text_template": "### Text: {text}\\n### The tone is:\\n{label}"}}],
     "passes": {"lora": {"type": "LoRA", "r": 16, "alpha": 32, "train_data_config": "train",
                         "training_args": {"max_steps": 150, "per_device_train_batch_size": 8,
                                           "learning_rate": 3e-4, "gradient_checkpointing": true}},
                "merge": {"type": "MergeAdapterWeights"},
                "builder": {"type": "ModelBuilder", "precision": "int4"}},
     "output_dir": "olive-out"}

``max_seq_len`` 96 gives the issue's 768 tokens per step (8 x 96); without it Olive joins into 1024-token rows,
33x autotune's tokens per step (~86 s per step here). Add ``"systems"`` with a LocalSystem on
``CPUExecutionProvider`` and ``"host"``/``"target"`` naming it to pin the CPU. ``train600.jsonl`` holds the 600
training phrases autotune trains on (``{"text": ..., "label": ...}`` lines; write them from ``load_splits`` with
the flags above). "line-by-line" is the same config with
``"strategy": "line-by-line"``. The int4 model is scored with autotune's ``measure()`` on the 160 test phrases.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "emotion" / "train.txt"
LABEL_MAP = "sadness=Sad,joy=Joy,fear=Fear,surprise=Surprise"
# Olive 0.13's cookbook workflow as recorded on 2026-11-28 (wall s, peak RSS GiB, train s, int4 accuracy). Not
# measured by this script, and never divided into: a ratio is only honest when both sides ran in one sitting.
OLIVE = {
    'Olive 0.13, "join" data (cookbook), Intel Xeon': (582, 2.15, 569, 0.356),
    "Olive 0.13, line-by-line, Intel Xeon": (366, 2.11, 350, 0.037),
    'Olive 0.13, "join", max_seq_len 96, AMD EPYC (Zen 4)': (553, 2.35, 530, 0.338),
    # The same configuration again that afternoon (Olive's training is not bit-reproducible).
    'Olive 0.13, "join", max_seq_len 96, AMD EPYC (Zen 4), 17:21': (529, 2.35, 510, 0.281),
}


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_candidate(code: Path, data: Path, steps: int, seed: int, threads: int, out: Path, extra: list[str]) -> dict:
    """``autotune candidate`` from the checkout ``code``: its JSON record plus wall and peak tree RSS."""
    command = [sys.executable, "-m", "autotune.cli", "candidate", "--no-baseline", "--json",
               "--data", str(data), "--delimiter", ";", "--columns", "text,label", "--label-map", LABEL_MAP,
               "--max-per-label", "250", "--max-eval", "160", "--rank", "16", "--alpha", "32", "--lr", "3e-4",
               "--steps", str(steps), "--batch-size", "8", "--precision", "int4", "--seed", str(seed),
               "--threads", str(threads), "-o", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(code), "TRANSFORMERS_VERBOSITY": "error"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = psutil.Popen(command, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the whole tree's CPU time, less sensitive to load than wall
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"{code}: autotune candidate failed:\n{stderr[-3000:]}")
    record = json.loads(stdout[stdout.index("{"):])["candidate"]
    return {"wall": wall, "cpu": cpu, "peak_gib": peak / 2**30, "train": record["train_seconds"],
            "accuracy": record["measurement"]["accuracy"], "stages": record["stage_seconds"]}


def emotion_config(data: Path):
    """The :class:`DataConfig` the command-line flags of :func:`run_candidate` describe."""
    from autotune.data import DataConfig

    return DataConfig(path=str(data), delimiter=";", columns=("text", "label"), max_per_label=250,
                      label_map=tuple(tuple(pair.split("=")) for pair in LABEL_MAP.split(",")))


def training_tokens(data: Path, steps: int, seed: int) -> int:
    """Real (unpadded) tokens of the examples the run trains on: the same batches autotune draws."""
    from autotune.data import load_splits
    from autotune.models import resolve_model
    from autotune.train import _batches, encode_example, load_tokenizer

    splits = load_splits(emotion_config(data))
    tokenizer = load_tokenizer(resolve_model(None))
    lengths = [len(encode_example(e, tokenizer, False)[0]) for e in splits.train]
    return sum(lengths[i] for batch in _batches(len(lengths), 8, steps, seed) for i in batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2, help="training and measuring threads (default: 2, as Olive's)")
    parser.add_argument("--data", type=Path, default=DATA, help="the emotion data's train.txt (text;label lines)")
    parser.add_argument("--baseline-code", type=Path, help="another checkout of autotune to run interleaved, e.g. main")
    parser.add_argument("--batching", choices=["padded", "packed"], help="this checkout's --batching (default: its own)")
    parser.add_argument("--pass-tokens", type=int, help="this checkout's --pass-tokens (default: its own)")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"--data {args.data}: no such file; point it at the emotion data's train.txt")
    codes = {"autotune (this checkout)": ROOT}
    if args.baseline_code:
        codes = {f"autotune ({args.baseline_code})": args.baseline_code.resolve(), **codes}
    sys.path.insert(0, str(ROOT))
    rows: dict[str, list[dict]] = {name: [] for name in codes}
    print(f"load before: {os.getloadavg()}", flush=True)
    for seed in args.seeds:
        tokens = training_tokens(args.data, args.steps, seed)
        for name, code in codes.items():  # interleaved: each seed runs every checkout back to back
            with tempfile.TemporaryDirectory() as tmp:
                extra = []
                if code == ROOT:
                    extra += ["--batching", args.batching] if args.batching else []
                    extra += ["--pass-tokens", str(args.pass_tokens)] if args.pass_tokens is not None else []
                run = run_candidate(code, args.data, args.steps, seed, args.threads, Path(tmp) / "out", extra)
            run["tokens_per_s"] = tokens / run["train"]
            rows[name].append(run)
            acc = run["accuracy"]
            print(f"seed {seed} {name}: wall {run['wall']:.0f} s, CPU {run['cpu']:.0f} s, peak {run['peak_gib']:.2f} GiB, train {run['train']:.0f} s, "
                  f"{run['tokens_per_s']:.0f} tokens/s, int4 accuracy {acc['accuracy']:.3f} (n={acc['n']}), "
                  f"stages {json.dumps({k: round(v, 1) for k, v in run['stages'].items()})}, load {os.getloadavg()[0]:.1f}",
                  flush=True)
    print(f"\nSmolLM2-135M, LoRA r16/a32, {args.steps} steps of batch 8, lr 3e-4, int4; {args.threads} threads; "
          f"seeds {args.seeds}; load after: {os.getloadavg()}")
    print(f"{'':<44}{'wall s':>8}{'peak RSS GiB':>14}{'train s':>9}{'tokens/s':>10}{'int4 accuracy':>15}")
    for name, (wall, peak, train, acc) in OLIVE.items():
        print(f"{name:<44}{wall:>8}{peak:>14.2f}{train:>9}{'':>10}{acc:>15.3f}   (recorded 2026-11-28, not this run)")
    for name, runs in rows.items():
        mean = lambda key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
        accs = [r["accuracy"]["accuracy"] for r in runs]
        spread = f" ({min(accs):.3f}-{max(accs):.3f})" if len(accs) > 1 else ""
        print(f"{name:<44}{mean('wall'):>8.0f}{max(r['peak_gib'] for r in runs):>14.2f}{mean('train'):>9.0f}"
              f"{mean('tokens_per_s'):>10.0f}{sum(accs) / len(accs):>15.3f}{spread}")


if __name__ == "__main__":
    main()
