"""Where callbacks may go: a platform names a URL, and we must not become its way into
our own network (server-side request forgery).

Two checks, both needed:

- when a scan is submitted (and again before each send), the URL itself: https (plain http
  only where private addresses are allowed, i.e. local development), no user info, at most
  2048 characters, and a host on the token's allow-list;
- when connecting, every address the host resolves to: one private, loopback, link-local,
  site-local, multicast, reserved, unspecified or shared (CGNAT) address, one of the
  special-purpose blocks (documentation, benchmarking, IETF protocol assignments, discard),
  a cloud metadata address, or an IPv6 form that embeds such an IPv4 address (mapped,
  compatible, NAT64, 6to4, Teredo) refuses the whole host. The sender then connects to an
  address it checked, never to the name again: a second lookup could answer differently
  (DNS rebinding).

Python's ``is_private``/``is_global`` tables differ between releases and miss some blocks
(3.11 lets ``fec0::/10`` and parts of ``192.0.0.0/24`` through), so the special-purpose
blocks are also listed here, by hand, from the IANA registries.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from urllib.parse import SplitResult, urlsplit

MAX_URL_LENGTH = 2048
MAX_HOST_LENGTH = 253

# A function from a host name to its addresses (tests inject their own; nothing else may).
Resolver = Callable[[str], list[str]]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Instance metadata services answer on these addresses with credentials of the machine.
METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack
        ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
    }
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible (::a.b.c.d)
_DOCUMENTATION = "a documentation address"
# Special-purpose blocks refused whatever this Python's tables say (IANA IPv4 and IPv6
# special-purpose address registries); whole blocks, even where a few addresses in them
# are globally reachable (192.0.0.9, 2001:3::/32, ...): no callback receiver lives there.
_SPECIAL: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(network), what)
    for network, what in (
        ("0.0.0.0/8", 'a "this network" address (0.0.0.0/8)'),
        ("192.0.0.0/24", "an IETF protocol assignment (192.0.0.0/24)"),
        ("192.0.2.0/24", _DOCUMENTATION),
        ("198.51.100.0/24", _DOCUMENTATION),
        ("203.0.113.0/24", _DOCUMENTATION),
        ("198.18.0.0/15", "a benchmarking address (198.18.0.0/15)"),
        ("192.88.99.0/24", "a 6to4 relay anycast address (192.88.99.0/24)"),
        ("240.0.0.0/4", "a reserved address (240.0.0.0/4, with the broadcast address)"),
        ("100::/64", "a discard-only address (100::/64)"),
        ("2001::/23", "an IETF protocol assignment (2001::/23)"),
        ("2001:db8::/32", _DOCUMENTATION),
        ("3fff::/20", _DOCUMENTATION),
    )
)
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class CallbackRefused(ValueError):
    """A callback URL, host or address we will not send to; the message says why."""


def system_resolver(host: str) -> list[str]:
    """Every address ``host`` resolves to, in the resolver's order; only the families this
    machine has an address of (``AI_ADDRCONFIG``: an IPv4-only pod is not handed AAAA
    records first). So which addresses are judged depends on the machine: a private AAAA
    record is not seen where IPv6 cannot be used, and is never dialled there either; only
    addresses that were checked are ever connected to."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def normalize_host(host: str) -> str:
    """A host as the allow-list stores it: lower case, no trailing dot, an IP address in
    its canonical form, an internationalised name in its ASCII (punycode) form."""
    candidate = host.strip().lower().removesuffix(".")
    if candidate.startswith("[") and candidate.endswith("]"):
        candidate = candidate[1:-1]
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        pass
    try:
        candidate = candidate.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise CallbackRefused(f"{host!r} is not a host name") from exc
    labels = candidate.split(".")
    if (
        not candidate
        or len(candidate) > MAX_HOST_LENGTH
        or not all(_LABEL.fullmatch(label) for label in labels)
    ):
        raise CallbackRefused(f"{host!r} is not a host name")
    return candidate


def split_url(url: str, *, allow_private: bool) -> tuple[SplitResult, str]:
    """The URL's parts and its normalised host, when its form may be sent to (the
    allow-list aside)."""
    if len(url) > MAX_URL_LENGTH:
        raise CallbackRefused(f"a callback URL is at most {MAX_URL_LENGTH} characters")
    if not url.isprintable() or any(c.isspace() for c in url):
        raise CallbackRefused("a callback URL holds no spaces or control characters")
    parts = urlsplit(url)
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes:
        raise CallbackRefused(
            "a callback URL must use https"
            + (" or http" if allow_private else " (plain http is for local development)")
        )
    if "@" in parts.netloc:
        raise CallbackRefused("a callback URL may not hold a user name or password")
    if not parts.hostname:
        raise CallbackRefused("a callback URL must name a host")
    try:
        _ = parts.port
    except ValueError as exc:
        raise CallbackRefused("the callback URL's port is not a number from 0 to 65535") from exc
    return parts, normalize_host(parts.hostname)


def check_url(url: str, allowed_hosts: Iterable[str], *, allow_private: bool) -> str:
    """``url`` when it may be sent to: see :func:`split_url`, and its host on the
    allow-list (exact names: a subdomain is another host)."""
    _, host = split_url(url, allow_private=allow_private)
    allowed = set(allowed_hosts)
    if not allowed:
        raise CallbackRefused(
            "no callback hosts are allowed for this token (an operator adds them: "
            "PUT /v1/tokens/{id}/callback-hosts or `tokens create --callback-host`)"
        )
    if host not in allowed:
        raise CallbackRefused(f"callbacks to {host} are not allowed for this token")
    return url


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, compatible, NAT64, 6to4, Teredo)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if any(address in network for network in _NAT64) or (
        address in _COMPATIBLE and int(address) > 1  # :: and ::1 are judged as IPv6
    ):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_refusal(address: str, *, allow_private: bool) -> str | None:
    """Why we will not connect to ``address`` (None: we may). Metadata addresses are
    refused even where private addresses are allowed: nothing legitimate listens there."""
    try:
        ip: IPAddress = ipaddress.ip_address(address.partition("%")[0])  # no IPv6 zone
    except ValueError:
        return f"{address!r} is not an IP address"
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    embedded = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    if embedded is not None:
        inner = address_refusal(str(embedded), allow_private=allow_private)
        if inner is not None:
            return f"{ip} embeds {embedded}: {inner}"
    if allow_private:
        return None
    if embedded is not None:
        # Judged by the address it stands for (Python calls every mapped address private),
        # and by the block it is in (Teredo's 2001::/32 is refused whatever it embeds).
        special = next((what for network, what in _SPECIAL if ip in network), None)
        return f"{ip} is {special}" if special else None
    for refused, what in _CLASSES:
        if refused(ip):
            return f"{ip} is {what}"
    return None


_CLASSES: tuple[tuple[Callable[[IPAddress], bool], str], ...] = (
    (lambda ip: ip.is_unspecified, "the unspecified address"),
    (lambda ip: ip.is_loopback, "a loopback address"),
    (lambda ip: ip.is_link_local, "a link-local address"),
    (
        lambda ip: isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local,
        "a site-local address (fec0::/10, deprecated)",
    ),
    (lambda ip: ip.is_multicast, "a multicast address"),
    (lambda ip: ip in _SHARED, "a shared (carrier-grade NAT) address"),
    *((lambda ip, network=network: ip in network, what) for network, what in _SPECIAL),
    (lambda ip: ip.is_reserved, "a reserved address"),
    (lambda ip: ip.is_private, "a private address"),
    (lambda ip: not ip.is_global, "not a public address"),
)


def vet_host(host: str, resolver: Resolver, *, allow_private: bool) -> list[str]:
    """The addresses of ``host`` to connect to: all of them when every one may be reached.
    A host with one forbidden address is refused whole (the attacker picks which one a
    client would use). A lookup that fails raises ``OSError`` (worth another try)."""
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        addresses = resolver(host)
    else:
        addresses = [str(literal)]
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    for address in addresses:
        refusal = address_refusal(address, allow_private=allow_private)
        if refusal is not None:
            raise CallbackRefused(f"{host} resolves to a forbidden address: {refusal}")
    return addresses
