"""One POST to a callback URL, with the guard in the connection itself: the host is
resolved once, every address checked, and the socket opened to a checked address (TLS
still speaks to, and verifies the certificate of, the host name). Redirects are never
followed, the answer is read only a few KiB deep, and an attempt never outlasts its
connect and read timeouts together."""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from workers.callbacks.guard import CallbackRefused, split_url, vet_host
from workers.callbacks.policy import CallbackPolicy

_EXCERPT = 200  # characters of a refusing answer's body kept for the platform to read


@dataclass(frozen=True)
class Answer:
    """What one attempt came to: the receiver's status, or why there is none.
    ``refused``: the guard would not send (for good: retrying cannot change it)."""

    status: int | None
    error: str | None
    duration_ms: float
    refused: bool = False

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Plain HTTP to ``address``, speaking to ``host`` (development only)."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to ``address``: SNI and certificate verification against ``host``."""

    def __init__(
        self, host: str, port: int, *, address: str, timeout: float, tls: ssl.SSLContext
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=tls)
        self._address = address
        self._tls = tls

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


class CallbackSender:
    """Sends callbacks under ``policy`` (its timeouts, its guard, its TLS trust)."""

    def __init__(self, policy: CallbackPolicy) -> None:
        self.policy = policy
        self._tls = policy.tls or ssl.create_default_context()

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        started = time.monotonic()

        def answer(status: int | None, error: str | None, *, refused: bool = False) -> Answer:
            return Answer(status, error, (time.monotonic() - started) * 1000, refused)

        policy = self.policy
        try:
            parts, host = split_url(url, allow_private=policy.allow_private)
            addresses = vet_host(host, policy.resolver, allow_private=policy.allow_private)
        except CallbackRefused as exc:
            return answer(None, str(exc), refused=True)
        except OSError as exc:
            return answer(None, f"could not resolve {host}: {exc}")
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        try:
            status, excerpt, location = self._exchange(
                host=host,
                port=port,
                address=addresses[0],
                https=https,
                target=target,
                body=body,
                headers=headers,
            )
        except TimeoutError:
            return answer(
                None,
                f"timed out ({policy.timeout_s:g} s to connect and per read, "
                f"{policy.attempt_limit_s:g} s in all)",
            )
        except ssl.SSLError as exc:
            return answer(None, f"TLS failed: {exc}")
        except (OSError, http.client.HTTPException) as exc:
            return answer(None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if 300 <= status < 400:
            where = _plain((location or "")[:_EXCERPT])
            return answer(
                status, f"answered {status} to {where or 'nowhere'}: redirects are not followed"
            )
        if 200 <= status < 300:
            return answer(status, None)
        return answer(status, f"answered {status}" + (f": {excerpt}" if excerpt else ""))

    def _exchange(
        self,
        *,
        host: str,
        port: int,
        address: str,
        https: bool,
        target: str,
        body: bytes,
        headers: Mapping[str, str],
    ) -> tuple[int, str, str | None]:
        timeout = self.policy.timeout_s
        connection: http.client.HTTPConnection
        if https:
            connection = _PinnedHTTPSConnection(
                host, port, address=address, timeout=timeout, tls=self._tls
            )
        else:
            connection = _PinnedHTTPConnection(host, port, address=address, timeout=timeout)
        # The socket timeout bounds each read; this bounds them all together, against a
        # receiver that answers one byte at a time.
        cut = threading.Event()
        watchdog = threading.Timer(self.policy.attempt_limit_s, _cut, args=(connection, cut))
        watchdog.daemon = True
        watchdog.start()
        try:
            connection.request("POST", target, body=body, headers=dict(headers))
            response = connection.getresponse()
            data = response.read(self.policy.max_answer_bytes)
        except (OSError, http.client.HTTPException) as exc:
            if cut.is_set() and not isinstance(exc, TimeoutError):
                raise TimeoutError("the attempt took too long") from exc
            raise
        finally:
            watchdog.cancel()
            connection.close()
        # A cut connection reads as an early end: whatever was parsed before it is no answer.
        if cut.is_set():
            raise TimeoutError("the attempt took too long")
        excerpt = _plain(data[:_EXCERPT].decode("utf-8", "replace"))
        return response.status, excerpt, response.getheader("Location")


def _cut(connection: http.client.HTTPConnection, cut: threading.Event) -> None:
    """Stop a stuck attempt: shutting the socket down wakes the reading thread."""
    cut.set()
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _plain(text: str) -> str:
    """Text from a receiver as one printable line (it is stored and shown to people)."""
    return "".join(c if c.isprintable() else " " for c in text).strip()


def host_of(url: str) -> str:
    """The host a URL names, for logs (never the path: it may hold a token)."""
    return urlsplit(url).hostname or ""
