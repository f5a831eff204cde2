"""Read a labelled text dataset and split it, deterministically, for the search.

Files: JSON lines, a JSON list of objects, or CSV/TSV (delimiter configurable; a file
without a header names its columns with ``columns=``). Each example becomes a prompt,
rendered from a template whose last field is the label::

    ### Text: {text}
    ### The tone is:
    {label}

``{text}`` and ``{label}`` stand for the chosen text and label columns; any other
``{column}`` of the file may be used too. The model is trained to write the label
after the prompt, and scored on whether it does.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from autotune.errors import UserError
from autotune.tokens import without_bos

DEFAULT_TEMPLATE = "### Text: {text}\n### The tone is:\n{label}"
DEMO_DATASET = "demo"
INSTRUCTION = "Classify the text as one of: {labels}. Answer with the label only."


@dataclass(frozen=True)
class Example:
    """One labelled example: the prompt the model sees and the label it should write."""

    prompt: str
    label: str


@dataclass(frozen=True)
class DataConfig:
    """How to read and split a dataset; maps one-to-one onto the CLI's data flags."""

    path: str = DEMO_DATASET
    text_column: str = "text"
    label_column: str = "label"
    columns: tuple[str, ...] = ()
    delimiter: str | None = None
    template: str = DEFAULT_TEMPLATE
    chat_template: bool = False
    label_map: tuple[tuple[str, str], ...] = ()
    max_per_label: int | None = None
    validation_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class Splits:
    """A stratified train / validation / test split and the label set.

    The search scores candidates on ``validation``; ``test`` is touched only to report
    the chosen model.
    """

    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]
    labels: tuple[str, ...]
    config: DataConfig
    fingerprint: str = field(default="")

    def summary(self) -> str:
        return (
            f"{len(self.train)} train / {len(self.validation)} validation / {len(self.test)} test, "
            f"labels {', '.join(self.labels)}"
        )

    def examples(self, split: str, limit: int | None = None) -> list[Example]:
        """The examples of ``split``, or ``limit`` of them with the labels balanced (:func:`balanced`)."""
        return balanced(getattr(self, split), limit)

    def prompts(self, split: str, tokenizer=None, limit: int | None = None) -> tuple[list[str], list[str]]:
        """Rendered prompts and true labels of :meth:`examples` ``(split, limit)``.

        ``tokenizer`` is needed only with ``config.chat_template`` (it holds the template).
        """
        examples = self.examples(split, limit)
        rendered = [render_prompt(e.prompt, tokenizer, self.config.chat_template) for e in examples]
        return rendered, [e.label for e in examples]


def balanced(examples: Sequence[Example], limit: int | None) -> list[Example]:
    """``limit`` of ``examples`` (all if None), as evenly spread over the labels as they allow: one of each
    label in turn, each label's examples taken in their order, until ``limit``; in the examples' order."""
    if limit is None or limit >= len(examples):
        return list(examples)
    by_label: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_label.setdefault(example.label, []).append(index)
    queues = [iter(indices) for _, indices in sorted(by_label.items())]
    chosen: set[int] = set()
    while len(chosen) < limit:
        for queue in queues:
            index = next(queue, None)
            if index is not None and len(chosen) < limit:
                chosen.add(index)
    return [examples[i] for i in sorted(chosen)]


def render_prompt(prompt: str, tokenizer, chat_template: bool) -> str:
    """The exact text the model sees before its answer (shared by training and measuring).

    A chat template's BOS is left to the tokenizer where it adds one (:func:`autotune.tokens.without_bos`).
    """
    if not chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat-template: this model's tokenizer has no chat template; drop the flag")
    messages = [{"role": "user", "content": prompt.rstrip()}]
    return without_bos(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), tokenizer)


def load_splits(config: DataConfig) -> Splits:
    """Read ``config.path``, render prompts and split them.

    Raises:
        UserError: with a one-line message naming the file, the line and the fix.
    """
    rows, where = _read_rows(config)
    labels_map = dict(config.label_map)
    fields = _template_fields(config.template, config)
    if fields[-1] != "label" and fields[-1] != config.label_column:
        raise UserError(f"--template must end with the label field {{label}}; it ends with {{{fields[-1]}}}")
    prompt_template = config.template[: config.template.rfind("{")]
    seen_raw: Counter[str] = Counter()
    examples: list[Example] = []
    for line_no, row in rows:
        for column in (config.text_column, config.label_column):
            value = row.get(column)
            if value is None or (isinstance(value, str) and not value.strip()):
                known = ", ".join(sorted(row)) or "none"
                raise UserError(
                    f"{where}:{line_no}: no value in column '{column}' (columns here: {known}); "
                    "fix the row or choose the column with --text-column / --label-column"
                )
        raw_label = str(row[config.label_column]).strip()
        seen_raw[raw_label] += 1
        if labels_map and raw_label not in labels_map:
            continue  # a label map selects and renames labels; the rest are left out
        label = labels_map.get(raw_label, raw_label)
        values = {k: str(v) for k, v in row.items()}
        values["text"] = str(row[config.text_column]).strip()
        values["label"] = label
        missing = [f for f in fields if f not in values]
        if missing:
            raise UserError(
                f"--template names {{{missing[0]}}}, which is not a column of {where} "
                f"(columns: {', '.join(sorted(row))}); use {{text}}, {{label}} or a column name"
            )
        examples.append(Example(prompt=prompt_template.format(**values), label=label))
    unknown = sorted(set(labels_map) - set(seen_raw))
    if unknown:
        raise UserError(
            f"--label-map names label '{unknown[0]}', which {where} does not contain "
            f"(labels there: {', '.join(sorted(seen_raw))})"
        )
    return _split(examples, config, where)


def _read_rows(config: DataConfig) -> tuple[list[tuple[int, dict]], str]:
    if config.path == DEMO_DATASET:
        text = resources.files("autotune.demo").joinpath("tones.jsonl").read_text(encoding="utf-8")
        return _parse(text, "jsonl", config, "demo dataset"), "demo dataset"
    path = Path(config.path).expanduser()
    if not path.is_file():
        raise UserError(f"--data {config.path}: no such file; pass a .jsonl, .json or .csv file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"--data {path}: not UTF-8 text (byte {exc.start}); re-save the file as UTF-8") from exc
    if not text.strip():
        raise UserError(f"--data {path}: the file is empty; it needs labelled rows")
    suffix = path.suffix.lower()
    kind = {".jsonl": "jsonl", ".json": "json"}.get(suffix, "csv")
    return _parse(text, kind, config, str(path)), str(path)


def _parse(text: str, kind: str, config: DataConfig, where: str) -> list[tuple[int, dict]]:
    rows: list[tuple[int, dict]] = []
    if kind == "jsonl":
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise UserError(f"{where}:{line_no}: not valid JSON ({exc.msg}); each line must be one JSON object") from exc
            if not isinstance(row, dict):
                raise UserError(f"{where}:{line_no}: a JSON line must be an object like {{\"text\": ..., \"label\": ...}}")
            rows.append((line_no, row))
    elif kind == "json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UserError(f"{where}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"{where}: a .json dataset must be a list of objects; use .jsonl for one object per line")
        rows = [(i, r) for i, r in enumerate(data, start=1)]  # "file:N" names the N-th object here
    else:
        delimiter = config.delimiter or _sniff_delimiter(text)
        reader = csv.reader(io.StringIO(text), delimiter=delimiter)
        header = list(config.columns) or None
        for values in reader:
            line_no = reader.line_num  # the physical line: quoted fields may span several
            if not any(v.strip() for v in values):
                continue
            if header is None:
                header = [v.strip() for v in values]
                continue
            if len(values) != len(header):
                raise UserError(
                    f"{where}:{line_no}: {len(values)} fields where the header has {len(header)} "
                    f"(delimiter {delimiter!r}); fix the row or pass --delimiter / --columns"
                )
            rows.append((line_no, dict(zip(header, values))))
    if not rows:
        raise UserError(f"{where}: no rows; the dataset needs labelled examples")
    columns = set().union(*(r.keys() for _, r in rows))
    for role, column in (("text", config.text_column), ("label", config.label_column)):
        if column not in columns:
            raise UserError(
                f"{where}: no column '{column}' (columns: {', '.join(sorted(columns))}); "
                f"choose the {role} column with --{role}-column"
            )
    return rows


def _sniff_delimiter(text: str) -> str:
    first = text.splitlines()[0]
    for candidate in ("\t", ";", ",", "|"):
        if candidate in first:
            return candidate
    return ","


def _template_fields(template: str, config: DataConfig) -> list[str]:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise UserError(f"--template is not a valid format string ({exc}); fields look like {{text}}") from exc
    if not fields:
        raise UserError("--template has no fields; it needs {text} (or a column) and ends with {label}")
    if "text" not in fields and config.text_column not in fields:
        raise UserError("--template never uses the text: add {text}")
    return fields


def _split(examples: list[Example], config: DataConfig, where: str) -> Splits:
    by_label: dict[str, list[Example]] = {}
    for example in examples:
        by_label.setdefault(example.label, []).append(example)
    if len(by_label) < 2:
        only = next(iter(by_label), "none")
        raise UserError(f"{where}: only one label ({only}); a classifier needs at least two: add rows with another "
                        "label, or check --label-column and --label-map")
    rng = random.Random(config.seed)
    train: list[Example] = []
    validation: list[Example] = []
    test: list[Example] = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda e: e.prompt)  # independent of file order
        rng.shuffle(group)
        if config.max_per_label:
            group = group[: config.max_per_label]
        n_val = max(1, round(len(group) * config.validation_fraction))
        n_test = max(1, round(len(group) * config.test_fraction))
        if len(group) - n_val - n_test < 1:
            raise UserError(
                f"{where}: label '{label}' has {len(group)} rows, too few to split into train, validation and "
                "test; add rows (at least 3 per label)"
            )
        test += group[:n_test]
        validation += group[n_test : n_test + n_val]
        train += group[n_test + n_val :]
    # Orders independent of the file's; a split cut to --max-eval prompts keeps its labels balanced (balanced()).
    rng.shuffle(train)
    validation.sort(key=lambda e: hashlib.sha256(e.prompt.encode()).hexdigest())
    test.sort(key=lambda e: hashlib.sha256(e.prompt.encode()).hexdigest())
    digest = hashlib.sha256()
    for part in (train, validation, test):
        for example in part:
            digest.update(f"{example.prompt}\x00{example.label}\x01".encode())
        digest.update(b"\x02")
    digest.update(repr(config.chat_template).encode())
    return Splits(
        train=tuple(train),
        validation=tuple(validation),
        test=tuple(test),
        labels=tuple(sorted(by_label)),
        config=config,
        fingerprint=digest.hexdigest()[:16],
    )


def parse_label_map(text: str) -> tuple[tuple[str, str], ...]:
    """``"sadness=Sad,joy=Joy"`` -> ``(("sadness", "Sad"), ("joy", "Joy"))``."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise UserError(f"--label-map item '{item}' is not FROM=TO; write e.g. sadness=Sad,joy=Joy")
        source, target = (s.strip() for s in item.split("=", 1))
        if not source or not target:
            raise UserError(f"--label-map item '{item}' has an empty side; write e.g. sadness=Sad")
        pairs.append((source, target))
    return tuple(pairs)


def instruction_prompt(prompt: str, labels: tuple[str, ...] | list[str], tokenizer=None) -> str:
    """The zero-shot baseline's prompt: an instruction that names the labels, then the example.

    With a tokenizer that has a chat template, the instruction and the example are the user's
    turn and the template's answer cue (the prompt's last line, e.g. ``### The tone is:``,
    without heading marks) opens the assistant's answer, so a base model answers with a label
    rather than with a sentence about it. Without a chat template, plain text.
    """
    instruction = INSTRUCTION.format(labels=", ".join(labels))
    body, _, cue = prompt.rstrip("\n").rpartition("\n")
    if not getattr(tokenizer, "chat_template", None) or not body:
        return f"{instruction}\n\n{prompt}"
    messages = [{"role": "user", "content": f"{instruction}\n\n{body}"}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return without_bos(chat, tokenizer) + cue.lstrip("# ")
