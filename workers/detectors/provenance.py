"""The provenance detector: C2PA, IPTC XMP, generator metadata, stealth payloads and the
Stable Diffusion watermark, read from the uploaded file itself (no model, no weights).

It answers 1.0 when the file declares or carries a mark of generative AI, and abstains
(``score=None``) otherwise, with whatever it saw as evidence: stripped metadata is the
normal case for uploads, so absence never lowers a score. Its spec is usually marked
``decisive``: a positive answer flags the image for review whatever the models say.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from workers.detectors.base import DetectorOutput, DetectorSpec, DetectorUnavailable, derive_version
from workers.provenance import ProvenanceConfig, ProvenanceInspector, to_evidence

KNOWN_OPTIONS = frozenset(
    {"decisive", "watermark_max_p_value", "watermark_max_pixels", "stealth_max_pixels"}
)


class ProvenanceOptionsError(DetectorUnavailable, ValueError):
    """The spec's options are invalid: a configuration mistake (ValueError) that also makes
    this detector unavailable, so a fleet skips it with this message."""


class ProvenanceDetector:
    """Satisfies :class:`workers.detectors.base.Detector`."""

    def __init__(self, spec: DetectorSpec, inspector: ProvenanceInspector) -> None:
        self.spec = spec
        self.inspector = inspector
        libraries = inspector.library_versions()
        # A library upgrade can change what is read (SDK validation rules, colour
        # conversion), so it is a new detector version.
        self._version = "+".join(
            [derive_version(spec, None), *(f"{name}-{v}" for name, v in sorted(libraries.items()))]
        )

    @property
    def version(self) -> str:
        return self._version

    @property
    def weights_sha256(self) -> str | None:
        return None

    def detect_batch(
        self, images: Sequence[Image.Image], raw: Sequence[bytes]
    ) -> list[DetectorOutput]:
        if len(images) != len(raw):
            raise ValueError(f"{len(images)} images but {len(raw)} raw files")
        return [self.detect(image, data) for image, data in zip(images, raw, strict=True)]

    def detect(self, image: Image.Image, raw: bytes) -> DetectorOutput:
        report = self.inspector.inspect(image, raw)
        return DetectorOutput(
            score=1.0 if report.ai_findings else None, evidence=to_evidence(report)
        )


def load_provenance(spec: DetectorSpec, *, device: str, weights_path: Path) -> ProvenanceDetector:
    """Build the detector; ``device`` and ``weights_path`` are ignored (no model). A missing
    optional library (c2pa-python, OpenCV) disables its signal, with a note in every result,
    rather than the detector."""
    del device, weights_path
    unknown = set(spec.options) - KNOWN_OPTIONS
    if unknown:
        raise ProvenanceOptionsError(
            f"{spec.name}: unknown provenance options {sorted(unknown)}; "
            f"known: {sorted(KNOWN_OPTIONS)}"
        )
    try:
        config = ProvenanceConfig.from_options(spec.options)
    except ValueError as exc:
        raise ProvenanceOptionsError(f"{spec.name}: {exc}") from exc
    return ProvenanceDetector(spec, ProvenanceInspector(config))
