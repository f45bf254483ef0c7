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

from workers.detectors.base import DetectorOutput, DetectorSpec, derive_version
from workers.detectors.options import DetectorOptionsError, ProvenanceOptions, parse_options
from workers.provenance import ProvenanceConfig, ProvenanceInspector, to_evidence

# Invalid options (a DetectorUnavailable and a ValueError): the error every family raises.
ProvenanceOptionsError = DetectorOptionsError


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
    options = parse_options(spec, ProvenanceOptions)
    # Unset limits keep ProvenanceConfig's defaults.
    limits = options.model_dump(exclude={"decisive"}, exclude_none=True)
    return ProvenanceDetector(spec, ProvenanceInspector(ProvenanceConfig(**limits)))
