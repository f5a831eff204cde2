"""Time and memory as the model grows: one GPTQ int4 candidate per size, each stage predicted and measured.

    python benchmarks/scale.py                        # demo, 135M, 360M and 1B (about 40 min on 2 cores, 5 GB RAM)
    python benchmarks/scale.py --sizes demo 135M      # the small ones (minutes)
    python benchmarks/scale.py --sizes 1B --models /data/scale-models   # keep the built models for the next run

The sizes are random-weight models of one family, Llama with SmolLM2's tokenizer and tied embeddings,
built locally with transformers (nothing downloaded): ``135M`` and ``360M`` have SmolLM2-135M's and
SmolLM2-360M's configs, ``1B`` TinyLlama-1.1B's widths (hidden 2048, MLP 5632, 32 heads, 4 KV heads, 22
layers) with the same vocabulary (1.07B parameters, 4.28 GB in fp32). ``demo`` is the embedded
SmolLM2-135M-Instruct itself, the baseline of GPTQ's time per parameter.

Each size runs one candidate through the pipeline (:func:`autotune.candidate.run_candidate`, the stages a
search runs) in a fresh process: LoRA r16 on every linear layer, ``--steps`` steps of batch 8 on the demo
data, merged, calibrated by GPTQ on 128 training examples (int4, block 32), exported by the builder and
measured on ``--max-eval`` validation prompts, all on one thread. For every stage it prints the wall time
and the peak memory the memory check predicted from the model's config beside the peak measured: the
process's peak RSS during the stage (Linux VmHWM, reset at the stage's start), and the measuring child's
own peak. Last comes a projection, from the same memory model and the measured seconds per parameter,
for Phi-3-mini (3.8B) on a 32 GB laptop CPU and on a 16 GB GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> LlamaConfig fields besides the shared ones (SmolLM2's vocabulary and tokens, tied embeddings)
FAMILY = {
    "135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    "360M": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5),
    "1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
}
SIZES = ("demo", *FAMILY)
STAGES = ("train", "merge", "calibrate", "export", "measure")
# Phi-3-mini-4k-instruct's config (the fields the memory model reads), for the projection.
PHI3_MINI = {"architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "intermediate_size": 8192,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
             "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def build_model(name: str, folder: Path) -> Path:
    """The random-weight model ``name`` of :data:`FAMILY` in ``folder`` (built once; safetensors)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from autotune.cache import atomic_dir
    from autotune.models import _demo_gguf_path

    gguf = _demo_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=8192,
                         rope_theta=100000.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **FAMILY[name])
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # random normal weights (std 0.02, as transformers initialises), norms at one
        for pname, param in model.named_parameters():
            param.normal_(0, 0.02) if param.dim() > 1 else param.fill_(1.0)
    model.tie_weights()
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return folder


def child(size: str, models: Path, steps: int, max_eval: int) -> dict:
    """One candidate of ``size`` through the pipeline, in this process: its stages' seconds and memory."""
    import torch

    from autotune.candidate import CandidateSpec, Workspace, run_candidate
    from autotune.data import DataConfig, load_splits
    from autotune.export import ExportSpec
    from autotune.models import model_shape, resolve_model
    from autotune.train import TrainSpec

    base = resolve_model(None if size == "demo" else str(models / size))
    shape = model_shape(base)
    with tempfile.TemporaryDirectory(prefix="scale-", dir=models) as root:
        ws = Workspace(Path(root), base, load_splits(DataConfig()), threads=1, train_threads=1, max_eval=max_eval)
        spec = CandidateSpec(TrainSpec(steps=steps, warmup_steps=1),
                             ExportSpec("int4", block_size=32, calibration="gptq"))
        starts: dict[str, float] = {}  # CPU seconds of this process when each stage began

        def on_stage(stage: str, fraction: float, detail: str) -> None:
            starts.setdefault(stage, time.process_time())

        start = time.perf_counter()
        result = run_candidate(ws, spec, on_stage=on_stage)
        wall = time.perf_counter() - start
    seconds = dict(result.stage_seconds)
    seconds["measure"] = sum(seconds.pop(k, 0.0) for k in ("load", "warmup", "requests", "accuracy", "latency"))
    order = sorted(starts, key=starts.get)
    # A stage's CPU time runs to the next stage's start; the measuring child's own is not counted here.
    cpu = {stage: starts[after] - starts[stage] for stage, after in zip(order, order[1:])}
    return {"size": size, "parameters": shape.parameters, "fp32_bytes": shape.parameters * 4,
            "threads": torch.get_num_threads(), "wall": wall, "seconds": seconds, "cpu": cpu,
            "memory": {stage: m.to_dict() for stage, m in result.stage_memory.items()},
            "accuracy": result.measurement.accuracy.accuracy}


def projection(rows: dict[str, dict]) -> list[str]:
    """Phi-3-mini's stages by the memory model, and its CPU time from the largest model's seconds per parameter."""
    from autotune.data import DataConfig, load_splits
    from autotune.export import ExportSpec
    from autotune.memory import RUNTIME_BYTES, calibrate_need, export_need, memory_need, merge_need, tokens_per_step
    from autotune.models import BaseModel, model_shape
    from autotune.train import TrainSpec, calibration_samples, load_tokenizer
    from autotune.models import resolve_model

    splits = load_splits(DataConfig())
    lengths = [len(ids) for ids in calibration_samples(splits, load_tokenizer(resolve_model(None)))]
    gib = lambda n: f"{(RUNTIME_BYTES + n) / 2**30:.1f}"  # noqa: E731  (a process's runtime, then the stage)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(PHI3_MINI))
        shape = model_shape(BaseModel("phi3", Path(folder), "Phi3ForCausalLM", "", 0))
        base = BaseModel("phi3", Path(folder), "Phi3ForCausalLM", "", shape.parameters * 2)  # bf16 on disk
        export = ExportSpec("int4", block_size=32, calibration="gptq")
        lines = [f"Phi-3-mini ({shape.parameters / 1e9:.2f}B, {shape.parameters * 4 / 2**30:.1f} GiB fp32), "
                 f"predicted peak GiB (a {RUNTIME_BYTES / 2**30:.1f} GiB runtime included):"]
        for method in ("lora", "qlora"):
            train = TrainSpec(method=method, steps=150)
            tokens = tokens_per_step(splits, train)
            cpu = memory_need(base, train, "float32", tokens, False)
            gpu = memory_need(base, train, "bfloat16", tokens, False)
            lines.append(f"  train {method}: CPU fp32 {gib(cpu)} (checkpointing {gib(memory_need(base, train, 'float32', tokens, True))}),"
                         f" GPU bf16 {gib(gpu)} (checkpointing {gib(memory_need(base, train, 'bfloat16', tokens, True))})")
        lines.append(f"  merge {gib(merge_need(base))}, calibrate (GPTQ) {gib(calibrate_need(base, export, lengths))}, "
                     f"export {gib(export_need(base, export))} (RAM on either machine: the builder runs on the CPU)")
    largest = max(rows.values(), key=lambda r: r["parameters"])
    per_param = {stage: s / largest["parameters"] for stage, s in largest["seconds"].items()}
    minutes = {stage: per_param[stage] * shape.parameters / 60 for stage in per_param}
    lines.append(f"  CPU time at {largest['size']}'s seconds per parameter ({largest['threads']} thread): "
                 + ", ".join(f"{stage} {minutes[stage]:.0f} min" for stage in STAGES if stage in minutes))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument("--models", type=Path, help="where the random models are built and kept (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=5, help="training steps of batch 8 (default: 5)")
    parser.add_argument("--max-eval", type=int, default=16, help="validation prompts measured (default: 16)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.build:
        build_model(args.build, args.models / args.build)
        return
    if args.child:
        print(json.dumps(child(args.child, args.models, args.steps, args.max_eval)))
        return
    with tempfile.TemporaryDirectory(prefix="scale-models-") as scratch:
        models = (args.models or Path(scratch)).resolve()
        models.mkdir(parents=True, exist_ok=True)
        rows = {}
        for size in args.sizes:  # one at a time, each in its own process: no stage inherits another size's memory
            command = [sys.executable, __file__, "--models", str(models)]
            if size != "demo":
                subprocess.run([*command, "--build", size], check=True, capture_output=True)
            proc = subprocess.run([*command, "--child", size, "--steps", str(args.steps), "--max-eval", str(args.max_eval)],
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{size} failed:\n{proc.stderr[-3000:]}")
            rows[size] = json.loads(proc.stdout.strip().splitlines()[-1])
            print_row(rows[size], flush=True)
    print(f"\nload average {os.getloadavg()}")
    if "demo" in rows and "1B" in rows:
        for clock in ("seconds", "cpu"):
            demo, big = (rows[s][clock]["calibrate"] / rows[s]["parameters"] * 1e6 for s in ("demo", "1B"))
            print(f"GPTQ per parameter ({'wall' if clock == 'seconds' else 'CPU'}): demo {demo:.3f} us, "
                  f"1B {big:.3f} us ({big / demo:.2f}x)")
    print("\n".join(projection(rows)))


def print_row(row: dict, flush: bool = False) -> None:
    fp32 = row["fp32_bytes"] / 2**20
    peak = max(m["measured_mb"] for stage, m in row["memory"].items() if stage != "measure")
    print(f"\n{row['size']}: {row['parameters'] / 1e6:.0f}M parameters, fp32 {fp32:.0f} MB, {row['threads']} thread, "
          f"wall {row['wall']:.0f} s, peak RSS {peak:.0f} MB = {peak / fp32:.2f}x fp32, accuracy {row['accuracy']:.3f}")
    print(f"  {'stage':<10}{'wall s':>8}{'CPU s':>8}{'us/param':>10}{'start MB':>10}{'predicted MB':>14}{'measured MB':>13}"
          f"{'error':>8}")
    for stage in STAGES:
        m = row["memory"].get(stage)
        if m is None:
            continue
        seconds = row["seconds"].get(stage, 0.0)
        error = (m["predicted_mb"] - m["measured_mb"]) / m["measured_mb"]
        start = "" if m["start_mb"] is None else f"{m['start_mb']:.0f}"
        cpu = row["cpu"].get(stage)
        cpu = "" if cpu is None else f"{cpu:.1f}"
        print(f"  {stage:<10}{seconds:>8.1f}{cpu:>8}{seconds / row['parameters'] * 1e6:>10.3f}{start:>10}{m['predicted_mb']:>14.0f}"
              f"{m['measured_mb']:>13.0f}{error:>+8.0%}", flush=flush)


if __name__ == "__main__":
    main()
