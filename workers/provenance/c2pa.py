"""C2PA Content Credentials, read with the official SDK (``c2pa-python``), offline.

The manifest store is read from the file's bytes; the active manifest and, through their
ingredients, the manifests it was made from are walked. An action whose
``digitalSourceType`` is ``trainedAlgorithmicMedia`` or
``compositeWithTrainedAlgorithmicMedia`` declares generative AI. The signer (certificate
issuer and common name), the claim generator and the SDK's validation state are reported
as they are: with no trust list configured, a good signature is reported as "untrusted"
(the certificate is not on a list we trust), which is not the same as a bad one.

The SDK is configured never to use the network: remote manifests are not fetched, OCSP is
not queried, and no host is allowed. A remote-manifest pointer is reported as such.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import json
import re
import threading
from dataclasses import dataclass
from typing import Any

from workers.provenance.findings import (
    MAX_LIST_ITEMS,
    Finding,
    Kind,
    Report,
    clip,
    error_text,
)
from workers.provenance.xmp import is_ai_source_type, source_type_name

# No network, whatever the file asks for (verified with strace: no socket is opened).
OFFLINE_SETTINGS: dict[str, Any] = {
    "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False},
    "core": {"allowed_network_hosts": []},
}
MAX_MANIFESTS = 64
MAX_INGREDIENT_DEPTH = 16

_ACTIONS_LABEL = re.compile(r"^c2pa\.actions(\.v\d+)?(__\d+)?$")
_URL = re.compile(r"https?://[^\s\"')]+")
_UNTRUSTED = "signingCredential.untrusted"

_VALIDITY_SENTENCES = {
    "trusted": "signature valid and the signer is on the configured trust list",
    "untrusted": (
        "signature and hashes check out, but the signing certificate is not on a trust list "
        "configured here (untrusted)"
    ),
    "valid": "signature and hashes check out",
    "invalid": "the manifest does NOT validate",
    "unknown": "validation state not reported",
}


class C2paUnavailable(Exception):
    """The SDK cannot be used here; the message says why."""


class C2paReader:
    """One SDK context with offline settings, shared by every read in this process."""

    def __init__(self) -> None:
        try:
            self._sdk: Any = importlib.import_module("c2pa")
            settings = self._sdk.Settings.from_dict(OFFLINE_SETTINGS)
            self._context = self._sdk.Context(settings=settings)
            self._mime_types = frozenset(self._sdk.Reader.get_supported_mime_types())
        except Exception as exc:  # ImportError, or a native library that fails to load
            raise C2paUnavailable(
                f"the c2pa-python package is not usable here ({error_text(exc)})"
            ) from exc
        self.package_version = importlib.metadata.version("c2pa-python")
        # The wrapper's objects are not documented as safe to share across threads.
        self._lock = threading.Lock()

    def supports(self, mime: str) -> bool:
        return mime in self._mime_types

    def read(self, raw: bytes, mime: str) -> dict[str, Any]:
        """The manifest store as the SDK's JSON report. Raises the SDK's errors: no manifest,
        a remote manifest it will not fetch, a store it cannot read."""
        with self._lock, self._sdk.Reader(mime, io.BytesIO(raw), context=self._context) as reader:
            store: dict[str, Any] = json.loads(reader.json())
            return store

    def is_manifest_not_found(self, exc: Exception) -> bool:
        return isinstance(exc, self._sdk.C2paError.ManifestNotFound)

    def is_sdk_error(self, exc: Exception) -> bool:
        return isinstance(exc, self._sdk.C2paError)


@dataclass(frozen=True)
class C2paAction:
    manifest: str
    role: str  # "active" or "ingredient"
    action: str
    software_agent: str | None
    digital_source_type: str | None

    @property
    def ai(self) -> bool:
        return self.digital_source_type is not None and is_ai_source_type(self.digital_source_type)

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "role": self.role,
            "action": self.action,
            "software_agent": self.software_agent,
            "digital_source_type": self.digital_source_type,
        }


def c2pa_findings(
    reader: C2paReader,
    raw: bytes,
    mime: str,
    report: Report,
    *,
    embedded_store: bool,
    remote_hint: str | None,
) -> None:
    """Read the store and add one C2PA finding (AI or not) for it, if there is one."""
    if not reader.supports(mime):
        report.check("c2pa", f"not applicable ({mime} is not a format the SDK reads)")
        return
    try:
        store = reader.read(raw, mime)
    except Exception as exc:
        _sdk_failure(reader, exc, report, embedded_store=embedded_store, remote_hint=remote_hint)
        return
    if store and isinstance(store.get("manifests"), dict) and store["manifests"]:
        _describe_store(store, report, remote_hint)
    elif store and (store.get("active_manifest") or store.get("validation_status")):
        # The store is there but its manifest did not load (e.g. damaged CBOR).
        codes = _failure_codes(store)
        report.error(f"C2PA manifest store present but no manifest could be loaded: {codes}")
        report.add(
            Finding(
                Kind.C2PA,
                False,
                "The file carries a damaged C2PA manifest store: no manifest could be loaded "
                f"({', '.join(codes[:4]) or 'no reason given'}); nothing it claims can be "
                "relied on",
                {"validity": "invalid", "validation_failures": codes},
            )
        )
        report.check("c2pa", "manifest present but unreadable")
    else:
        report.check("c2pa", "no manifest")


def remote_pointer_finding(url: str, report: Report, *, why: str) -> None:
    report.add(
        Finding(
            Kind.C2PA,
            False,
            f"The file points to a remote C2PA manifest ({clip(url, 200)}); it was not fetched "
            f"({why}), so what it declares is unknown here",
            {"remote_manifest_url": url, "fetched": False},
        )
    )
    report.check("c2pa", "remote manifest, not fetched")


def _sdk_failure(
    reader: C2paReader,
    exc: Exception,
    report: Report,
    *,
    embedded_store: bool,
    remote_hint: str | None,
) -> None:
    message = clip(str(exc), 400)
    if reader.is_manifest_not_found(exc):
        if embedded_store:
            report.error(f"the container holds a C2PA store but the SDK found none: {message}")
        report.check("c2pa", "no manifest")
        return
    if "Remote:" in message[:40] or "remote manifest" in message.lower():
        found = _URL.search(message)
        url = found.group(0) if found else remote_hint or "(URL not reported)"
        remote_pointer_finding(url, report, why="the scanner never uses the network")
        return
    if not reader.is_sdk_error(exc):
        report.error(f"C2PA reader failed: {error_text(exc)}")
        report.check("c2pa", "error")
        return
    report.error(f"C2PA manifest store could not be read: {message}")
    report.add(
        Finding(
            Kind.C2PA,
            False,
            "The file carries C2PA Content Credentials that the SDK cannot read or validate "
            f"({message}); nothing it claims can be relied on",
            {"validity": "unreadable", "sdk_error": message},
        )
    )
    report.check("c2pa", "manifest present but unreadable")


def _describe_store(store: dict[str, Any], report: Report, remote_hint: str | None) -> None:
    manifests: dict[str, Any] = store["manifests"]
    walked = _walk(manifests, store.get("active_manifest"))
    actions = [a for label, role, m in walked for a in _actions(label, m, role)]
    codes = _failure_codes(store)
    validity = _validity(store.get("validation_state"), codes)
    active_label, _, active = walked[0] if walked else ("", "active", {})
    signer = _signer(active)
    generator = _claim_generator(active)
    details: dict[str, Any] = {
        "active_manifest": active_label,
        "claim_generator": generator,
        "signer": signer,
        "validity": validity,
        "validation_state": store.get("validation_state"),
        "validation_failures": codes,
        "manifests": [
            {
                "label": label,
                "role": role,
                "claim_generator": _claim_generator(m),
                "signer": _signer(m),
                "title": m.get("title") if isinstance(m.get("title"), str) else None,
            }
            for label, role, m in walked
        ],
        "actions": [a.to_json() for a in actions[:MAX_LIST_ITEMS]],
        "remote_manifest_url": remote_hint,
    }
    signed_by = _signer_name(signer) or "an unnamed signer"
    state = _VALIDITY_SENTENCES[validity]
    reasons = [c for c in codes if c != _UNTRUSTED]
    if validity == "invalid" and reasons:
        state += f" ({clip(', '.join(reasons), 200)})"
    ai_actions = [a for a in actions if a.ai]
    if ai_actions:
        best = min(ai_actions, key=_strength)
        details["ai_actions"] = [a.to_json() for a in ai_actions[:MAX_LIST_ITEMS]]
        details["generator"] = best.software_agent
        # Name the signer of the manifest that makes the declaration.
        signed_by = (
            next(
                (
                    _signer_name(_signer(m))
                    for label, _, m in walked
                    if clip(label) == best.manifest
                ),
                None,
            )
            or signed_by
        )
        where = "" if best.role == "active" else " in an ingredient's manifest"
        agent = f" ({best.software_agent})" if best.software_agent else ""
        more = f"; {len(ai_actions) - 1} more AI action(s)" if len(ai_actions) > 1 else ""
        summary = (
            f"C2PA manifest signed by {signed_by}: {best.action} with "
            f"{source_type_name(best.digital_source_type or '')}{agent}{where}{more}; {state}"
        )
        report.add(
            Finding(Kind.C2PA, True, summary, details, rank=0 if validity != "invalid" else 10)
        )
        report.check("c2pa", f"AI declared ({validity})")
        return
    claimed = [a for a in actions if a.digital_source_type]
    by = f" (claim generator {clip(generator, 80)})" if generator else ""
    if claimed:
        first = claimed[0]
        summary = (
            f"C2PA manifest signed by {signed_by}{by} claims {first.action} with "
            f"{source_type_name(first.digital_source_type or '')}: a signed claim, not proof of "
            f"how the pixels were made; {state}"
        )
    elif actions:
        names = ", ".join(dict.fromkeys(a.action for a in actions))
        summary = (
            f"C2PA manifest signed by {signed_by}{by} declares {clip(names, 200)}; no "
            f"generative-AI action; {state}"
        )
    else:
        summary = f"C2PA manifest signed by {signed_by}{by} declares no actions; {state}"
    report.add(Finding(Kind.C2PA, False, summary, details))
    report.check("c2pa", f"manifest without AI declaration ({validity})")


def _walk(manifests: dict[str, Any], active: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, role, manifest) from the active manifest through its ingredients' manifests,
    breadth first, each once."""
    if not isinstance(active, str) or not isinstance(manifests.get(active), dict):
        # No usable active manifest: describe what the store has, in its order.
        return [
            (label, "ingredient", m)
            for label, m in list(manifests.items())[:MAX_MANIFESTS]
            if isinstance(m, dict)
        ]
    walked: list[tuple[str, str, dict[str, Any]]] = []
    seen = {active}
    frontier = [active]
    depth = 0
    while frontier and depth <= MAX_INGREDIENT_DEPTH and len(walked) < MAX_MANIFESTS:
        next_frontier: list[str] = []
        for label in frontier:
            manifest = manifests[label]
            walked.append((label, "active" if depth == 0 else "ingredient", manifest))
            ingredients = manifest.get("ingredients")
            for ingredient in ingredients if isinstance(ingredients, list) else []:
                child = ingredient.get("active_manifest") if isinstance(ingredient, dict) else None
                if (
                    isinstance(child, str)
                    and child not in seen
                    and isinstance(manifests.get(child), dict)
                ):
                    seen.add(child)
                    next_frontier.append(child)
        frontier = next_frontier
        depth += 1
    return walked[:MAX_MANIFESTS]


def _actions(label: str, manifest: dict[str, Any], role: str) -> list[C2paAction]:
    found: list[C2paAction] = []
    assertions = manifest.get("assertions")
    for assertion in assertions if isinstance(assertions, list) else []:
        if not isinstance(assertion, dict) or not _ACTIONS_LABEL.match(str(assertion.get("label"))):
            continue
        data = assertion.get("data")
        entries = data.get("actions") if isinstance(data, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict) or not isinstance(entry.get("action"), str):
                continue
            source = entry.get("digitalSourceType")
            found.append(
                C2paAction(
                    manifest=clip(label),
                    role=role,
                    action=clip(entry["action"], 80),
                    software_agent=_agent(entry.get("softwareAgent")),
                    digital_source_type=clip(source) if isinstance(source, str) else None,
                )
            )
            if len(found) >= MAX_LIST_ITEMS:
                return found
    return found


def _strength(action: C2paAction) -> tuple[int, int, int]:
    """Order AI actions for the summary: a plain trainedAlgorithmicMedia declaration before
    a composite, this file's manifest before an ingredient's, a creation before an edit."""
    composite = source_type_name(action.digital_source_type or "").startswith("composite")
    return (int(composite), int(action.role != "active"), int(action.action != "c2pa.created"))


def _agent(value: Any) -> str | None:
    if isinstance(value, str):
        return clip(value, 120)
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        version = value.get("version")
        return clip(
            f"{value['name']} {version}" if isinstance(version, str) else value["name"], 120
        )
    return None


def _claim_generator(manifest: dict[str, Any]) -> str | None:
    info = manifest.get("claim_generator_info")
    if isinstance(info, list) and info and isinstance(info[0], dict):
        name, version = info[0].get("name"), info[0].get("version")
        if isinstance(name, str):
            return clip(f"{name} {version}" if isinstance(version, str) else name)
    generator = manifest.get("claim_generator")
    return clip(generator) if isinstance(generator, str) else None


def _signer(manifest: dict[str, Any]) -> dict[str, Any]:
    info = manifest.get("signature_info")
    if not isinstance(info, dict):
        return {}
    return {
        key: clip(str(info[key]))
        for key in ("issuer", "common_name", "time", "alg", "cert_serial_number")
        if info.get(key) is not None
    }


def _signer_name(signer: dict[str, Any]) -> str | None:
    issuer, common_name = signer.get("issuer"), signer.get("common_name")
    if issuer and common_name and issuer != common_name:
        return f"{issuer} ({common_name})"
    return issuer or common_name


def _failure_codes(store: dict[str, Any]) -> list[str]:
    codes: list[str] = []
    results = store.get("validation_results")
    groups: list[Any] = []
    if isinstance(results, dict):
        active = results.get("activeManifest")
        if isinstance(active, dict):
            groups.append(active.get("failure"))
        deltas = results.get("ingredientDeltas")
        for delta in deltas if isinstance(deltas, list) else []:
            inner = delta.get("validationDeltas") if isinstance(delta, dict) else None
            if isinstance(inner, dict):
                groups.append(inner.get("failure"))
    groups.append(store.get("validation_status"))
    for group in groups:
        for status in group if isinstance(group, list) else []:
            code = status.get("code") if isinstance(status, dict) else None
            if isinstance(code, str) and code not in codes and len(codes) < MAX_LIST_ITEMS:
                codes.append(clip(code, 80))
    return codes


def _validity(state: Any, codes: list[str]) -> str:
    if state == "Trusted":
        return "trusted"
    if state == "Invalid":
        return "invalid"
    if state == "Valid":
        return "untrusted" if _UNTRUSTED in codes else "valid"
    if codes:
        return "untrusted" if codes == [_UNTRUSTED] else "invalid"
    return "unknown"
