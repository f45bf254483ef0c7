"""Text no database column can hold, refused up front for every route: a NUL character
(PostgreSQL's text types cannot store it) or a lone UTF-16 surrogate (not encodable as
UTF-8), in the path, the query or anywhere in a JSON body. Without this, a string that
passes a schema would fail deep in a handler as a server error."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from api.problems import Problem


def unstorable(text: str) -> bool:
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _firstunstorable(value: Any, where: str) -> str | None:
    """Where in ``value`` (a parsed JSON document) the first unstorable string is."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, str):
            if unstorable(node):
                return at
        elif isinstance(node, dict):
            for key, item in node.items():
                if unstorable(key):
                    return f"{at} (a key)"
                stack.append((item, f"{at}.{key}"))
        elif isinstance(node, list):
            stack.extend((item, f"{at}[{i}]") for i, item in enumerate(node))
    return None


async def storable_text(request: Request) -> None:
    """A dependency of the whole application (see the module's description)."""
    if unstorable(request.url.path):
        raise Problem(422, "invalid-text", "the path holds a NUL or an unpaired surrogate")
    for name, value in request.query_params.multi_items():
        if unstorable(name) or unstorable(value):
            raise Problem(
                422,
                "invalid-text",
                f"query parameter {name!r} holds a NUL or an unpaired surrogate",
            )
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.method in ("POST", "PUT", "PATCH") and content_type == "application/json":
        raw = await request.body()  # cached: the handler reads the same bytes
        try:
            document = json.loads(raw)
        except (ValueError, RecursionError):
            return  # malformed: the handler's own parsing answers it
        where = _firstunstorable(document, "body")
        if where is not None:
            raise Problem(422, "invalid-text", f"{where} holds a NUL or an unpaired surrogate")
