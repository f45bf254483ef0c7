"""The detector plug-in contract.

A detector is described by a :class:`DetectorSpec` (plain data: what to build, from which
weights, with which preprocessing) and built by its family's loader into an object that
satisfies :class:`Detector`. Loading is lazy and happens in the process that scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

JsonDict = dict[str, Any]


@dataclass(frozen=True)
class DetectorSpec:
    """Everything needed to build one detector; data only, no behaviour.

    ``weights`` is a URI: a local path, ``s3://bucket/key`` or ``hf://org/repo[@rev][/file]``.
    ``options`` holds family-specific settings (backbone, ai_index, preprocessing, ...).
    """

    name: str
    family: str
    version: str
    weights: str | None = None
    sha256: str | None = None
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def decisive(self) -> bool:
        """A decisive detector's positive answer flags an image whatever the others say (a
        signed "made by AI" manifest outweighs any pixel statistics). Set per spec, as the
        option ``decisive``; the ensemble reads it from here and nowhere else."""
        return self.options.get("decisive", False) is True  # the options refuse non-booleans


@dataclass(frozen=True)
class DetectorOutput:
    """One detector's answer for one image: a probability that it is AI-made, or an
    abstention (``score is None``) with whatever evidence was seen."""

    score: float | None
    evidence: JsonDict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.score is not None and not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score must be within [0, 1], got {self.score!r}")


class DetectorUnavailable(Exception):
    """The detector cannot run on this machine (weights missing, optional package absent).

    The message is shown to the operator as is: it names what is missing and how to
    provide it.
    """


@runtime_checkable
class Detector(Protocol):
    spec: DetectorSpec

    @property
    def version(self) -> str:
        """Stored with every result; changes whenever the spec or the weights change."""
        ...

    @property
    def weights_sha256(self) -> str | None: ...

    def detect_batch(
        self, images: Sequence[Image.Image], raw: Sequence[bytes]
    ) -> list[DetectorOutput]:
        """Score decoded RGB images (``raw`` holds the original file bytes, for detectors that
        read metadata). Returns one output per image, in order."""
        ...


class Loader(Protocol):
    """A detector family's loader: builds a detector from its spec and a local weights file
    (``Path()`` for a family that needs none)."""

    def __call__(self, spec: DetectorSpec, *, device: str, weights_path: Path) -> Detector: ...


def derive_version(spec: DetectorSpec, weights_sha256: str | None) -> str:
    """The stored version of a detector's results: the spec's own version, a short digest of
    its options (so a changed preprocessing or ai_index is a new version) and the first 12
    hex digits of the weights' sha256 (so a changed checkpoint is a new version)."""
    import hashlib
    import json

    options = json.dumps(dict(spec.options), sort_keys=True, default=str).encode()
    parts = [spec.version, "o" + hashlib.sha256(options).hexdigest()[:8]]
    if weights_sha256:
        parts.append("w" + weights_sha256[:12])
    return "+".join(parts)
