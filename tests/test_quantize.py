"""int4 grids: quantize_rtn is bit-exact to the builder's int4 export, and write_prequantized ships our int4.

Every comparison is exact (zero mismatches), on a tiny random Llama at hidden 128 whose weights are
rigged with rounding ties, near-ties and corner blocks (all zero, |max| == |min|, one-signed), for
block sizes 16/32/64, symmetric and asymmetric.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from autotune.errors import UserError
from autotune.quantize import Int4Grid, QuantizedWeight, fake_quantize, quantize_rtn, write_prequantized
from conftest import build_tiny_model

GRIDS = [Int4Grid(block, symmetric) for block in (16, 32, 64) for symmetric in (True, False)]
GRID_IDS = [f"b{g.block_size}-{'sym' if g.symmetric else 'asym'}" for g in GRIDS]
LINEARS = [f"model.layers.{i}.{part}" for i in range(2) for part in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
TABLE = "model.embed_tokens"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The machine's other core is busy; torch here and onnxruntime below run on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny128(tmp_path_factory) -> Path:
    """The conftest tiny Llama at hidden 128 (intermediate 256): several blocks per row at every block size."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-128"), hidden=128)


def _rigged(weight: torch.Tensor, grid: Int4Grid, seed: int) -> torch.Tensor:
    """``weight`` with a quarter of each block on rounding ties of ``grid``, a quarter one ulp above, a quarter
    one ulp below, and corner blocks in the first 19 rows: all zero, |max| == |min|, all positive, all
    negative, and asymmetric zero points that land on k + 0.5."""
    gen = torch.Generator().manual_seed(seed)
    blocks = weight.detach().clone().float().reshape(weight.shape[0], -1, grid.block_size)
    blocks[0] = 0.0
    blocks[1, :, 0], blocks[1, :, 1] = 0.25, -0.25
    blocks[2], blocks[3] = blocks[2].abs(), -blocks[3].abs()
    for k in range(15):
        lo, hi = -(2 * k + 1) * 2.0**-8, (29 - 2 * k) * 2.0**-8  # scale 2^-7, zero point exactly k + 0.5
        blocks[4 + k].clamp_(lo, hi)
        blocks[4 + k, :, 0], blocks[4 + k, :, 1] = lo, hi
    grid_now = quantize_rtn(blocks.reshape(weight.shape), grid)
    scale = grid_now.scales.unsqueeze(-1)
    zero = grid_now.zero_points.float().unsqueeze(-1)
    step = torch.randint(0, 15, blocks.shape, generator=gen).float()
    tie = (step + 0.5 - zero) * scale
    kind = torch.randint(0, 4, blocks.shape, generator=gen)
    moved = torch.where(kind == 0, tie, torch.where(kind == 1, torch.nextafter(tie, tie + 1), torch.nextafter(tie, tie - 1)))
    hi, lo = blocks.amax(-1, keepdim=True), blocks.amin(-1, keepdim=True)
    # Keep each block's extremes (they set its scale and zero point) and the corner rows as they are.
    keep = (kind == 3) | (blocks == hi) | (blocks == lo) | (moved > hi) | (moved < lo)
    keep[:19] = True
    return torch.where(keep, blocks, moved).reshape(weight.shape)


def _copy_with_weights(src: Path, dst: Path, replace) -> Path:
    """``src``'s checkpoint with every Linear weight and the embedding table passed through ``replace``."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    tensors = load_file(src / "model.safetensors")
    tensors = {name: replace(name.removesuffix(".weight"), t) if t.dim() == 2 else t for name, t in tensors.items()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for extra in src.iterdir():
        if extra.name != "model.safetensors":
            shutil.copy2(extra, dst / extra.name)
    return dst


def _export(src: Path, out: Path, grid: Int4Grid, accuracy_level: int = 4) -> Path:
    """The builder's int4 CPU export of ``src``, in-process as autotune.export runs it."""
    from onnxruntime_genai.models import builder

    options = [*grid.builder_options(), f"accuracy_level={accuracy_level}", "hf_remote=false"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        extra = builder.parse_extra_options("", str(src), str(out), "int4", "cpu", str(out / "cache"), options)
        builder.create_model("", str(src), str(out), "int4", "cpu", str(out / "cache"), **extra)
    return out


def _unpack(packed: np.ndarray, rows: int) -> torch.Tensor:
    data = torch.from_numpy(packed.copy()).reshape(rows, -1)
    return torch.stack([data & 0xF, data >> 4], -1).reshape(rows, -1)  # low nibble first


def _shipped(model_dir: Path, hf_config: dict) -> tuple[dict[str, QuantizedWeight], dict]:
    """The int4 weight of every MatMulNBits in the export, keyed by HF Linear name (fused q/k/v split back)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_dir / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    head = hf_config["hidden_size"] // hf_config["num_attention_heads"]
    q_rows, kv_rows = hf_config["num_attention_heads"] * head, hf_config["num_key_value_heads"] * head
    shipped = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        n, k, blocks = attrs["N"], attrs["K"], attrs["K"] // attrs["block_size"]
        scales = torch.from_numpy(inits[node.input[2]].copy()).reshape(n, blocks)
        zeros = (_unpack(inits[node.input[3]], n)[:, :blocks] if len(node.input) > 3
                 else torch.full((n, blocks), 8, dtype=torch.uint8))  # MatMulNBits' default zero point
        qw = QuantizedWeight(_unpack(inits[node.input[1]], n)[:, :k], scales, zeros)
        parts = node.name.strip("/").split("/")  # e.g. model/layers.0/attn/qkv_proj/MatMul_Q4, lm_head/MatMulNBits
        if parts[0] == "lm_head":
            shipped["lm_head"] = qw
        elif parts[3] == "qkv_proj":
            for proj, rows in zip("qkv", (slice(0, q_rows), slice(q_rows, q_rows + kv_rows), slice(q_rows + kv_rows, None))):
                shipped[f"model.{parts[1]}.self_attn.{proj}_proj"] = QuantizedWeight(qw.q[rows], qw.scales[rows], qw.zero_points[rows])
        else:
            shipped[f"model.{parts[1]}.{'self_attn' if parts[2] == 'attn' else 'mlp'}.{parts[3]}"] = qw
    return shipped, {"model": model, "inits": inits}


def _embedding_rows(graph: dict, ids: list[int]) -> torch.Tensor:
    """Run the export's GatherBlockQuantized alone on its own initializers: the embedding rows it ships."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nodes = {out: node for node in graph["model"].graph.node for out in node.output}
    gather = next(n for n in graph["model"].graph.node if n.op_type == "GatherBlockQuantized")
    data = graph["inits"][nodes[gather.input[0]].input[0]]  # the Reshape of the lm_head's packed weight
    vocab = graph["inits"][gather.input[2]].shape[0]
    feeds = {"data": data.reshape(vocab, -1), "ids": np.array([ids], dtype=np.int64)}
    names = ["data", "ids"]
    for name, init in zip(("scales", "zeros"), gather.input[2:]):
        feeds[name] = graph["inits"][init]
        names.append(name)
    kinds = {np.dtype("uint8"): TensorProto.UINT8, np.dtype("int64"): TensorProto.INT64, np.dtype("float32"): TensorProto.FLOAT}
    node = helper.make_node("GatherBlockQuantized", names, ["rows"], domain="com.microsoft",
                            **{a.name: helper.get_attribute_value(a) for a in gather.attribute})
    model = helper.make_model(
        helper.make_graph([node], "embedding", [helper.make_tensor_value_info(k, kinds[v.dtype], v.shape) for k, v in feeds.items()],
                          [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)]),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, feeds)[0][0])


def _assert_same(name: str, shipped: QuantizedWeight, expected: QuantizedWeight) -> None:
    mismatches = {
        "dequantized": int((shipped.dequantize() != expected.dequantize()).sum()),
        "q": int((shipped.q != expected.q).sum()),
        "scales": int((shipped.scales != expected.scales).sum()),
        "zero_points": int((shipped.zero_points != expected.zero_points).sum()),
    }
    assert not any(mismatches.values()), f"{name}: {mismatches}"


def _hf_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# --- quantize_rtn against the quantizer itself: fast, no export --------------------------------------

@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_quantize_rtn_matches_the_mlas_quantizer(grid):
    """The C++ quantizer the builder calls (onnxruntime's quantize_matmul_4bits), on rigged weights."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    weight = _rigged(torch.randn(256, 256, generator=torch.Generator().manual_seed(1)) * 0.02, grid, seed=2)
    rows, cols = weight.shape
    blocks = cols // grid.block_size
    packed = np.zeros((rows, blocks, grid.block_size // 2), np.uint8)
    scales = np.zeros((rows, blocks), np.float32)
    zeros = np.zeros((rows, (blocks + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, np.ascontiguousarray(weight.T.numpy()), scales, zeros, grid.block_size, rows, cols, grid.symmetric)
    mlas = QuantizedWeight(_unpack(packed, rows), torch.from_numpy(scales),
                           _unpack(zeros, rows)[:, :blocks] if not grid.symmetric else torch.full((rows, blocks), 8, dtype=torch.uint8))
    ours = quantize_rtn(weight, grid)
    _assert_same("rigged", mlas, ours)
    # The rigging has teeth: dividing by the scale instead of multiplying by its reciprocal, or
    # rounding ties to even, each move thousands of these weights by a step.
    # (Rows from 19 on: the corner rows above hold blocks with scale 0.)
    body = weight[19:].reshape(rows - 19, blocks, -1)
    scale, zero = ours.scales[19:].unsqueeze(-1), ours.zero_points[19:].unsqueeze(-1)
    by_division = torch.floor(body / scale + zero + 0.5).clamp(0, 15).reshape(rows - 19, cols)
    assert int((by_division != mlas.q[19:]).sum()) > 100
    to_even = torch.round(body * (1 / scale) + zero).clamp(0, 15).reshape(rows - 19, cols)
    assert int((to_even != mlas.q[19:]).sum()) > 100


def test_quantize_rtn_corner_blocks():
    weight = torch.zeros(2, 32)
    weight[1, :3] = torch.tensor([0.5, -0.5, 0.1])
    sym = quantize_rtn(weight, Int4Grid(16, True))
    assert sym.q[0].tolist() == [8] * 32 and sym.zero_points.unique().tolist() == [8]
    assert sym.scales[1, 0].item() == 0.0625  # |max| == |min|: the min sets the scale (-0.5 / -8)
    assert sym.dequantize()[1, :2].tolist() == [0.4375, -0.5]  # so +0.5 clips to step 7
    asym = quantize_rtn(weight.abs(), Int4Grid(16, False))
    assert asym.zero_points[:, 0].tolist() == [0, 0] and asym.q[0].unique().tolist() == [0]
    assert torch.equal(asym.dequantize()[1, :2], torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_forward_is_the_grid_and_gradient_is_identity(dtype):
    grid = Int4Grid(32, False)
    weight = (torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype).requires_grad_()
    out = fake_quantize(weight, grid)
    assert out.dtype == dtype
    assert torch.equal(out.detach(), quantize_rtn(weight.detach(), grid).dequantize().to(dtype))
    assert not torch.equal(out.detach(), weight.detach())
    upstream = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(upstream)
    assert torch.equal(weight.grad, upstream)


# --- the builder's plain int4 export ----------------------------------------------------------------

@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_plain_export_ships_quantize_rtn(grid, tiny128, tmp_path):
    rigged = _copy_with_weights(tiny128, tmp_path / "rigged", lambda name, w: _rigged(w, grid, seed=len(name)))
    out = _export(rigged, tmp_path / "onnx", grid)
    shipped, graph = _shipped(out, _hf_config(rigged))
    from safetensors.torch import load_file

    fp32 = load_file(rigged / "model.safetensors")
    assert sorted(shipped) == sorted([*LINEARS, "lm_head"])
    for name in LINEARS:
        _assert_same(name, shipped[name], quantize_rtn(fp32[f"{name}.weight"], grid))
    table = quantize_rtn(fp32[f"{TABLE}.weight"], grid)
    _assert_same("lm_head", shipped["lm_head"], table)
    if grid.symmetric:
        # The tied embedding reads the lm_head's int4 through GatherBlockQuantized. (The asymmetric
        # plain export of 0.18 wires it to the fp32 table instead, and the model does not load.)
        ids = [0, 1, 2, 3, 4, 20, 1000, 49151]
        assert torch.equal(_embedding_rows(graph, ids), table.dequantize()[ids])


# --- pre-quantized checkpoints ----------------------------------------------------------------------

def _chosen(shape: tuple[int, int], grid: Int4Grid, seed: int) -> QuantizedWeight:
    """int4 weights no RTN would produce: random steps, signed scales, random zero points."""
    gen = torch.Generator().manual_seed(seed)
    rows, blocks = shape[0], shape[1] // grid.block_size
    zeros = (torch.full((rows, blocks), 8, dtype=torch.uint8) if grid.symmetric
             else torch.randint(0, 16, (rows, blocks), generator=gen, dtype=torch.uint8))
    return QuantizedWeight(torch.randint(0, 16, shape, generator=gen, dtype=torch.uint8),
                           torch.randn(rows, blocks, generator=gen) * 0.01, zeros)


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_prequantized_export_ships_our_weights(grid, tiny128, tmp_path):
    from safetensors.torch import load_file

    fp32 = load_file(tiny128 / "model.safetensors")
    left_out = "model.layers.1.mlp.down_proj"  # the writer rounds it with quantize_rtn, as the plain export would
    weights = {name: _chosen(tuple(fp32[f"{name}.weight"].shape), grid, seed=i)
               for i, name in enumerate([*LINEARS, TABLE]) if name != left_out}
    if grid.block_size == 32:
        weights["lm_head"] = weights.pop(TABLE)  # the tied table under its other name
    table = weights.get(TABLE, weights.get("lm_head"))
    folder = write_prequantized(tiny128, tmp_path / "prequantized", weights, grid)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "quant_auto"
    assert (folder / "tokenizer.json").is_file() and (folder / "generation_config.json").is_file()

    out = _export(folder, tmp_path / "onnx", Int4Grid(128, not grid.symmetric))  # the export's own grid must not matter
    shipped, graph = _shipped(out, _hf_config(tiny128))
    assert sorted(shipped) == sorted([*LINEARS, "lm_head"])
    for name in LINEARS:
        expected = quantize_rtn(fp32[f"{name}.weight"], grid) if name == left_out else weights[name]
        _assert_same(name, shipped[name], expected)
    _assert_same("lm_head", shipped["lm_head"], table)
    nodes = [n for n in graph["model"].graph.node if n.op_type == "MatMulNBits"]
    assert {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"} == {4}
    assert all(graph["inits"][n.input[2]].dtype == np.float32 for n in nodes)  # scales stay fp32 on CPU
    ids = [0, 1, 2, 3, 4, 20, 1000, 49151]
    assert torch.equal(_embedding_rows(graph, ids), table.dequantize()[ids])


def _torch_greedy(folder: Path, weights: dict[str, QuantizedWeight], prompt: list[int], new_tokens: int):
    """Greedy tokens and first-step logits of the fp32 model with every int4 weight dequantized in."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, qw in weights.items():
            params[f"{name}.weight"].copy_(qw.dequantize())
        ids = torch.tensor([prompt])
        first = None
        for _ in range(new_tokens):
            logits = model(ids).logits[0, -1]
            first = logits if first is None else first
            ids = torch.cat([ids, logits.argmax().view(1, 1)], 1)
    return ids[0].tolist(), first


def _genai_greedy(folder: Path, prompt: list[int], new_tokens: int):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt])
    first = torch.from_numpy(np.array(generator.get_output("logits")))
    first = first.reshape(-1, first.shape[-1])[-1]  # the prompt's last position
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)], first


@pytest.mark.parametrize("grid", [Int4Grid(32, False), Int4Grid(64, True)], ids=["b32-asym", "b64-sym"])
def test_prequantized_export_generates_like_torch(grid, tiny128, tmp_path):
    from safetensors.torch import load_file

    fp32 = load_file(tiny128 / "model.safetensors")
    # Our int4: the RTN of moved weights, so that it is not the builder's own RTN. Linears x8 make the
    # random model's greedy tokens vary (at x1 it repeats one token).
    gen = torch.Generator().manual_seed(3)
    weights = {name: quantize_rtn(fp32[f"{name}.weight"] * (1.0 if name == TABLE else 8.0)
                                  + 0.002 * torch.randn(fp32[f"{name}.weight"].shape, generator=gen), grid)
               for name in [*LINEARS, TABLE]}
    folder = write_prequantized(tiny128, tmp_path / "prequantized", weights, grid)
    prompt, new = [1, 100, 2000, 300, 7], 10
    expected, expected_logits = _torch_greedy(tiny128, weights, prompt, new)
    # accuracy_level 1 computes in fp32: same tokens, logits equal to float rounding.
    tokens, logits = _genai_greedy(_export(folder, tmp_path / "a1", grid, accuracy_level=1), prompt, new)
    assert tokens == expected
    assert torch.allclose(logits, expected_logits, rtol=0, atol=1e-4 * expected_logits.abs().max())
    # accuracy_level 4 rounds activations to int8 per block: close, not equal.
    tokens4, logits4 = _genai_greedy(_export(folder, tmp_path / "a4", grid, accuracy_level=4), prompt, new)
    # Measured: 2.4-2.7% of the largest logit; greedy tokens the same for 5-10 steps, then they may part.
    assert torch.allclose(logits4, expected_logits, rtol=0, atol=0.05 * expected_logits.abs().max())
    assert tokens4[len(prompt)] == expected[len(prompt)]


def test_prequantized_untied_model_ships_its_lm_head(tiny128, tmp_path):
    """An untied checkpoint goes out in the Olive format: our int4 lm_head, an fp32 embedding."""
    from safetensors.torch import load_file, save_file

    untied = _copy_with_weights(tiny128, tmp_path / "untied", lambda name, w: w)
    tensors = load_file(untied / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn(tensors[f"{TABLE}.weight"].shape, generator=torch.Generator().manual_seed(5)) * 0.02
    save_file(tensors, str(untied / "model.safetensors"), metadata={"format": "pt"})
    config = _hf_config(untied)
    (untied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))

    grid = Int4Grid(32, False)
    weights = {"lm_head": _chosen(tuple(tensors["lm_head.weight"].shape), grid, seed=9),
               LINEARS[0]: _chosen(tuple(tensors[f"{LINEARS[0]}.weight"].shape), grid, seed=10)}
    folder = write_prequantized(untied, tmp_path / "prequantized", weights, grid)
    assert _hf_config(folder)["quantization_config"]["quant_method"] == "olive"
    shipped, graph = _shipped(_export(folder, tmp_path / "onnx", grid), config)
    _assert_same("lm_head", shipped["lm_head"], weights["lm_head"])
    _assert_same(LINEARS[0], shipped[LINEARS[0]], weights[LINEARS[0]])
    for name in LINEARS[1:]:
        _assert_same(name, shipped[name], quantize_rtn(tensors[f"{name}.weight"], grid))
    embedding = graph["inits"]["model.embed_tokens.weight"]
    assert np.array_equal(embedding, tensors[f"{TABLE}.weight"].numpy())


PHI3_LINEARS = [f"model.layers.{i}.{part}" for i in range(2)
                for part in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
_PARTS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def _shipped_as(shipped: dict[str, QuantizedWeight], name: str) -> QuantizedWeight:
    """The shipped int4 of the checkpoint's Linear ``name``; a fused one (Phi-3) is its shipped parts' rows."""
    layer, _, linear = name.partition(".layers.")[2].partition(".")
    if linear not in _PARTS:
        return shipped[name]
    parts = [shipped[f"model.layers.{layer}.{part}"] for part in _PARTS[linear]]
    return QuantizedWeight(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scales", "zero_points")))


@pytest.mark.parametrize("grid", [Int4Grid(16, True), Int4Grid(32, False)], ids=["b16-sym", "b32-asym"])
def test_prequantized_phi3_ships_its_fused_projections(grid, family_model, tmp_path):
    """Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj: our int4 of each fused weight ships exactly,
    whatever grid the export itself is asked for; the untied lm_head too, the embedding stays fp32."""
    from safetensors.torch import load_file

    phi3 = family_model("phi3")
    fp32 = load_file(phi3 / "model.safetensors")
    left_out = PHI3_LINEARS[2]  # a fused one the writer rounds itself, as the plain export would
    weights = {name: _chosen(tuple(fp32[f"{name}.weight"].shape), grid, seed=i)
               for i, name in enumerate([*PHI3_LINEARS, "lm_head"]) if name != left_out}
    folder = write_prequantized(phi3, tmp_path / "prequantized", weights, grid)
    shipped, graph = _shipped(_export(folder, tmp_path / "onnx", Int4Grid(64, not grid.symmetric)), _hf_config(phi3))
    for name in [*PHI3_LINEARS, "lm_head"]:
        expected = quantize_rtn(fp32[f"{name}.weight"], grid) if name == left_out else weights[name]
        _assert_same(name, _shipped_as(shipped, name), expected)
    assert np.array_equal(graph["inits"]["model.embed_tokens.weight"], fp32[f"{TABLE}.weight"].numpy())


def test_write_prequantized_rejects_what_cannot_ship(tiny128, tmp_path):
    from safetensors.torch import load_file

    fp32 = load_file(tiny128 / "model.safetensors")
    shape = tuple(fp32[f"{LINEARS[0]}.weight"].shape)
    sym, asym = Int4Grid(32, True), Int4Grid(32, False)
    cases = {
        "no Linear layer named": ({"model.layers.9.self_attn.q_proj": _chosen(shape, sym, 0)}, sym),
        "blocks of 16": ({LINEARS[0]: _chosen(shape, Int4Grid(16, True), 0)}, sym),
        "zero point 8": ({LINEARS[0]: _chosen(shape, asym, 0)}, sym),
        "the checkpoint's is": ({LINEARS[0]: _chosen((128, 256), sym, 0)}, sym),
        "give it once": ({TABLE: _chosen((49152, 128), sym, 0), "lm_head": _chosen((49152, 128), sym, 1)}, sym),
    }
    for message, (weights, grid) in cases.items():
        with pytest.raises(UserError, match=message):
            write_prequantized(tiny128, tmp_path / "out", weights, grid)
    with pytest.raises(UserError, match="block size must be one of"):
        Int4Grid(48)


# --- int4-aware training: its forward computes with exactly what the builder ships -------------------

@pytest.mark.parametrize("family,block", [("llama", 16), ("llama", 32), ("llama", 64), ("phi3", 32)])
def test_int4_aware_training_forward_is_what_the_builder_ships(family, block, tiny128, family_model, splits, tmp_path):
    """Train an int4-aware adapter, merge and export it the normal way, then read back the weights each
    Linear of the *training* forward computes with (its output on the identity matrix is its weight,
    exactly) and the embedding rows it looks up: zero mismatches with the builder's int4. On Phi-3 too,
    whose fused qkv_proj and gate_up_proj the builder ships as MatMuls of their own (q/k/v fused again)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from autotune.export import ExportSpec, export_model, merge_adapter
    from autotune.models import resolve_model
    from autotune.train import TrainSpec, _peft_model, train_adapter

    folder = tiny128 if family == "llama" else family_model(family)
    linears = LINEARS if family == "llama" else PHI3_LINEARS
    base = resolve_model(str(folder))
    spec = TrainSpec(rank=4, alpha=8.0, steps=3, batch_size=4, learning_rate=1e-2, int4_aware=True, int4_block_size=block)
    train_adapter(base, splits, spec, tmp_path / "adapter", threads=1)
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and t.abs().sum() > 0 for name, t in adapter.items())  # it moved
    merged = merge_adapter(base, tmp_path / "adapter", tmp_path / "merged")
    out = tmp_path / "onnx"
    export_model(merged, out, ExportSpec("int4", block_size=block), work_dir=tmp_path / "work")
    shipped, graph = _shipped(out, _hf_config(folder))

    model = _peft_model(base, spec, "cpu", "float32", False, False)
    set_peft_model_state_dict(model, {k.replace(".weight", ".default.weight"): v for k, v in adapter.items()})
    model.eval()  # no dropout: the forward an export reproduces
    inner = model.base_model.model
    with torch.no_grad():
        for name in linears:
            layer = inner.get_submodule(name)
            used = layer(torch.eye(layer.in_features)).T
            assert int((used != _shipped_as(shipped, name).dequantize()).sum()) == 0, name
        table = inner.model.embed_tokens.weight
        assert torch.equal(inner.lm_head.weight, shipped["lm_head"].dequantize())
        if _hf_config(folder).get("tie_word_embeddings"):
            ids = [0, 1, 2, 3, 4, 20, 1000, 49151]
            assert torch.equal(_embedding_rows(graph, ids), table[ids])
        else:  # an untied embedding ships as it is (training never rounds it)
            assert np.array_equal(graph["inits"]["model.embed_tokens.weight"], table.numpy())


def test_int4_aware_gradients_are_straight_through_and_the_rounding_follows_each_step(tiny128):
    """A and B get the straight-through gradients of ``x @ fake_quantize(W + s * B @ A)`` (computed here the
    direct way), x the rounded weight's; the rounded weight is computed once per optimizer step, and after a
    step the forward rounds the new merged weight."""
    import torch.nn.functional as F

    from autotune.models import resolve_model
    from autotune.quantize import fake_quantize
    from autotune.train import TrainSpec, _peft_model

    grid = Int4Grid(32, True)
    spec = TrainSpec(rank=4, alpha=8.0, dropout=0.0, int4_aware=True, int4_block_size=32)
    model = _peft_model(resolve_model(str(tiny128)), spec, "cpu", "float32", False, False)
    layer = model.base_model.model.get_submodule(LINEARS[0])
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.manual_seed(0)
    with torch.no_grad():
        b.normal_(0, 0.05)  # peft starts B at zero: make the adapter's share of the rounding count
    x0, target = torch.randn(2, 5, layer.in_features), torch.randn(2, 5, layer.out_features)
    optimizer = torch.optim.AdamW([a, b], lr=1e-2)
    for _ in range(2):
        x = x0.clone().requires_grad_()
        ((layer(x) - target) ** 2).sum().backward()
        grads = x.grad, a.grad.clone(), b.grad.clone()
        x_ref, a_ref, b_ref = (t.detach().clone().requires_grad_() for t in (x0, a, b))
        merged = layer.base_layer.weight + layer.scaling["default"] * (b_ref @ a_ref)
        reference = F.linear(x_ref, fake_quantize(merged, grid))
        assert torch.equal(layer(x0).detach(), reference.detach())  # the output is the rounded weight's, exactly
        ((reference - target) ** 2).sum().backward()
        for got, want in zip(grads, (x_ref.grad, a_ref.grad, b_ref.grad)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        optimizer.step()  # in place: the next forward must round the new merged weight
        optimizer.zero_grad()


# --- calibrated int4 (GPTQ) -------------------------------------------------------------------------

def test_gptq_lowers_the_output_error_of_rtn_on_its_calibration_inputs():
    """GPTQ's point: on the inputs it was calibrated on, the layer's outputs move less than under plain rounding."""
    from autotune.gptq import gptq_weight

    torch.manual_seed(0)
    x = torch.randn(512, 64) @ torch.randn(64, 64)  # correlated inputs, as real activations are
    weight = torch.randn(48, 64)
    hessian = x.T @ x / x.shape[0]
    for grid in (Int4Grid(16, True), Int4Grid(32, False)):
        gptq, rtn = gptq_weight(weight, hessian, grid), quantize_rtn(weight, grid)
        error = lambda q: (x @ (weight - q.dequantize()).T).pow(2).mean().item()  # noqa: E731
        assert error(gptq) < 0.7 * error(rtn)
        assert gptq.q.dtype == torch.uint8 and int(gptq.q.max()) <= 15
        assert gptq.scales.shape == rtn.scales.shape == (48, 64 // grid.block_size)
        if grid.symmetric:
            assert bool((gptq.zero_points == 8).all())


def _reference_gptq(weight, hessian, grid, damping=0.01):
    """GPTQ as its paper writes it (no lazy batches): each column's error divided by the diagonal of ``U``, the
    upper Cholesky factor of the damped ``H^-1``, and moved onto the later columns by ``U``'s row; each block's
    grid taken from its columns as updated when its first column is reached."""
    from autotune.quantize import _grid_of, _reciprocal

    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(damping * torch.mean(torch.diag(h)))
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    w = weight.clone()
    w[:, dead] = 0
    codes, scales, zeros = torch.empty_like(w), [], []
    for j in range(w.shape[1]):
        if j % grid.block_size == 0:
            scale, zero = (t[:, 0] for t in _grid_of(w[:, j:j + grid.block_size].unsqueeze(1), grid))
            scales.append(scale)
            zeros.append(zero)
        codes[:, j] = torch.floor(w[:, j] * _reciprocal(scale) + zero + 0.5).clamp(0, 15)
        error = (w[:, j] - (codes[:, j] - zero) * scale) / u[j, j]
        w[:, j + 1:] -= error[:, None] * u[j, j + 1:]
    return codes, torch.stack(scales, 1), torch.stack(zeros, 1)


@pytest.mark.parametrize("grid", [Int4Grid(32, False), Int4Grid(16, True)], ids=["b32-asym", "b16-sym"])
def test_gptq_gives_the_codes_of_the_papers_algorithm(grid):
    """The lazy batches and the Hessian's own factor (no inverse) give the paper's codes, in float64 where rounding
    cannot tell the two apart; over three lazy batches, with a dead input (a column no sample ever sets)."""
    from autotune.gptq import LAZY_COLUMNS, gptq_weight

    torch.manual_seed(0)
    columns = 2 * LAZY_COLUMNS + 64
    x = torch.randn(1024, columns, dtype=torch.float64) @ (torch.eye(columns, dtype=torch.float64)
                                                           + 0.3 * torch.randn(columns, columns, dtype=torch.float64) / columns ** 0.5)
    x[:, 5] = 0
    weight = torch.randn(40, columns, dtype=torch.float64) * 0.02
    hessian = x.T @ x / x.shape[0]
    got = gptq_weight(weight, hessian, grid)
    codes, scales, zeros = _reference_gptq(weight, hessian, grid)
    assert torch.equal(got.q, codes.to(torch.uint8))
    torch.testing.assert_close(got.scales, scales, rtol=1e-12, atol=0)
    assert torch.equal(got.zero_points, zeros.to(torch.uint8))
    assert not torch.equal(got.q, quantize_rtn(weight, grid).q)  # errors were moved: not plain rounding


def test_gptq_rounds_linears_sharing_an_input_as_one_matrix():
    """GPTQ treats rows on their own: q/k/v (or gate/up) stacked give each one's own result, bit for bit."""
    from autotune.gptq import gptq_weight

    torch.manual_seed(0)
    x = torch.randn(512, 64) @ torch.randn(64, 64)
    hessian = x.T @ x / x.shape[0]
    first, second = torch.randn(48, 64), torch.randn(16, 64)
    for grid in (Int4Grid(16, True), Int4Grid(32, False)):
        stacked, alone = gptq_weight(torch.cat([first, second]), hessian, grid), [gptq_weight(w, hessian, grid) for w in (first, second)]
        assert torch.equal(stacked.q, torch.cat([w.q for w in alone]))
        assert torch.equal(stacked.scales, torch.cat([w.scales for w in alone]))


def test_gptq_calibrates_on_packed_samples_as_on_one_sample_per_forward(tiny128, splits):
    """Packed calibration samples reach every decoder layer as they do one per forward (each attends within
    itself), and the Linears reading one input are grouped: q/k/v, o, gate/up, down."""
    from transformers import AutoModelForCausalLM

    from autotune.models import resolve_model
    from autotune.packing import packed_attention_in
    from autotune.gptq import _Captured, _layer_inputs, _record_input, _run_layer, _shared_inputs
    from autotune.train import calibration_samples, load_tokenizer

    samples = calibration_samples(splits, load_tokenizer(resolve_model(str(tiny128))))[:9]
    model = AutoModelForCausalLM.from_pretrained(tiny128, dtype=torch.float32).eval()
    with torch.no_grad(), packed_attention_in(model) as packed:
        assert packed
        one_each = _layer_inputs(model, samples)
        chunks = _layer_inputs(model, samples, tokens_per_pass=3 * max(map(len, samples)))
        assert len(one_each) == 9 and 1 < len(chunks) < 9
        for layer in model.model.layers:
            one_each = [_run_layer(layer, *inputs) for inputs in one_each]
            chunks = [_run_layer(layer, *inputs) for inputs in chunks]
            torch.testing.assert_close(torch.cat([args[0][0] for args, _ in chunks]),
                                       torch.cat([args[0][0] for args, _ in one_each]), rtol=1e-5, atol=1e-5)
        layer = model.model.layers[0]
        linears = [name for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
        seen = {}
        handles = [layer.get_submodule(name).register_forward_pre_hook(
            functools.partial(_record_input, seen, name, len(linears))) for name in linears]
        with contextlib.suppress(_Captured):
            layer(*chunks[0][0], **chunks[0][1])
        for handle in handles:
            handle.remove()
    assert _shared_inputs(seen, linears) == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                              ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert model.config._attn_implementation == "sdpa"  # the model's own attention again


def test_gptq_export_ships_the_calibrated_weights(tiny128, splits, tmp_path):
    """The whole calibrated path on the tiny model: GPTQ on training examples, pre-quantized checkpoint,
    builder; the export carries GPTQ's weights, not the builder's rounding."""
    from transformers import AutoModelForCausalLM

    from autotune.export import ExportSpec, export_model, prequantize
    from autotune.gptq import gptq_quantize
    from autotune.train import calibration_samples, load_tokenizer
    from autotune.models import resolve_model

    base = resolve_model(str(tiny128))
    spec = ExportSpec("int4", block_size=32, symmetric=False, calibration="gptq", calibration_samples=8)
    samples = calibration_samples(splits, load_tokenizer(base))
    folder = prequantize(tiny128, tmp_path / "prequantized", spec, samples)
    out = tmp_path / "onnx"
    export_model(folder, out, spec, work_dir=tmp_path / "work")
    shipped, _ = _shipped(out, _hf_config(tiny128))
    model = AutoModelForCausalLM.from_pretrained(tiny128, dtype=torch.float32)
    expected = gptq_quantize(model, samples[:8], Int4Grid(32, False))  # deterministic: the same weights again
    for name in [*LINEARS, "lm_head"]:  # the head (the tied table) is calibrated too
        _assert_same(name, shipped[name], expected[name])
    from safetensors.torch import load_file

    rtn = quantize_rtn(load_file(tiny128 / "model.safetensors")[f"{LINEARS[0]}.weight"], Int4Grid(32, False))
    assert not torch.equal(shipped[LINEARS[0]].q, rtn.q)  # calibrated, not plain rounding
