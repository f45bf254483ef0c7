"""Labelled examples out of the review: every decided case as one row of CSV or one JSON
object per line, for calibration. The CLI (``synthsentry review export``) and the admin
download write through the same function.

Columns: ``sha256``, ``label`` (the final decision), ``decided_at``, ``decided_by``,
``ensemble_version`` and ``ai_score`` of the verdict the deciding moderator was shown,
``detectors`` (name, version and score of each detector in that verdict) and ``sources``
(where the bytes were seen). In CSV the two lists are JSON text in their cells.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from typing import Literal, TextIO

from workers.review import LabelledExample

ExportFormat = Literal["csv", "jsonl"]
COLUMNS = (
    "sha256",
    "label",
    "decided_at",
    "decided_by",
    "ensemble_version",
    "ai_score",
    "detectors",
    "sources",
)
MEDIA_TYPES: dict[str, str] = {"csv": "text/csv; charset=utf-8", "jsonl": "application/jsonl"}


class _Line:
    """A file-like target that hands back what was written to it, for streaming."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def take(self) -> str:
        text = "".join(self.parts)
        self.parts.clear()
        return text


def export_lines(examples: Iterable[LabelledExample], fmt: ExportFormat) -> Iterator[str]:
    """The export as text chunks, one example at a time (a download streams them)."""
    if fmt not in MEDIA_TYPES:
        raise ValueError(f"unknown export format {fmt!r} (csv or jsonl)")
    line = _Line()
    writer = csv.DictWriter(line, fieldnames=COLUMNS, lineterminator="\n")
    if fmt == "csv":
        writer.writeheader()
        yield line.take()
    for example in examples:
        row = example.as_row()
        if fmt == "jsonl":
            yield json.dumps(row, sort_keys=True, allow_nan=False) + "\n"
            continue
        writer.writerow(
            {
                **row,
                "detectors": json.dumps(row["detectors"], sort_keys=True),
                "sources": json.dumps(row["sources"]),
            }
        )
        yield line.take()


def write_examples(examples: Iterable[LabelledExample], fmt: ExportFormat, out: TextIO) -> int:
    """Write the export to ``out``; returns how many examples."""
    written = 0
    for chunk in export_lines(examples, fmt):
        out.write(chunk)
        written += 1
    return written - (1 if fmt == "csv" else 0)
