"""The one Markdown-table writer: samples, comparisons, sweep results, bench and `generate --compare_p`."""

from __future__ import annotations

from typing import Iterable, Sequence


def md_cell(value) -> str:
    """Text safe inside one Markdown table cell: pipes escaped, line breaks as <br>."""
    return str(value).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def md_table(head: Sequence[str], rows: Iterable[Sequence], align: Sequence[str] | None = None) -> str:
    """A Markdown table, one line per row, ending in a newline. Cells are escaped with md_cell; align
    holds one of 'l' or 'r' per column (default: every column left-aligned)."""
    rule = ["---:" if a == "r" else "---" for a in (align or ["l"] * len(head))]
    lines = ["| " + " | ".join(md_cell(h) for h in head) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
