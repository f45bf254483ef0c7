"""Names from the outside (local file paths, object keys) as text any output can carry.

A POSIX file name is bytes, and need not be valid UTF-8 (a Latin-1 ``caf\\xe9.png`` from
an old file system or an archive). Python hands such a name over as a ``str`` with the
bad bytes smuggled in as lone surrogates ("surrogateescape"), which no UTF-8 output,
JSON parser or database accepts. Every place that prints, logs or stores a name goes
through :func:`printable`:

- a name that is valid UTF-8 is printed as it is;
- in any other name, each byte that is not part of valid UTF-8 is written ``\\xNN``
  (two lowercase hex digits), the rest as it is (Python's ``backslashreplace``).

``\\xNN`` could also be four ordinary characters of a name, so the printable text alone
does not always give the bytes back. Where that matters the exact bytes travel beside it:
:func:`raw_base64` (``path_bytes`` in ``scan --json``) and :func:`identity` (the key that
tells two files apart in the database).
"""

from __future__ import annotations

import base64
import os


def raw_bytes(name: str | os.PathLike[str]) -> bytes:
    """The name's bytes as the operating system gave them."""
    text = os.fspath(name)
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that did not come from a byte (a JSON "\ud800")
        return text.encode("utf-8", "surrogatepass")


def is_clean(name: str | os.PathLike[str]) -> bool:
    """True when the name is valid UTF-8 text (printed unchanged)."""
    try:
        os.fspath(name).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str | os.PathLike[str]) -> str:
    """The name as valid UTF-8 text: unchanged when it is, bad bytes as ``\\xNN`` if not."""
    text = os.fspath(name)
    if is_clean(text):
        return text
    return raw_bytes(text).decode("utf-8", "backslashreplace")


def raw_base64(name: str | os.PathLike[str]) -> str | None:
    """The exact bytes of a name that is not valid UTF-8, base64-encoded; None otherwise."""
    if is_clean(name):
        return None
    return base64.b64encode(raw_bytes(name)).decode("ascii")


def identity(name: str | os.PathLike[str]) -> str:
    """A text key that differs whenever the bytes of two absolute paths differ: the path
    itself when it is valid UTF-8, else ``base64:`` and its bytes (an absolute path starts
    with ``/``, so a clean one never reads like an encoded one)."""
    encoded = raw_base64(name)
    return os.fspath(name) if encoded is None else f"base64:{encoded}"
