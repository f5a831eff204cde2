"""Reading, templating and splitting datasets (autotune.data)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from autotune.data import DataConfig, load_splits, parse_label_map
from autotune.errors import UserError
from conftest import LABELS, write_jsonl


def _rows(n_per_label: int = 10, labels=LABELS) -> list[dict]:
    return [{"text": f"example number {i} about {label.lower()} things", "label": label, "source": f"src{i % 3}"}
            for i in range(n_per_label) for label in labels]


def _all(splits):
    return splits.train + splits.validation + splits.test


def _user_error(config: DataConfig) -> str:
    with pytest.raises(UserError) as info:
        load_splits(config)
    message = str(info.value)
    assert message and "\n" not in message, f"message must be one line: {message!r}"
    return message


# --------------------------------------------------------------------------- formats


def test_jsonl(small_dataset):
    splits = load_splits(DataConfig(path=str(small_dataset)))
    assert len(_all(splits)) == 40
    assert splits.labels == tuple(sorted(LABELS))
    example = splits.train[0]
    assert example.prompt.startswith("### Text: example number ")
    assert example.prompt.endswith("### The tone is:\n")
    assert example.label in LABELS
    assert example.label.lower() in example.prompt


def test_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(_rows()))
    splits = load_splits(DataConfig(path=str(path)))
    assert len(_all(splits)) == 40
    assert splits.labels == tuple(sorted(LABELS))


def test_csv_with_header(tmp_path):
    path = tmp_path / "data.csv"
    lines = ["text,label"] + [f"\"{r['text']}, quoted\",{r['label']}" for r in _rows()]
    path.write_text("\n".join(lines) + "\n")
    splits = load_splits(DataConfig(path=str(path)))
    assert len(_all(splits)) == 40
    assert all(", quoted" in e.prompt for e in _all(splits))


def test_tsv_sniffed(tmp_path):
    path = tmp_path / "data.tsv"
    lines = ["label\ttext"] + [f"{r['label']}\t{r['text']}" for r in _rows()]
    path.write_text("\n".join(lines) + "\n")
    splits = load_splits(DataConfig(path=str(path)))
    assert len(_all(splits)) == 40


def test_headerless_semicolon_csv(tmp_path):
    path = tmp_path / "emotions.txt"
    path.write_text("".join(f"{r['text']};{r['label'].lower()}\n" for r in _rows()))
    config = DataConfig(path=str(path), columns=("text", "label"), delimiter=";")
    splits = load_splits(config)
    assert len(_all(splits)) == 40  # the first line is data, not a header
    assert splits.labels == tuple(sorted(label.lower() for label in LABELS))


def test_label_map_renames_and_selects(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": r["text"], "label": r["label"].lower()} for r in _rows()])
    label_map = parse_label_map("sad=Sad, joy=Happy")
    assert label_map == (("sad", "Sad"), ("joy", "Happy"))
    splits = load_splits(DataConfig(path=str(path), label_map=label_map))
    assert splits.labels == ("Happy", "Sad")
    assert len(_all(splits)) == 20
    assert {e.label for e in _all(splits)} == {"Happy", "Sad"}


def test_label_map_unknown_label(small_dataset):
    message = _user_error(DataConfig(path=str(small_dataset), label_map=(("Sad", "S"), ("Anger", "A"))))
    assert "Anger" in message


@pytest.mark.parametrize("text", ["sad", "sad=", "=Sad"])
def test_parse_label_map_errors(text):
    with pytest.raises(UserError):
        parse_label_map(text)


def test_template_with_extra_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _rows())
    template = "From {source}: {text}\nTone: {label}"
    splits = load_splits(DataConfig(path=str(path), template=template))
    for example in _all(splits):
        assert example.prompt.startswith("From src")
        assert example.prompt.endswith("\nTone: ")
        assert "{" not in example.prompt


def test_template_missing_field(small_dataset):
    message = _user_error(DataConfig(path=str(small_dataset), template="{source}: {text} -> {label}"))
    assert "{source}" in message


def test_template_must_end_with_label(small_dataset):
    message = _user_error(DataConfig(path=str(small_dataset), template="{label} is the tone of {text}"))
    assert "{label}" in message


def test_custom_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"sentence": r["text"], "tone": r["label"]} for r in _rows()])
    splits = load_splits(DataConfig(path=str(path), text_column="sentence", label_column="tone"))
    assert len(_all(splits)) == 40
    assert splits.labels == tuple(sorted(LABELS))


# --------------------------------------------------------------------------- splitting


def test_split_deterministic_and_stratified(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(n_per_label=25))
    first = load_splits(DataConfig(path=str(path), seed=1))
    again = load_splits(DataConfig(path=str(path), seed=1))
    other = load_splits(DataConfig(path=str(path), seed=2))
    assert (first.train, first.validation, first.test) == (again.train, again.validation, again.test)
    assert first.fingerprint == again.fingerprint
    assert set(first.test) != set(other.test)
    assert first.fingerprint != other.fingerprint
    for part in (first.train, first.validation, first.test):
        assert {e.label for e in part} == set(LABELS)
    total = len(_all(first))
    assert total == 100
    assert len(first.train) / total == pytest.approx(0.6, abs=0.05)
    assert len(first.validation) / total == pytest.approx(0.2, abs=0.05)
    assert len(first.test) / total == pytest.approx(0.2, abs=0.05)
    assert not set(first.train) & set(first.validation)
    assert not set(first.train) & set(first.test)
    assert not set(first.validation) & set(first.test)


def test_split_independent_of_file_order(tmp_path):
    rows = _rows()
    a = load_splits(DataConfig(path=str(write_jsonl(tmp_path / "a.jsonl", rows))))
    b = load_splits(DataConfig(path=str(write_jsonl(tmp_path / "b.jsonl", rows[::-1]))))
    assert (a.train, a.validation, a.test) == (b.train, b.validation, b.test)


def test_max_eval_keeps_the_labels_balanced(tmp_path):
    """--max-eval's prompts: as many of each label as the split allows, in the split's own order."""
    from autotune.data import Example, balanced

    rows = _rows(n_per_label=25) + [{"text": f"rare {i}", "label": "Rare"} for i in range(5)]
    splits = load_splits(DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows))))
    for limit, most in ((5, 1), (8, 2), (13, 3)):  # the split holds one Rare: the other labels share the rest
        chosen = splits.examples("validation", limit)
        counts = Counter(e.label for e in chosen)
        assert len(chosen) == limit and counts["Rare"] == 1 and max(counts.values()) == most
        assert max(counts.values()) - min(n for label, n in counts.items() if label != "Rare") <= 1
        assert chosen == [e for e in splits.validation if e in chosen]  # the split's order
    prompts, answers = splits.prompts("validation", limit=8)
    assert Counter(answers) == Counter(e.label for e in splits.examples("validation", 8))
    assert splits.examples("validation") == list(splits.validation)
    few = [Example(f"p{i}", "A") for i in range(6)] + [Example("q", "B")]  # B runs out: A fills the rest
    assert Counter(e.label for e in balanced(few, 5)) == {"A": 4, "B": 1}


def test_max_per_label(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(n_per_label=20))
    splits = load_splits(DataConfig(path=str(path), max_per_label=10))
    assert Counter(e.label for e in _all(splits)) == {label: 10 for label in LABELS}


def test_demo_dataset():
    splits = load_splits(DataConfig())
    examples = _all(splits)
    assert len(examples) == 680
    assert len(splits.labels) == 4
    counts = Counter(e.label for e in examples)
    assert set(counts) == set(splits.labels)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert splits.summary().startswith(f"{len(splits.train)} train / ")


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    message = _user_error(DataConfig(path=str(path)))
    assert str(path) in message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    message = _user_error(DataConfig(path=str(path)))
    assert str(path) in message and "empty" in message


def test_malformed_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in _rows()]
    lines[6] = '{"text": "broken", "label": '
    path.write_text("\n".join(lines) + "\n")
    message = _user_error(DataConfig(path=str(path)))
    assert f"{path}:7" in message


def test_json_line_not_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_rows()[0]) + "\n[1, 2]\n")
    assert f"{path}:2" in _user_error(DataConfig(path=str(path)))


def test_malformed_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"text": "a", "label": "x"},\n{"text": \n')
    assert str(path) in _user_error(DataConfig(path=str(path)))


def test_row_without_label(tmp_path):
    rows = _rows()
    del rows[4]["label"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    message = _user_error(DataConfig(path=str(path)))
    assert f"{path}:5" in message and "'label'" in message


def test_row_with_blank_text(tmp_path):
    rows = _rows()
    rows[2]["text"] = "   "
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert f"{path}:3" in _user_error(DataConfig(path=str(path)))


def test_unknown_text_column(small_dataset):
    message = _user_error(DataConfig(path=str(small_dataset), text_column="sentence"))
    assert "'sentence'" in message and "--text-column" in message


def test_single_label(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(labels=("Joy",)))
    message = _user_error(DataConfig(path=str(path)))
    assert "Joy" in message


def test_too_few_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _rows(n_per_label=2))
    message = _user_error(DataConfig(path=str(path)))
    assert str(path) in message and "too few" in message


def test_csv_wrong_field_count(tmp_path):
    path = tmp_path / "d.csv"
    lines = ["text,label"] + [f"{r['text']},{r['label']}" for r in _rows()]
    lines[3] = "one,two,three"
    path.write_text("\n".join(lines) + "\n")
    message = _user_error(DataConfig(path=str(path)))
    assert f"{path}:4" in message


def test_not_utf8(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\ncaf\xe9,Joy\n")
    assert str(path) in _user_error(DataConfig(path=str(path)))
