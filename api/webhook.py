"""HTTP endpoint for S3-style upload notifications (MinIO's webhook target, or anything that
POSTs the S3 event JSON). A plain WSGI application: run it with ``synthsentry webhook`` or
under any WSGI server.

    POST /s3-events   Authorization: Bearer <SYNTHSENTRY_WEBHOOK_SECRET>   body: S3 event JSON
    GET  /healthz

Answers 200 with counts when every allowed upload was recorded and queued, 400 (and a dead
letter) for a body that is not an S3 event, 401 for a wrong secret, 503 when the database
or broker is down, so that the sender retries.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from workers.events import BucketPolicy, MalformedEvent, UploadRecord, parse_s3_notification

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024

Submit = Callable[[UploadRecord], int | None]
DeadLetter = Callable[[str, str], None]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def make_app(
    *, secret: str, policy: BucketPolicy, submit: Submit, dead_letter: DeadLetter
) -> Callable[[dict[str, Any], StartResponse], Iterable[bytes]]:
    if not secret:
        raise ValueError("the webhook needs a shared secret")

    def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "/")
        if method == "GET" and path == "/healthz":
            return _reply(start_response, 200, {"ok": True})
        if path != "/s3-events":
            return _reply(start_response, 404, {"error": "not found"})
        if method != "POST":
            return _reply(start_response, 405, {"error": "POST only"})
        if not _authorised(environ.get("HTTP_AUTHORIZATION", ""), secret):
            log.warning("webhook call with a wrong or missing secret")
            return _reply(start_response, 401, {"error": "unauthorised"})
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY_BYTES:
            return _reply(start_response, 413 if length > 0 else 400, {"error": "bad body size"})
        body = environ["wsgi.input"].read(length)
        try:
            notification = parse_s3_notification(body)
        except MalformedEvent as exc:
            dead_letter(body.decode("utf-8", "replace"), str(exc))
            return _reply(start_response, 400, {"error": str(exc)})
        accepted = duplicates = refused = 0
        for record in notification.uploads:
            if not policy.allows(record):
                refused += 1
                log.warning("event for a bucket not scanned here", extra={"bucket": record.bucket})
                continue
            try:
                source_id = submit(record)
            except Exception:
                log.exception("could not record an upload; asking the sender to retry")
                return _reply(start_response, 503, {"error": "temporarily unavailable"})
            if source_id is None:
                duplicates += 1
            else:
                accepted += 1
        return _reply(
            start_response,
            200,
            {
                "accepted": accepted,
                "duplicates": duplicates,
                "refused": refused,
                "test_event": notification.is_test_event,
            },
        )

    return application


def _authorised(header: str, secret: str) -> bool:
    token = header.removeprefix("Bearer ").strip()
    return hmac.compare_digest(token.encode(), secret.encode())


def _reply(start_response: StartResponse, status: int, payload: dict[str, Any]) -> list[bytes]:
    reasons = {
        200: "OK",
        400: "Bad Request",
        401: "Unauthorized",
        404: "Not Found",
        405: "Method Not Allowed",
        413: "Payload Too Large",
        503: "Service Unavailable",
    }
    body = json.dumps(payload).encode()
    start_response(
        f"{status} {reasons[status]}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]
