"""How much of a request body the API reads, enforced for every route before a body is read
whole: a pure ASGI middleware (a ``BaseHTTPMiddleware`` would buffer the body first).

- A declared ``Content-Length`` over the route's limit is answered 413 at once; nothing of
  the body is read.
- A body sent without one (chunked) is counted as it streams, and answered 413 as soon as
  it passes the limit; the rest is never read.
- A body that stops arriving for ``read_timeout_s`` is answered 408: the ASGI server has no
  body read timeout of its own, and a half-sent request would otherwise hold its
  connection for as long as the sender keeps it open.

Either way the answer is a problem document (``api.problems``) that closes the connection,
so the server never drains the rest. The limits: ``ApiContext.max_body_bytes`` for JSON;
a multipart upload to ``POST /v1/scans`` may carry an image of ``limits.max_bytes`` plus
64 KiB of form overhead; the S3 event route keeps its own 1 MiB (``api.webhook``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import webhook
from api.context import ApiContext
from api.problems import MEDIA_TYPE, problem_document

log = logging.getLogger(__name__)

UPLOAD_PATH = "/v1/scans"
UPLOAD_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries, part headers, the form's fields
BODY_READ_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class BodyLimits:
    """The most body bytes each kind of request may carry."""

    json_bytes: int  # every route not named below
    upload_bytes: int  # multipart/form-data posted to UPLOAD_PATH
    by_path: Mapping[str, int] = field(default_factory=dict)  # whatever the method and type

    @classmethod
    def of(cls, context: ApiContext) -> BodyLimits:
        return cls(
            json_bytes=context.max_body_bytes,
            upload_bytes=context.limits.max_bytes + UPLOAD_OVERHEAD_BYTES,
            by_path={webhook.PATH: webhook.MAX_BODY_BYTES},
        )

    def for_request(self, scope: Scope) -> int:
        path = _route_path(scope)
        if path in self.by_path:
            return self.by_path[path]
        if scope.get("method") == "POST" and path == UPLOAD_PATH and _is_multipart(scope):
            return self.upload_bytes
        return self.json_bytes


def install(
    app: FastAPI, context: ApiContext, *, read_timeout_s: float = BODY_READ_TIMEOUT_S
) -> None:
    """Limit every request body ``app`` reads (see the module's description)."""
    app.add_middleware(BodyLimit, limits=BodyLimits.of(context), read_timeout_s=read_timeout_s)


class BodyLimit:
    """The middleware: ``limits`` decides each request's limit from its scope."""

    def __init__(
        self, app: ASGIApp, *, limits: BodyLimits, read_timeout_s: float = BODY_READ_TIMEOUT_S
    ) -> None:
        if read_timeout_s <= 0:
            raise ValueError("the body read timeout must be positive")
        self.app = app
        self.limits = limits
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.for_request(scope)
        try:
            declared = _content_length(scope)
        except ValueError:
            await _refuse(send, _Refusal(400, "bad-request", "the Content-Length is not a number"))
            return
        if declared is not None and declared > limit:
            _log_refusal(scope, limit, declared=declared)
            await _refuse(send, _too_large(limit))
            return
        guard = _Guard(receive, send, limit, self.read_timeout_s)
        try:
            await self.app(scope, guard.receive, guard.send)
        except Exception:
            # An app that failed because its body was refused has nothing more to say;
            # anything else is the app's own error.
            if guard.refusal is None or guard.response_started:
                raise
        if guard.refusal is not None and not guard.response_started:
            _log_refusal(scope, limit, read=guard.read)
            await _refuse(send, guard.refusal)


@dataclass(frozen=True)
class _Refusal:
    status: int
    kind: str
    detail: str


class _BodyRefused(Exception):
    """Raised into the app by ``receive``: its body will not be read any further."""


class _Guard:
    """``receive`` and ``send`` for one request: counts the body as it streams and stops
    reading past the limit or after the read timeout; once it has, the app's own answer is
    replaced by the refusal."""

    def __init__(self, receive: Receive, send: Send, limit: int, read_timeout_s: float) -> None:
        self._receive = receive
        self._send = send
        self.limit = limit
        self.read_timeout_s = read_timeout_s
        self.read = 0
        self.body_complete = False
        self.refusal: _Refusal | None = None
        self.response_started = False

    async def receive(self) -> Message:
        if self.refusal is not None:
            raise _BodyRefused
        if self.body_complete:
            # After the body, receive only waits for a disconnect: no deadline.
            return await self._receive()
        try:
            with anyio.fail_after(self.read_timeout_s):
                message = await self._receive()
        except TimeoutError:
            self.refusal = _Refusal(
                408,
                "body-timeout",
                f"no part of the body arrived for {self.read_timeout_s:g} seconds",
            )
            raise _BodyRefused from None
        if message["type"] == "http.request":
            self.read += len(message.get("body", b""))
            if self.read > self.limit:
                self.refusal = _too_large(self.limit)
                raise _BodyRefused
            self.body_complete = not message.get("more_body", False)
        else:  # http.disconnect: nothing more will arrive
            self.body_complete = True
        return message

    async def send(self, message: Message) -> None:
        if self.refusal is not None:
            return  # the refusal is answered instead, once the app is done
        if message["type"] == "http.response.start":
            self.response_started = True
        await self._send(message)


def _too_large(limit: int) -> _Refusal:
    return _Refusal(413, "body-too-large", f"the body is over {limit} bytes")


_TITLES = {
    400: "Unusable request",
    408: "Request body not sent in time",
    413: "Request body too large",
}


async def _refuse(send: Send, refusal: _Refusal) -> None:
    document = problem_document(
        refusal.status, refusal.kind, refusal.detail, title=_TITLES[refusal.status]
    )
    body = json.dumps(document, ensure_ascii=True).encode()
    await send(
        {
            "type": "http.response.start",
            "status": refusal.status,
            "headers": [
                (b"content-type", MEDIA_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
                # The rest of the body is never read: the connection cannot carry another
                # request.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _log_refusal(scope: Scope, limit: int, **facts: Any) -> None:
    log.warning(
        "request body refused",
        extra={"method": scope.get("method"), "path": _route_path(scope), "limit": limit, **facts},
    )


def _route_path(scope: Scope) -> str:
    path = str(scope.get("path", "/"))
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.rstrip("/") or "/"


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


def _content_length(scope: Scope) -> int | None:
    raw = _header(scope, b"content-length")
    if raw is None:
        return None
    text = raw.decode("latin-1").strip()
    if not (text.isascii() and text.isdigit()):  # no sign, spaces or underscores inside
        raise ValueError(text)
    return int(text)


def _is_multipart(scope: Scope) -> bool:
    raw = _header(scope, b"content-type") or b""
    media_type = raw.split(b";", 1)[0].strip().lower()
    return media_type == b"multipart/form-data"
