"""Run every provenance signal on one image and turn the result into stored evidence.

Each signal runs on its own: a failure in one (a parser bug, a library error) is recorded
in ``errors`` and the others still run. A file without provenance yields no finding, and
that says nothing about how it was made: the detector then abstains.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from PIL import Image

from workers.intake import SNIFF_BYTES, sniff
from workers.provenance.c2pa import (
    C2paReader,
    C2paUnavailable,
    c2pa_findings,
    remote_pointer_finding,
)
from workers.provenance.containers import (
    ContainerMetadata,
    ExifText,
    read_container,
    read_exif_text,
)
from workers.provenance.findings import Kind, Report, clip, error_text
from workers.provenance.generator_metadata import generator_findings
from workers.provenance.stealth import read_stealth
from workers.provenance.watermark import check_watermarks
from workers.provenance.xmp import XmpFacts, iptc_findings, read_xmp

MIME_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
    "BMP": "image/bmp",
    "HEIF": "image/heif",
    "AVIF": "image/avif",
}
SUMMARY_CHARS = 400

T = TypeVar("T")


@dataclass(frozen=True)
class ProvenanceConfig:
    """Tunable limits; every field is a spec option of the same name."""

    # A watermark match counts as evidence only below this binomial tail probability.
    watermark_max_p_value: float = 1e-6
    # Larger images are not searched for a watermark (no generator emits them unscaled,
    # and scaling destroys the mark); 4096 x 4096.
    watermark_max_pixels: int = 4096 * 4096
    # Larger RGBA PNGs are not decoded again to read alpha LSBs.
    stealth_max_pixels: int = 4096 * 4096


class ProvenanceInspector:
    """Holds the libraries the signals need, loaded once; inspects one image at a time."""

    def __init__(self, config: ProvenanceConfig) -> None:
        self.config = config
        self.c2pa: C2paReader | None = None
        self.c2pa_unavailable: str | None = None
        try:
            self.c2pa = C2paReader()
        except C2paUnavailable as exc:
            self.c2pa_unavailable = str(exc)
        self.watermark_unavailable: str | None = None
        try:
            import cv2  # noqa: F401  (the watermark decoder's colour conversion)
        except ImportError as exc:
            self.watermark_unavailable = f"OpenCV (cv2) is not importable here ({error_text(exc)})"

    def library_versions(self) -> dict[str, str]:
        """Versions of the libraries whose behaviour the results depend on."""
        versions = {
            "c2pa": self.c2pa.package_version if self.c2pa else "none",
            "iwm": _package_version("invisible-watermark"),
        }
        if self.watermark_unavailable is None:
            import cv2

            versions["cv2"] = str(cv2.__version__)
        return versions

    def inspect(self, image: Image.Image, raw: bytes) -> Report:
        report = Report()
        fmt = sniff(raw[:SNIFF_BYTES]) if raw else None
        meta = _guarded(report, "container", lambda: read_container(raw, fmt, report))
        meta = meta or ContainerMetadata(format=fmt)
        exif: ExifText | None = None
        if meta.exif is not None:
            exif = _guarded(report, "EXIF", lambda: read_exif_text(meta.exif or b"", report))
        facts = _guarded(report, "XMP", lambda: read_xmp(meta.xmp_packets, report)) or XmpFacts()
        self._iptc(facts, report)
        self._c2pa(raw, fmt, meta, facts, report)
        found = _guarded(
            report, "generator metadata", lambda: generator_findings(meta, exif, report)
        )
        if found is None:
            report.check("generator_metadata", "error")
        else:
            report.check("generator_metadata", f"found: {len(found)}" if found else "none found")
        _guarded(
            report,
            "stealth payload",
            lambda: read_stealth(
                image,
                raw,
                meta,
                report,
                max_pixels=self.config.stealth_max_pixels,
                orientation=exif.orientation if exif else None,
            ),
        )
        if self.watermark_unavailable is not None:
            report.check("watermark", "unavailable")
            report.error(f"invisible watermark not checked: {self.watermark_unavailable}")
        else:
            _guarded(
                report,
                "watermark",
                lambda: check_watermarks(
                    image,
                    report,
                    max_p_value=self.config.watermark_max_p_value,
                    max_pixels=self.config.watermark_max_pixels,
                    raw=raw,
                ),
            )
        return report

    def _iptc(self, facts: XmpFacts, report: Report) -> None:
        before = len(report.findings)
        _guarded(report, "IPTC", lambda: iptc_findings(facts, report))
        report.check("iptc", "found" if len(report.findings) > before else "none found")

    def _c2pa(
        self, raw: bytes, fmt: str | None, meta: ContainerMetadata, facts: XmpFacts, report: Report
    ) -> None:
        remote = facts.provenance_urls[0] if facts.provenance_urls else None
        if self.c2pa is None:
            report.check("c2pa", "unavailable")
            report.error(f"C2PA not checked: {self.c2pa_unavailable}")
            if remote:
                remote_pointer_finding(remote, report, why="the C2PA SDK is not usable here")
            return
        if fmt is None or fmt not in MIME_TYPES:
            report.check("c2pa", "not applicable (unknown format)")
            return
        reader = self.c2pa
        _guarded(
            report,
            "C2PA",
            lambda: c2pa_findings(
                reader,
                raw,
                MIME_TYPES[fmt],
                report,
                embedded_store=meta.c2pa_store,
                remote_hint=remote,
            ),
        )
        has_c2pa = any(f.kind is Kind.C2PA for f in report.findings)
        if remote and not has_c2pa:
            remote_pointer_finding(remote, report, why="the scanner never uses the network")


def _guarded(report: Report, signal: str, step: Callable[[], T]) -> T | None:
    """``step()``, or None when it raised: the failure is recorded and the other signals
    still run."""
    try:
        return step()
    except Exception as exc:  # one signal's bug must not cost the others
        report.error(f"{signal} check failed: {error_text(exc)}")
        key = signal.lower().replace(" ", "_")
        if key in ("c2pa", "stealth_payload", "watermark", "iptc"):
            report.check(key, "error")
        return None


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def to_evidence(report: Report) -> dict[str, Any]:
    """The JSON stored with the detection: a one-line summary naming the strongest AI
    signal (or saying there is none), every finding, what could not be read, and what each
    signal concluded."""
    ai = report.ai_findings
    others = [f for f in report.findings if not f.ai]
    if ai:
        summary = ai[0].summary
        if len(ai) > 1:
            kinds = ", ".join(dict.fromkeys(f.kind.value for f in ai[1:]))
            summary += f" (also: {kinds})"
    elif others:
        summary = f"No generative-AI signal in the file's provenance; seen: {others[0].summary}"
    else:
        summary = "No provenance signal found (absence is not evidence of a real photo)"
    return {
        "summary": clip(summary.replace("\n", " "), SUMMARY_CHARS),
        "items": [f.to_json() for f in [*ai, *others]],
        "errors": list(report.errors),
        "checked": dict(report.checked),
    }
