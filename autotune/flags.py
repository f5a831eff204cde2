"""The flags of each command: one argparse parser per subcommand, and the groups they share."""

from __future__ import annotations

import argparse

from autotune import bounds
from autotune.measure import LATENCY_METRICS

DEFAULT_OUTPUT = "autotune-out"


def _add_model_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="base model: a local HF folder, a .gguf file or a hub id (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--data", default="demo", help="dataset: .jsonl, .json or .csv/.txt (default: the embedded tone demo)")
    g.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    g.add_argument("--label-column", default="label", help="column holding the label (default: label)")
    g.add_argument("--columns", help="names for the columns of a CSV without a header, e.g. text,label")
    g.add_argument("--delimiter", help="CSV delimiter, e.g. ';' (default: sniffed from the first line)")
    g.add_argument("--template", help="prompt template ending with {label} (default: '### Text: {text}\\n### The tone is:\\n{label}')")
    g.add_argument("--chat-template", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--label-map", help="rename and select labels, e.g. sadness=Sad,joy=Joy (unmapped labels are dropped)")
    g.add_argument("--max-per-label", type=int, help="use at most N rows per label")
    g.add_argument("--max-eval", type=int, help="score on at most N prompts of each split, the labels balanced (default: all)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation/test split (default: 0)")
    s = p.add_argument_group("hardware and safety")
    s.add_argument("--target", default="auto", metavar="{auto,cpu,cuda,dml}",
                   help="where the model will run: auto picks the best profile that runs here; cpu, cuda (NVIDIA "
                   "GPU, needs onnxruntime-genai-cuda) or dml (Windows, DirectML) ask for one (default: auto)")
    s.add_argument("--profile", help="a hardware profile by name, e.g. cpu for fp32 training on a CPU that "
                   "cpu-bf16 would get (default: the best that runs here; `autotune profile` shows it)")
    s.add_argument("--threads", type=int, help="CPU threads for training and measuring (default: the cores free now)")
    s.add_argument("--measure-timeout", type=float, help="stop measuring a candidate after this many seconds (default: "
                   "from the exported model's size and the number of prompts)")
    s.add_argument("--output", "-o", default=DEFAULT_OUTPUT, help=f"output folder (default: {DEFAULT_OUTPUT})")
    s.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code to run (off by default)")
    s.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (off by default: safetensors only)")


def search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autotune",
        description="Search LoRA/QLoRA fine-tunes and onnxruntime-genai exports for the most accurate model "
        "that meets latency, size and memory bounds on this hardware. Subcommands: candidate, profile, dashboard, worker, select "
        "(autotune SUBCOMMAND --help).",
    )
    _add_model_data_args(p)
    g = p.add_argument_group("search")
    bounds.add_arguments(g)  # --max-latency, --max-size, --max-memory
    g.add_argument("--latency-metric", default="request", choices=list(LATENCY_METRICS),
                   help="request (tokenize, prefill, generation to the stop, decode), ttft (time to first token) "
                   "or token (per-token decode); p50 across prompts (default: request)")
    g.add_argument("--trials", type=int, default=6, help="candidates to evaluate in all, counting a resumed study's "
                   "(default: 6, about 10 min for SmolLM2 on 2 CPU cores; the search may stop earlier when the rest "
                   "could not take a new adapter to the top rung)")
    g.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    g.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "random"], help="constrained multivariate TPE (default), NSGA-II or random")
    g.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    g.add_argument("--space", help="search space YAML (default: search_spaces/default.yaml)")
    g.add_argument("--storage", help="Optuna storage URL (default: sqlite in the output folder)")
    g.add_argument("--study", default="autotune", help="study name (default: autotune)")
    g.add_argument("--artifacts", help="folder for adapters and exported models that all workers reach (default: OUTPUT/cache)")
    g.add_argument("--keep-all", action="store_true", help="keep every candidate's model folder, not only the Pareto front's")
    g.add_argument("--no-siblings", action="store_true", help="do not export the best adapter at the space's other "
                   "precisions and int4 methods (every adapter is still exported the screening way, int8 on a CPU)")
    g.add_argument("--select", default="smallest-tied", choices=["smallest-tied", "most-accurate"],
                   help="how the model is chosen: smallest-tied (default) ships the smallest, then the fastest, of the "
                   "feasible candidates not significantly less accurate than the most accurate one (paired on the "
                   "validation prompts); most-accurate ships the most accurate one")
    _add_per_profile(g)
    return p


def _add_per_profile(p) -> None:
    p.add_argument("--per-profile", action="store_true",
                   help="if this machine's hardware (profile, device, measuring threads) differs from the study's, "
                   "use the study STUDY@HARDWARE instead of refusing")


def candidate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autotune candidate",
        description="Build one candidate (fine-tune, merge, export with the onnxruntime-genai builder) and "
        "measure it with onnxruntime-genai, beside the zero-shot base at the same precision.",
    )
    _add_model_data_args(p)
    t = p.add_argument_group("training")
    t.add_argument("--method", default="lora", choices=["lora", "qlora"], help="LoRA, or QLoRA on an nf4 base (default: lora)")
    t.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    t.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    t.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05)")
    t.add_argument("--lr", type=float, default=3e-4, help="learning rate (default: 3e-4)")
    t.add_argument("--steps", type=int, default=150, help="optimizer steps (default: 150)")
    t.add_argument("--batch-size", type=int, default=8, help="batch size (default: 8)")
    t.add_argument("--target-modules", default="all-linear", choices=["all-linear", "attention", "mlp"], help="layers that get LoRA (default: all-linear)")
    t.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    t.add_argument("--batching", default="packed", choices=["packed", "padded"],
                   help="a step's examples packed into one row without padding, or padded rows: the same training "
                        "(default: packed)")
    t.add_argument("--pass-tokens", type=int, default=256,
                   help="run a step in parts of at most this many tokens: the same gradients, less memory; "
                        "0 runs each step in one pass (default: 256)")
    t.add_argument("--step-groups", type=int, default=2,
                   help="cut each step into this many groups of examples whose gradients are summed in order; with 2+ "
                        "CPU threads they run at once (default: 2; 1: one after the other)")
    e = p.add_argument_group("export")
    e.add_argument("--precision", default="int4", choices=["fp32", "fp16", "bf16", "int8", "int4"], help="export precision (default: int4)")
    e.add_argument("--block-size", type=int, default=32, help="int4/int8 block size (default: 32)")
    e.add_argument("--accuracy-level", type=int, default=4, help="int4/int8 MatMul accuracy level: 0 builder default, 1 fp32 .. 4 int8 (default: 4)")
    e.add_argument("--algo", default="default", choices=["default", "rtn", "k_quant"], help="int4 rounding algorithm (default: default)")
    e.add_argument("--int4-method", default="rtn", choices=["rtn", "int4-aware", "gptq"], help="rtn: the builder rounds; "
                   "int4-aware: train against that rounding; gptq: int4 weights calibrated on the training data (default: rtn)")
    e.add_argument("--asymmetric", action="store_true", help="int4 with a zero point per block (default: symmetric)")
    e.add_argument("--int8-layers", default="none", choices=["none", "last", "mixed"], help="keep the LM head (last) or "
                   "also llama.cpp's sensitive layers (mixed) at int8 in an int4 model (default: none)")
    o = p.add_argument_group("output")
    o.add_argument("--split", default="validation", choices=["validation", "test"],
                   help="split to score on (default: validation; test only to report a final choice)")
    o.add_argument("--no-baseline", action="store_true", help="skip the three baselines (the majority class, the base "
                   "told the labels in an instruction, and the base with its answer restricted to the labels)")
    o.add_argument("--json", action="store_true", help="print the measured record as JSON on stdout")
    return p


def profile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autotune profile", description="Show the detected hardware and the profile chosen for --target.")
    p.add_argument("--target", default="auto", metavar="{auto,cpu,cuda,dml}",
                   help="auto, cpu, cuda or dml (default: auto)")
    p.add_argument("--profile", help="show this hardware profile by name instead of the best that runs here")
    p.add_argument("--json", action="store_true", help="print as JSON")
    return p


def worker_parser(prog: str, description: str, worker: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--storage", required=True, help="the study's Optuna storage URL, e.g. postgresql://user:pass@host/db")
    p.add_argument("--study", default="autotune", help="study name (default: autotune)")
    p.add_argument("--artifacts", help="shared folder for adapters and exported models (default: OUTPUT/cache)")
    p.add_argument("--output", "-o", default=DEFAULT_OUTPUT, help=f"local output folder (default: {DEFAULT_OUTPUT})")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores free now)")
    if worker:
        p.add_argument("--trials", type=int, help="override the study's total trial count")
    _add_per_profile(p)
    return p


def dashboard_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autotune dashboard", description="Open the study in optuna-dashboard.")
    p.add_argument("output", nargs="?", default=DEFAULT_OUTPUT, help=f"output folder of a search (default: {DEFAULT_OUTPUT})")
    p.add_argument("--storage", help="Optuna storage URL instead of the output folder's study.db")
    p.add_argument("--artifacts", help="the shared artifacts folder the workers were given (default: OUTPUT/artifacts)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    return p
