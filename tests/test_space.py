"""The search space: YAML parsing, hardware restriction, sampling (autotune.space)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from autotune.candidate import CandidateSpec
from autotune.errors import UserError
from autotune.profiles import VALID_PRECISIONS
from autotune.space import Choice, Range, SearchSpace

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPACE = ROOT / "search_spaces" / "default.yaml"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(seed: int = 0) -> optuna.Study:
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))


# --------------------------------------------------------------------------- loading


@pytest.mark.skipif(not DEFAULT_SPACE.is_file(), reason="search_spaces/default.yaml not written yet")
def test_default_space_loads_and_samples():
    space = SearchSpace.from_yaml(DEFAULT_SPACE)
    assert space.source == str(DEFAULT_SPACE)
    cpu = space.restrict(VALID_PRECISIONS["cpu"], qlora=True, execution_provider="cpu")
    study = _study()
    for _ in range(5):
        trial = study.ask()
        spec = cpu.suggest(trial, "cpu")
        assert isinstance(spec, CandidateSpec)
        assert spec.export.precision in VALID_PRECISIONS["cpu"]
        study.tell(trial, 0.5)


def test_from_yaml(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "method: [lora, qlora]\n"
        "rank: {low: 4, high: 64, log: true}\n"
        "alpha_ratio: [0.5, 1, 2]\n"
        "learning_rate: {low: 1.0e-4, high: 1.0e-3, log: true}\n"
        "precision: [int4, int8, fp32]\n"
        "block_size: [32, 128]\n"
        "accuracy_level: [0, 4]\n"
        "seed: 3\n"
    )
    space = SearchSpace.from_yaml(path)
    assert space.method == Choice(("lora", "qlora"))
    assert space.rank == Range(4, 64, True, None) and space.rank.is_int
    assert isinstance(space.learning_rate, Range) and not space.learning_rate.is_int
    assert space.precision == Choice(("int4", "int8", "fp32"))
    assert space.seed == 3
    assert space.source == str(path)
    assert set(space.train_param_names()) == {"method", "rank", "alpha_ratio", "learning_rate"}
    assert space.adapters() is None  # ranges have no finite count


@pytest.mark.parametrize("text,match", [
    ("- a\n- b\n", "mapping"),
    ("rank: [4\n", "YAML"),
])
def test_from_yaml_errors(tmp_path, text, match):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=match):
        SearchSpace.from_yaml(path)


def test_from_yaml_missing(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        SearchSpace.from_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("raw,match", [
    ({"ranks": [4, 8]}, "unknown key 'ranks'"),
    ({"rank": []}, "empty list"),
    ({"learning_rate": {"low": 1e-3, "high": 1e-4}}, "range is empty"),
    ({"rank": {"low": 16, "high": 4}}, "range is empty"),
    ({"rank": {"low": 4}}, "needs low and high"),
    ({"rank": {"low": 4, "high": 8, "scale": 2}}, "needs low and high"),
    ({"precision": {"low": 4, "high": 8}}, "categorical"),
    ({"method": {"low": 0, "high": 1}}, "categorical"),
    ({"precision": ["int4", "int3"]}, "int3"),
    ({"method": ["lora", "full"]}, "full"),
    ({"block_size": [48]}, "48"),
    ({"rank": [0, 8]}, "positive"),
    ({"learning_rate": {"low": 0, "high": 1e-3, "log": True}}, "log range"),
    ({"alpha": [16], "alpha_ratio": [2]}, "either"),
])
def test_from_dict_errors(raw, match):
    with pytest.raises(UserError, match=match) as info:
        SearchSpace.from_dict(raw, where="space.yaml")
    assert str(info.value).startswith("space.yaml: ")
    assert "\n" not in str(info.value)


def test_from_dict_scalar_is_one_choice():
    space = SearchSpace.from_dict({"rank": 8, "precision": "fp32", "dropout": [0, 0.1]})
    assert space.rank == Choice((8,))
    assert space.precision == Choice(("fp32",))
    assert space.dropout == Choice((0, 0.1))


def test_alpha_replaces_ratio():
    space = SearchSpace.from_dict({"alpha": [8, 16]})
    assert space.alpha == Choice((8, 16)) and space.alpha_ratio is None


# --------------------------------------------------------------------------- hardware


def test_restrict_drops_what_cannot_run():
    space = SearchSpace.from_dict({"method": ["lora", "qlora"], "precision": ["fp16", "int4", "fp32"],
                                   "accuracy_level": [0, 4]})
    cpu = space.restrict(VALID_PRECISIONS["cpu"], qlora=False, execution_provider="cpu")
    assert cpu.precision == Choice(("int4", "fp32"))
    assert cpu.method == Choice(("lora",))
    assert cpu.accuracy_level == Choice((0, 4))
    assert cpu.source == space.source

    with_qlora = space.restrict(VALID_PRECISIONS["cpu"], qlora=True, execution_provider="cpu")
    assert with_qlora.method == Choice(("lora", "qlora"))

    cuda = space.restrict(VALID_PRECISIONS["cuda"], qlora=True, execution_provider="cuda")
    assert cuda.precision == Choice(("fp16", "int4", "fp32"))
    assert cuda.accuracy_level == Choice((0,))


def test_restrict_raises_when_nothing_left():
    with pytest.raises(UserError, match="fp16"):
        SearchSpace.from_dict({"precision": ["fp16", "bf16"]}).restrict(VALID_PRECISIONS["cpu"], True, "cpu")
    with pytest.raises(UserError, match="QLoRA"):
        SearchSpace.from_dict({"method": ["qlora"]}).restrict(VALID_PRECISIONS["cpu"], False, "cpu")


# --------------------------------------------------------------------------- sampling


def test_suggest_fp32_samples_no_quantization_options():
    space = SearchSpace.from_dict({
        "rank": [4, 8, 16], "alpha_ratio": [0.5, 1, 2], "precision": ["fp32"],
        "block_size": [32, 128], "accuracy_level": [0, 4], "algo": ["default", "rtn"],
    })
    study = _study()
    for _ in range(6):
        trial = study.ask()
        spec = space.suggest(trial, "cpu")
        assert isinstance(spec, CandidateSpec)
        assert spec.export.precision == "fp32"
        assert spec.export == spec.export.normalized()
        assert set(trial.params) == {"rank", "alpha_ratio"}
        assert spec.train.rank == trial.params["rank"]
        assert spec.train.alpha == pytest.approx(trial.params["alpha_ratio"] * trial.params["rank"])
        study.tell(trial, 0.0)


def test_suggest_quantization_options_only_when_quantized():
    """A screening trial samples only the adapter; an export trial (its precision fixed by the scheduler)
    samples the quantization options of that precision only."""
    space = SearchSpace.from_dict({
        "precision": ["int4", "int8", "fp32"], "block_size": [32, 128], "accuracy_level": [0, 4],
        "algo": ["default", "rtn"], "learning_rate": {"low": 1.0e-4, "high": 1.0e-3, "log": True},
        "rank": {"low": 4, "high": 32}, "steps": [10, 20],
    })
    study = _study(seed=1)
    for precision in ("int4", "int8", "fp32") * 4:
        screen = study.ask()
        spec = space.suggest(screen, "cpu")
        assert set(screen.params) == {"learning_rate", "rank"}  # the adapter only
        assert spec.export == space.screening(spec.train, "cpu") and spec.export.precision == "int8"
        assert spec.train.steps == 10  # the first rung
        study.tell(screen, 0.0)
        study.enqueue_trial({**space.adapter_params(screen.params), "precision": precision})
        trial = study.ask()
        spec = space.suggest(trial, "cpu", steps=20, export=True)
        assert spec.train.steps == 20 and spec.export.precision == precision
        quant_params = {"block_size", "accuracy_level", "algo"} & set(trial.params)
        if precision == "fp32":
            assert not quant_params
        else:  # the rounding algorithm is an int4 choice
            assert quant_params == {"block_size", "accuracy_level", "algo"} - ({"algo"} if precision == "int8" else set())
            assert spec.export.block_size == trial.params["block_size"]
            assert spec.export.accuracy_level == trial.params["accuracy_level"]
            assert spec.export.algo == trial.params.get("algo", "default")
        assert 1e-4 <= spec.train.learning_rate <= 1e-3
        assert isinstance(spec.train.rank, int) and 4 <= spec.train.rank <= 32
        assert spec.train.alpha == pytest.approx(2.0 * spec.train.rank)  # default ratio 2
        assert spec.train.seed == space.seed
        study.tell(trial, 0.0)


def test_suggest_fixed_alpha_and_fixed_space():
    space = SearchSpace.from_dict({"alpha": [24], "rank": [8], "method": ["qlora"], "seed": 7})
    trial = _study().ask()
    spec = space.suggest(trial, "cpu")
    assert trial.params == {}
    assert spec.train.alpha == 24.0 and spec.train.rank == 8
    assert spec.train.method == "qlora" and spec.train.seed == 7
    assert spec.export.precision == "int4" and spec.export.block_size == 32


def test_adapters_counts_a_categorical_space():
    space = SearchSpace.from_dict({
        "rank": [4, 8], "alpha_ratio": [1, 2], "learning_rate": [1.0e-4, 3.0e-4, 1.0e-3],
        "precision": ["int4", "fp32"], "block_size": [32, 128], "accuracy_level": [0, 4],
    })
    assert space.adapters() == 2 * 2 * 3  # the export choices do not make adapters
    # int4-aware is a training choice: one adapter per grid it trains against, LoRA only.
    aware = SearchSpace.from_dict({"method": ["lora", "qlora"], "int4_method": ["rtn", "int4-aware"],
                                   "block_size": [32, 64], "precision": ["int4"]})
    assert aware.adapters() == (1 + 2) + 1
    assert SearchSpace().adapters() == 1
    assert SearchSpace.from_dict({"learning_rate": {"low": 1e-4, "high": 1e-3}}).adapters() is None


INT4_SPACE = {"method": ["lora", "qlora"], "precision": ["int4", "int8", "fp32"], "block_size": [16, 32, 64],
              "int4_method": ["rtn", "int4-aware", "gptq"], "symmetric": [True, False], "int8_layers": ["none", "last", "mixed"],
              "algo": ["default", "k_quant"], "steps": [10]}


def test_int4_methods_sample_only_valid_combinations():
    """int4-aware: LoRA only, screened and exported at int4 on exactly the trained grid (symmetric, default
    rounding, no int8 layers); gptq: its own weights (no algo or int8 layers); rtn: every export knob."""
    space = SearchSpace.from_dict(INT4_SPACE)
    study = _study(seed=3)
    seen = set()
    for _ in range(60):
        screen = study.ask()
        train = space.suggest(screen, "cpu").train
        study.tell(screen, 0.0)
        assert not (train.method == "qlora" and train.int4_aware)
        for fixed in space.exports(train, "cpu") or [{"precision": "int4"}]:
            study.enqueue_trial({**space.adapter_params(screen.params), **fixed})
            trial = study.ask()
            spec = space.suggest(trial, "cpu", export=True)
            export = spec.export
            seen.add((train.method, spec.int4_method, export.precision))
            if train.int4_aware and export.quantized:
                assert export.precision == "int4" and export.block_size == train.int4_block_size
                assert (export.symmetric, export.algo, export.int8_layers, export.calibration) == (True, "default", "none", "none")
            if export.calibration == "gptq":
                assert export.precision == "int4" and export.algo == "default" and export.int8_layers == "none"
            if export.precision != "int4":
                assert export.calibration == "none" and export.int8_layers == "none" and export.symmetric
            study.tell(trial, 0.0)
    assert {("lora", "int4-aware", "int4"), ("lora", "gptq", "int4"), ("qlora", "gptq", "int4"), ("lora", "rtn", "int4"),
            ("lora", "rtn", "fp32"), ("qlora", "rtn", "fp32")} <= seen


def test_int4_aware_adapters_keep_the_trained_grid_and_get_no_other_precision():
    space = SearchSpace.from_dict(INT4_SPACE)
    params = {"method": "lora", "int4_aware": True, "block_size": 16, "precision": "int8", "symmetric": False,
              "int8_layers": "last"}
    assert space.adapter_params(params) == {"method": "lora", "int4_aware": True, "block_size": 16}
    assert space.adapter_params({**params, "int4_aware": False}) == {"method": "lora", "int4_aware": False}
    study = _study()
    study.enqueue_trial({"method": "lora", "int4_aware": True, "block_size": 16})
    train = space.suggest(study.ask(), "cpu").train
    assert train.int4_aware and space.screening(train, "cpu").block_size == 16
    assert space.exports(train, "cpu") == []


def test_exports_start_with_the_start_int4_method():
    space = SearchSpace.from_dict({**INT4_SPACE, "start": {"rank": 16, "int4_method": "gptq", "block_size": 32}})
    plain = space.suggest(_study().ask(), "cpu").train
    plain = plain if not plain.int4_aware else replace(plain, int4_aware=False)
    plan = space.exports(plain, "cpu")
    assert plan[0] == {"precision": "int4", "int4_method": "gptq", "block_size": 32}
    assert [p["precision"] for p in plan] == ["int4", "fp32", "int4"]  # int8 is the screening export


def test_start_is_the_first_adapter_and_is_dropped_when_it_cannot_run():
    space = SearchSpace.from_dict({"method": ["lora", "qlora"], "rank": [8, 16], "int4_method": ["rtn", "int4-aware"],
                                   "start": {"method": "qlora", "rank": 16}})
    assert space.start_params() == {"method": "qlora", "rank": 16}
    lora_only = space.restrict(VALID_PRECISIONS["cpu"], qlora=False, execution_provider="cpu")
    assert lora_only.start_params() == {} and any("start" in note for note in lora_only.notes)
    lora = SearchSpace.from_dict({**INT4_SPACE, "start": {"method": "lora", "int4_method": "gptq"}})
    assert lora.start_params() == {"method": "lora", "int4_aware": False}  # sampled for LoRA: fixed either way


def test_rungs_promote_and_learning_rates_too_low_to_learn():
    space = SearchSpace.from_dict({"steps": [60, 30, 120], "promote": 0.34,
                                   "learning_rate": {"low": 1.0e-4, "high": 3.0e-3, "log": True}, "min_lr_steps": 0.015})
    assert space.rungs == (30, 60, 120) and space.promote == 0.34
    cut = space.restrict(VALID_PRECISIONS["cpu"], True, "cpu")
    assert cut.learning_rate == Range(5.0e-4, 3.0e-3, True, None)
    assert any("learning rates below 5.0e-04 dropped" in note for note in cut.notes)
    with pytest.raises(UserError, match="too low to learn"):
        SearchSpace.from_dict({"steps": [10], "learning_rate": [1.0e-4], "min_lr_steps": 0.015}).restrict(
            VALID_PRECISIONS["cpu"], True, "cpu")
    for bad, match in (({"promote": 1.5}, "promote"), ({"steps": [0, 10]}, "rungs"), ({"start": {"rank": 0}}, "positive"),
                       ({"start": {"bogus": 1}}, "start"), ({"local_first": -1}, "local_first"),
                       ({"local_first": 1.5}, "local_first"), ({"epochs": 0}, "'epochs' must be a positive number"),
                       ({"epochs": "2"}, "epochs")):
        with pytest.raises(UserError, match=match):
            SearchSpace.from_dict(bad)


def test_the_top_rung_is_at_least_epochs_passes_over_the_training_split():
    """A larger dataset's finalist trains longer; a small one keeps the rungs the space names."""
    space = SearchSpace.from_dict({"steps": [30, 120], "epochs": 2, "batch_size": [16, 8]})
    fitted = space.fit_data(600)  # 2 x 600 examples at the smallest batch, 8: 150 steps
    assert fitted.rungs == (30, 150)
    assert fitted.notes == ("top rung 120 -> 150 steps: 2 epochs of 600 training examples of batch 8",)
    assert space.fit_data(408) is space  # 102 steps: the named 120 stand
    assert space.fit_data(481).rungs == (30, 121)  # rounded up: never under the epochs asked for
    assert SearchSpace.from_dict({"steps": [30, 120]}).fit_data(10_000).rungs == (30, 120)  # no epochs: as named


def test_a_nearby_adapter_keeps_the_starts_categorical_choices_only():
    space = SearchSpace.from_dict({**INT4_SPACE, "method": ["lora", "qlora"], "target_modules": ["all-linear", "attention"],
                                   "rank": {"low": 4, "high": 64, "log": True}, "local_first": 2,
                                   "start": {"method": "lora", "rank": 16, "target_modules": "all-linear",
                                             "int4_method": "gptq"}})
    assert space.local_first == 2
    assert space.local_params() == {"method": "lora", "target_modules": "all-linear", "int4_aware": False}
    assert SearchSpace.from_dict({"rank": [4, 16], "start": {"rank": 16}}).local_params() == {}  # nothing categorical
    assert SearchSpace.from_dict({"method": ["lora", "qlora"]}).local_params() == {}  # no start


def test_restrict_keeps_block_sizes_that_divide_the_model():
    space = SearchSpace.from_dict(INT4_SPACE).restrict(("int4", "int8", "fp32"), True, "cpu", widths=(576, 1536))
    assert space.block_size.values == (16, 32, 64)
    assert SearchSpace.from_dict(INT4_SPACE).restrict(("int4",), True, "cpu", widths=(96, 192)).block_size.values == (16, 32)
    with pytest.raises(UserError, match="divides this model"):
        SearchSpace.from_dict({**INT4_SPACE, "block_size": [64]}).restrict(("int4",), True, "cpu", widths=(96,))
    no_int4 = SearchSpace.from_dict(INT4_SPACE).restrict(("fp16", "int8"), True, "cuda")
    assert no_int4.int4_method.values == ("rtn",)
