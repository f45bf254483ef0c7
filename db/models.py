"""The moderation domain as stored: images, where they came from, what each detector said,
the ensemble's verdict, the human review and an append-only audit trail.

Content is addressed by sha256: the same bytes seen twice share one ``images`` row and its
detections, while every place they came from gets its own ``sources`` row.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """A stored time with its zone: SQLite hands timestamps back without one, and every
    time stored here is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # JSONB on Postgres so evidence can be queried and indexed; plain JSON text on SQLite.
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dict[str, Any]: JSON().with_variant(JSONB(), "postgresql"),
        list[str]: JSON().with_variant(JSONB(), "postgresql"),
        datetime: DateTime(timezone=True),
    }


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings with a CHECK constraint: adding a member is a simple migration
    # on both Postgres and SQLite (no ALTER TYPE).
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda members: [m.value for m in members],
    )


class SourceKind(enum.StrEnum):
    UPLOAD_EVENT = "upload_event"  # S3 ObjectCreated notification
    HOOK = "hook"  # a platform's upload hook called the API
    CLI = "cli"  # `synthsentry scan` on local files
    RESCAN = "rescan"  # operator-requested batch re-scan


class SourceStatus(enum.StrEnum):
    PENDING = "pending"
    SCORED = "scored"
    REJECTED = "rejected"


class VerdictLabel(enum.StrEnum):
    LIKELY_AI = "likely_ai"
    NO_INDICATION = "no_indication"
    INCONCLUSIVE = "inconclusive"
    # The upload was refused before any detector saw it (not an image, damaged, too large,
    # ...): no evidence either way. Flagged only for the reasons the ensemble sends to review.
    NOT_SCORED = "not_scored"


class ReviewState(enum.StrEnum):
    OPEN = "open"
    CLAIMED = "claimed"
    DECIDED = "decided"
    # Left the queue without a decision: a later verdict no longer flags the image (a new
    # ensemble configuration, a new detector version). A verdict that flags it again
    # reopens the case.
    WITHDRAWN = "withdrawn"
    # A moderator was unsure, or two moderators reviewing blind disagreed: an admin decides.
    ESCALATED = "escalated"


class TokenRole(enum.StrEnum):
    PLATFORM = "platform"  # an upload hook: submits scans, reads its own verdicts
    MODERATOR = "moderator"  # reads the review queue, claims and decides cases
    ADMIN = "admin"  # operators: tokens, re-scans, everything a moderator may do


class ScanPriority(enum.StrEnum):
    NORMAL = "normal"  # live uploads: served first
    LOW = "low"  # bulk work (re-scans, back-fills): queues of its own, served after uploads


class DeliveryState(enum.StrEnum):
    PENDING = "pending"  # due at next_attempt_at
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # retried for the whole retry window, or refused for good
    DISABLED = "disabled"  # its endpoint answered 410 Gone: nothing more is sent there


class RescanState(enum.StrEnum):
    LISTING = "listing"  # objects or images still being listed and queued
    RUNNING = "running"  # everything is queued; waiting for the results
    DONE = "done"
    CANCELLED = "cancelled"


class ReviewDecision(enum.StrEnum):
    AI_GENERATED = "ai_generated"
    NOT_AI_GENERATED = "not_ai_generated"
    UNSURE = "unsure"


class Image(Base):
    """One distinct content, by sha256 of its bytes."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str | None] = mapped_column(String(16))
    mime: Mapped[str | None] = mapped_column(String(64))
    width: Mapped[int | None]
    height: Mapped[int | None]
    frames: Mapped[int | None]
    mode: Mapped[str | None] = mapped_column(String(16))
    # What the decoder stepped over to read the pixels (damaged ancillary PNG chunks, ...):
    # evidence for a moderator, since a clean camera file rarely has any. Null: none.
    anomalies: Mapped[list[str] | None]
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)

    detections: Mapped[list[Detection]] = relationship(back_populates="image")
    verdicts: Mapped[list[Verdict]] = relationship(back_populates="image")


class Source(Base):
    """One place an image came from, and what happened when it was taken in.

    ``ref_key`` is the identity used to make duplicate events harmless: for S3 it is
    bucket/key plus version id (or ETag), for local files the absolute path plus content
    sha256. A rejection belongs here, not to ``images``: a missing or unreadable file has
    no bytes to address.
    """

    __tablename__ = "sources"
    __table_args__ = (
        UniqueConstraint("kind", "ref_key"),
        Index("ix_sources_status_created_at", "status", "created_at"),
        # A re-scan's items in id order: counting them from a watermark reads only the new.
        Index("ix_sources_rescan_id_id", "rescan_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    kind: Mapped[SourceKind] = mapped_column(_enum(SourceKind, "source_kind"))
    ref_key: Mapped[str] = mapped_column(String(2048))
    bucket: Mapped[str | None] = mapped_column(String(255))
    object_key: Mapped[str | None] = mapped_column(String(1024))
    version_id: Mapped[str | None] = mapped_column(String(1024))
    etag: Mapped[str | None] = mapped_column(String(128))
    local_path: Mapped[str | None] = mapped_column(Text)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id"), index=True)
    status: Mapped[SourceStatus] = mapped_column(
        _enum(SourceStatus, "source_status"), default=SourceStatus.PENDING
    )
    reject_reason: Mapped[str | None] = mapped_column(String(32))
    reject_message: Mapped[str | None] = mapped_column(Text)
    submitted_by: Mapped[str | None] = mapped_column(String(255))
    # The batch re-scan that listed this object or image (None: an upload, a hook, a scan).
    rescan_id: Mapped[int | None] = mapped_column(ForeignKey("rescans.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_count: Mapped[int] = mapped_column(default=1)
    # Pending uploads are checked for lost messages (see workers.fleet.resend_stalled): not
    # before this time, or ``created_at`` plus the check delay when never re-sent.
    recheck_at: Mapped[datetime | None]
    resend_count: Mapped[int] = mapped_column(default=0, server_default="0")

    image: Mapped[Image | None] = relationship()


class Detection(Base):
    """One detector's result for one image at one detector version.

    Unique per (image, detector, version): a redelivered task or a rescan with unchanged
    weights writes nothing new. ``score`` is null when the detector abstained or failed
    (then ``error`` says why).
    """

    __tablename__ = "detections"
    __table_args__ = (UniqueConstraint("image_id", "detector_name", "detector_version"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    detector_name: Mapped[str] = mapped_column(String(128))
    detector_version: Mapped[str] = mapped_column(String(128))
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    score: Mapped[float | None] = mapped_column(Float)
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image] = relationship(back_populates="detections")


class Ensemble(Base):
    """One ensemble configuration: everything that decides a verdict from the detectors'
    scores (combination rule, weights, calibrations, threshold, decisive rules).

    ``definition`` is the canonical document and ``digest`` its sha256; ``version`` names
    the digest and is what verdicts carry. A row is written the first time a verdict is
    stored under the configuration, and never changed.
    """

    __tablename__ = "ensembles"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    definition: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Where a fitted configuration came from (``synthsentry calibrate``): the detectors it
    # combines, the data it was fitted on, the false-positive guarantee of its threshold.
    # Not part of the digest: it describes the configuration, it does not decide verdicts.
    provenance: Mapped[dict[str, Any] | None] = mapped_column(
        JSON().with_variant(JSONB(), "postgresql")
    )


class EnsembleActivation(Base):
    """An operator made a stored configuration the active one (``synthsentry ensemble
    activate``): the newest activation is what the fleet and the scan decide with instead
    of the settings' configuration. Never updated; also in the audit trail."""

    __tablename__ = "ensemble_activations"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    ensemble_id: Mapped[int] = mapped_column(ForeignKey("ensembles.id"), index=True)
    activated_at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(255))


class Verdict(Base):
    """The ensemble's combination of detections for one image.

    Its identity is everything that decides it: the ensemble configuration (``ensemble_id``,
    whose ``version`` is copied into ``ensemble_version``) and the detector versions and
    scores that were combined (``detector_set``, digested into ``detector_set_digest``).
    Recomputing the same combination under the same configuration is a no-op; a changed
    weight, calibration or threshold is a new verdict.
    """

    __tablename__ = "verdicts"
    __table_args__ = (UniqueConstraint("image_id", "ensemble_version", "detector_set_digest"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    ensemble_version: Mapped[str] = mapped_column(String(64))
    # Null for verdicts stored before configurations were recorded (revision 0004), and by
    # such a release during a rolling upgrade: their ensemble_version names a legacy row.
    ensemble_id: Mapped[int | None] = mapped_column(ForeignKey("ensembles.id"))
    detector_set_digest: Mapped[str] = mapped_column(String(64))
    detector_set: Mapped[dict[str, Any]] = mapped_column(default=dict)
    ai_score: Mapped[float | None] = mapped_column(Float)
    label: Mapped[VerdictLabel] = mapped_column(_enum(VerdictLabel, "verdict_label"))
    flagged: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image] = relationship(back_populates="verdicts")


# The cases someone holds (a claimed case, an escalated one an admin took).
HELD_CASE = "state IN ('claimed', 'escalated') AND assignee IS NOT NULL"


class ReviewCase(Base):
    """A flagged image waiting for, or decided by, a human moderator.

    One per image: a later verdict that flags the same image again (a rescan, a new model)
    does not queue it twice. ``verdict_id`` is the verdict that opened the case (or reopened
    it after a withdrawal); the image's current verdict is read beside it, never in place
    of it, so a moderator sees both when they differ.
    """

    __tablename__ = "review_cases"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    verdict_id: Mapped[int] = mapped_column(ForeignKey("verdicts.id"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), unique=True)
    state: Mapped[ReviewState] = mapped_column(
        _enum(ReviewState, "review_state"), default=ReviewState.OPEN
    )
    assignee: Mapped[str | None] = mapped_column(String(255))
    decision: Mapped[ReviewDecision | None] = mapped_column(
        _enum(ReviewDecision, "review_decision")
    )
    note: Mapped[str | None] = mapped_column(Text)
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_at: Mapped[datetime | None]
    decided_at: Mapped[datetime | None]
    # The opening verdict's ai_score (None: not scored), and the queue's order: the time
    # the case opened, moved earlier by its score (``workers.review``), so a high score goes
    # first and a long wait eventually overtakes it.
    score: Mapped[float | None] = mapped_column(Float)
    queue_key: Mapped[datetime] = mapped_column(default=utcnow)
    # A claim is a lease: past this time the case is anybody's again.
    lease_expires_at: Mapped[datetime | None]
    # 2 when the case was sampled for a blind second review (agreement between moderators).
    reviews_required: Mapped[int] = mapped_column(default=1, server_default="1")

    verdict: Mapped[Verdict] = relationship()

    __table_args__ = (
        Index(None, "state", "opened_at"),
        Index("ix_review_cases_state_queue_key", "state", "queue_key"),
        # One job per moderator: the database refuses a second held case, whatever races.
        Index(
            "uq_review_cases_one_held_case",
            "assignee",
            unique=True,
            postgresql_where=text(HELD_CASE),
            sqlite_where=text(HELD_CASE),
        ),
    )


class ReviewDecisionRecord(Base):
    """One moderator's decision on a case: the case keeps the final one, this table every
    one (a blind second review, a decision escalated to an admin), for the case history,
    agreement between moderators and the export of labelled examples."""

    __tablename__ = "review_decisions"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("review_cases.id"), index=True)
    actor: Mapped[str] = mapped_column(String(255), index=True)
    decision: Mapped[ReviewDecision] = mapped_column(_enum(ReviewDecision, "review_decision"))
    note: Mapped[str | None] = mapped_column(Text)
    from_state: Mapped[str] = mapped_column(String(32))
    # The verdict the moderator was shown (the image's current one under the active ensemble).
    verdict_id: Mapped[int | None] = mapped_column(ForeignKey("verdicts.id"))
    # True for a blind second review (the moderator did not see the first decision).
    blind: Mapped[bool] = mapped_column(Boolean, default=False)
    decided_at: Mapped[datetime] = mapped_column(default=utcnow)


class ReviewCaseSignal(Base):
    """What a case can be filtered by in the queue: a detector that fired, a provenance
    kind found, the kind of a source. Rewritten when a verdict opens or reopens the case."""

    __tablename__ = "review_case_signals"
    __table_args__ = (
        UniqueConstraint("case_id", "kind", "value"),
        Index(None, "kind", "value"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("review_cases.id"))
    kind: Mapped[str] = mapped_column(String(16))  # detector | provenance | source
    value: Mapped[str] = mapped_column(String(128))


class AuditEvent(Base):
    """Append-only record of everything that changed a moderation outcome.

    The migration installs triggers that refuse UPDATE and DELETE on this table.
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    subject_type: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[int] = mapped_column(BigInteger)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)

    __table_args__ = (Index(None, "subject_type", "subject_id"),)


class DetectionAttempt(Base):
    """How many times one message of a detector task for one image was delivered.

    Written and committed before the model runs, so a delivery that kills its worker (out
    of memory, a crashing decoder) still counts; after ``max_detect_attempts`` deliveries
    of one message the fleet records a failed detection instead of trying again forever.
    Counted per message: copies of the same work sent again (the reconciler, a repeated
    intake) are not redeliveries and must not use up the attempts of the one in flight.
    """

    __tablename__ = "detection_attempts"
    __table_args__ = (UniqueConstraint("image_id", "detector_name", "message_id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    detector_name: Mapped[str] = mapped_column(String(128))
    message_id: Mapped[str] = mapped_column(String(255), default="", server_default="")
    attempts: Mapped[int] = mapped_column(default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeadLetter(Base):
    """An incoming message that could not be understood, kept for an operator."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    channel: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)


class ApiToken(Base):
    """A credential for the HTTP API: a role, a name for people, and the sha256 of its
    secret (the token itself is shown once, when it is made, and never stored).

    The secret is 32 random bytes, so a fast hash is as safe as a slow one (nothing to
    guess); ``public_id`` is the part of the token that finds the row, so a presented token
    is checked with one indexed lookup and one constant-time comparison.
    """

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(255))
    role: Mapped[TokenRole] = mapped_column(_enum(TokenRole, "token_role"))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    # The review dashboard's default for this moderator: images blurred until asked.
    blur_images: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())


class DashboardSession(Base):
    """A signed-in dashboard session, made by exchanging a moderator's or an admin's token.
    Like a token, only the sha256 of its secret is stored; it ends at ``expires_at``, at
    logout, or when its token is revoked."""

    __tablename__ = "dashboard_sessions"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]

    token: Mapped[ApiToken] = relationship()


# --- the platform API -------------------------------------------------------------------

_ID = BigInteger().with_variant(Integer, "sqlite")


class Scan(Base):
    """One object a platform (or an operator) asked the API to scan: its own source row, the
    caller's token, and what the caller attached to it (its own id, a callback URL)."""

    __tablename__ = "scans"
    __table_args__ = (Index(None, "token_id", "external_id"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(40), unique=True)
    token_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id"))
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"), unique=True)
    external_id: Mapped[str | None] = mapped_column(String(255))
    callback_url: Mapped[str | None] = mapped_column(Text)
    priority: Mapped[ScanPriority] = mapped_column(
        _enum(ScanPriority, "scan_priority"), default=ScanPriority.NORMAL
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyKey(Base):
    """A request made with an ``Idempotency-Key``: the same key and body from the same token
    answer with the scans the first request made; the same key with another body is refused."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("token_id", "key"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"))
    key: Mapped[str] = mapped_column(String(255))
    request_sha256: Mapped[str] = mapped_column(String(64))
    scan_ids: Mapped[list[str]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CallbackSecret(Base):
    """A platform token's signing secret for callbacks, encrypted at rest (it must be read
    back to sign). During a rotation the old one signs beside the new one until
    ``expires_at``."""

    __tablename__ = "callback_secrets"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"), index=True)
    secret_encrypted: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]


class CallbackHost(Base):
    """A host a platform token's callbacks may go to (the allow-list)."""

    __tablename__ = "callback_hosts"
    __table_args__ = (UniqueConstraint("token_id", "host"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"))
    host: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CallbackEndpoint(Base):
    """A callback URL of a token; one that answered 410 Gone is disabled."""

    __tablename__ = "callback_endpoints"
    __table_args__ = (UniqueConstraint("token_id", "url_sha256"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"))
    url: Mapped[str] = mapped_column(Text)
    url_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled_at: Mapped[datetime | None]
    disabled_reason: Mapped[str | None] = mapped_column(Text)


class CallbackDelivery(Base):
    """One event owed to one endpoint (the outbox): written in the transaction that made the
    event happen, sent by the callback sender, retried until ``next_attempt_at`` passes the
    retry window."""

    __tablename__ = "callback_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "event_key"),
        Index(None, "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(40), unique=True)  # the webhook-id header
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id"), index=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("callback_endpoints.id"))
    scan_id: Mapped[int | None] = mapped_column(ForeignKey("scans.id"), index=True)
    event_type: Mapped[str] = mapped_column(String(64))
    event_key: Mapped[str] = mapped_column(String(128))  # one delivery per event and endpoint
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState, "delivery_state"), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    last_status: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)


class CallbackAttempt(Base):
    """One try at a delivery: when, what the receiver answered (or why nothing did)."""

    __tablename__ = "callback_attempts"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("callback_deliveries.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float | None] = mapped_column(Float)


class Rescan(Base):
    """An operator's batch re-scan: what it selects, where its listing stands (``cursor``,
    committed with each page, so a restarted lister goes on from there) and its counts.

    What became of its items is counted as they finish, not on each read: every item up to
    ``counted_through`` (a source id) was looked at once, those then finished are in
    ``done`` (``reused`` of them) / ``rejected`` / ``failed`` / ``cancelled``, and those
    still pending are in ``unfinished`` (at most the re-scan's in-flight cap), looked at
    again at the next count (``db.repository.rescans.count_finished_items``)."""

    __tablename__ = "rescans"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(40), unique=True)
    token_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id"))
    created_by: Mapped[str] = mapped_column(String(255))
    selection: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[RescanState] = mapped_column(
        _enum(RescanState, "rescan_state"), default=RescanState.LISTING
    )
    cursor: Mapped[str | None] = mapped_column(Text)
    listed: Mapped[int] = mapped_column(default=0)
    queued: Mapped[int] = mapped_column(default=0)
    done: Mapped[int] = mapped_column(default=0)
    reused: Mapped[int] = mapped_column(default=0)
    rejected: Mapped[int] = mapped_column(default=0)
    failed: Mapped[int] = mapped_column(default=0)
    cancelled: Mapped[int] = mapped_column(default=0)
    counted_through: Mapped[int] = mapped_column(_ID, default=0)
    unfinished: Mapped[list[int]] = mapped_column(
        JSON().with_variant(JSONB(), "postgresql"), default=list
    )
    counted_at: Mapped[datetime | None]  # when the counts above were last brought up to date
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    listed_at: Mapped[datetime | None]  # when the listing finished
    finished_at: Mapped[datetime | None]
