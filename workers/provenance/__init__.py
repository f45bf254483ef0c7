"""Provenance signals: what a file says about its own origin, read without a model.

One module per signal, each evidence and none proof:

- :mod:`~workers.provenance.c2pa`: C2PA Content Credentials (signed manifests);
- :mod:`~workers.provenance.xmp`: IPTC ``DigitalSourceType`` in XMP (unsigned);
- :mod:`~workers.provenance.generator_metadata`: generation settings written by
  AUTOMATIC1111, ComfyUI, InvokeAI, NovelAI, Fooocus, DALL-E;
- :mod:`~workers.provenance.stealth`: settings hidden in alpha/RGB least significant bits;
- :mod:`~workers.provenance.watermark`: the Stable Diffusion invisible watermark.

:mod:`~workers.provenance.containers` walks PNG/JPEG/WebP metadata with bounded work, and
:class:`ProvenanceInspector` runs everything on one image. Re-encoding, screenshots and
most platform uploads strip all of these: absence of provenance is not evidence of a real
photo.
"""

from workers.provenance.findings import Finding, Kind, Report
from workers.provenance.inspector import ProvenanceConfig, ProvenanceInspector, to_evidence

__all__ = [
    "Finding",
    "Kind",
    "ProvenanceConfig",
    "ProvenanceInspector",
    "Report",
    "to_evidence",
]
