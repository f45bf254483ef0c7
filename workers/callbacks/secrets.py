"""Signing secrets: made per platform token, shown once, stored encrypted (they must be
read back to sign, so a hash will not do), and the signatures they make.

Secrets follow the Standard Webhooks format (``whsec_`` and base64 of random bytes), so a
receiver verifies with any Standard Webhooks library: ``Webhook(secret).verify(body,
headers)``. The at-rest key is derived from the deployment's secret key with HKDF, so the
same setting can key other purposes without one leaking into another.

The secret key can be changed without losing a stored secret: the box is given the new key
and the earlier ones, encrypts with the new one and decrypts with any (Fernet's
``MultiFernet``), and :meth:`SecretBox.rotate` re-encrypts a stored secret under the new
key, after which the earlier ones can be dropped.
"""

from __future__ import annotations

import base64
import os
import secrets
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from standardwebhooks.webhooks import Webhook

SECRET_PREFIX = "whsec_"  # noqa: S105  (the format's prefix, not a secret)
_SECRET_BYTES = 32
_KDF_INFO = b"synthsentry callback signing secrets v1"


class SecretUnreadable(ValueError):
    """A stored secret that none of the box's keys can decrypt (the secret key was changed
    and the one it was encrypted with is not among the previous keys)."""


def _fernet(secret_key: str) -> Fernet:
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KDF_INFO).derive(
        secret_key.encode("utf-8")
    )
    return Fernet(base64.urlsafe_b64encode(derived))


class SecretBox:
    """Encrypts and decrypts signing secrets with a key derived from the deployment's
    secret key (Fernet: AES-128-CBC with an HMAC-SHA256 tag). ``previous``: the secret keys
    used before this one, newest first; what they encrypted is still read (and can be
    re-encrypted under ``secret_key`` with :meth:`rotate`), nothing new is written with
    them."""

    def __init__(self, secret_key: str, previous: Sequence[str] = ()) -> None:
        if not secret_key:
            raise ValueError("the secret key is empty")
        if not all(previous):
            raise ValueError("a previous secret key is empty")
        self._current = _fernet(secret_key)
        earlier = [_fernet(key) for key in dict.fromkeys(previous) if key != secret_key]
        self._fernet = MultiFernet([self._current, *earlier])

    def __repr__(self) -> str:
        return "SecretBox(<keys hidden>)"

    def encrypt(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode("utf-8")).decode("ascii")

    def decrypt(self, stored: str) -> str:
        try:
            return self._fernet.decrypt(stored.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError) as exc:
            raise SecretUnreadable(_UNREADABLE) from exc

    def rotate(self, stored: str) -> str | None:
        """``stored`` encrypted anew under the current key, or None when it already is
        (so that rotating twice rewrites nothing). Raises :class:`SecretUnreadable` when no
        key decrypts it."""
        try:
            token = stored.encode("ascii")
            try:
                self._current.decrypt(token)
            except InvalidToken:
                return self._fernet.rotate(token).decode("ascii")
            return None
        except (InvalidToken, UnicodeError) as exc:
            raise SecretUnreadable(_UNREADABLE) from exc


# Platforms read this in a delivery's last error, so it says no more than what failed.
_UNREADABLE = "a stored callback signing secret cannot be decrypted with this server's secret keys"


def new_signing_secret() -> str:
    """A fresh Standard Webhooks secret (32 random bytes)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode("ascii")


def sign(msg_id: str, timestamp: datetime, body: str, signing: Sequence[str]) -> str:
    """The ``webhook-signature`` header: one ``v1,<base64>`` per secret, space-separated
    (two while a rotated secret still signs beside its successor)."""
    return " ".join(Webhook(secret).sign(msg_id, timestamp, body) for secret in signing)


def load_or_create_key(path: Path) -> str:
    """The secret key kept in ``path`` (development only, when none is configured): made on
    first use, readable by this user only. Two processes starting together agree on one:
    the key is written to a private file first and linked into place, which fails for the
    second, who then reads the first one's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".secret-key-")
        try:
            with os.fdopen(descriptor, "w", encoding="ascii") as handle:  # mkstemp: 0600
                handle.write(secrets.token_urlsafe(48) + "\n")
            os.link(temporary, path)
        except FileExistsError:
            pass
        finally:
            Path(temporary).unlink()
    key = path.read_text(encoding="ascii").strip()
    if not key:
        raise ValueError(f"{path} is empty; remove it to make a new key")
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return key
