"""Bad input through the real CLI: one clear line, exit code 2, no traceback, nothing left behind.

Every case runs ``python -m autotune.cli`` in a subprocess and checks that

* the exit code is 2;
* stderr ends with a single ``error: ...`` line that names the problem and the fix
  (two case-specific substrings);
* there is no ``Traceback`` in stderr;
* nothing is left that a later run would trip over: no ``study.db`` (every case here is
  caught before a study is opened) and no half-written ``*.tmp-*`` artifact.

The cases are cheap (they fail before training), but each process pays the import of
torch for the hardware probe, so they run concurrently in one module fixture and each
test only reads its result. Model and data cases use ``autotune candidate --steps 2``;
space, storage and latency cases use the search command.

Read-only folders: the tests run as root in CI, where ``chmod 555`` does not stop
writes, so as root a read-only tmpfs is mounted instead (falling back to a path below a
regular file if mounting is not allowed). The free-disk case mounts a small tmpfs (or,
where mounting is impossible, calls ``check_free_disk`` on a faked ``disk_usage``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import LABELS, run_cli, write_jsonl

UNREACHABLE_POSTGRES = "postgresql+psycopg2://u:p@127.0.0.1:1/db"


@dataclass
class Env:
    """What a case's setup may use: its own folder and the shared tiny model, data and space."""

    dir: Path
    model: Path
    data: Path
    space: Path
    mounts: list[Path] = field(default_factory=list)

    def candidate(self, *extra: str, model: Path | None = None, data: Path | None = None) -> list[str]:
        """``autotune candidate`` that would train for 2 steps, if the input were good."""
        return ["candidate", "--model", str(model or self.model), "--data", str(data or self.data), "--steps", "2",
                "--batch-size", "4", "--threads", "1", "--no-baseline", "-o", str(self.out), *extra]

    def search(self, *extra: str, space: Path | None = None) -> list[str]:
        """The search command on the tiny model, one trial."""
        return ["--model", str(self.model), "--data", str(self.data), "--space", str(space or self.space),
                "--trials", "1", "--max-latency", "1000", "--threads", "1", "-o", str(self.out), *extra]

    @property
    def out(self) -> Path:
        return self.dir / "out"

    def jsonl(self, name: str, rows: list[dict]) -> Path:
        return write_jsonl(self.dir / name, rows)

    def text(self, name: str, content: str | bytes) -> Path:
        path = self.dir / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def model_copy(self, name: str = "model", *, config: dict | None = None, weights: str | None = "keep") -> Path:
        """A copy of the tiny model's folder, optionally with another config or weights."""
        folder = self.dir / name
        shutil.copytree(self.model, folder)
        if config is not None:
            merged = {**json.loads((folder / "config.json").read_text()), **config}
            (folder / "config.json").write_text(json.dumps(merged))
        if weights != "keep":
            for path in folder.glob("*.safetensors"):
                path.unlink()
            if weights is not None:
                (folder / weights).write_bytes(b"\x80\x04not really a pickle")
        return folder


def rows(n_per_label: int = 10, labels: tuple[str, ...] = LABELS) -> list[dict]:
    return [{"text": f"example number {i} about {label.lower()} things", "label": label}
            for i in range(n_per_label) for label in labels]


# --------------------------------------------------------------------------- read-only folders


def _mount(*options: str, target: Path) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(target)],
                          capture_output=True, text=True)
    return proc.returncode == 0


def _unmount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


def read_only_output(env: Env) -> list[str]:
    """--output inside a folder nobody may write to."""
    parent = env.dir / "locked"
    if os.geteuid() != 0:
        parent.mkdir()
        parent.chmod(0o555)
    elif _mount("ro", "size=1m", target=parent):  # root ignores modes; a read-only filesystem stops root too
        env.mounts.append(parent)
    else:  # no mount allowed: a folder below a regular file cannot be created by anyone
        parent.write_text("a file, not a folder\n")
    return ["candidate", "--model", str(env.model), "--data", str(env.data), "--steps", "2", "--threads", "1",
            "--no-baseline", "-o", str(parent / "out")]


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Env], list[str]]  # builds the bad input; returns the CLI arguments
    problem: str  # a substring of the error line that names the problem
    fix: str  # a substring of the error line that says how to fix it
    skip: Callable[[], str | None] = lambda: None


def _no_gpu() -> str | None:
    import torch

    return "this machine has a CUDA GPU" if torch.cuda.is_available() else None


def _on_windows() -> str | None:
    return "this is Windows" if sys.platform == "win32" else None


CASES = [
    # ---------------------------------------------------------------- data
    Case("missing-data-file",
         lambda e: e.candidate(data=e.dir / "nothere.jsonl"),
         "nothere.jsonl: no such file", "pass a .jsonl"),
    Case("empty-data-file",
         lambda e: e.candidate(data=e.text("empty.jsonl", "\n  \n")),
         "the file is empty", "needs labelled rows"),
    Case("malformed-json-line",
         lambda e: e.candidate(data=e.text("bad.jsonl", '{"text": "ok", "label": "Joy"}\n{"text": "oops", \n')),
         "bad.jsonl:2: not valid JSON", "each line must be one JSON object"),
    Case("row-without-label",
         lambda e: e.candidate(data=e.jsonl("nolabel.jsonl", rows()[:5] + [{"text": "no label here"}] + rows()[5:])),
         "nolabel.jsonl:6: no value in column 'label'", "--label-column"),
    Case("unknown-text-column",
         lambda e: e.candidate("--text-column", "body"),
         "no column 'body'", "choose the text column with --text-column"),
    Case("single-label",
         lambda e: e.candidate(data=e.jsonl("one.jsonl", rows(labels=("Joy",)))),
         "only one label (Joy)", "add rows with another label"),
    Case("template-missing-field",
         lambda e: e.candidate("--template", "### {text} ({source})\\n{label}"),
         "--template names {source}", "use {text}, {label} or a column name"),
    Case("too-few-rows",
         lambda e: e.candidate(data=e.jsonl("few.jsonl", rows(n_per_label=2))),
         "too few to split", "at least 3 per label"),
    Case("label-map-unknown-label",
         lambda e: e.candidate("--label-map", "Joy=joy,Anger=anger"),
         "--label-map names label 'Anger'", "labels there: Fear, Joy, Sad, Surprise"),
    # ---------------------------------------------------------------- hardware and settings
    Case("unknown-target",
         lambda e: e.search("--target", "tpu"),
         "unknown --target 'tpu'", "choose from auto, cpu, cuda, dml"),
    Case("cuda-without-gpu",
         lambda e: e.search("--target", "cuda"),
         "--target cuda: no CUDA GPU found", "use --target cpu", skip=_no_gpu),
    Case("dml-off-windows",
         lambda e: e.search("--target", "dml"),
         "DirectML needs Windows", "use --target cpu", skip=_on_windows),
    Case("unknown-profile",
         lambda e: e.search("--profile", "cpu-fast"),
         "--profile cpu-fast: no such hardware profile", "choose from cpu, cpu-bf16"),
    Case("max-latency-zero",
         lambda e: [*e.search(), "--max-latency", "0"],
         "--max-latency must be a positive number", "got 0"),
    Case("max-latency-negative",
         lambda e: [*e.search(), "--max-latency", "-5"],
         "--max-latency must be a positive number", "got -5"),
    Case("zero-trials",
         lambda e: [*e.search(), "--trials", "0"],
         "--trials must be at least 1", "got 0"),
    # ---------------------------------------------------------------- search space
    Case("space-unknown-key",
         lambda e: e.search(space=e.text("space.yaml", "rank: [4]\nlearning_rat: [1.0e-3]\n")),
         "unknown key 'learning_rat'", "known: method, rank"),
    Case("space-empty-range",
         lambda e: e.search(space=e.text("space.yaml", "rank: {low: 64, high: 4}\n")),
         "'rank' range is empty", "make low <= high"),
    Case("space-empty-list",
         lambda e: e.search(space=e.text("space.yaml", "rank: [4]\nprecision: []\n")),
         "'precision' is an empty list", "give at least one value"),
    Case("space-not-yaml",
         lambda e: e.search(space=e.text("space.yaml", "rank: [4\nsteps: 3\n")),
         "not valid YAML at line 2", "fix the syntax"),
    Case("space-missing-file",
         lambda e: e.search(space=e.dir / "nospace.yaml"),
         "nospace.yaml: no such file", "leave --space out"),
    # ---------------------------------------------------------------- model
    Case("model-path-missing",
         lambda e: e.candidate(model=e.dir / "no-such-model"),
         "no-such-model: no such model folder", "pass a local HF folder"),
    Case("model-without-weights",
         lambda e: e.candidate(model=e.model_copy(weights=None)),
         "no weights (*.safetensors)", "or pass another --model"),
    Case("model-only-pickle",
         lambda e: e.candidate(model=e.model_copy(weights="pytorch_model.bin")),
         "only pickled .bin weights", "--allow-pickle"),
    Case("model-unexportable-architecture",
         lambda e: e.candidate(model=e.model_copy(config={"architectures": ["BertForMaskedLM"]})),
         "architecture BertForMaskedLM is not one the onnxruntime-genai builder exports",
         "choose a causal LM of a supported architecture (LlamaForCausalLM"),
    # ---------------------------------------------------------------- output and storage
    Case("output-is-a-file",
         lambda e: _output_is_file(e),
         "is a file", "choose a folder"),
    Case("output-read-only",
         read_only_output,
         "is not writable", "choose another folder"),
    Case("storage-malformed-url",
         lambda e: e.search("--storage", "notaurl"),
         "--storage: cannot open the study storage", "check the URL"),
    Case("storage-unreachable",
         lambda e: e.search("--storage", UNREACHABLE_POSTGRES),
         "--storage: cannot open the study storage", "that the server is up"),
]


def _output_is_file(env: Env) -> list[str]:
    target = env.text("out-file", "precious\n")
    args = env.candidate()
    args[args.index("-o") + 1] = str(target)
    return args


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    env: Env
    args: list[str]
    proc: subprocess.CompletedProcess | None
    skipped: str | None = None
    before: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_model_dir, tiny_dataset, tiny_space):
    """Run every case's CLI once, concurrently; yield id -> Outcome; unmount afterwards."""
    runs: dict[str, Outcome] = {}
    for case in CASES:
        env = Env(tmp_path_factory.mktemp(case.id), tiny_model_dir, tiny_dataset, tiny_space)
        reason = case.skip()
        if reason:
            runs[case.id] = Outcome(env, [], None, skipped=reason)
            continue
        args = case.setup(env)
        before = {p: p.read_bytes() for p in env.dir.rglob("*") if p.is_file() and p.name == "out-file"}
        runs[case.id] = Outcome(env, args, None, before=before)

    def launch(outcome: Outcome) -> None:
        outcome.proc = run_cli(*outcome.args, timeout=300)

    todo = [o for o in runs.values() if o.skipped is None]
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        list(pool.map(launch, todo))
    try:
        yield runs
    finally:
        for outcome in runs.values():
            for mount in outcome.env.mounts:
                _unmount(mount)


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, outcomes) -> None:
    outcome = outcomes[case.id]
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    proc = outcome.proc
    where = f"autotune {' '.join(outcome.args)}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, where
    assert proc.returncode == 2, where
    line = _last_line(proc.stderr)
    assert line.startswith("error: "), where
    assert "\n" not in line.strip() and len(line) < 600, where
    assert case.problem in line, f"expected {case.problem!r} in: {line}"
    assert case.fix in line, f"expected the fix {case.fix!r} in: {line}"
    # Nothing a later run would trip over.
    env = outcome.env
    assert not (env.out / "study.db").exists(), "a study was created for an input error"
    leftovers = [p for p in env.dir.rglob("*.tmp-*")]
    assert not leftovers, leftovers
    for path, content in outcome.before.items():
        assert path.read_bytes() == content, f"{path} was changed"
    if env.out.is_dir():
        cache = env.out / "cache"
        built = [p for p in cache.rglob("*") if p.is_file()] if cache.is_dir() else []
        assert not built, f"artifacts built for an input error: {built}"


def test_case_table_is_broad() -> None:
    assert len(CASES) >= 22
    assert len({c.id for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------- free disk


def test_not_enough_disk_for_export(tmp_path: Path, tiny_model_dir, tiny_dataset) -> None:
    """An export that cannot fit is refused before it starts, with sizes in the message.

    The output lives on an 8 MiB tmpfs: the adapter (about 4 MB with its tokenizer)
    fits, the int4 export of the tiny model (about 20 MB with its merged copy) does not.
    """
    small = tmp_path / "small"
    if not _mount("size=8m", target=small):
        _check_free_disk_without_mount(tmp_path, tiny_model_dir)
        return
    try:
        out = small / "out"
        proc = run_cli("candidate", "--model", str(tiny_model_dir), "--data", str(tiny_dataset), "--steps", "2",
                       "--batch-size", "4", "--threads", "1", "--no-baseline", "--precision", "int4", "-o", str(out),
                       timeout=300)
        where = f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
        assert "Traceback" not in proc.stderr, where
        assert proc.returncode == 2, where
        line = _last_line(proc.stderr)
        assert line.startswith("error: not enough free disk for the int4 export"), where
        assert "MB free" in line and "MB needed" in line and "choose --output elsewhere" in line, line
        models = out / "cache" / "models"
        assert not [p for p in models.iterdir() if p.is_dir()], "the export started anyway"
        assert not list(out.rglob("*.tmp-*")) and not list((out / "cache").glob("merge*")), "partial files left"
        assert list((out / "cache" / "adapters").glob("*/train_log.json")), "the trained adapter was not kept"
    finally:
        _unmount(small)


def _check_free_disk_without_mount(tmp_path: Path, model_dir: Path) -> None:
    """Fallback where tmpfs cannot be mounted: the same check against a faked disk_usage."""
    from unittest import mock

    from autotune.errors import UserError
    from autotune.export import ExportSpec, check_free_disk
    from autotune.models import resolve_model

    base = resolve_model(str(model_dir))
    usage = shutil.disk_usage(tmp_path)._replace(free=1 << 20)
    with mock.patch("autotune.export.shutil.disk_usage", return_value=usage):
        with pytest.raises(UserError, match="not enough free disk"):
            check_free_disk(tmp_path / "models", base, ExportSpec("int4"))
