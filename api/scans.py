"""Platform hooks: submit uploads for scanning and read what became of them (the services:
``workers.submissions``). A platform token sees only its own scans; an admin token sees
every scan. Answers carry the result in the shape ``scan --json`` prints, the review state,
the moderator's decision apart from the flag, and the notice that a flag asks for review
and is not a finding.

    POST /v1/scans                  JSON (one object or up to 1,000) or multipart (bytes)
    GET  /v1/scans/{id}?wait=N      one scan; waits up to N s (<= 30) for its result
    GET  /v1/scans?external_id=X    the caller's scans carrying its own id
    GET  /v1/items?bucket=&key=     the scans of one object
    GET  /v1/images/{sha256}        the scans whose bytes were these
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Header, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.auth import PlatformOrAdmin
from api.context import ApiContext, ContextDep
from api.guards import unstorable
from api.problems import Problem
from db.models import ApiToken, ScanPriority, TokenRole
from workers import callbacks, submissions
from workers.submissions import (
    Caller,
    ObjectRef,
    Reader,
    ScanNotFound,
    ScanRequest,
    SubmissionRefused,
    SubmitPolicy,
)

router = APIRouter(tags=["scans"])

MAX_WAIT_S = 30
_POLL_S = 0.2
_FORM_OVERHEAD = 64 * 1024
# Image uploads held in memory at once (each up to the image size limit); more wait for
# a turn, and one that waits longer than this is answered 503 to try again.
UPLOADS_AT_ONCE = 8
_UPLOAD_WAIT_S = 10.0
_BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"


class ObjectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(min_length=3, max_length=63, pattern=_BUCKET_PATTERN)
    key: str = Field(min_length=1, max_length=1024)
    version_id: str | None = Field(None, min_length=1, max_length=1024)


class ScanBody(BaseModel):
    """One object (``object``) or a list (``objects``, 1 to 1,000), and what to attach."""

    model_config = ConfigDict(extra="forbid")

    object: ObjectIn | None = None
    objects: list[ObjectIn] | None = Field(None, min_length=1, max_length=submissions.MAX_OBJECTS)
    external_id: str | None = Field(
        None, min_length=1, max_length=255, description="your own id, echoed in every answer"
    )
    callback_url: str | None = Field(
        None,
        min_length=1,
        max_length=2048,
        description="where the result is POSTed (a host on your token's allow-list)",
    )
    priority: ScanPriority = Field(
        ScanPriority.NORMAL, description="low: queued behind live uploads (back-fills)"
    )

    @model_validator(mode="after")
    def _one_of(self) -> ScanBody:
        if (self.object is None) == (self.objects is None):
            raise ValueError("give either `object` or `objects`")
        return self

    def request(self, objects: list[ObjectRef] | None = None) -> ScanRequest:
        given = [self.object] if self.object is not None else list(self.objects or [])
        return ScanRequest(
            objects=objects or [ObjectRef(o.bucket, o.key, o.version_id) for o in given],
            external_id=self.external_id,
            callback_url=self.callback_url,
            priority=self.priority,
        )


class ScanLink(BaseModel):
    id: str
    links: dict[str, str]


class Accepted(BaseModel):
    scans: list[ScanLink]
    replayed: bool = Field(description="true when this Idempotency-Key was answered before")


class ObjectOut(BaseModel):
    bucket: str | None
    key: str | None
    version_id: str | None


class DetectorOut(BaseModel):
    name: str
    version: str
    weights_sha256: str | None
    score: float | None = Field(description="this detector's probability of AI generation")
    evidence: dict[str, Any]
    latency_ms: float | None
    error: str | None
    reused: bool


class DecisionOut(BaseModel):
    label: str = Field(description="the moderator's label: ai_generated, not_ai_generated, unsure")
    decided_at: str | None


class ScanOut(BaseModel):
    """One scan: the result as ``scan --json`` prints it, and the scan's own fields."""

    model_config = ConfigDict(extra="forbid")

    id: str
    external_id: str | None
    object: ObjectOut
    priority: ScanPriority
    submitted_at: str
    finished: bool = Field(description="false while the result is pending")
    path: str
    path_bytes: str | None
    sha256: str | None
    status: str = Field(description="pending, scored or rejected")
    reason: str | None = Field(description="a rejected upload: why (e.g. not_an_image)")
    message: str | None
    ai_score: float | None
    flagged: bool = Field(
        description="a request for human review; never a finding that the image is AI-made"
    )
    verdict: str = Field(description="likely_ai, no_indication, inconclusive, not_scored, ...")
    verdict_reason: str | None
    ensemble_version: str | None
    image: dict[str, Any] | None
    detectors: list[DetectorOut]
    review: dict[str, Any] | None = Field(description="the review case, as scan --json shows it")
    review_state: str = Field(description="none, open, claimed, escalated, decided or withdrawn")
    decision: DecisionOut | None = Field(description="the moderator's decision, once made")
    detector_versions: dict[str, str]
    notice: str
    links: dict[str, str]


class ScanList(BaseModel):
    scans: list[ScanOut]


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` written in place, so it stands alone inside
    the OpenAPI document (no cycles among these models)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


_FORM_FIELDS = ("external_id", "callback_url", "priority")
_SUBMIT_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inlined(ScanBody.model_json_schema())},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "additionalProperties": False,
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "external_id": {"type": "string", "minLength": 1, "maxLength": 255},
                        "callback_url": {"type": "string", "minLength": 1, "maxLength": 2048},
                        "priority": {"type": "string", "enum": ["normal", "low"]},
                    },
                }
            },
        },
    }
}


def _policy(context: ApiContext) -> SubmitPolicy:
    return SubmitPolicy(
        buckets=context.bucket_policy,
        upload_bucket=context.upload_bucket,
        upload_prefix=context.upload_prefix,
        limits=context.limits,
        check_callback=functools.partial(
            callbacks.check_callback_url, allow_private=context.callbacks.allow_private
        ),
    )


def _refused(exc: SubmissionRefused) -> Problem:
    return Problem(exc.status, exc.kind, exc.detail)


def _invalid(exc: ValidationError) -> Problem:
    if not exc.errors():
        return Problem(422, "invalid-request", "the request does not match the schema")
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "body"
    return Problem(422, "invalid-request", f"{where}: {first.get('msg', '')}")


def install(app: FastAPI) -> None:
    """What this router keeps per application: the turns of image uploads."""
    app.state.upload_turns = asyncio.Semaphore(UPLOADS_AT_ONCE)


@router.post(
    "/v1/scans",
    status_code=202,
    response_model=Accepted,
    openapi_extra=_SUBMIT_DOC,
    summary="Submit objects, or an image's bytes, for scanning",
)
async def submit(
    request: Request,
    context: ContextDep,
    caller: PlatformOrAdmin,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            description="the same key and body answer with the same scans",
        ),
    ] = None,
) -> Accepted:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    submit = functools.partial(
        submissions.submit_objects,
        context.session_factory,
        context.dispatcher,
        caller=Caller(token_id=caller.id, actor=f"token:{caller.public_id}"),
        policy=_policy(context),
        idempotency_key=idempotency_key,
    )
    try:
        if content_type == "multipart/form-data":
            # Parsed first (Starlette spools a large file part to disk): a slow sender holds
            # no turn; a turn holds the image in memory while it is checked and stored.
            async with _form(request, context) as (body, upload):
                turns: asyncio.Semaphore = request.app.state.upload_turns
                try:
                    async with asyncio.timeout(_UPLOAD_WAIT_S):
                        await turns.acquire()
                except TimeoutError as exc:
                    raise Problem(
                        503, "busy", "too many uploads at once; try again", {"Retry-After": "5"}
                    ) from exc
                try:
                    data = await upload.read(context.limits.max_bytes + 1)
                    media = upload.content_type
                    sha256 = await run_in_threadpool(submissions.check_upload, data, context.limits)
                    ref = submissions.upload_ref(_policy(context), sha256)
                    submitted = await run_in_threadpool(
                        lambda: submit(
                            request=body.request([ref]),
                            digest_extra=sha256,
                            upload=lambda: submissions.store_upload(
                                context.store, ref, data, content_type=media
                            ),
                        )
                    )
                finally:
                    turns.release()
        elif content_type in ("application/json", ""):
            scan_request = _json_body(await request.body())
            submitted = await run_in_threadpool(lambda: submit(request=scan_request))
        else:
            raise Problem(
                415,
                "unsupported-media-type",
                "send application/json (objects) or multipart/form-data (an image file)",
            )
    except SubmissionRefused as exc:
        raise _refused(exc) from exc
    if len(submitted.scan_ids) == 1:
        response.headers["Location"] = f"/v1/scans/{submitted.scan_ids[0]}"
    return Accepted(
        scans=[ScanLink(id=i, links={"self": f"/v1/scans/{i}"}) for i in submitted.scan_ids],
        replayed=submitted.replayed,
    )


def _json_body(raw: bytes) -> ScanRequest:
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise Problem(400, "malformed-json", f"the body is not JSON: {exc}") from exc
    try:
        return ScanBody.model_validate(document).request()
    except ValidationError as exc:
        raise _invalid(exc) from exc


@contextlib.asynccontextmanager
async def _form(
    request: Request, context: ApiContext
) -> AsyncIterator[tuple[ScanBody, UploadFile]]:
    """The form's fields, checked, and its file part (unread); the form is closed after."""
    try:
        form = await request.form(
            max_files=1, max_fields=8, max_part_size=context.limits.max_bytes + _FORM_OVERHEAD
        )
    except Exception as exc:  # python-multipart's and Starlette's parse errors
        raise Problem(400, "malformed-form", f"the multipart body cannot be read: {exc}") from exc
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise Problem(422, "invalid-request", "the form needs a `file` part")
        unknown = sorted(set(form.keys()) - {"file", *_FORM_FIELDS})
        if unknown:
            raise Problem(422, "invalid-request", f"unknown form fields: {', '.join(unknown)}")
        # A placeholder object: the stored upload's name is known once its bytes are.
        fields: dict[str, Any] = {"object": {"bucket": context.upload_bucket, "key": "upload"}}
        for name in _FORM_FIELDS:
            value = form.get(name)
            if isinstance(value, str):
                if unstorable(value):
                    raise Problem(
                        422, "invalid-text", f"{name} holds a NUL or an unpaired surrogate"
                    )
                fields[name] = value
        try:
            body = ScanBody.model_validate(fields)
        except ValidationError as exc:
            raise _invalid(exc) from exc
        yield body, upload
    finally:
        await form.close()


# --- reading -----------------------------------------------------------------------------


def _reader(caller: ApiToken) -> Reader:
    return Reader(token_id=None if caller.role == TokenRole.ADMIN else caller.id)


@router.get(
    "/v1/scans/{scan_id}",
    response_model=ScanOut,
    summary="One scan: its result, review state and decision",
)
async def read_scan(
    scan_id: Annotated[str, Path(min_length=1, max_length=40)],
    context: ContextDep,
    caller: PlatformOrAdmin,
    wait: Annotated[
        int,
        Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for the result (0-30)"),
    ] = 0,
) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    read = functools.partial(
        submissions.read_scan,
        context.session_factory,
        scan_id,
        _reader(caller),
        active_ensemble=context.active_ensemble,
    )
    while True:
        try:
            document = await run_in_threadpool(read)
        except ScanNotFound as exc:
            raise Problem(404, "not-found", "no such scan") from exc
        if document["finished"] or time.monotonic() >= deadline:
            return document
        # Polls the database (the result may be stored by any worker of the fleet); the
        # request holds no connection between polls.
        await asyncio.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))


def _found(context: ApiContext, caller: ApiToken, what: str, **by: Any) -> ScanList:
    documents = submissions.find_scans(
        context.session_factory, _reader(caller), active_ensemble=context.active_ensemble, **by
    )
    if not documents:
        raise Problem(404, "not-found", f"no scan of {what}")
    return ScanList.model_validate({"scans": documents})


@router.get("/v1/scans", response_model=ScanList, summary="Your scans carrying an external id")
def scans_by_external_id(
    context: ContextDep,
    caller: PlatformOrAdmin,
    external_id: Annotated[str, Query(min_length=1, max_length=255)],
) -> ScanList:
    documents = submissions.find_scans(
        context.session_factory,
        _reader(caller),
        active_ensemble=context.active_ensemble,
        external_id=external_id,
    )
    return ScanList.model_validate({"scans": documents})


@router.get("/v1/items", response_model=ScanList, summary="The scans of one object")
def scans_of_object(
    context: ContextDep,
    caller: PlatformOrAdmin,
    bucket: Annotated[str, Query(min_length=3, max_length=63)],
    key: Annotated[str, Query(min_length=1, max_length=1024)],
) -> ScanList:
    return _found(context, caller, f"s3://{bucket}/{key}", object_ref=ObjectRef(bucket, key))


@router.get("/v1/images/{sha256}", response_model=ScanList, summary="The scans of these bytes")
def scans_of_image(
    context: ContextDep,
    caller: PlatformOrAdmin,
    sha256: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")],
) -> ScanList:
    return _found(context, caller, "an image with this sha256", sha256=sha256)
