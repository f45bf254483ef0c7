"""What a provenance signal reports: findings for a moderator, and what could not be read.

Everything here ends up in a detection's ``evidence`` JSON column, so it is built from plain
JSON types only, and every string that comes from the file is bounded.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Longest text taken from a file into the evidence (prompts, claim fields, error details).
MAX_TEXT_CHARS = 2000
# Longest short field (names, labels, URLs).
MAX_FIELD_CHARS = 300
# Most entries kept from one list found in a file (actions, models, manifests).
MAX_LIST_ITEMS = 32


class Kind(enum.StrEnum):
    """The signal a finding comes from; the values are stored, so they never change."""

    C2PA = "c2pa"
    IPTC = "iptc"
    GENERATOR_METADATA = "generator_metadata"
    STEALTH_PAYLOAD = "stealth_payload"
    WATERMARK = "watermark"


@dataclass(frozen=True)
class Finding:
    """One thing a provenance signal saw in a file.

    ``ai`` is True only for a declaration or mark of generative AI. ``rank`` orders AI
    findings for the one-line summary (lower is stronger) and is not stored.
    """

    kind: Kind
    ai: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    rank: int = 100

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "ai": self.ai,
            "summary": clip(self.summary, MAX_TEXT_CHARS),
            "details": json_safe(self.details),
        }


@dataclass
class Report:
    """Findings, errors and the status of each signal for one image."""

    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    checked: dict[str, str] = field(default_factory=dict)

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)

    def error(self, message: str) -> None:
        if len(self.errors) < MAX_LIST_ITEMS:
            self.errors.append(clip(message, MAX_FIELD_CHARS * 2))

    def check(self, signal: str, status: str) -> None:
        self.checked[signal] = clip(status, MAX_FIELD_CHARS)

    @property
    def ai_findings(self) -> list[Finding]:
        return sorted((f for f in self.findings if f.ai), key=lambda f: f.rank)


def clip(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``text`` cut to ``limit`` characters, marked when cut; control characters dropped."""
    # Cut before filtering: metadata text can be megabytes long.
    cleaned = "".join(ch for ch in text[: limit * 2] if ch.isprintable() or ch in "\n\t")
    if len(cleaned) <= limit and len(text) <= limit * 2:
        return cleaned
    return cleaned[: max(0, limit - 1)] + "…"


def json_safe(value: Any, depth: int = 0) -> Any:
    """A JSON-serialisable copy of ``value`` with strings clipped and containers bounded.

    Metadata is attacker-controlled: nesting, list lengths and string sizes are all capped.
    """
    if depth > 8:
        return "…"
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return clip(value, MAX_TEXT_CHARS)
    if isinstance(value, bytes):
        return clip(value.decode("latin-1"), MAX_FIELD_CHARS)
    if isinstance(value, Mapping):
        items = list(value.items())[:MAX_LIST_ITEMS]
        return {clip(str(k), MAX_FIELD_CHARS): json_safe(v, depth + 1) for k, v in items}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v, depth + 1) for v in list(value)[:MAX_LIST_ITEMS]]
    return clip(str(value), MAX_FIELD_CHARS)


def error_text(exc: BaseException) -> str:
    """A short description of an exception for the ``errors`` list."""
    detail = str(exc).strip()
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
