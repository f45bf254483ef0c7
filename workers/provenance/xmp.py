"""IPTC digital source type and C2PA pointers in XMP packets.

``Iptc4xmpExt:DigitalSourceType`` (IPTC vocabulary
``http://cv.iptc.org/newscodes/digitalsourcetype/``) is read in its attribute form, element
form and ``rdf:resource`` form; ``Iptc4xmpExt:AISystemUsed`` (IPTC 2025.1) names a
generator; ``dcterms:provenance`` points at a remote C2PA manifest.

XMP is untrusted XML: packets over a size cap and packets that declare a DTD (the way to
entity expansion) are not parsed, and the stdlib parser never fetches anything. A packet
that does not parse is searched for the same properties as text, and the failure noted.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from workers.provenance.findings import Finding, Kind, Report, clip, error_text

IPTC_EXT_NS = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
DCTERMS_NS = "http://purl.org/dc/terms/"
XMP_NS = "http://ns.adobe.com/xap/1.0/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DIGITAL_SOURCE_TYPE_VOCABULARY = "http://cv.iptc.org/newscodes/digitalsourcetype/"

# The last segment of a digital source type URI that declares generative AI.
AI_SOURCE_TYPES = frozenset({"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia"})

MAX_PACKET_BYTES = 2 * 1024 * 1024

_DTD = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
# For packets that do not parse: the same properties found as text (attribute or element
# form); values must be URIs. Every repetition is bounded: the packet is hostile input.
_FALLBACK = {
    "digital_source_type": re.compile(
        r"DigitalSourceType\s{0,20}(?:=\s{0,20}[\"']|>)\s{0,20}(https?://[^\"'<\s]{1,300})"
    ),
    "provenance": re.compile(
        r"dcterms:provenance\s{0,20}(?:=\s{0,20}[\"']|>)\s{0,20}(https?://[^\"'<\s]{1,300})"
    ),
}


def source_type_name(uri: str) -> str:
    """``trainedAlgorithmicMedia`` from ``http(s)://cv.iptc.org/.../trainedAlgorithmicMedia``."""
    return uri.strip().rstrip("/").rsplit("/", 1)[-1]


def is_ai_source_type(uri: str) -> bool:
    return source_type_name(uri) in AI_SOURCE_TYPES


@dataclass
class XmpFacts:
    """What the XMP packets of one file say."""

    digital_source_types: list[str] = field(default_factory=list)
    ai_systems: list[str] = field(default_factory=list)
    provenance_urls: list[str] = field(default_factory=list)
    creator_tools: list[str] = field(default_factory=list)
    parsed: bool = True  # False when a fallback text search supplied the facts


def read_xmp(packets: list[bytes], report: Report) -> XmpFacts:
    facts = XmpFacts()
    for packet in packets:
        _read_packet(packet, facts, report)
    return facts


def _read_packet(packet: bytes, facts: XmpFacts, report: Report) -> None:
    if len(packet) > MAX_PACKET_BYTES:
        report.error(f"XMP packet of {len(packet)} bytes is over the {MAX_PACKET_BYTES} cap")
        _fallback(packet[:MAX_PACKET_BYTES], facts)
        return
    if _DTD.search(packet.replace(b"\x00", b"")):  # NULs removed: UTF-16 packets too
        report.error("XMP packet declares a DTD or entities; not parsed as XML")
        _fallback(packet, facts)
        return
    try:
        # Safe without defusedxml: DTDs (the only way to declare entities) were refused
        # above, and ElementTree never resolves external references.
        root = ET.fromstring(packet.strip(b"\x00 \t\r\n"))  # noqa: S314
    except ET.ParseError as exc:
        report.error(f"XMP packet is not well-formed XML ({error_text(exc)}); searched as text")
        _fallback(packet, facts)
        return
    for element in root.iter():
        for name, value in element.attrib.items():
            _take(name, value, facts)
        text = (element.text or "").strip()
        resource = element.attrib.get(f"{{{RDF_NS}}}resource", "")
        if text or resource:
            _take(element.tag, text or resource, facts)


def _take(qualified: str, value: str, facts: XmpFacts) -> None:
    namespace, _, local = (
        qualified[1:].partition("}") if qualified.startswith("{") else ("", "", "")
    )
    if not value or not local:
        return
    value = clip(value)
    if local == "DigitalSourceType" and "Iptc4xmpExt" in namespace:
        _append(facts.digital_source_types, value)
    elif local == "AISystemUsed" and "Iptc4xmpExt" in namespace:
        _append(facts.ai_systems, value)
    elif local == "provenance" and namespace == DCTERMS_NS:
        _append(facts.provenance_urls, value)
    elif local == "CreatorTool" and namespace == XMP_NS:
        _append(facts.creator_tools, value)


def _fallback(packet: bytes, facts: XmpFacts) -> None:
    text = packet.decode("utf-8", errors="replace")
    found = False
    for match in _FALLBACK["digital_source_type"].finditer(text):
        _append(facts.digital_source_types, clip(match.group(1)))
        found = True
    for match in _FALLBACK["provenance"].finditer(text):
        _append(facts.provenance_urls, clip(match.group(1)))
        found = True
    if found:
        facts.parsed = False


def _append(values: list[str], value: str) -> None:
    if value not in values and len(values) < 16:
        values.append(value)


def iptc_findings(facts: XmpFacts, report: Report) -> None:
    """Findings for the IPTC properties (unsigned metadata: a claim by whoever wrote it)."""
    how = "" if facts.parsed else " (read from XMP that does not parse)"
    for uri in facts.digital_source_types:
        name = source_type_name(uri)
        details = {
            "digital_source_type": uri,
            "source_type": name,
            "in_iptc_vocabulary": uri.replace("https://", "http://").startswith(
                DIGITAL_SOURCE_TYPE_VOCABULARY
            ),
            "signed": False,
            "creator_tool": facts.creator_tools[0] if facts.creator_tools else None,
        }
        if is_ai_source_type(uri):
            report.add(
                Finding(
                    Kind.IPTC,
                    True,
                    f"XMP metadata declares IPTC digital source type {name}{how}: unsigned "
                    "metadata saying the image was made with generative AI",
                    details,
                    rank=40,
                )
            )
        else:
            report.add(
                Finding(
                    Kind.IPTC,
                    False,
                    f"XMP metadata declares IPTC digital source type {name}{how}: an unsigned "
                    "claim, not evidence either way about generative AI",
                    details,
                )
            )
    for system in facts.ai_systems:
        report.add(
            Finding(
                Kind.IPTC,
                True,
                f"XMP metadata names the AI system used: {clip(system, 120)}{how}",
                {"ai_system_used": system, "signed": False},
                rank=40,
            )
        )
