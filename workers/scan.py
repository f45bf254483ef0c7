"""The embedded scan: local files in, one stored verdict per file out.

Used by ``synthsentry scan``; the fleet's tasks call the same steps one image at a time.
Per chunk of files: read and decode in threads (no database), register images and sources
and find results that can be reused (one transaction), run the detectors that are still
missing (no transaction held), then store detections, verdicts and review cases (one
transaction). Bad files become ``rejected`` results; they never stop the run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import Detection, Source, SourceKind, Verdict, VerdictLabel
from db.session import transaction
from workers.detectors.base import Detector
from workers.engine import DetectorResult, Prepared, prepare, run_detector
from workers.ensemble import DetectorScore, EnsembleConfig, VerdictDecision, combine
from workers.intake import DecodedImage, IntakeLimits, Rejected, RejectReason, decode, read_local

log = logging.getLogger(__name__)

REJECTED = "rejected"
SCORED = "scored"


@dataclass(frozen=True)
class DetectorReport:
    name: str
    version: str
    weights_sha256: str | None
    score: float | None
    evidence: dict[str, Any]
    latency_ms: float | None
    error: str | None
    reused: bool

    @classmethod
    def from_row(cls, row: Detection, *, reused: bool) -> DetectorReport:
        return cls(
            name=row.detector_name,
            version=row.detector_version,
            weights_sha256=row.weights_sha256,
            score=row.score,
            evidence=row.evidence,
            latency_ms=row.latency_ms,
            error=row.error,
            reused=reused,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "weights_sha256": self.weights_sha256,
            "score": self.score,
            "evidence": self.evidence,
            "latency_ms": self.latency_ms,
            "error": self.error,
            "reused": self.reused,
        }


@dataclass(frozen=True)
class ScanOutcome:
    """One input file's result, as printed by ``scan --json`` and ``status --json``."""

    path: str
    sha256: str | None
    status: str
    reason: str | None
    message: str | None
    ai_score: float | None
    flagged: bool
    verdict: str
    verdict_reason: str | None
    detectors: list[DetectorReport] = field(default_factory=list)
    image: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "ai_score": self.ai_score,
            "flagged": self.flagged,
            "verdict": self.verdict,
            "verdict_reason": self.verdict_reason,
            "image": self.image,
            "detectors": [d.to_json() for d in self.detectors],
        }


def iter_image_paths(paths: Iterable[Path]) -> Iterator[Path]:
    """Files named directly, and every file below named directories (recursively, sorted,
    hidden entries skipped). A path that does not exist is yielded as is so that it is
    reported as ``missing`` rather than silently dropped."""
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        yield Path(root) / name
        else:
            yield path


@dataclass
class _Item:
    path: Path
    data: bytes | None = None
    sha256: str | None = None
    decoded: DecodedImage | None = None
    prepared: Prepared | None = None
    rejection: Rejected | None = None
    image_id: int | None = None
    source_id: int | None = None
    reused: dict[str, Detection] = field(default_factory=dict)
    fresh: dict[str, DetectorResult] = field(default_factory=dict)


def _take_in(path: Path, limits: IntakeLimits, detectors: Sequence[Detector]) -> _Item:
    """Read, hash, decode and preprocess one file (runs in an intake thread)."""
    item = _Item(path=path)
    try:
        item.data = read_local(path, limits)
        item.sha256 = hashlib.sha256(item.data).hexdigest()
        item.decoded = decode(item.data, limits)
        item.prepared = prepare(item.decoded.image, item.data, detectors)
    except Rejected as exc:
        item.rejection = exc
    except Exception as exc:  # a bug in intake must not lose the rest of the run
        log.exception("intake failed unexpectedly", extra={"path": str(path)})
        item.rejection = Rejected(RejectReason.DECODE_ERROR, f"unexpected intake error: {exc}")
    return item


class Scanner:
    def __init__(
        self,
        detectors: Sequence[Detector],
        session_factory: sessionmaker[Session],
        limits: IntakeLimits,
        ensemble: EnsembleConfig,
        *,
        batch_size: int = 16,
        decode_threads: int = 2,
        actor: str = "cli",
    ) -> None:
        """``batch_size``: files taken in per step, and the largest batch a model sees.
        ``decode_threads``: intake threads (read, decode, preprocess)."""
        self.detectors = list(detectors)
        self.session_factory = session_factory
        self.limits = limits
        self.ensemble = ensemble
        self.batch_size = max(1, batch_size)
        self.decode_threads = max(1, decode_threads)
        self.actor = actor
        self.versions = {d.spec.name: d.version for d in self.detectors}

    def scan(self, paths: Iterable[Path]) -> Iterator[ScanOutcome]:
        """Results in input order. While the detectors work on one chunk, the intake threads
        already read, decode and preprocess the next."""
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="intake") as pool:
            previous: list[Future[_Item]] | None = None
            for chunk in _chunks(paths, self.batch_size):
                submitted = [pool.submit(_take_in, p, self.limits, self.detectors) for p in chunk]
                if previous is not None:
                    yield from self._finish([f.result() for f in previous])
                previous = submitted
            if previous is not None:
                yield from self._finish([f.result() for f in previous])

    def _finish(self, items: list[_Item]) -> list[ScanOutcome]:
        with transaction(self.session_factory) as session:
            for item in items:
                self._register(session, item)
        self._detect(items)
        with transaction(self.session_factory) as session:
            outcomes = [self._conclude(session, item) for item in items]
        for item in items:  # free pixels and tensors before the next chunk
            item.decoded = item.prepared = None
        return outcomes

    def _register(self, session: Session, item: _Item) -> None:
        if item.data is not None and item.sha256 is not None:
            decoded = item.decoded
            image = repository.get_or_create_image(
                session,
                repository.ImageFacts(
                    sha256=item.sha256,
                    size_bytes=len(item.data),
                    format=decoded.format if decoded else None,
                    mime=decoded.mime if decoded else None,
                    width=decoded.width if decoded else None,
                    height=decoded.height if decoded else None,
                    frames=decoded.frames if decoded else None,
                    mode=decoded.mode if decoded else None,
                ),
            )
            item.image_id = image.id
        absolute = str(item.path.absolute())
        ref = repository.SourceRef(
            kind=SourceKind.CLI,
            ref_key=f"{absolute}@{item.sha256 or 'unread'}",
            local_path=absolute,
            submitted_by=self.actor,
        )
        source, _ = repository.record_source(session, ref, item.image_id)
        item.source_id = source.id
        if item.rejection is not None:
            repository.mark_source_rejected(
                session, source, item.rejection.reason.value, item.rejection.message
            )
        elif item.image_id is not None:
            item.reused = repository.reusable_detections(session, item.image_id, self.versions)

    def _detect(self, items: list[_Item]) -> None:
        for detector in self.detectors:
            name = detector.spec.name
            todo = [i for i in items if i.prepared is not None and name not in i.reused]
            if todo:
                prepared = [i.prepared for i in todo if i.prepared is not None]
                results = run_detector(detector, prepared, max_batch=self.batch_size)
                for item, result in zip(todo, results, strict=True):
                    item.fresh[name] = result

    def _conclude(self, session: Session, item: _Item) -> ScanOutcome:
        source = item.source_id
        if item.rejection is not None or item.image_id is None or source is None:
            rejection = item.rejection or Rejected(RejectReason.DECODE_ERROR, "no image")
            return ScanOutcome(
                path=str(item.path),
                sha256=item.sha256,
                status=REJECTED,
                reason=rejection.reason.value,
                message=rejection.message,
                ai_score=None,
                flagged=False,
                verdict=REJECTED,
                verdict_reason=rejection.message,
            )
        reports: list[DetectorReport] = []
        for detector in self.detectors:
            name = detector.spec.name
            if name in item.reused:
                row = item.reused[name]
                reused = True
            else:
                output, latency_ms, error = item.fresh[name]
                row = repository.save_detection(
                    session,
                    item.image_id,
                    repository.DetectionRecord(
                        detector_name=name,
                        detector_version=detector.version,
                        weights_sha256=detector.weights_sha256,
                        score=output.score if output else None,
                        evidence=output.evidence if output else {},
                        latency_ms=latency_ms,
                        error=error,
                    ),
                )
                reused = False
            reports.append(DetectorReport.from_row(row, reused=reused))
        _, decision = record_verdict(
            session,
            item.image_id,
            [
                DetectorScore(
                    r.name,
                    r.version,
                    r.score,
                    r.error,
                    decisive=bool(detector.spec.options.get("decisive", False)),
                    summary=r.evidence.get("summary"),
                )
                for r, detector in zip(reports, self.detectors, strict=True)
            ],
            self.ensemble,
            actor=self.actor,
        )
        source_row = session.get(Source, source)
        if source_row is not None:
            repository.mark_source_scored(session, source_row)
        decoded = item.decoded
        return ScanOutcome(
            path=str(item.path),
            sha256=item.sha256,
            status=SCORED,
            reason=None,
            message=None,
            ai_score=decision.ai_score,
            flagged=decision.flagged,
            verdict=decision.label,
            verdict_reason=decision.reason,
            detectors=reports,
            image=None
            if decoded is None
            else {"format": decoded.format, "width": decoded.width, "height": decoded.height},
        )


def record_verdict(
    session: Session,
    image_id: int,
    scores: Sequence[DetectorScore],
    ensemble: EnsembleConfig,
    *,
    actor: str,
) -> tuple[Verdict, VerdictDecision]:
    """Combine the scores and store the verdict (once per detector set) and, when flagged,
    the image's review case. Shared by the embedded scan and the fleet's fan-in."""
    decision = combine(scores, ensemble)
    verdict, _ = repository.save_verdict(
        session,
        image_id,
        repository.VerdictRecord(
            ensemble_version=ensemble.version,
            detector_set_digest=decision.detector_set_digest,
            detector_set=decision.detector_set,
            ai_score=decision.ai_score,
            label=VerdictLabel(decision.label),
            flagged=decision.flagged,
            reason=decision.reason,
        ),
        actor=actor,
    )
    return verdict, decision


def _chunks(paths: Iterable[Path], size: int) -> Iterator[list[Path]]:
    chunk: list[Path] = []
    for path in paths:
        chunk.append(path)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
