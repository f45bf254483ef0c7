"""``POST /s3-events``: S3-style upload notifications (MinIO's webhook target, or anything
that POSTs the S3 event JSON). A route of the API (``api.app``), outside ``/v1``: its
caller is a storage server, which holds no API token, so it is authenticated by the shared
secret ``SYNTHSENTRY_WEBHOOK_SECRET`` as a Bearer token instead (compared in constant time;
with no secret configured every call is refused).

    POST /s3-events   Authorization: Bearer <SYNTHSENTRY_WEBHOOK_SECRET>   body: S3 event JSON

Every record of an event has its own outcome, and the answer lists them:

- 200 with counts: ``accepted`` (recorded and dispatched), ``duplicates`` (recorded before,
  by an earlier delivery or a retry: nothing is dispatched again), ``ignored`` (records that
  announce no upload), ``refused`` and ``refusals``: the ``index`` in ``Records``, a
  ``status`` and the ``reason`` of each record not taken (403: its bucket is not scanned
  here; 400: no retry can make it usable, and it is kept as a dead letter).
- 400 when nothing in the body can be used (empty, not an S3 event, JSON nested too deep,
  every record invalid), 413 for a body over :data:`MAX_BODY_BYTES` (``api.limits`` refuses
  it unread) or more records than ``ApiContext.webhook_max_records``: nothing is dispatched,
  and an event that was read is kept as a dead letter. 401 for a wrong secret.
- 503 only when the database or the dispatch (the broker, the embedded worker) fails, so
  that the sender retries. The records taken before the failure are duplicates on the retry
  and dispatch nothing twice; an intake whose dispatch failed after its upload was recorded
  is dispatched by the sweep (``synthsentry reconcile``, or the embedded worker's own).

Answers other than 200 are RFC 9457 problem documents (``application/problem+json``).
"""

from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from api.context import ApiContext, ContextDep
from api.problems import MEDIA_TYPE, Problem, problem_document
from workers import metrics
from workers.events import MalformedEvent, S3Notification, TooManyRecords, parse_s3_notification
from workers.uploads import keep_dead_letter, submit_upload

log = logging.getLogger(__name__)

PATH = "/s3-events"
MAX_BODY_BYTES = 1024 * 1024
DEAD_LETTER_CHANNEL = "webhook"

# RFC 9457 problem kinds (``api.problems``: URNs, nothing serves a page for them) and their
# titles.
_PROBLEM_TITLES = {
    "bad-body": "Unusable request body",
    "malformed-event": "Not an S3 event notification",
    "too-many-records": "Too many records in one event",
    "invalid-records": "No usable record in the event",
    "unavailable": "Database or broker unavailable",
}

_shared_secret = HTTPBearer(
    scheme_name="S3EventSecret",
    auto_error=False,
    description="the shared secret SYNTHSENTRY_WEBHOOK_SECRET (not an API token)",
)


def require_shared_secret(
    context: ContextDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_shared_secret)],
) -> None:
    """Let the call through only with the configured secret as its Bearer token."""
    secret = context.webhook_secret.encode()
    # The header's own bytes (the server decoded them as Latin-1). Both sides as bytes:
    # compare_digest refuses non-ASCII str. An empty secret configured means the endpoint
    # is closed, not that an empty token opens it.
    offered = (
        b"" if credentials is None else credentials.credentials.strip().encode("latin-1", "replace")
    )
    if not (secret and offered and hmac.compare_digest(offered, secret)):
        log.warning("S3 event call with a wrong or missing secret")
        raise Problem(
            401, "unauthorised", "a wrong or missing bearer token", {"WWW-Authenticate": "Bearer"}
        )


SharedSecret = Annotated[None, Depends(require_shared_secret)]


class Refusal(BaseModel):
    index: int = Field(description="the record's place in Records")
    status: int = Field(
        description="403: its bucket is not scanned here; 400: no retry can make it usable "
        "(kept as a dead letter)"
    )
    reason: str


class EventOutcome(BaseModel):
    accepted: int = Field(description="uploads recorded and dispatched by this call")
    duplicates: int = Field(description="uploads recorded before: nothing dispatched again")
    ignored: int = Field(description="records that announce no upload")
    refused: int
    refusals: list[Refusal]
    test_event: bool = Field(description="the s3:TestEvent a bucket sends when subscribed")


def _problem_doc(description: str) -> dict[str, Any]:
    return {"description": description, "content": {MEDIA_TYPE: {}}}


router = APIRouter(tags=["s3 events"])


@router.post(
    PATH,
    response_model=EventOutcome,
    summary="Take an S3 event notification",
    responses={
        400: _problem_doc("nothing in the body can be used (see refusals, if any)"),
        401: _problem_doc("a wrong or missing shared secret"),
        408: _problem_doc("the body stopped arriving"),
        413: _problem_doc("a body over 1 MiB, or more records than the cap"),
        503: _problem_doc("the database or the broker is down: send the event again"),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def take_s3_event(request: Request, context: ContextDep, _: SharedSecret) -> Response:
    # Read here, after the secret was checked, and as bytes: a malformed event is an answer
    # of this endpoint (and a dead letter), not a validation error.
    try:
        body = await request.body()
    except ClientDisconnect:
        return _problem(HTTPStatus.BAD_REQUEST, "bad-body", "the body ended before it was whole")
    if not body:
        return _problem(HTTPStatus.BAD_REQUEST, "bad-body", "the body is empty")
    try:
        # The database and the dispatch block: off the event loop.
        return await run_in_threadpool(_take_event, context, body)
    except _Unavailable:
        metrics.error("api")
        return _problem(
            HTTPStatus.SERVICE_UNAVAILABLE,
            "unavailable",
            "the database or the broker is unavailable; send the event again",
            headers={"Retry-After": "10"},
        )


class _Unavailable(Exception):
    """The database or the dispatch failed: the sender should send the event again."""


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


def _take_event(context: ApiContext, body: bytes) -> Response:
    try:
        notification = parse_s3_notification(body, max_records=context.webhook_max_records)
    except TooManyRecords as exc:
        log.warning("event over the record cap", extra={"records": exc.count})
        _keep(context, _storable(body), str(exc))
        return _problem(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "too-many-records", str(exc))
    except MalformedEvent as exc:
        log.warning("not an S3 event notification", extra={"reason": str(exc)})
        _keep(context, _storable(body), str(exc))
        return _problem(HTTPStatus.BAD_REQUEST, "malformed-event", str(exc))

    outcomes = _take_uploads(context, notification)
    # After the uploads: if keeping fails, the sender retries, and the uploads recorded
    # meanwhile are then duplicates that dispatch nothing.
    for invalid in notification.invalid_records:
        log.warning(
            "invalid record; kept as a dead letter",
            extra={"index": invalid.index, "reason": invalid.reason},
        )
        _keep(context, invalid.record, invalid.reason)
        outcomes.refuse(invalid.index, HTTPStatus.BAD_REQUEST, invalid.reason)

    summary = outcomes.summary()
    if notification.invalid_records and not (notification.uploads or notification.ignored_events):
        return _problem(
            HTTPStatus.BAD_REQUEST,
            "invalid-records",
            "no record of the event can be used; see refusals",
            **summary,
        )
    _count(outcomes)
    return _reply(
        HTTPStatus.OK, {**summary, "test_event": notification.is_test_event}, "application/json"
    )


def _count(outcomes: _Outcomes) -> None:
    """The records of an event answered 200: each upload taken (a duplicate included), each
    record refused (an event refused whole is counted at the door, ``api.metrics``)."""
    metrics.upload_received("s3_event", outcomes.accepted + outcomes.duplicates)
    for refusal in outcomes.refusals:
        reason = "bucket-not-allowed" if refusal["status"] == 403 else "invalid-record"
        metrics.upload_refused("s3_event", reason)


def _take_uploads(context: ApiContext, notification: S3Notification) -> _Outcomes:
    outcomes = _Outcomes(ignored=len(notification.ignored_events))
    policy = context.bucket_policy
    for index, record in notification.numbered_uploads():
        if policy is None or not policy.allows(record):
            log.warning(
                "upload refused by bucket policy", extra={"bucket": record.bucket, "index": index}
            )
            outcomes.refuse(
                index,
                HTTPStatus.FORBIDDEN,
                f"bucket {record.bucket!r} (or this key's prefix) is not scanned here",
            )
            continue
        try:
            source_id = submit_upload(context.session_factory, context.dispatcher, record)
        except Exception as exc:
            log.exception("could not record or dispatch an upload; asking the sender to retry")
            raise _Unavailable from exc
        if source_id is None:
            outcomes.duplicates += 1
        else:
            outcomes.accepted += 1
    return outcomes


def _keep(context: ApiContext, body: str, reason: str) -> None:
    try:
        keep_dead_letter(context.session_factory, DEAD_LETTER_CHANNEL, body, reason)
    except Exception as exc:
        log.exception("could not keep a dead letter; asking the sender to retry")
        raise _Unavailable from exc


def _storable(body: bytes) -> str:
    # A dead letter is text in the database: no invalid UTF-8, no NUL.
    return body.decode("utf-8", "replace").replace("\x00", "\ufffd")


def _problem(
    status: HTTPStatus,
    kind: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> Response:
    document = problem_document(
        int(status), kind, detail, title=_PROBLEM_TITLES[kind], **extensions
    )
    return _reply(status, document, MEDIA_TYPE, headers)


def _reply(
    status: HTTPStatus,
    payload: dict[str, Any],
    media_type: str,
    headers: dict[str, str] | None = None,
) -> Response:
    # ensure_ascii: reasons quote keys, which can hold anything Unicode can, lone surrogates
    # included, and those cannot be encoded as UTF-8.
    body = json.dumps(payload, ensure_ascii=True).encode()
    return Response(body, status_code=int(status), media_type=media_type, headers=headers)
