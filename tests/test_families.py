"""Every family the builder exports, through autotune's own run_candidate, on tiny random models.

Each family gets a tokenizer that behaves like its own (tests/families.py): the tokenization checks are
about what those tokenizers do (a BOS the chat template writes too, SentencePiece's "▁" before a label).
The fast tier builds and measures LoRA + rtn int4 of every family and checks its tokenization; the rest of
the int4 options (GPTQ, asymmetric, int4-aware, QLoRA with GPTQ, the int8 head) run in the slow tier,
reusing each family's adapter through the workspace cache.
"""

from __future__ import annotations

import json

import pytest

from autotune.candidate import CandidateSpec, Workspace, run_candidate
from autotune.capabilities import check_exportable, limits
from autotune.data import DataConfig, load_splits, render_prompt
from autotune.errors import UserError
from autotune.export import ExportSpec
from autotune.measure import LatencySettings, normalize_answer
from autotune.models import resolve_model
from autotune.space import SearchSpace
from autotune.train import TrainSpec, encode_example
from conftest import run_cli
from families import FAMILIES, FAMILY_TOKENIZER

EXPORTED = [family for family in FAMILIES if family != "gemma3"]  # builder 0.18 cannot export Gemma 3 (see below)
LORA = TrainSpec(rank=4, alpha=8.0, steps=2, batch_size=4, learning_rate=1e-3)
OPTIONS = {
    "gptq": CandidateSpec(LORA, ExportSpec("int4", calibration="gptq", calibration_samples=8)),
    "asymmetric": CandidateSpec(LORA, ExportSpec("int4", symmetric=False)),
    "int4-aware": CandidateSpec(TrainSpec(**{**LORA.__dict__, "int4_aware": True}), ExportSpec("int4")),
    "qlora-gptq": CandidateSpec(TrainSpec(**{**LORA.__dict__, "method": "qlora"}),
                                ExportSpec("int4", calibration="gptq", calibration_samples=8)),
    "int8-head": CandidateSpec(LORA, ExportSpec("int4", int8_layers="last")),
}


@pytest.fixture(scope="module")
def workspace(family_model, tiny_dataset, tmp_path_factory):
    """``workspace(family, chat_template=False)``: one Workspace per family (its own tokenizer), kept for the
    module, so the options of a family share its adapter through the cache."""
    made: dict[tuple[str, bool], Workspace] = {}

    def get(family: str, chat_template: bool = False) -> Workspace:
        if (family, chat_template) not in made:
            base = resolve_model(str(family_model(family, FAMILY_TOKENIZER[family])))
            splits = load_splits(DataConfig(path=str(tiny_dataset), chat_template=chat_template))
            made[family, chat_template] = Workspace(
                root=tmp_path_factory.mktemp(f"ws-{family}"), base=base, splits=splits, threads=1, train_threads=1,
                max_eval=4, latency=LatencySettings(warmup=0))
        return made[family, chat_template]

    return get


@pytest.fixture(scope="module")
def rtn(workspace):
    """``rtn(family)``: the measured LoRA + rtn int4 candidate of a family (built once)."""
    built = {}

    def get(family: str):
        if family not in built:
            built[family] = run_candidate(workspace(family), CandidateSpec(LORA, ExportSpec("int4")), with_latency=False)
        return built[family]

    return get


@pytest.mark.parametrize("family", EXPORTED)
def test_lora_rtn_int4_is_exported_and_measured(family, workspace, rtn):
    """Gemma 2's measuring generator keeps a KV cache of its sliding window (the runtime refuses less)."""
    ws, result = workspace(family), rtn(family)
    accuracy = result.measurement.accuracy
    assert accuracy.n == 4 and sorted(ws.prompts("validation")[1]) == sorted(ws.splits.labels)  # balanced --max-eval
    window = json.loads((result.model_dir / "genai_config.json").read_text())["model"]["decoder"].get("sliding_window")
    assert bool(window) == family.startswith("gemma")
    restricted = run_candidate(ws, result.spec, with_latency=False, restrict_to_labels=True).measurement.accuracy
    assert restricted.n == 4 and restricted.invalid == 0  # each answer is a label, scored by its ids in context


@pytest.mark.parametrize("chat_template", [False, True], ids=["template", "chat"])
@pytest.mark.parametrize("family", EXPORTED)
def test_training_targets_are_what_a_right_answer_generates(family, chat_template, workspace, rtn):
    """What training puts before the answer is what the runtime's tokenizer makes of the prompt (one BOS, never
    two); the answer is the label's ids as they follow the prompt, then an EOS the runtime stops at; the
    runtime's tokenizer makes exactly those ids of the prompt followed by the label; the label-restricted
    baseline scores those same ids."""
    import onnxruntime_genai as og

    ws = workspace(family, chat_template)
    tokenizer = ws.tokenizer()
    model_dir = rtn(family).model_dir  # its tokenizer files are what every export of this family ships
    runtime = og.Tokenizer(og.Model(str(model_dir)))
    runtime.update_options(add_special_tokens="true")  # as the measuring child does
    stops = json.loads((model_dir / "genai_config.json").read_text())["model"]["eos_token_id"]
    stops = stops if isinstance(stops, list) else [stops]
    prompts, answers = ws.prompts("validation")
    restricted = ws.label_ids("validation")
    for example, prompt, answer, scored in zip(ws.splits.examples("validation", 4), prompts, answers, restricted):
        assert prompt == render_prompt(example.prompt, tokenizer, chat_template)
        ids, targets = encode_example(example, tokenizer, chat_template)
        cut = targets.count(-100)
        prompt_ids, label_ids, eos = ids[:cut], ids[cut:-1], ids[-1]
        assert [int(t) for t in runtime.encode(prompt)] == prompt_ids
        assert prompt_ids[:2] != [tokenizer.bos_token_id] * 2
        whole = [int(t) for t in runtime.encode(prompt + answer)]
        if whole[:cut] == prompt_ids:  # the label in context: as the runtime tokenizes it after the prompt
            assert whole == prompt_ids + label_ids
        else:  # the prompt's end merges with the label's start (byte-level BPE after "\n\n"): the label's own ids
            assert label_ids == tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert normalize_answer(runtime.decode(label_ids), ws.splits.labels) == answer
        assert eos in stops
        assert scored[ws.splits.labels.index(answer)] == label_ids
    if family in ("mistral", "phi3") and not chat_template:  # SentencePiece: after a newline, no word-start "▁"
        alone = tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_ids_to_tokens(alone)[0].startswith("▁") and label_ids != alone


@pytest.mark.slow
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("family", EXPORTED)
def test_every_family_takes_every_int4_option(family, option, workspace):
    """LoRA and QLoRA; GPTQ, asymmetric, int4-aware and the int8 head: each exported and measured."""
    result = run_candidate(workspace(family), OPTIONS[option], with_latency=False)
    assert result.measurement.accuracy.n == 4
    assert result.spec.int4_method == {"gptq": "gptq", "qlora-gptq": "gptq", "int4-aware": "int4-aware"}.get(option, "rtn")


def test_gemma3_is_refused_before_any_work(family_model):
    """Builder 0.18 cannot read Gemma 3's RoPE settings as transformers 5.24 gives them: one line, at the start."""
    base = resolve_model(str(family_model("gemma3", "gemma")))
    with pytest.raises(UserError, match=r"cannot export this Gemma3ForCausalLM .*RoPE.*choose a model of another family"):
        check_exportable(base)
    check_exportable(resolve_model(str(family_model("gemma2", "gemma"))))  # its sibling exports


def test_what_a_model_cannot_take_leaves_the_space(tmp_path, tiny_dataset):
    """Phi-2's dense/fc1/fc2 have no pre-quantized int4 layout (GPTQ and asymmetric int4 go); the space drops
    exactly those, and says why. A Llama with an MLP width of 96 takes everything (bitsandbytes 0.50's CPU 4-bit
    trains such widths)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

    from families import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    vocab = len(tokenizer)
    sizes = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    PhiForCausalLM(PhiConfig(intermediate_size=128, **sizes)).save_pretrained(tmp_path / "phi2")
    LlamaForCausalLM(LlamaConfig(intermediate_size=96, **sizes)).save_pretrained(tmp_path / "odd")
    for name in ("phi2", "odd"):
        tokenizer.save_pretrained(tmp_path / name)
    phi2, odd = (resolve_model(str(tmp_path / name)) for name in ("phi2", "odd"))
    check_exportable(phi2)  # the builder takes Phi-2: only the options are dropped, not the model
    assert {(limit.option, limit.value) for limit in limits(phi2)} == {("int4_method", "gptq"), ("symmetric", False)}
    assert "mlp.fc1" in limits(phi2)[0].reason or "dense" in limits(phi2)[0].reason
    assert limits(odd) == ()
    space = SearchSpace.from_dict({"method": ["lora", "qlora"], "int4_method": ["rtn", "gptq", "int4-aware"],
                                   "symmetric": [True, False], "precision": ["int4", "int8"]})
    drop = [(limit.option, limit.value, limit.reason) for limit in (*limits(phi2), *limits(odd))]
    narrowed = space.restrict(("int4", "int8"), True, "cpu", drop=drop)
    assert narrowed.int4_method.values == ("rtn", "int4-aware") and narrowed.symmetric.values == (True,)
    assert narrowed.method.values == ("lora", "qlora")
    assert f"int4_method gptq dropped: {limits(phi2)[0].reason}" in narrowed.notes  # the search prints each note
    with pytest.raises(UserError, match="offers only 'gptq', which this model cannot take"):
        SearchSpace.from_dict({"int4_method": ["gptq"]}).restrict(("int4",), True, "cpu", drop=drop)
    smollm2_tokenizer().save_pretrained(tmp_path / "phi2")  # one candidate asking for it: refused before training
    proc = run_cli("candidate", "--model", str(tmp_path / "phi2"), "--data", str(tiny_dataset), "--int4-method", "gptq",
                   "--steps", "1", "--threads", "1", "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and "error: this model cannot take --int4-method gptq: no pre-quantized int4 layout for " \
        "model.layers.0.mlp.fc1.weight" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "cache" / "adapters").exists()


def test_on_cuda_a_tied_model_drops_the_int4_blocks_its_embedding_rows_hold_an_odd_number_of(tmp_path):
    """onnxruntime's CUDA kernel for an int4 embedding shared with the LM head misreads zero points when a row has an
    odd number of blocks (SmolLM2 at blocks of 64 on an H200: 0.301 against 0.699); the CPU reads them right."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from autotune.capabilities import check_candidate
    from families import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    sizes = dict(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=128, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    for name, tied in (("tied", True), ("untied", False)):
        LlamaForCausalLM(LlamaConfig(tie_word_embeddings=tied, **sizes)).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    tied, untied = (resolve_model(str(tmp_path / name)) for name in ("tied", "untied"))
    found = limits(tied, "cuda")  # 192 = 3 blocks of 64 (odd), 6 of 32 and 12 of 16 (even); 128 and 256 do not divide
    assert [(limit.option, limit.value) for limit in found] == [("block_size", 64)]
    assert "odd number of blocks (192 / 64 = 3)" in found[0].reason
    assert limits(tied, "cpu") == () and limits(untied, "cuda") == ()
    narrowed = SearchSpace.from_dict({"block_size": [16, 32, 64], "precision": ["int4"]}).restrict(
        ("int4",), False, "cuda", widths=(192, 128), drop=[(f.option, f.value, f.reason) for f in found])
    assert narrowed.block_size.values == (16, 32) and any(n.startswith("block_size 64 dropped: ") for n in narrowed.notes)
    with pytest.raises(UserError, match="this model cannot take --block-size 64: onnxruntime's CUDA kernel"):
        check_candidate(tied, CandidateSpec(TrainSpec(steps=1), ExportSpec("int4", "cuda", block_size=64)))
    check_candidate(tied, CandidateSpec(TrainSpec(steps=1), ExportSpec("int4", "cuda", block_size=32)))
    check_candidate(tied, CandidateSpec(TrainSpec(steps=1), ExportSpec("int4", "cpu", block_size=64)))
