"""From an upload event to dispatched work: the one path shared by the SQS ingest
(``tasks.submit``), the S3 event endpoint (``api.webhook``) and ``synthsentry submit``.

The source row is committed before its intake is dispatched, so whatever takes it in (a
Celery worker, the embedded worker) always finds it; an upload recorded before dispatches
nothing, so a retried or duplicated event queues no work twice. If the dispatch after the
commit fails, the caller sees the error; its retry is then a duplicate that dispatches
nothing, and the sweep (``synthsentry reconcile``, or the embedded worker's own) finds the
upload still pending and dispatches its intake again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from db import repository
from db.models import SourceKind
from db.session import transaction
from workers.dispatch import Dispatcher
from workers.events import UploadRecord

log = logging.getLogger(__name__)

# Who recorded an upload announced by an event (sources.submitted_by).
EVENT_ACTOR = "fleet"


@dataclass(frozen=True)
class Upload:
    """An object to scan, as an upload event, a hook or an operator names it; ``ref_key``
    tells one upload of it from another (``UploadRecord.ref_key``)."""

    bucket: str
    key: str
    ref_key: str
    version_id: str | None = None
    etag: str | None = None


def record_object(
    session_factory: sessionmaker[Session],
    upload: Upload,
    *,
    kind: SourceKind = SourceKind.UPLOAD_EVENT,
) -> int | None:
    """Record an upload; returns the source id to take in when this call recorded it, or
    None when this exact object was recorded before (a duplicate event, a sender's retry)."""
    with transaction(session_factory) as session:
        source, created = repository.record_source(
            session,
            repository.SourceRef(
                kind=kind,
                ref_key=upload.ref_key,
                bucket=upload.bucket,
                object_key=upload.key,
                version_id=upload.version_id,
                etag=upload.etag,
                submitted_by=EVENT_ACTOR if kind == SourceKind.UPLOAD_EVENT else kind.value,
            ),
            None,
        )
        # Only the call that created the row dispatches its intake, so a sender retrying a
        # request (or S3 and SQS delivering twice) queues nothing again.
        return source.id if created else None


def record_upload(
    session_factory: sessionmaker[Session],
    record: UploadRecord,
    *,
    kind: SourceKind = SourceKind.UPLOAD_EVENT,
) -> int | None:
    """Record the upload an event announces (see ``record_object``)."""
    upload = Upload(
        bucket=record.bucket,
        key=record.key,
        ref_key=record.ref_key(),
        version_id=record.version_id,
        etag=record.etag,
    )
    return record_object(session_factory, upload, kind=kind)


def submit_upload(
    session_factory: sessionmaker[Session],
    dispatcher: Dispatcher,
    record: UploadRecord,
    *,
    kind: SourceKind = SourceKind.UPLOAD_EVENT,
) -> int | None:
    """Record the upload and dispatch its intake; returns the source id, or None for an
    upload recorded before (nothing is dispatched). Raises if the database or the dispatch
    fails (the caller keeps the event and tries again)."""
    source_id = record_upload(session_factory, record, kind=kind)
    if source_id is None:
        log.info("upload recorded before; nothing sent", extra={"ref": record.ref_key()})
        return None
    dispatcher.intake(source_id)
    return source_id


def keep_dead_letter(
    session_factory: sessionmaker[Session], channel: str, body: str, reason: str
) -> None:
    """Keep an event (or one record of it) that no retry can make usable, for an operator;
    raises if the database cannot be reached."""
    with transaction(session_factory) as session:
        repository.record_dead_letter(session, channel, reason, body)
