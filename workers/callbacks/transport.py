"""One POST to a callback URL, with the guard in the connection itself: the host is
resolved once, every address checked, and the socket opened to a checked address (TLS
still speaks to, and verifies the certificate of, the host name). Redirects are never
followed and the answer is read only a few KiB deep.

Time: with ``t`` the policy's ``timeout_s``, an attempt takes at most
``attempt_limit_s`` from its start to its end, whatever the receiver or the resolver does:

- the lookup: at most ``t`` (and never past the attempt's limit); the resolver runs in a
  thread of its own, left behind if it does not answer in time;
- connecting: each checked address in turn, each for at most ``t`` (the first that
  accepts is used: a dual-stack name seen from an IPv4-only machine still arrives);
- the TLS handshake, sending, and each read of the answer: at most ``t`` each;
- all of it: a watchdog shuts down whatever socket the attempt holds (the raw one while
  connecting, the TLS one from the handshake on) when ``attempt_limit_s`` has passed.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from urllib.parse import urlsplit

from workers.callbacks.guard import CallbackRefused, Resolver, split_url, vet_host
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


class _Unreachable(OSError):
    """No checked address took the connection; the message names each and why."""


class _Deadline:
    """One attempt's clock, and the watchdog that ends it: when the limit has passed, the
    socket the attempt holds is shut down, which wakes the thread blocked on it (in the
    TLS handshake as in a read). The lock keeps a cut off a socket already closed."""

    def __init__(self, limit_s: float) -> None:
        self.ends = time.monotonic() + limit_s
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._done = False
        self._timer = threading.Timer(limit_s, self._cut)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.ends - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        """From now on, ``sock`` is the one to shut down (at once, if the time is up)."""
        with self._lock:
            self._sock = sock
            if self.cut.is_set():
                _shut(sock)

    def finish(self) -> None:
        """The attempt is over: no cut from now on."""
        self._timer.cancel()
        with self._lock:
            self._done = True
            self._sock = None

    def _cut(self) -> None:
        with self._lock:
            if self._done:
                return
            self.cut.set()
            if self._sock is not None:
                _shut(self._sock)


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for a TLS socket: no TLS close-notify exchange.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP over a socket already connected to a checked address (and, for https, through
    a verified TLS handshake). It never connects by itself: that would look the name up
    again."""

    def __init__(self, host: str, port: int, *, sock: socket.socket, https: bool) -> None:
        super().__init__(host, port, timeout=sock.gettimeout())
        self.default_port = 443 if https else 80  # the Host header names the port otherwise
        self.sock = sock

    def connect(self) -> None:
        raise http.client.NotConnected("the connection to the checked address is closed")


def _lookup(resolver: Resolver, wait_s: float) -> Resolver:
    """``resolver``, given at most ``wait_s`` to answer (a lookup cannot be interrupted: a
    late one is left to finish in its own thread, and its answer is dropped)."""

    def bounded(host: str) -> list[str]:
        future: Future[list[str]] = Future()

        def run() -> None:
            try:
                future.set_result(resolver(host))
            except BaseException as exc:  # handed to the waiting thread
                future.set_exception(exc)

        threading.Thread(target=run, name="callback-lookup", daemon=True).start()
        try:
            return future.result(timeout=max(wait_s, 0.0))
        except TimeoutError as exc:
            if future.done():
                raise
            raise TimeoutError(f"no answer within {round(wait_s, 1):g} s") from exc

    return bounded


class CallbackSender:
    """Sends callbacks under ``policy`` (its timeouts, its guard, its TLS trust)."""

    def __init__(self, policy: CallbackPolicy) -> None:
        self.policy = policy
        self._tls = policy.tls or ssl.create_default_context()

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        started = time.monotonic()
        deadline = _Deadline(self.policy.attempt_limit_s)
        try:
            status, error, refused = self._attempt(deadline, url, body, headers)
        finally:
            deadline.finish()
        return Answer(status, error, (time.monotonic() - started) * 1000, refused)

    def _attempt(
        self, deadline: _Deadline, url: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int | None, str | None, bool]:
        """The receiver's status, why there is none or why it is not what we wanted, and
        whether the guard refused the URL."""
        policy = self.policy
        try:
            parts, host = split_url(url, allow_private=policy.allow_private)
            resolver = _lookup(policy.resolver, min(policy.timeout_s, deadline.remaining()))
            addresses = vet_host(host, resolver, allow_private=policy.allow_private)
        except CallbackRefused as exc:
            return None, str(exc), True
        except OSError as exc:
            return None, f"could not resolve {host}: {exc}", False
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        try:
            status, excerpt, location = self._exchange(
                deadline,
                host=host,
                port=port,
                addresses=addresses,
                https=https,
                target=target,
                body=body,
                headers=headers,
            )
        except TimeoutError:
            timing = (
                f"{policy.timeout_s:g} s to connect and per read, "
                f"{policy.attempt_limit_s:g} s in all"
            )
            return None, f"timed out ({timing})", False
        except _Unreachable as exc:
            return None, str(exc), False
        except ssl.SSLError as exc:
            return None, f"TLS failed: {exc}", False
        except (OSError, http.client.HTTPException) as exc:
            return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, False
        if 300 <= status < 400:
            where = _plain((location or "")[:_EXCERPT])
            return (
                status,
                f"answered {status} to {where or 'nowhere'}: redirects are not followed",
                False,
            )
        if 200 <= status < 300:
            return status, None, False
        return status, f"answered {status}" + (f": {excerpt}" if excerpt else ""), False

    def _exchange(
        self,
        deadline: _Deadline,
        *,
        host: str,
        port: int,
        addresses: list[str],
        https: bool,
        target: str,
        body: bytes,
        headers: Mapping[str, str],
    ) -> tuple[int, str, str | None]:
        sock: socket.socket | None = None
        connection: _PinnedConnection | None = None
        response: http.client.HTTPResponse | None = None
        try:
            sock = _connect(deadline, addresses, port, self.policy.timeout_s)
            if https:
                sock = self._tls.wrap_socket(
                    sock, server_hostname=host, do_handshake_on_connect=False
                )
                deadline.watch(sock)  # the plain socket is detached now: cut this one
                sock.do_handshake()
            connection = _PinnedConnection(host, port, sock=sock, https=https)
            connection.request("POST", target, body=body, headers=dict(headers))
            response = connection.getresponse()
            data = response.read(self.policy.max_answer_bytes)
        except (OSError, http.client.HTTPException) as exc:
            if deadline.cut.is_set() and not isinstance(exc, TimeoutError):
                raise TimeoutError("the attempt took too long") from exc
            raise
        finally:
            deadline.finish()
            for opened in (response, connection, sock):
                if opened is not None:
                    opened.close()
        # A cut connection reads as an early end: whatever was parsed before it is no answer.
        if deadline.cut.is_set():
            raise TimeoutError("the attempt took too long")
        excerpt = _plain(data[:_EXCERPT].decode("utf-8", "replace"))
        return response.status, excerpt, response.getheader("Location")


def _connect(
    deadline: _Deadline, addresses: list[str], port: int, timeout_s: float
) -> socket.socket:
    """A socket connected to the first of ``addresses`` that takes it, each given the
    connect timeout (less, once the attempt's limit is near)."""
    failures: list[str] = []
    timed_out = 0
    for address in addresses:
        wait = min(timeout_s, deadline.remaining())
        if wait <= 0 or deadline.cut.is_set():
            raise TimeoutError("the attempt took too long")
        sock: socket.socket | None = None
        try:
            # A numeric address, not looked up: its family, and its IPv6 scope if any.
            family, kind, proto, _, where = socket.getaddrinfo(
                address, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )[0]
            sock = socket.socket(family, kind, proto)
            deadline.watch(sock)
            sock.settimeout(wait)
            sock.connect(where)
            sock.settimeout(timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            if sock is not None:
                sock.close()
            if deadline.cut.is_set():
                raise TimeoutError("the attempt took too long") from exc
            timed_out += isinstance(exc, TimeoutError)
            failures.append(f"{address} ({_reason(exc)})")
            continue
        return sock
    if timed_out == len(failures):
        raise TimeoutError("no address answered in time")
    raise _Unreachable("could not connect to " + ", ".join(failures))


def _reason(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return exc.strerror or str(exc) or type(exc).__name__


def _plain(text: str) -> str:
    """Text from a receiver as one printable line (it is stored and shown to people)."""
    return "".join(c if c.isprintable() else " " for c in text).strip()


def host_of(url: str) -> str:
    """The host a URL names, for logs (never the path: it may hold a token)."""
    return urlsplit(url).hostname or ""
