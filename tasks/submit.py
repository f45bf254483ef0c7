"""Turn an upload record into a scan: the one path shared by the SQS ingest, the webhook and
``synthsentry submit``. The source row is committed before the intake task is sent, so the
worker always finds it; an upload recorded before sends nothing, so a retried event queues
no work twice. If the send after the commit fails, the caller sees the error; its retry is
then a duplicate and sends nothing, and :func:`resend_lost` (``synthsentry reconcile``)
sends the intake of the upload left pending."""

from __future__ import annotations

import logging

from db.models import SourceKind
from tasks.app import app, send_detect, send_intake
from tasks.queues import QUEUES
from workers.events import UploadRecord
from workers.fleet import FleetContext, Upload, record_upload, resend_stalled

log = logging.getLogger(__name__)


def submit_upload(
    ctx: FleetContext, record: UploadRecord, *, kind: SourceKind = SourceKind.UPLOAD_EVENT
) -> int | None:
    """Record the upload and queue its intake; returns the source id, or None for an upload
    recorded before (nothing is sent). Raises if the database or the broker cannot be reached
    (the caller keeps the event and tries again)."""
    source_id = record_upload(
        ctx,
        Upload(
            bucket=record.bucket,
            key=record.key,
            ref_key=record.ref_key(),
            version_id=record.version_id,
            etag=record.etag,
        ),
        kind=kind,
    )
    if source_id is None:
        log.info("upload recorded before; nothing sent", extra={"ref": record.ref_key()})
        return None
    send_intake(source_id)
    return source_id


class BrokerBacklog:
    """Whether a queue still holds messages, asked of the broker once per queue per check."""

    def __init__(self) -> None:
        self._sizes: dict[str, int] = {}

    def intake_waiting(self) -> bool:
        return self._waiting(QUEUES.intake)

    def detection_waiting(self, detector: str) -> bool:
        return self._waiting(QUEUES.detect(detector))

    def _waiting(self, queue: str) -> bool:
        if queue not in self._sizes:
            with app.connection_for_write() as connection:
                # Declaring an existing queue changes nothing and returns its length.
                declared = connection.default_channel.queue_declare(queue=queue)
                self._sizes[queue] = int(declared.message_count)
        return self._sizes[queue] > 0


def resend_lost(ctx: FleetContext, *, after_s: float) -> int:
    """Send again the messages of uploads pending longer than ``after_s``; returns how many
    messages were sent. Marked in the database before sending: a crash in between only
    delays that upload to its next check."""
    work = resend_stalled(ctx, after_s=after_s, backlog=BrokerBacklog())
    for source_id in work.intake:
        send_intake(source_id)
    for image_id, detector in work.detect:
        send_detect(image_id, detector)
    return len(work.intake) + len(work.detect)
