"""The callback guard without a network: which addresses, URLs and hosts a callback may
go to, and the at-rest encryption of signing secrets. The same guard at connect time, over
real sockets, is in tests/test_callbacks.py."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from workers.callbacks import CallbackRefused, SecretBox, load_or_create_key
from workers.callbacks.guard import address_refusal, check_url, normalize_host, vet_host
from workers.callbacks.secrets import SecretUnreadable, new_signing_secret

REFUSED = {
    "10.0.0.1": "private",
    "172.16.5.4": "private",
    "192.168.1.1": "private",
    "127.0.0.1": "loopback",
    "127.8.9.10": "loopback",
    "0.0.0.0": "unspecified",
    "169.254.169.254": "metadata",
    "169.254.170.2": "metadata",
    "169.254.1.1": "link-local",
    "100.64.0.1": "shared",
    "100.127.255.254": "shared",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "240.0.0.1": "reserved",
    "255.255.255.255": "reserved",  # broadcast
    "0.1.2.3": "this network",  # 0.0.0.0/8
    "192.0.0.8": "IETF protocol assignment",  # 192.0.0.0/24: let through by 3.11's tables
    "192.0.0.9": "IETF protocol assignment",
    "192.0.0.10": "IETF protocol assignment",
    "192.0.0.170": "IETF protocol assignment",
    "192.0.2.1": "documentation",  # TEST-NET-1
    "198.51.100.7": "documentation",
    "203.0.113.9": "documentation",
    "198.18.0.1": "benchmarking",
    "198.19.255.254": "benchmarking",
    "192.88.99.1": "6to4 relay",
    "fec0::1": "site-local",  # deprecated; let through by 3.11's tables
    "2001:db8::1": "documentation",
    "3fff::1": "documentation",
    "100::1": "discard",
    "2001:1::1": "IETF protocol assignment",  # 2001::/23, the globally reachable parts too
    "2001:3::1": "IETF protocol assignment",
    "2001:4:112::1": "IETF protocol assignment",
    "2001:20::1": "IETF protocol assignment",
    "2001:1ff::1": "IETF protocol assignment",
    "2001:0:4136:e378:8000:63bf:f7f7:f7f7": "IETF protocol assignment",  # Teredo of 8.8.8.8
    "::ffff:192.0.0.8": "IETF protocol assignment",
    "::1": "loopback",
    "::": "unspecified",
    "fe80::1": "link-local",
    "fe80::1%eth0": "link-local",
    "fc00::1": "private",
    "fd12:3456::1": "private",
    "fd00:ec2::254": "metadata",
    "ff02::1": "multicast",
    "::ffff:127.0.0.1": "loopback",  # IPv4-mapped
    "::ffff:10.1.2.3": "private",
    "::ffff:169.254.169.254": "metadata",
    "::127.0.0.1": "loopback",  # IPv4-compatible (deprecated)
    "64:ff9b::a00:1": "private",  # NAT64 of 10.0.0.1
    "64:ff9b::a9fe:a9fe": "metadata",  # NAT64 of 169.254.169.254
    "2002:a00:1::": "private",  # 6to4 of 10.0.0.1
    "2002:7f00:1::1": "loopback",  # 6to4 of 127.0.0.1
    "2001:0:4136:e378:8000:63bf:f5ff:fffe": "private",  # Teredo, client 10.0.0.1
}
PUBLIC = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1"]


@pytest.mark.parametrize(("address", "kind"), sorted(REFUSED.items()))
def test_forbidden_addresses_are_refused_with_the_reason(address: str, kind: str) -> None:
    refusal = address_refusal(address, allow_private=False)
    assert refusal is not None and kind in refusal, refusal


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_may_be_reached(address: str) -> None:
    assert address_refusal(address, allow_private=False) is None


def test_allowing_private_addresses_still_refuses_the_metadata_service() -> None:
    for address in ("127.0.0.1", "10.0.0.1", "::1", "::ffff:127.0.0.1", "fe80::1"):
        assert address_refusal(address, allow_private=True) is None, address
    for address in ("169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254"):
        refusal = address_refusal(address, allow_private=True)
        assert refusal is not None and "metadata" in refusal
    assert "not an IP address" in (address_refusal("example.com", allow_private=True) or "")


def test_one_forbidden_address_refuses_the_whole_host() -> None:
    answers = {
        "public.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
        "mixed.example": ["93.184.216.34", "10.0.0.7"],
        "inner.example": ["192.168.0.10"],
        "mapped.example": ["::ffff:127.0.0.1"],
        "empty.example": [],
    }
    asked: list[str] = []

    def resolver(host: str) -> list[str]:
        asked.append(host)
        return answers[host]

    assert vet_host("public.example", resolver, allow_private=False) == answers["public.example"]
    for host in ("mixed.example", "inner.example", "mapped.example"):
        with pytest.raises(CallbackRefused, match=f"{host} resolves to a forbidden address"):
            vet_host(host, resolver, allow_private=False)
    with pytest.raises(OSError, match="no address"):
        vet_host("empty.example", resolver, allow_private=False)
    # An address literal is checked as it is, never looked up.
    with pytest.raises(CallbackRefused, match="loopback"):
        vet_host("127.0.0.1", resolver, allow_private=False)
    assert vet_host("127.0.0.1", resolver, allow_private=True) == ["127.0.0.1"]
    assert "127.0.0.1" not in asked


ALLOWED = ["hooks.example.com", "127.0.0.1", "::1"]


@pytest.mark.parametrize(
    ("url", "allow_private", "reason"),
    [
        ("http://hooks.example.com/cb", False, "must use https"),
        ("ftp://hooks.example.com/cb", True, "must use https or http"),
        ("https://user:pw@hooks.example.com/cb", False, "user name or password"),
        ("https://user@hooks.example.com/cb", False, "user name or password"),
        ("https://evil.example.com/cb", False, "evil.example.com are not allowed"),
        ("https://sub.hooks.example.com/cb", False, "not allowed"),
        ("https://hooks.example.com.evil.net/cb", False, "not allowed"),
        ("https://hooks.example.com/" + "a" * 2048, False, "at most 2048"),
        ("https:///cb", False, "must name a host"),
        ("https://hooks.example.com:99999/cb", False, "port"),
        ("https://hooks.example.com/a b", False, "no spaces"),
        ("https://hooks.example.com/\x00", False, "control characters"),
        ("https://10.0.0.1/cb", False, "10.0.0.1 are not allowed"),
        ("http://127.0.0.2:8000/cb", True, "127.0.0.2 are not allowed"),
    ],
)
def test_a_callback_url_is_refused_with_a_clear_reason(
    url: str, allow_private: bool, reason: str
) -> None:
    with pytest.raises(CallbackRefused, match=reason):
        check_url(url, ALLOWED, allow_private=allow_private)


def test_allowed_urls_pass_unchanged() -> None:
    for url, allow_private in [
        ("https://hooks.example.com/cb?x=1", False),
        ("https://HOOKS.Example.com.:8443/cb", False),
        ("http://127.0.0.1:8000/cb", True),
        ("http://[::1]:8000/cb", True),
    ]:
        assert check_url(url, ALLOWED, allow_private=allow_private) == url
    with pytest.raises(CallbackRefused, match="no callback hosts are allowed"):
        check_url("https://hooks.example.com/cb", [], allow_private=False)


def test_hosts_are_kept_in_one_form() -> None:
    assert normalize_host("Hooks.Example.COM.") == "hooks.example.com"
    assert normalize_host("[::FFFF:1.2.3.4]") == "::ffff:102:304"
    assert normalize_host("bücher.example") == "xn--bcher-kva.example"
    for bad in ("", "exa mple.com", "-lead.example", "a..b", "x" * 64 + ".com", "a/b"):
        with pytest.raises(CallbackRefused, match="not a host name"):
            normalize_host(bad)


def test_secrets_are_encrypted_with_a_key_derived_from_the_setting() -> None:
    box = SecretBox("a deployment secret key, long and random")
    secret = new_signing_secret()
    assert secret.startswith("whsec_") and len(Webhook(secret)._whsecret) == 32
    stored = box.encrypt(secret)
    assert secret not in stored and secret.removeprefix("whsec_") not in stored
    assert box.decrypt(stored) == secret
    assert SecretBox("a deployment secret key, long and random").decrypt(stored) == secret
    with pytest.raises(SecretUnreadable, match="cannot be decrypted"):
        SecretBox("another key").decrypt(stored)
    assert "deployment" not in repr(box)
    with pytest.raises(ValueError, match="empty"):
        SecretBox("")


def test_the_development_key_file_is_made_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "data" / "secret.key"
    keys: list[str] = []
    racers = [
        threading.Thread(target=lambda: keys.append(load_or_create_key(path))) for _ in range(8)
    ]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(10)
    assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret.key"]  # no leftovers
    path.chmod(0o644)
    assert load_or_create_key(path) == keys[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
