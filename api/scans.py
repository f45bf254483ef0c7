"""Platform hooks: submit uploads for scanning and read what became of them (the service:
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
import functools
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.auth import PlatformOrAdmin
from api.context import ApiContext, ContextDep
from api.problems import Problem
from db import repository
from db.models import ApiToken, Scan, ScanPriority, TokenRole
from workers import callbacks, submissions
from workers.submissions import (
    Caller,
    ObjectRef,
    ScanRequest,
    SubmissionRefused,
    SubmitPolicy,
)

router = APIRouter(tags=["scans"])

MAX_WAIT_S = 30
_POLL_S = 0.2
_FORM_OVERHEAD = 64 * 1024
_LIST_LIMIT = 100


class ObjectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
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

    def request(self) -> ScanRequest:
        given = [self.object] if self.object is not None else list(self.objects or [])
        return ScanRequest(
            objects=[ObjectRef(o.bucket, o.key, o.version_id) for o in given],
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


class ScanList(BaseModel):
    scans: list[dict[str, Any]]


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


_SUBMIT_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": ScanBody.model_json_schema(ref_template="#/components/schemas/{model}")
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "external_id": {"type": "string", "maxLength": 255},
                        "callback_url": {"type": "string", "maxLength": 2048},
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
        check_callback=_callback_check(context),
    )


def _callback_check(context: ApiContext) -> Any:
    return functools.partial(
        callbacks.check_callback_url, allow_private=context.callbacks.allow_private
    )


def _caller(token: ApiToken) -> Caller:
    return Caller(token_id=token.id, actor=f"token:{token.public_id}")


def _refused(exc: SubmissionRefused) -> Problem:
    return Problem(exc.status, exc.kind, exc.detail)


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
    policy = _policy(context)
    if content_type == "multipart/form-data":
        scan_request, data, media = await _form(request, context)
        try:
            ref = await run_in_threadpool(
                submissions.store_upload, context.store, data, policy, content_type=media
            )
        except SubmissionRefused as exc:
            raise _refused(exc) from exc
        scan_request = ScanRequest(
            objects=[ref],
            external_id=scan_request.external_id,
            callback_url=scan_request.callback_url,
            priority=scan_request.priority,
        )
        uploaded = True
    elif content_type in ("application/json", ""):
        scan_request = _json_body(await request.body())
        uploaded = False
    else:
        raise Problem(
            415,
            "unsupported-media-type",
            "send application/json (objects) or multipart/form-data (an image file)",
        )
    try:
        submitted = await run_in_threadpool(
            lambda: submissions.submit_objects(
                context.session_factory,
                context.dispatcher,
                scan_request,
                _caller(caller),
                policy,
                idempotency_key=idempotency_key,
                uploaded=uploaded,
            )
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
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()
        ]
        raise Problem(422, "invalid-request", _first(errors)) from exc


def _first(errors: list[dict[str, Any]]) -> str:
    if not errors:
        return "the request does not match the schema"
    where = ".".join(str(part) for part in errors[0]["loc"]) or "body"
    return f"{where}: {errors[0]['msg']}"


async def _form(request: Request, context: ApiContext) -> tuple[ScanRequest, bytes, str | None]:
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
        unknown = sorted(set(form.keys()) - {"file", "external_id", "callback_url", "priority"})
        if unknown:
            raise Problem(422, "invalid-request", f"unknown form fields: {', '.join(unknown)}")
        data = await upload.read(context.limits.max_bytes + 1)
        fields: dict[str, Any] = {"object": {"bucket": context.upload_bucket, "key": "upload"}}
        for name in ("external_id", "callback_url", "priority"):
            value = form.get(name)
            if isinstance(value, str):
                fields[name] = value
        try:
            parsed = ScanBody.model_validate(fields).request()
        except ValidationError as exc:
            errors = [
                {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()
            ]
            raise Problem(422, "invalid-request", _first(errors)) from exc
        return parsed, data, upload.content_type
    finally:
        await form.close()


# --- reading -----------------------------------------------------------------------------


def _visible(scan: Scan | None, caller: ApiToken) -> Scan:
    """The scan if the caller may see it; 404 alike for one that does not exist and one of
    another platform (so ids cannot be probed)."""
    if scan is None or (caller.role != TokenRole.ADMIN and scan.token_id != caller.id):
        raise Problem(404, "not-found", "no such scan")
    return scan


def _owner_filter(caller: ApiToken) -> int | None:
    return None if caller.role == TokenRole.ADMIN else caller.id


def _read_scan(
    context: ApiContext, public_id: str, caller: ApiToken
) -> tuple[dict[str, Any], bool]:
    with context.session_factory() as session:
        scan = _visible(repository.scan_by_public_id(session, public_id), caller)
        finished = submissions.is_finished(session, scan)
        document = submissions.scan_document(session, scan, active_ensemble=context.active_ensemble)
        return document, finished


@router.get("/v1/scans/{scan_id}", summary="One scan: its result, review state and decision")
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
    while True:
        document, finished = await run_in_threadpool(_read_scan, context, scan_id, caller)
        if finished or time.monotonic() >= deadline:
            return document
        # Polls the database (the result may be stored by any worker of the fleet);
        # the request holds no connection between polls.
        await asyncio.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))


@router.get("/v1/scans", response_model=ScanList, summary="Your scans carrying an external id")
def scans_by_external_id(
    context: ContextDep,
    caller: PlatformOrAdmin,
    external_id: Annotated[str, Query(min_length=1, max_length=255)],
) -> ScanList:
    with context.session_factory() as session:
        found = repository.scans_by_external_id(
            session, external_id, token_id=_owner_filter(caller), limit=_LIST_LIMIT
        )
        return ScanList(
            scans=submissions.scan_documents(
                session, found, active_ensemble=context.active_ensemble
            )
        )


@router.get("/v1/items", response_model=ScanList, summary="The scans of one object")
def scans_of_object(
    context: ContextDep,
    caller: PlatformOrAdmin,
    bucket: Annotated[str, Query(min_length=3, max_length=63)],
    key: Annotated[str, Query(min_length=1, max_length=1024)],
) -> ScanList:
    with context.session_factory() as session:
        found = repository.scans_of_object(
            session, bucket, key, token_id=_owner_filter(caller), limit=_LIST_LIMIT
        )
        if not found:
            raise Problem(404, "not-found", f"no scan of s3://{bucket}/{key}")
        return ScanList(
            scans=submissions.scan_documents(
                session, found, active_ensemble=context.active_ensemble
            )
        )


@router.get("/v1/images/{sha256}", response_model=ScanList, summary="The scans of these bytes")
def scans_of_image(
    context: ContextDep,
    caller: PlatformOrAdmin,
    sha256: Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")],
) -> ScanList:
    with context.session_factory() as session:
        found = repository.scans_of_image(
            session, sha256, token_id=_owner_filter(caller), limit=_LIST_LIMIT
        )
        if not found:
            raise Problem(404, "not-found", "no scan of an image with this sha256")
        return ScanList(
            scans=submissions.scan_documents(
                session, found, active_ensemble=context.active_ensemble
            )
        )
