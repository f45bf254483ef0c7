"""What the deployment decides about callbacks, as plain values (built from the settings
by the process that sends or serves them; nothing here reads the settings)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from datetime import timedelta

from workers.callbacks.guard import Resolver, system_resolver
from workers.callbacks.secrets import SecretBox

# How long a rotated-out secret keeps signing beside its successor.
ROTATION_OVERLAP = timedelta(hours=24)


@dataclass(frozen=True)
class CallbackPolicy:
    """``box``: encrypts signing secrets at rest; None where no secret key is configured
    (then no secret can be made or read, and nothing is signed or sent).
    ``allow_private``: local development only (private addresses, plain http).
    ``timeout_s``: the connect timeout, and the read timeout of each read of the answer.
    ``retry_hours``: how long a failing delivery is retried before it is marked failed.
    ``tls``: the TLS context (None: the system's trusted certificates, host names checked).
    ``resolver``: host name -> addresses (tests inject one; the default asks the system).
    """

    box: SecretBox | None = None
    allow_private: bool = False
    timeout_s: float = 15.0
    retry_hours: float = 24.0
    max_answer_bytes: int = 4096
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    resolver: Resolver = field(default=system_resolver, compare=False)

    @property
    def retry_window(self) -> timedelta:
        return timedelta(hours=self.retry_hours)

    @property
    def attempt_limit_s(self) -> float:
        """The longest one attempt may take, from the host's lookup to the last byte of the
        answer read; whatever is still running then is cut."""
        return 2 * self.timeout_s
