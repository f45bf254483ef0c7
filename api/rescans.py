"""``/v1/rescans``: operators start, watch and cancel batch re-scans (the same services as
``synthsentry rescan``, in ``workers.rescans``). A re-scan is recorded here and listed by
the fleet's reconciler (or the embedded worker's sweep), a page at a time, onto the
low-priority queues."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from api.auth import AdminToken, SessionDep
from api.context import ContextDep
from api.problems import Problem
from db.models import RescanState
from workers import rescans

router = APIRouter(prefix="/v1/rescans", tags=["rescans"])

_STATUS = {
    rescans.InvalidSelection: 422,
    rescans.BucketRefused: 403,
    rescans.RescanNotFound: 404,
    rescans.RescanFinished: 409,
}


class DetectorSelection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    detector: str = Field(min_length=1, max_length=128, description="the images it scored")


class RescanRequest(BaseModel):
    """Exactly one selection: ``bucket`` with ``prefix`` ("" for the whole bucket) or with
    ``keys``; or ``images``: "all", "stale" (not scored under the active ensemble, or
    missing an answer from a detector's current version) or ``{"detector": NAME}``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"bucket": "uploads", "prefix": "2026/11/"},
                {"bucket": "uploads", "keys": ["a.jpg", "b/c.png"]},
                {"images": "stale"},
                {"images": {"detector": "sumsub-v2"}},
            ]
        },
    )

    bucket: str | None = Field(None, min_length=3, max_length=63)
    prefix: str | None = Field(None, max_length=rescans.MAX_KEY_BYTES)
    keys: list[Annotated[str, Field(max_length=rescans.MAX_KEY_BYTES)]] | None = Field(
        None, min_length=1, max_length=rescans.MAX_KEYS
    )
    images: Literal["all", "stale"] | DetectorSelection | None = None


class RescanCounts(BaseModel):
    """What became of the items as of ``counted_at``; pending, done, rejected, failed and
    cancelled add up to ``listed``."""

    listed: int = Field(description="items recorded by the listing")
    queued: int = Field(description="items whose work was sent to the bulk queues")
    pending: int = Field(description="items recorded and not finished")
    done: int = Field(description="items scored")
    reused: int = Field(description="of those, scored without a detector running again")
    rejected: int = Field(description="items whose bytes were refused (not an image, ...)")
    failed: int = Field(description="items whose object could not be read (gone, denied)")
    cancelled: int = Field(description="items never taken in: the re-scan was cancelled")


class RescanOut(BaseModel):
    id: str
    state: RescanState
    selection: dict[str, Any]
    created_by: str
    created_at: datetime
    listed_at: datetime | None
    finished_at: datetime | None
    counts: RescanCounts
    counted_at: datetime | None = Field(
        description="when the counts were taken: the fleet's last step for this re-scan "
        "(every few seconds while it is active; final once it is done or cancelled); null "
        "before its first"
    )
    total: int | None = Field(description="items in all, once known")
    throughput: float = Field(description="items finished per second")
    eta_seconds: float | None = Field(description="until every item is finished; null: unknown")
    links: dict[str, str]


def _out(view: rescans.RescanView) -> RescanOut:
    document = view.as_dict()
    document.pop("state")
    return RescanOut(
        **document,
        state=view.state,
        links={"self": f"{router.prefix}/{view.id}"},
    )


def _problem(exc: rescans.RescanError) -> Problem:
    return Problem(_STATUS.get(type(exc), 400), exc.kind, str(exc))


def _actor(caller: AdminToken) -> str:
    return f"token:{caller.public_id}"


RescanId = Annotated[str, Path(max_length=40)]


@router.post("", status_code=202, response_model=RescanOut)
def create_rescan(
    body: RescanRequest,
    session: SessionDep,
    context: ContextDep,
    caller: AdminToken,
    response: Response,
) -> RescanOut:
    """Start a re-scan; answered at once (202), its listing runs in the background."""
    try:
        selection = rescans.parse_selection(
            bucket=body.bucket,
            prefix=body.prefix,
            keys=body.keys,
            images=body.images if isinstance(body.images, str) else None,
            detector=body.images.detector if isinstance(body.images, DetectorSelection) else None,
        )
        view = rescans.create_rescan(
            session,
            selection,
            policy=context.bucket_policy,
            actor=_actor(caller),
            token_id=caller.id,
        )
    except rescans.RescanError as exc:
        raise _problem(exc) from exc
    out = _out(view)
    response.headers["Location"] = out.links["self"]
    return out


@router.get("", response_model=list[RescanOut])
def list_rescans(
    session: SessionDep,
    caller: AdminToken,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> list[RescanOut]:
    """The newest re-scans first, with the counts kept on each (nothing is counted here)."""
    return [_out(view) for view in rescans.list_rescans(session, limit=limit)]


@router.get("/{rescan_id}", response_model=RescanOut)
def get_rescan(rescan_id: RescanId, session: SessionDep, caller: AdminToken) -> RescanOut:
    try:
        return _out(rescans.rescan_status(session, rescan_id))
    except rescans.RescanError as exc:
        raise _problem(exc) from exc


@router.delete("/{rescan_id}", response_model=RescanOut)
def cancel_rescan(rescan_id: RescanId, session: SessionDep, caller: AdminToken) -> RescanOut:
    """Cancel: nothing more is listed, and items not yet taken in are never scanned (409
    for a re-scan that has finished)."""
    try:
        return _out(rescans.cancel_rescan(session, rescan_id, actor=_actor(caller)))
    except rescans.RescanError as exc:
        raise _problem(exc) from exc
