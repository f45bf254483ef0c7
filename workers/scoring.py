"""The scoring core: the steps every pipeline takes between an upload's bytes and a stored
verdict. The local-file scan (``workers/scan.py``) and the fleet (``workers/fleet.py``) are
two pipelines over these steps, side by side; neither imports the other.

    take_in            bytes -> sha256 and decoded pixels, or why they were refused
    record_intake      the content-addressed image row and the source's outcome
                       (record_intakes: sources new to the database, a group at a time)
    detection_record   one detector's result as it is stored
    register_ensemble  the configuration a pipeline decides with, stored once
    conclude           stored detections -> the ensemble's verdict -> the review case
                       (conclude_many: a group of images in a few statements)

The functions that write take an open session: the caller owns the transaction (and,
for ``conclude``, the image's row lock in it). Nothing here reads settings.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import Detection, Verdict, VerdictLabel
from db.session import transaction
from workers import metrics
from workers.detectors.base import Detector
from workers.engine import DetectorResult
from workers.ensemble import DetectorScore, EnsembleConfig, VerdictDecision, combine, not_scored
from workers.intake import Admit, DecodedImage, IntakeLimits, Rejected, RejectReason, decode
from workers.names import printable

log = logging.getLogger(__name__)

metrics.initialise(metrics.INTAKE_REJECTIONS, (reason.value for reason in RejectReason))

# Counts that wait for their transaction to commit (``_on_commit``), in ``Session.info``.
_PENDING_COUNTS = "synthsentry.pending_counts"


def _on_commit(session: Session, count: Callable[[], None]) -> None:
    """Move a metric once ``session``'s transaction commits (a rolled-back verdict or
    rejection, to be stored again by a retry, is not counted twice)."""
    session.info.setdefault(_PENDING_COUNTS, []).append(count)


@event.listens_for(Session, "after_commit")
def _count_committed(session: Session) -> None:
    for count in session.info.pop(_PENDING_COUNTS, ()):
        count()


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_PENDING_COUNTS, None)


class TransientError(Exception):
    """Worth retrying later: storage or network trouble, not a property of the upload."""


@dataclass(frozen=True)
class Intake:
    """One upload's bytes as taken in: their identity and decoded pixels, or the reason
    they were refused. ``sha256`` is set whenever bytes were read, refused or not."""

    data: bytes
    sha256: str | None
    decoded: DecodedImage | None
    rejection: Rejected | None
    size_bytes: int = 0

    @classmethod
    def refused(cls, rejection: Rejected, data: bytes = b"") -> Intake:
        sha256 = sha256_of(data) if data else None
        return cls(data, sha256, decoded=None, rejection=rejection, size_bytes=len(data))

    def released(self) -> Intake:
        """The same outcome without the bytes and pixels (to free memory once scored)."""
        return replace(self, data=b"", decoded=None)

    def facts(self) -> repository.ImageFacts | None:
        """What the images table records of these bytes (None when nothing was read)."""
        if self.sha256 is None:
            return None
        decoded = self.decoded
        if decoded is None:
            return repository.ImageFacts(sha256=self.sha256, size_bytes=self.size_bytes)
        return repository.ImageFacts(
            sha256=self.sha256,
            size_bytes=self.size_bytes,
            format=decoded.format,
            mime=decoded.mime,
            width=decoded.width,
            height=decoded.height,
            frames=decoded.frames,
            mode=decoded.mode,
            anomalies=decoded.anomalies,
        )


def sha256_of(data: bytes) -> str:
    """The identity of content: images are addressed by it."""
    return hashlib.sha256(data).hexdigest()


def take_in(
    read: Callable[[], bytes],
    limits: IntakeLimits,
    *,
    admit: Admit | None = None,
    draft: tuple[int, int] | None = None,
) -> Intake:
    """Read, hash and decode one upload. A refusal (:class:`Rejected`) is an outcome, not an
    error; trouble that may pass (:class:`TransientError`: storage unreachable, this
    process out of memory) propagates, so that the caller can try again later. ``admit``
    is called with the declared size before any pixel is decoded; ``draft``: a JPEG may be
    decoded at a reduced scale no smaller than this (see ``decode``)."""
    try:
        data = read()
    except Rejected as rejection:
        return Intake.refused(rejection)
    sha256 = sha256_of(data)
    try:
        decoded = decode(data, limits, admit=admit, draft=draft)
    except Rejected as rejection:
        return Intake.refused(rejection, data)
    except MemoryError as exc:  # this process was short of memory, not the upload bad
        raise TransientError(f"out of memory while decoding {sha256}") from exc
    except Exception as exc:  # a bug in a decoder must not take other uploads down
        log.exception("decoding failed unexpectedly", extra={"sha256": sha256})
        return Intake.refused(
            Rejected(RejectReason.DECODE_ERROR, f"unexpected decoding error: {exc}"), data
        )
    return Intake(data, sha256, decoded=decoded, rejection=None, size_bytes=len(data))


def record_intake(session: Session, source_id: int, intake: Intake) -> int | None:
    """Store what intake found for this source: the image row of any bytes read (a refused
    file keeps its identity), and the rejection. Returns the image id of the bytes read
    (refused or not: see ``intake.rejection``), None when nothing was read."""
    facts = intake.facts()
    image_id = None
    if facts is not None:
        image_id = repository.get_or_create_image(session, facts).id
        repository.attach_image(session, source_id, image_id)
    if intake.rejection is not None:
        repository.mark_source_rejected(
            session, source_id, intake.rejection.reason.value, intake.rejection.message
        )
        _on_commit(session, metrics.INTAKE_REJECTIONS.labels(intake.rejection.reason.value).inc)
    return image_id


def record_intakes(
    session: Session, taken: Sequence[tuple[repository.SourceRef, Intake]]
) -> list[tuple[int, int | None]]:
    """Store several sources with what intake found (as ``record_intake`` does for a stored
    source): the image rows of the bytes read, then the sources pointing at them, refused
    ones with their reason; one statement per table for the group. Returns (source id,
    image id or None when nothing was read) in the order of ``taken``."""
    facts = [intake.facts() for _, intake in taken]
    image_ids = repository.get_or_create_images(session, [f for f in facts if f is not None])
    entries = []
    for (ref, intake), found in zip(taken, facts, strict=True):
        rejection = intake.rejection
        entries.append(
            repository.SourceIntake(
                ref,
                image_ids[found.sha256] if found is not None else None,
                rejection.reason.value if rejection is not None else None,
                rejection.message if rejection is not None else None,
            )
        )
        if rejection is not None:
            _on_commit(session, metrics.INTAKE_REJECTIONS.labels(rejection.reason.value).inc)
    source_ids = repository.record_sources(session, entries)
    return [(source_id, e.image_id) for source_id, e in zip(source_ids, entries, strict=True)]


def detection_record(detector: Detector, result: DetectorResult) -> repository.DetectionRecord:
    """One detector's result for one image, as stored (counted here: every pipeline stores
    what this returns)."""
    output = result.output
    outcome = "scored" if output is not None and result.error is None else "failed"
    metrics.DETECTIONS.labels(detector.spec.name, outcome).inc()
    return repository.DetectionRecord(
        detector_name=detector.spec.name,
        detector_version=detector.version,
        weights_sha256=detector.weights_sha256,
        score=output.score if output is not None else None,
        evidence=_storable(output.evidence) if output is not None else {},
        latency_ms=result.latency_ms,
        error=printable(result.error) if result.error is not None else None,
    )


def _storable(value: Any) -> Any:
    """Evidence with every string printable: detectors quote text found in the file (its
    metadata, its name), which may hold bytes no database or JSON reader accepts."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(str(k)): _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value]
    return value


def ensemble_scores(detections: Iterable[Detection]) -> list[DetectorScore]:
    """What the ensemble reads of stored detections."""
    return [
        DetectorScore(
            name=row.detector_name,
            version=row.detector_version,
            score=row.score,
            error=row.error,
            summary=row.evidence.get("summary") if isinstance(row.evidence, dict) else None,
        )
        for row in detections
    ]


def register_ensemble(session_factory: sessionmaker[Session], ensemble: EnsembleConfig) -> int:
    """Store the configuration (once; a transaction of its own, before any verdict under
    it) and return its id, which every verdict under it carries."""
    with transaction(session_factory) as session:
        row = repository.register_ensemble(
            session,
            repository.EnsembleRecord(
                version=ensemble.version, digest=ensemble.digest, definition=ensemble.definition()
            ),
        )
        return row.id


@dataclass(frozen=True)
class Concluded:
    verdict: Verdict
    decision: VerdictDecision
    created: bool


def conclude(
    session: Session,
    image_id: int,
    detections: Mapping[str, Detection],
    ensemble: EnsembleConfig,
    *,
    ensemble_id: int,
    actor: str,
    active: bool = True,
) -> Concluded:
    """Combine these stored detections (one per detector of the ensemble) and store the
    verdict under ``ensemble`` (registered as ``ensemble_id``), once per configuration and
    detector set; the image's review case follows it. ``active``: the configuration is the
    active one, whose verdicts may also withdraw a case (an ad-hoc one may only open).

    The caller holds the image's row lock in ``session`` (``repository.lock_image``):
    whoever holds it is the only one storing this image's verdicts and moving its review
    case. The fleet takes it before it stores a detection, a scan for its whole group."""
    (concluded,) = conclude_many(
        session,
        [(image_id, detections)],
        ensemble,
        ensemble_id=ensemble_id,
        actor=actor,
        active=active,
    )
    return concluded


def conclude_many(
    session: Session,
    found: Sequence[tuple[int, Mapping[str, Detection]]],
    ensemble: EnsembleConfig,
    *,
    ensemble_id: int,
    actor: str,
    active: bool = True,
) -> list[Concluded]:
    """:func:`conclude` for several (image id, detections) pairs, the verdicts and review
    cases stored together (``repository.save_verdicts``); the caller holds every image's
    row lock. In the order of ``found``."""
    decisions = [combine(ensemble_scores(rows.values()), ensemble) for _, rows in found]
    saved = repository.save_verdicts(
        session,
        [
            (image_id, _verdict_record(decision, ensemble, ensemble_id))
            for (image_id, _), decision in zip(found, decisions, strict=True)
        ],
        actor=actor,
        active=active,
    )
    concluded = []
    for (verdict, created), decision in zip(saved, decisions, strict=True):
        if created:
            _on_commit(session, metrics.VERDICTS.labels(_outcome(decision)).inc)
        concluded.append(Concluded(verdict=verdict, decision=decision, created=created))
    return concluded


def conclude_unscored(
    session: Session,
    image_id: int,
    rejection: Rejected,
    ensemble: EnsembleConfig,
    *,
    ensemble_id: int,
    actor: str,
    active: bool = True,
) -> Concluded | None:
    """Store the "not scored" verdict of bytes that were refused before any detector saw
    them: no evidence either way, flagged when ``ensemble`` sends this rejection reason to
    review. Same contract as :func:`conclude` (the caller holds the image's row lock).

    None, and nothing stored, when detectors already scored these bytes under ``ensemble``:
    a refusal that can vary (a decode timeout under load, another pixel limit) must not
    hide the evidence an earlier upload of the same bytes gave."""
    if repository.has_scored_verdict(session, image_id, ensemble_version=ensemble.version):
        return None
    decision = not_scored(rejection.reason.value, rejection.message, ensemble)
    return _store(session, image_id, decision, ensemble, ensemble_id, actor=actor, active=active)


def _store(
    session: Session,
    image_id: int,
    decision: VerdictDecision,
    ensemble: EnsembleConfig,
    ensemble_id: int,
    *,
    actor: str,
    active: bool,
) -> Concluded:
    verdict, created = repository.save_verdict(
        session,
        image_id,
        _verdict_record(decision, ensemble, ensemble_id),
        actor=actor,
        active=active,
    )
    if created:
        _on_commit(session, metrics.VERDICTS.labels(_outcome(decision)).inc)
    return Concluded(verdict=verdict, decision=decision, created=created)


def _verdict_record(
    decision: VerdictDecision, ensemble: EnsembleConfig, ensemble_id: int
) -> repository.VerdictRecord:
    return repository.VerdictRecord(
        ensemble_id=ensemble_id,
        ensemble_version=ensemble.version,
        detector_set_digest=decision.detector_set_digest,
        detector_set=decision.detector_set,
        ai_score=decision.ai_score,
        label=decision.label,
        flagged=decision.flagged,
        reason=decision.reason,
    )


def _outcome(decision: VerdictDecision) -> str:
    """How a verdict is counted: not scored (the upload was refused, whether or not its
    reason sends it to review), else flagged or not."""
    if decision.label == VerdictLabel.NOT_SCORED:
        return "not_scored"
    return "flagged" if decision.flagged else "not_flagged"
