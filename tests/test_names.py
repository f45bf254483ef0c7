"""Names from the outside as printable text: valid UTF-8 unchanged, other bytes escaped,
the exact bytes kept beside the text."""

from __future__ import annotations

import base64
import json
import os

import pytest

from workers.names import identity, is_clean, printable, raw_base64, raw_bytes


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"plain.png", "plain.png"),
        ("fleur-\u00e9t\u00e9.jpg".encode(), "fleur-\u00e9t\u00e9.jpg"),
        (b"caf\xe9.png", "caf\\xe9.png"),
        (b"\xff\xfe", "\\xff\\xfe"),
        (b"ok-\xc3\xa9-bad-\xc3", "ok-\u00e9-bad-\\xc3"),
    ],
)
def test_printable_escapes_only_what_is_not_utf8(raw: bytes, text: str) -> None:
    name = os.fsdecode(raw)
    assert printable(name) == text
    text.encode("utf-8")  # always encodable
    assert json.loads(json.dumps(printable(name), ensure_ascii=False)) == text
    assert raw_bytes(name) == raw
    if is_clean(name):
        assert raw_base64(name) is None and identity(name) == name
    else:
        assert base64.b64decode(str(raw_base64(name))) == raw
        assert identity(name) == f"base64:{raw_base64(name)}"


def test_two_names_that_print_alike_keep_distinct_identities() -> None:
    escaped = os.fsdecode(b"/x/caf\xe9.png")
    literal = "/x/caf\\xe9.png"  # a real backslash, x, e, 9 in the name
    assert printable(escaped) == printable(literal)
    assert identity(escaped) != identity(literal)


def test_a_lone_surrogate_that_came_from_no_byte_is_printable() -> None:
    assert printable("key-\ud800") == "key-\\xed\\xa0\\x80"


def test_a_log_line_carrying_such_a_name_is_strict_json() -> None:
    import logging

    from synthsentry.logs import JsonFormatter

    name = os.fsdecode(b"/in/caf\xe9.png")
    record = logging.makeLogRecord({"msg": "read %s", "args": (name,), "path": name})
    line = JsonFormatter().format(record)
    assert "\\udc" not in line  # no lone surrogate escapes, which strict readers refuse
    parsed = json.loads(line)
    assert parsed["path"] == "/in/caf\\xe9.png" and parsed["msg"] == "read /in/caf\\xe9.png"
