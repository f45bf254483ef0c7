"""How results are printed: the policy sentence, a table, JSON lines, a progress bar."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TextIO, TypeVar

from db.models import SourceStatus
from workers.results import ScanOutcome

POLICY = (
    "A flag is an indication for human review, not proof that an image is AI-generated: "
    "the detectors' own authors say their output may be wrong, and missing provenance "
    "says nothing about where a picture came from."
)

T = TypeVar("T")


def with_progress(items: Iterable[T], *, total: int, what: str, enabled: bool) -> Iterator[T]:
    """``items``, with a progress bar on stderr (rate and ETA) when ``enabled``, stderr is a
    terminal and there is more than one item."""
    if not (enabled and total > 1 and sys.stderr.isatty()):
        yield from items
        return
    from tqdm import tqdm

    with tqdm(items, total=total, desc=what, unit="file", file=sys.stderr) as bar:
        yield from bar


def print_json_line(outcome: ScanOutcome, out: TextIO = sys.stdout) -> None:
    print(json.dumps(outcome.to_json()), file=out, flush=True)


def print_table(outcomes: Sequence[ScanOutcome], out: TextIO) -> None:
    header = f"{'VERDICT':<14} {'AI_SCORE':>8}  {'DETECTORS':<40} PATH"
    print(header, file=out)
    for o in outcomes:
        score = "-" if o.ai_score is None else f"{o.ai_score:.3f}"
        if o.status == SourceStatus.REJECTED:
            detail = f"rejected: {o.reason}"
        else:
            detail = (
                ", ".join(
                    f"{d.name}={'err' if d.error else '-' if d.score is None else f'{d.score:.2f}'}"
                    for d in o.detectors
                )
                or "(no detector)"
            )
        label = (o.verdict or o.status).value + (" *" if o.flagged else "")
        print(f"{label:<14} {score:>8}  {detail:<40} {o.path}", file=out)
        for d in o.detectors:
            # What a detector found, in its own words (provenance: which signal, which tool).
            summary = d.evidence.get("summary") if isinstance(d.evidence, dict) else None
            if summary:
                text = f"{d.name}: {summary}"
                print(f"{'':<25}{text[:160]}{'...' if len(text) > 160 else ''}", file=out)
    flagged = sum(1 for o in outcomes if o.flagged)
    rejected = sum(1 for o in outcomes if o.status == SourceStatus.REJECTED)
    print(
        f"\n{len(outcomes)} files: {flagged} flagged for review (*), {rejected} rejected "
        "(not scored).",
        file=out,
    )
    print(POLICY, file=out)


def print_status_line(outcome: ScanOutcome, out: TextIO = sys.stdout) -> None:
    score = "-" if outcome.ai_score is None else f"{outcome.ai_score:.3f}"
    label = (outcome.verdict or outcome.status).value
    print(f"{label:<14} {score:>8}  {outcome.path}", file=out)
