"""Turn an upload record into a scan: the one path shared by the SQS ingest, the webhook and
``synthsentry submit``. The source row is committed before the intake task is sent, so the
worker always finds it; a duplicate of a finished upload sends nothing."""

from __future__ import annotations

import logging
from collections.abc import Callable

from db.models import SourceKind
from tasks.app import app
from workers.events import UploadRecord
from workers.fleet import FleetContext, Upload, queue_for, record_upload, resend_stalled

log = logging.getLogger(__name__)


def submit_upload(
    ctx: FleetContext, record: UploadRecord, *, kind: SourceKind = SourceKind.UPLOAD_EVENT
) -> int | None:
    """Record the upload and queue its intake; returns the source id, or None for a duplicate
    of an upload already taken in. Raises if the database or the broker cannot be reached
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
        log.info("duplicate upload event", extra={"bucket": record.bucket, "ref": record.ref_key()})
        return None
    app.send_task("synthsentry.intake", args=(source_id,))
    return source_id


def _queue_busy() -> Callable[[str], bool]:
    """Whether a queue still holds messages, asked of the broker once per queue per check."""
    sizes: dict[str, int] = {}

    def busy(queue: str) -> bool:
        if queue not in sizes:
            with app.connection_for_write() as connection:
                # Declaring an existing queue changes nothing and returns its length.
                declared = connection.default_channel.queue_declare(queue=queue)
                sizes[queue] = int(declared.message_count)
        return sizes[queue] > 0

    return busy


def resend_lost(ctx: FleetContext, *, after_s: float) -> int:
    """Send again the messages of uploads pending longer than ``after_s``; returns how many
    messages were sent. Marked in the database before sending: a crash in between only
    delays that upload to its next check."""
    work = resend_stalled(ctx, after_s=after_s, queue_busy=_queue_busy())
    for source_id in work.intake:
        app.send_task("synthsentry.intake", args=(source_id,))
    for image_id, detector in work.detect:
        app.send_task("synthsentry.detect", args=(image_id, detector), queue=queue_for(detector))
    return len(work.intake) + len(work.detect)
