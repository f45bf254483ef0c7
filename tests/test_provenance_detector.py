"""The provenance detector as the fleet sees it: loading, versions, options, batches, the
ensemble's decisive flag, signed C2PA test files, offline reading, and degradation when an
optional library is missing."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from PIL import Image

from db.models import VerdictLabel
from workers.detectors.base import Detector, DetectorSpec, DetectorUnavailable
from workers.detectors.provenance import ProvenanceOptionsError, load_provenance
from workers.detectors.registry import BUILTIN_SPECS
from workers.ensemble import DetectorScore, EnsembleConfig, combine
from workers.provenance.c2pa import C2paReader

from provenance_fixtures import (
    C2PA_TEST_CERTS,
    SPEC,
    detect,
    items_of,
    jpeg_bytes,
    make_detector,
    png_bytes,
    png_with_chunks,
    sign_c2pa,
    text_chunk,
)

A1111 = "a red fox\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Model: sdxl_base"
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
CAPTURE = "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"

needs_certs = pytest.mark.skipif(
    not C2PA_TEST_CERTS.is_dir(),
    reason=f"the public C2PA test signing chain is not at {C2PA_TEST_CERTS}",
)


def test_loads_without_weights_and_satisfies_the_contract() -> None:
    detector = load_provenance(SPEC, device="cuda:7", weights_path=Path("/nonexistent"))
    assert isinstance(detector, Detector)
    assert detector.spec is SPEC
    assert detector.weights_sha256 is None


def test_version_names_the_spec_options_and_libraries() -> None:
    import importlib.metadata

    version = make_detector().version
    assert version.startswith("1+o")
    assert f"c2pa-{importlib.metadata.version('c2pa-python')}" in version
    assert f"iwm-{importlib.metadata.version('invisible-watermark')}" in version
    assert len(version) <= 128  # the detections.detector_version column
    assert make_detector(watermark_max_p_value=1e-9).version != version
    assert make_detector().version == version


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"watermark_max_p_value": 0}, "watermark_max_p_value"),
        ({"watermark_max_p_value": "tiny"}, "watermark_max_p_value"),
        ({"watermark_max_pixels": -1}, "watermark_max_pixels"),
        ({"stealth_max_pixels": True}, "stealth_max_pixels"),
        ({"watermark_threshold": 1e-6}, "unknown provenance options"),
    ],
)
def test_bad_options_make_it_unavailable_with_a_reason(
    options: dict[str, object], message: str
) -> None:
    spec = DetectorSpec(name="provenance", family="provenance", version="1", options=options)
    with pytest.raises(ProvenanceOptionsError, match=message) as caught:
        load_provenance(spec, device="cpu", weights_path=Path())
    assert isinstance(caught.value, DetectorUnavailable)
    assert isinstance(caught.value, ValueError)


def test_batch_answers_in_order_and_checks_lengths() -> None:
    detector = make_detector()
    tiny = Image.new("RGB", (8, 8))
    flagged = png_with_chunks([text_chunk("parameters", A1111)])
    outputs = detector.detect_batch([tiny, tiny, tiny], [b"", flagged, png_bytes(tiny)])
    assert [o.score for o in outputs] == [None, 1.0, None]
    with pytest.raises(ValueError, match="2 images but 1 raw"):
        detector.detect_batch([tiny, tiny], [b""])


def test_prompts_and_workflows_are_bounded_in_the_evidence() -> None:
    long_prompt = "castle, " * 2000
    workflow = {
        str(i): {"class_type": "CLIPTextEncode", "inputs": {"text": long_prompt}}
        for i in range(200)
    }
    raw = png_with_chunks(
        [
            text_chunk("parameters", long_prompt + "\n" + A1111),
            text_chunk("prompt", json.dumps(workflow)),
        ]
    )
    output = detect(make_detector(), raw)
    assert output.score == 1.0
    for item in output.evidence["items"]:
        assert len(item["details"].get("prompt") or "") <= 2000
    assert len(json.dumps(output.evidence)) < 20_000


def test_a_decisive_positive_flags_the_image_whatever_the_models_say() -> None:
    output = detect(make_detector(), png_with_chunks([text_chunk("parameters", A1111)]))
    decision = combine(
        [
            DetectorScore("sumsub-v2", "1", 0.05),
            DetectorScore("provenance", "1", output.score, summary=output.evidence["summary"]),
        ],
        EnsembleConfig.for_detectors([BUILTIN_SPECS["provenance"]], threshold=0.5),
    )
    assert decision.flagged and decision.label == VerdictLabel.LIKELY_AI
    assert "AUTOMATIC1111" in decision.reason and "not proof" in decision.reason


def test_abstention_leaves_the_models_alone() -> None:
    output = detect(make_detector(), png_bytes(Image.new("RGB", (300, 300), (20, 90, 160))))
    assert output.score is None
    assert output.evidence["items"] == []
    assert "absence is not evidence" in output.evidence["summary"]
    decision = combine(
        [
            DetectorScore("sumsub-v2", "1", 0.2),
            DetectorScore("provenance", "1", None),
        ],
        EnsembleConfig.for_detectors([BUILTIN_SPECS["provenance"]], threshold=0.5),
    )
    assert decision.ai_score == pytest.approx(0.2) and not decision.flagged


@needs_certs
def test_signed_c2pa_ai_declaration_in_png() -> None:
    manifest = {
        "claim_generator_info": [{"name": "synthsentry-tests", "version": "1"}],
        "title": "generated.png",
        "assertions": [
            {
                "label": "c2pa.actions.v2",
                "data": {
                    "actions": [
                        {
                            "action": "c2pa.created",
                            "softwareAgent": {"name": "Test Diffusion", "version": "0.1"},
                            "digitalSourceType": TRAINED,
                        }
                    ]
                },
            }
        ],
    }
    signed = sign_c2pa(png_bytes(Image.new("RGB", (64, 64), (200, 30, 30))), "image/png", manifest)
    output = detect(make_detector(), signed)
    (item,) = items_of(output, "c2pa", ai=True)
    details = item["details"]
    assert details["signer"]["issuer"] == "C2PA Test Signing Cert"
    assert details["validity"] == "untrusted"  # the test chain is on no trust list
    assert details["generator"] == "Test Diffusion 0.1"
    assert details["claim_generator"] == "synthsentry-tests 1"
    assert output.evidence["summary"].startswith(
        "C2PA manifest signed by C2PA Test Signing Cert (C2PA Signer): c2pa.created with "
        "trainedAlgorithmicMedia (Test Diffusion 0.1)"
    )


@needs_certs
def test_signed_digital_capture_claim_is_shown_but_never_clears() -> None:
    manifest = {
        "claim_generator_info": [{"name": "synthsentry-tests"}],
        "assertions": [
            {
                "label": "c2pa.actions",
                "data": {"actions": [{"action": "c2pa.created", "digitalSourceType": CAPTURE}]},
            }
        ],
    }
    image = Image.new("RGB", (64, 64), (10, 10, 10))
    signed = sign_c2pa(jpeg_bytes(image), "image/jpeg", manifest)
    output = detect(make_detector(), signed)
    assert output.score is None  # abstains: a camera claim never lowers anything
    (item,) = items_of(output, "c2pa", ai=False)
    assert "digitalCapture" in item["summary"] and "not proof" in item["summary"]


def test_remote_manifests_are_never_fetched(corpus_dir: Path) -> None:
    """The SDK is configured not to fetch: it refuses at once instead of trying the network
    (a fetch attempt on this offline machine would fail differently, after a DNS lookup)."""
    raw = (corpus_dir / "images/c2pa_remote_PirateShip.jpg").read_bytes()
    reader = C2paReader()
    started = time.perf_counter()
    with pytest.raises(Exception, match="must fetch remote manifests") as caught:
        reader.read(raw, "image/jpeg")
    assert time.perf_counter() - started < 1
    assert "could not fetch" not in str(caught.value)


def test_missing_c2pa_sdk_disables_only_that_signal(
    corpus_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    import workers.provenance.c2pa as c2pa_module

    real_import = importlib.import_module

    def no_c2pa(name: str, package: str | None = None) -> object:
        if name == "c2pa":
            raise ImportError("No module named 'c2pa'", name="c2pa")
        return real_import(name, package)

    monkeypatch.setattr(c2pa_module.importlib, "import_module", no_c2pa)
    detector = make_detector()
    assert "c2pa-none" in detector.version

    firefly = detect(detector, (corpus_dir / "images/c2pa_4-firefly.jpg").read_bytes())
    assert firefly.score is None
    assert firefly.evidence["checked"]["c2pa"] == "unavailable"
    assert any("c2pa-python package is not usable" in e for e in firefly.evidence["errors"])

    remote = detect(detector, (corpus_dir / "images/c2pa_remote_PirateShip.jpg").read_bytes())
    (item,) = items_of(remote, "c2pa", ai=False)  # still seen, from the XMP pointer
    assert item["details"]["remote_manifest_url"].startswith("https://cai-manifests.adobe.com/")

    iptc = detect(detector, (corpus_dir / "images/iptc_trainedAlgorithmicMedia.jpg").read_bytes())
    assert iptc.score == 1.0  # the other signals are unaffected


def test_missing_opencv_disables_only_the_watermark(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)  # makes "import cv2" raise ImportError
    detector = make_detector()
    output = detect(detector, png_with_chunks([text_chunk("parameters", A1111)]))
    assert output.score == 1.0
    assert output.evidence["checked"]["watermark"] == "unavailable"
    assert any("watermark not checked" in e for e in output.evidence["errors"])
    assert "cv2-" not in detector.version


def test_evidence_is_plain_json_for_every_kind_of_input() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (300, 300), (1, 2, 3, 128)).save(buffer, "PNG")
    for raw in (buffer.getvalue(), jpeg_bytes(Image.new("RGB", (300, 300)))):
        evidence = detect(make_detector(), raw).evidence
        assert json.loads(json.dumps(evidence)) == evidence
        assert set(evidence) == {"summary", "items", "errors", "checked"}
