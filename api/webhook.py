"""HTTP endpoint for S3-style upload notifications (MinIO's webhook target, or anything that
POSTs the S3 event JSON). A plain WSGI application: ``synthsentry webhook`` serves it with
waitress, which hands it only whole requests (see ``serve_webhook`` for the connection
limits); any WSGI server will do.

    POST /s3-events   Authorization: Bearer <SYNTHSENTRY_WEBHOOK_SECRET>   body: S3 event JSON
    GET  /healthz

Every record of an event has its own outcome, and the answer lists them:

- 200 with counts: ``accepted`` (recorded and queued), ``duplicates`` (recorded before, by an
  earlier delivery or a retry: nothing is queued again), ``ignored`` (records that announce
  no upload), ``refused`` and ``refusals``: the ``index`` in ``Records``, a ``status`` and the
  ``reason`` of each record not taken (403: its bucket is not scanned here; 400: no retry can
  make it usable, and it is kept as a dead letter).
- 400 when nothing in the body can be used (not an S3 event, JSON nested too deep, every
  record invalid), 413 for a body over :data:`MAX_BODY_BYTES` or more records than the cap:
  nothing is queued, and the body is kept as a dead letter (one over the size limit is not
  read). 401 for a wrong secret.
- 503 only when the database or the broker is down, so that the sender retries. The records
  taken before the failure are duplicates on the retry and queue nothing twice; an intake
  whose send failed after its upload was recorded is sent by ``synthsentry reconcile``.

Answers other than 200 are RFC 9457 problem documents (``application/problem+json``).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from api.problems import MEDIA_TYPE, problem_document
from workers.events import (
    BucketPolicy,
    MalformedEvent,
    S3Notification,
    TooManyRecords,
    UploadRecord,
    parse_s3_notification,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
# S3 sends one record per event, MinIO a few; a bigger batch is someone else's traffic.
DEFAULT_MAX_RECORDS = 100

# RFC 9457 problem kinds (``api.problems``: URNs, nothing serves a page for them) and their
# titles.
_PROBLEM_TITLES = {
    "not-found": "No such endpoint",
    "method-not-allowed": "Method not allowed",
    "unauthorised": "Unauthorised",
    "bad-body": "Unusable request body",
    "malformed-event": "Not an S3 event notification",
    "too-many-records": "Too many records in one event",
    "invalid-records": "No usable record in the event",
    "unavailable": "Database or broker unavailable",
}

Submit = Callable[[UploadRecord], int | None]
DeadLetter = Callable[[str, str], None]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WSGIApplication = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class _Unavailable(Exception):
    """The database or the broker failed: the sender should send the event again."""


@dataclass
class _Outcomes:
    """What became of each record of one event."""

    accepted: int = 0
    duplicates: int = 0
    ignored: int = 0
    refusals: list[dict[str, Any]] = field(default_factory=list)

    def refuse(self, index: int, status: HTTPStatus, reason: str) -> None:
        self.refusals.append({"index": index, "status": int(status), "reason": reason})

    def summary(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "ignored": self.ignored,
            "refused": len(self.refusals),
            "refusals": sorted(self.refusals, key=lambda refusal: int(refusal["index"])),
        }


def make_app(
    *,
    secret: str,
    policy: BucketPolicy,
    submit: Submit,
    dead_letter: DeadLetter,
    max_records: int = DEFAULT_MAX_RECORDS,
) -> WSGIApplication:
    """The webhook as a WSGI application. ``submit`` records an upload and queues its scan
    (None: recorded before); it and ``dead_letter`` raise only when the database or the
    broker cannot be reached."""
    if not secret:
        raise ValueError("the webhook needs a shared secret")
    if max_records < 1:
        raise ValueError("the webhook must take at least one record per event")
    return _Webhook(secret, policy, submit, dead_letter, max_records)


@dataclass(frozen=True)
class _Webhook:
    secret: str = field(repr=False)
    policy: BucketPolicy
    submit: Submit
    dead_letter: DeadLetter
    max_records: int

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        method, path = environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "/")
        if method == "GET" and path == "/healthz":
            return _json(start_response, HTTPStatus.OK, {"ok": True})
        if path != "/s3-events":
            return _problem(start_response, HTTPStatus.NOT_FOUND, "not-found", "no such endpoint")
        if method != "POST":
            return _problem(
                start_response,
                HTTPStatus.METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "events are POSTed",
                headers=[("Allow", "POST")],
            )
        if not _authorised(environ.get("HTTP_AUTHORIZATION", ""), self.secret):
            log.warning("webhook call with a wrong or missing secret")
            return _problem(
                start_response,
                HTTPStatus.UNAUTHORIZED,
                "unauthorised",
                "a wrong or missing bearer token",
                headers=[("WWW-Authenticate", "Bearer")],
            )
        body = _read_body(environ)
        if isinstance(body, tuple):
            status, detail = body
            return _problem(start_response, status, "bad-body", detail)
        try:
            return self._take_event(body, start_response)
        except _Unavailable:
            return _problem(
                start_response,
                HTTPStatus.SERVICE_UNAVAILABLE,
                "unavailable",
                "the database or the broker is unavailable; send the event again",
                headers=[("Retry-After", "10")],
            )

    def _take_event(self, body: bytes, start_response: StartResponse) -> list[bytes]:
        try:
            notification = parse_s3_notification(body, max_records=self.max_records)
        except TooManyRecords as exc:
            log.warning("event over the record cap", extra={"records": exc.count})
            self._keep(_storable(body), str(exc))
            return _problem(
                start_response, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "too-many-records", str(exc)
            )
        except MalformedEvent as exc:
            log.warning("not an S3 event notification", extra={"reason": str(exc)})
            self._keep(_storable(body), str(exc))
            return _problem(start_response, HTTPStatus.BAD_REQUEST, "malformed-event", str(exc))

        outcomes = self._take_uploads(notification)
        # After the uploads: if keeping fails, the sender retries, and the uploads recorded
        # meanwhile are then duplicates that queue nothing.
        for invalid in notification.invalid_records:
            log.warning(
                "invalid record; kept as a dead letter",
                extra={"index": invalid.index, "reason": invalid.reason},
            )
            self._keep(invalid.record, invalid.reason)
            outcomes.refuse(invalid.index, HTTPStatus.BAD_REQUEST, invalid.reason)

        summary = outcomes.summary()
        if notification.invalid_records and not (
            notification.uploads or notification.ignored_events
        ):
            return _problem(
                start_response,
                HTTPStatus.BAD_REQUEST,
                "invalid-records",
                "no record of the event can be used; see refusals",
                **summary,
            )
        return _json(
            start_response, HTTPStatus.OK, {**summary, "test_event": notification.is_test_event}
        )

    def _take_uploads(self, notification: S3Notification) -> _Outcomes:
        outcomes = _Outcomes(ignored=len(notification.ignored_events))
        for index, record in notification.numbered_uploads():
            if not self.policy.allows(record):
                log.warning(
                    "upload refused by bucket policy",
                    extra={"bucket": record.bucket, "index": index},
                )
                outcomes.refuse(
                    index,
                    HTTPStatus.FORBIDDEN,
                    f"bucket {record.bucket!r} (or this key's prefix) is not scanned here",
                )
                continue
            try:
                source_id = self.submit(record)
            except Exception as exc:
                log.exception("could not record an upload; asking the sender to retry")
                raise _Unavailable from exc
            if source_id is None:
                outcomes.duplicates += 1
            else:
                outcomes.accepted += 1
        return outcomes

    def _keep(self, body: str, reason: str) -> None:
        try:
            self.dead_letter(body, reason)
        except Exception as exc:
            log.exception("could not keep a dead letter; asking the sender to retry")
            raise _Unavailable from exc


def _read_body(environ: dict[str, Any]) -> bytes | tuple[HTTPStatus, str]:
    declared = environ.get("CONTENT_LENGTH")
    if not declared:
        return HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required"
    try:
        length = int(declared)
    except ValueError:
        return HTTPStatus.BAD_REQUEST, "the Content-Length is not a number"
    if length > MAX_BODY_BYTES:
        return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is over {MAX_BODY_BYTES} bytes"
    if length <= 0:
        return HTTPStatus.BAD_REQUEST, "the body is empty"
    body: bytes = environ["wsgi.input"].read(length)
    if len(body) != length:
        return HTTPStatus.BAD_REQUEST, "the body ended before its Content-Length"
    return body


def _storable(body: bytes) -> str:
    # A dead letter is text in PostgreSQL: no invalid UTF-8, no NUL.
    return body.decode("utf-8", "replace").replace("\x00", "\ufffd")


def _authorised(header: str, secret: str) -> bool:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":  # the bare secret is not accepted: it is a Bearer token
        return False
    return hmac.compare_digest(token.strip().encode(), secret.encode())


def _json(
    start_response: StartResponse, status: HTTPStatus, payload: dict[str, Any]
) -> list[bytes]:
    return _reply(start_response, status, payload, "application/json", [])


def _problem(
    start_response: StartResponse,
    status: HTTPStatus,
    kind: str,
    detail: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    **extensions: Any,
) -> list[bytes]:
    document = problem_document(
        int(status), kind, detail, title=_PROBLEM_TITLES[kind], **extensions
    )
    return _reply(start_response, status, document, MEDIA_TYPE, headers or [])


def _reply(
    start_response: StartResponse,
    status: HTTPStatus,
    payload: dict[str, Any],
    content_type: str,
    headers: list[tuple[str, str]],
) -> list[bytes]:
    # ensure_ascii: payload values (reasons quoting a key) can hold anything Unicode can.
    body = json.dumps(payload, ensure_ascii=True).encode()
    start_response(
        f"{int(status)} {status.phrase}",
        [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers],
    )
    return [body]
