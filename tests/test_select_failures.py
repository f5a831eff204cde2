"""One failure during selection costs that member, not the selection (autotune.report).

A member whose re-benchmark or test run fails (a timeout, out of memory) is dropped with one line
naming why, and the rule chooses among the rest; a baseline that fails is reported as failed. Exit 2
stays for bad input. The models are not built here: the measuring and building calls are replaced
by fakes that fail where the test says.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

import optuna
import pytest
from rich.console import Console

from autotune import report
from autotune.candidate import CandidateResult, CandidateSpec, Workspace
from autotune.errors import CandidateError, UserError
from autotune.export import ExportSpec
from autotune.measure import Latency, Measurement, Request, score
from autotune.search import DIRECTIONS, SearchSettings
from autotune.train import TrainSpec

TIMEOUT = "measuring took longer than 900 s and was stopped"
OOM = "onnxruntime-genai could not run the model: killed by signal 9 (out of memory?)"


def _measurement(answers, labels, latency_ms: float) -> Measurement:
    requests = tuple(Request(a, 5, latency_ms, latency_ms / 2, ()) for a in answers)
    latency = Latency(latency_ms, latency_ms, latency_ms / 2, latency_ms / 2, 5.0, 5.0, 200.0, 5, 5, len(answers))
    return Measurement(score(list(answers), answers, labels), latency, 300.0, 90.0, 1.0, 1, "cpu", requests=requests)


@pytest.fixture()
def selection(tmp_path: Path, base, splits, monkeypatch):
    """A study of three complete trials with their model folders, and fakes that fail on demand."""
    ws = Workspace(root=tmp_path / "cache", base=base, splits=splits, threads=1, device="test CPU")
    _, answers = ws.prompts("validation")
    n = len(answers)
    study = optuna.create_study(directions=list(DIRECTIONS))
    specs = {}
    # rank, size: the smallest-tied rule ranks them 0, 1, 2 (all equally accurate)
    for number, (rank, precision, size) in enumerate(((4, "int4", 90.0), (8, "int8", 270.0), (16, "fp32", 520.0))):
        spec = CandidateSpec(TrainSpec(rank=rank, steps=2, batch_size=4), ExportSpec(precision=precision))
        specs[number] = spec
        (ws.model_dir(spec)).mkdir(parents=True)
        (ws.model_dir(spec) / "genai_config.json").write_text("{}")
        study.add_trial(optuna.trial.create_trial(values=[0.75, 20.0 + number], user_attrs={
            "candidate": spec.describe(), "spec": asdict(spec), "size_mb": size, "peak_rss_mb": 300.0,
            "correct": "1" * (3 * n // 4) + "0" * (n - 3 * n // 4), "eval_examples": n, "model_key": ws.export_key(spec)}))
    fails: dict[tuple[str, Path | str], str] = {}  # (what, model folder or baseline) -> reason

    def fake_measure(model_dir, prompts, answers, labels, **_):
        if ("rebenchmark", model_dir) in fails:
            raise CandidateError(fails["rebenchmark", model_dir])
        return _measurement(answers, labels, 20.0)

    def fake_run_candidate(ws, spec, *, split="validation", with_latency=True, restrict_to_labels=False, **_):
        what = "restricted" if restrict_to_labels else "told" if spec.train is None else split
        if (what, ws.model_dir(spec)) in fails or (what, "base") in fails:
            raise CandidateError(fails.get((what, ws.model_dir(spec))) or fails[what, "base"])
        _, answers = ws.prompts(split)
        return CandidateResult(spec, ws.model_dir(spec), _measurement(answers, ws.splits.labels, 20.0), None)

    monkeypatch.setattr(report, "measure", fake_measure)
    monkeypatch.setattr(report, "run_candidate", fake_run_candidate)

    def select():
        return report.select_and_write(study, ws, SearchSettings(), tmp_path / "out", hardware={}, profile={},
                                       argv=[], keep_all=True)

    return ws, specs, fails, select, tmp_path / "out"


def test_a_member_that_fails_is_dropped_and_selection_goes_on(selection, monkeypatch) -> None:
    ws, specs, fails, select, out = selection
    printed = io.StringIO()
    monkeypatch.setattr(report, "console", Console(file=printed, width=80))
    fails["rebenchmark", ws.model_dir(specs[0])] = TIMEOUT  # the rule's first choice: its re-benchmark times out
    fails["test", ws.model_dir(specs[1])] = OOM  # the next: its test run runs out of memory
    fails["restricted", "base"] = OOM  # one baseline fails
    assert select() == 0
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("dropped #")]
    assert len(lines) == 2, printed.getvalue()  # one line each, however long
    assert lines[0].startswith("dropped #0 ") and "its re-benchmark failed" in lines[0] and TIMEOUT in lines[0]
    assert lines[1].startswith("dropped #1 ") and "its test run failed" in lines[1] and "out of memory" in lines[1]
    written = json.loads((out / "report.json").read_text())
    assert written["chosen"]["trial"] == 2
    assert [d["trial"] for d in written["dropped"]] == [0, 1]
    assert [m["trial"] for m in written["pareto"]] == [2]  # the dropped are not compared as if measured
    floors = {b["name"]: b for b in written["chosen"]["baselines"]}
    assert floors["base, answer restricted to the labels"] == {
        "name": "base, answer restricted to the labels", "detail": floors["base, answer restricted to the labels"]["detail"],
        "accuracy": None, "failed": OOM}
    assert floors["base, labels named in an instruction"]["accuracy"] == 1.0
    assert "failed: " + OOM in (out / "MODEL_CARD.md").read_text()


def test_every_member_failing_is_exit_1_not_the_bad_input_code(selection) -> None:
    ws, specs, fails, select, out = selection
    for spec in specs.values():
        fails["rebenchmark", ws.model_dir(spec)] = TIMEOUT
    with pytest.raises(UserError) as info:
        select()
    assert info.value.exit_code == 1 and "\n" not in str(info.value)
    assert str(info.value).startswith("every feasible candidate failed when run again in the selection (#0: ")
    written = json.loads((out / "report.json").read_text())
    assert written["chosen"] is None
    assert all(TIMEOUT in row["reason"] for row in written["trials"])
