"""Errors as RFC 9457 problem documents (``application/problem+json``), for every answer
that is not a success: raised as :class:`Problem`, or turned into one from FastAPI's own
HTTP and validation errors."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

PROBLEM_TYPE = "urn:synthsentry:problem:"
MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    """An answer other than success: ``kind`` names it (``urn:synthsentry:problem:<kind>``),
    ``detail`` says what happened to this request."""

    def __init__(
        self, status: int, kind: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.headers = headers or {}


def problem_document(
    status: int, kind: str, detail: str, *, title: str | None = None, **extensions: Any
) -> dict[str, Any]:
    """The body of a problem answer; ``title`` defaults to the status's phrase. Shared by
    the API and the S3 event webhook, so both speak the same problem types."""
    return {
        "type": f"{PROBLEM_TYPE}{kind}",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **extensions,
    }


def problem_response(
    status: int, kind: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = problem_document(status, kind, detail, **extra)
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` with a problem document."""

    @app.exception_handler(Problem)
    async def on_problem(_: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.kind, exc.detail, exc.headers)

    @app.exception_handler(HTTPException)
    async def on_http(_: Request, exc: HTTPException) -> JSONResponse:
        kind = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "-")
        return problem_response(exc.status_code, kind, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(error.get("loc", ())), "msg": str(error.get("msg", ""))}
            for error in exc.errors()
        ]
        return problem_response(
            422, "invalid-request", "the request does not match the schema", errors=errors
        )
