"""The README quotes what the code prints: its example run's final table has today's title and columns."""

from __future__ import annotations

import re
from pathlib import Path

from autotune.card import FINAL_COLUMNS

README = Path(__file__).resolve().parent.parent / "README.md"


def quoted_blocks(text: str) -> list[str]:
    """The contents of the fenced blocks without a language (quoted output), in order."""
    blocks, current, language = [], None, None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, language = [], line[3:].strip()
            else:
                if not language:
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def table_header(block: str) -> tuple[list[str], str]:
    """The column names of the first rich table in ``block`` (its header cells may wrap over lines), and the
    title lines above it."""
    lines = block.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("┏"))
    end = next(i for i in range(top, len(lines)) if lines[i].startswith("┡"))
    title = " ".join(line.strip() for line in lines[:top] if line.strip())
    cells: list[list[str]] = []
    for line in lines[top + 1:end]:
        parts = line.strip().strip("┃").split("┃")
        cells = cells or [[] for _ in parts]
        for column, part in zip(cells, parts, strict=True):
            if part.strip():
                column.append(part.strip())
    return [" ".join(column) for column in cells], title


def test_the_readme_quotes_todays_final_table():
    blocks = [b for b in quoted_blocks(README.read_text()) if "Candidates (requests re-benchmarked" in b]
    assert blocks, "the README quotes no final table"
    for block in blocks:
        columns, title = table_header(block)
        assert tuple(columns) == FINAL_COLUMNS, columns
        assert "objective request p50; bounds: --max-latency" in re.sub(r"\s+", " ", title), title
        assert re.search(r"^chosen #\d+ ", block, flags=re.M), "no chosen line under the table"
        assert re.search(r"^  rule: ", block, flags=re.M), "no rule line under the chosen one"


def test_table_header_reads_wrapped_cells():
    block = ("Candidates (requests re-benchmarked, interleaved; objective request p50; bounds: --max-latency 1 ms)\n"
             "┏━━━┳━━━━━┓\n┃   ┃ val ┃\n┃ # ┃ acc ┃\n┡━━━╇━━━━━┩\n│ 0 │ 1.0 │\n")
    assert table_header(block) == (["#", "val acc"], block.splitlines()[0])
