"""The provenance detector on the shared corpus of real files, row by row of MANIFEST.tsv."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from workers.detectors.base import DetectorOutput
from workers.detectors.provenance import ProvenanceDetector

from provenance_fixtures import corpus_rows, detect, items_of, make_detector

STEALTH_FILE = "images/a1111_stealth_pnginfo_64px.png"
DALLE_FILES = {"images/dalle2_00000845.png", "images/dalle2_00000274.png"}


def expected_kind(row: dict[str, str]) -> str | None:
    """The evidence kind a row must produce as AI evidence, from its label, signal and notes;
    None for rows that must not be flagged (labels real/unknown, and AI images whose files
    carry no provenance at all)."""
    if row["file"] == STEALTH_FILE:
        return "stealth_payload"
    if row["file"] in DALLE_FILES:
        # Not listed as a signal in the manifest, but the files carry DALL-E's own EXIF note
        # ("Made with OpenAI DALL-E", MakerNote "OpenAI--req_...").
        return "generator_metadata"
    if row["label"] != "ai":
        return None
    return {
        "c2pa": "c2pa",
        "iptc-digital-source-type": "iptc",
        "png-parameters": "generator_metadata",
        "comfyui-workflow": "generator_metadata",
    }.get(row["signal"])


@pytest.fixture(scope="module")
def detector() -> ProvenanceDetector:
    return make_detector()


@pytest.fixture(scope="module")
def corpus_results(
    corpus_dir: Path, detector: ProvenanceDetector
) -> list[tuple[dict[str, str], DetectorOutput, float]]:
    results = []
    for row in corpus_rows(corpus_dir):
        raw = (corpus_dir / row["file"]).read_bytes()
        started = time.perf_counter()
        output = detect(detector, raw)
        results.append((row, output, time.perf_counter() - started))
    return results


def by_file(results: list[Any], name: str) -> DetectorOutput:
    return next(output for row, output, _ in results if row["file"] == f"images/{name}")


def test_every_row_gets_the_expected_answer(corpus_results: list[Any]) -> None:
    assert len(corpus_results) == 47
    for row, output, _ in corpus_results:
        kind = expected_kind(row)
        evidence = output.evidence
        assert json.loads(json.dumps(evidence)) == evidence, row["file"]
        assert evidence["summary"], row["file"]
        if kind is not None:
            assert output.score == 1.0, (row["file"], evidence["summary"])
            assert items_of(output, kind, ai=True), (row["file"], evidence["items"])
            # The summary names the strongest AI signal, which is the first item.
            assert evidence["items"][0]["ai"] is True
            assert evidence["summary"].startswith(evidence["items"][0]["summary"][:60])
        else:
            assert output.score is None, (row["file"], evidence["summary"])
            assert not [item for item in evidence["items"] if item["ai"]], row["file"]
        if row["label"] == "unknown":
            # Reported with what they claim, never flagged.
            assert items_of(output, "c2pa", ai=False), (row["file"], evidence)
        if row["label"] == "ai" and row["signal"] == "none" and kind is None:
            # Midjourney, FLUX, Recraft outputs without any metadata: nothing to say.
            assert evidence["items"] == [], row["file"]


def test_no_watermark_is_reported_on_a_corpus_without_watermarks(corpus_results: list[Any]) -> None:
    for row, output, _ in corpus_results:
        assert not items_of(output, "watermark", ai=True), row["file"]
        status = output.evidence["checked"].get("watermark", "")
        assert status.startswith(("best match", "skipped")), (row["file"], status)


def test_generator_metadata_names_the_generator_and_model(corpus_results: list[Any]) -> None:
    for row, output, _ in corpus_results:
        if row["signal"] not in ("png-parameters", "comfyui-workflow"):
            continue
        (item,) = items_of(output, "generator_metadata", ai=True)
        details = item["details"]
        assert details["model"], row["file"]
        if row["signal"] == "comfyui-workflow":
            assert details["generator"] == "ComfyUI"
        else:
            first_word = row["generator"].split()[0]
            assert first_word.lower() in details["generator"].lower(), (row, details)
    a1111 = items_of(by_file(corpus_results, "meta1px_a1111_parameters.png"), "generator_metadata")
    assert a1111[0]["details"]["model"] == "realistic_realisticVisionV20_v20"
    assert a1111[0]["details"]["prompt"] == "photo of a duck"
    flux = items_of(by_file(corpus_results, "comfy_flux_dev.png"), "generator_metadata")
    assert flux[0]["details"]["model"] == "flux1-dev.safetensors"
    sdxl = items_of(by_file(corpus_results, "comfy_sdxl.png"), "generator_metadata")
    assert sdxl[0]["details"]["models"] == [
        "sd_xl_base_1.0.safetensors",
        "sd_xl_refiner_1.0.safetensors",
    ]


def test_stealth_payload_is_decoded(corpus_results: list[Any]) -> None:
    output = by_file(corpus_results, "a1111_stealth_pnginfo_64px.png")
    (item,) = items_of(output, "stealth_payload", ai=True)
    assert item["details"]["magic"] == "stealth_pngcomp"
    assert item["details"]["channel"] == "alpha"
    assert item["details"]["model"] == "realisticVisionV51_v51VAE"
    assert item["details"]["text"].startswith("a circle\nNegative prompt: a square\nSteps: 20")


def test_c2pa_claims_signers_and_validity(corpus_results: list[Any]) -> None:
    firefly = by_file(corpus_results, "c2pa_4-firefly.jpg")
    (item,) = items_of(firefly, "c2pa", ai=True)
    assert item["details"]["signer"]["issuer"] == "Adobe Inc."
    assert item["details"]["generator"] == "Adobe Firefly"
    # Good signature, but no trust list is configured here: reported as untrusted.
    assert item["details"]["validity"] == "untrusted"
    assert firefly.evidence["summary"].startswith(
        "C2PA manifest signed by Adobe Inc. (firefly-prod): c2pa.created with "
        "trainedAlgorithmicMedia (Adobe Firefly)"
    )

    # The Firefly generation sits in an ingredient's manifest, Photoshop's edit on top.
    layered = items_of(by_file(corpus_results, "c2pa_firefly_ocsp.jpg"), "c2pa", ai=True)[0]
    actions = {
        (a["role"], a["action"], a["digital_source_type"].rsplit("/", 1)[-1])
        for a in layered["details"]["ai_actions"]
    }
    assert ("ingredient", "c2pa.created", "trainedAlgorithmicMedia") in actions
    assert ("active", "c2pa.edited", "compositeWithTrainedAlgorithmicMedia") in actions

    capture = items_of(by_file(corpus_results, "c2pa_C_with_CAWG_data.jpg"), "c2pa")[0]
    assert "digitalCapture" in capture["summary"] and "not proof" in capture["summary"]

    gradient = items_of(by_file(corpus_results, "c2pa_C.jpg"), "c2pa")[0]
    assert "algorithmicMedia" in gradient["summary"] and gradient["ai"] is False

    truepic = items_of(by_file(corpus_results, "c2pa_truepic_camera.jpg"), "c2pa")[0]
    assert truepic["details"]["validity"] == "invalid"
    assert "assertion.dataHash.mismatch" in truepic["details"]["validation_failures"]

    unreadable = by_file(corpus_results, "c2pa_no_alg.jpg")
    assert items_of(unreadable, "c2pa")[0]["details"]["validity"] == "unreadable"
    assert any("unknown algorithm" in error for error in unreadable.evidence["errors"])


def test_remote_manifest_is_reported_and_not_fetched(corpus_results: list[Any]) -> None:
    output = by_file(corpus_results, "c2pa_remote_PirateShip.jpg")
    (item,) = items_of(output, "c2pa", ai=False)
    assert item["details"]["remote_manifest_url"].startswith("https://cai-manifests.adobe.com/")
    assert item["details"]["fetched"] is False
    assert output.score is None


def test_time_per_image(corpus_results: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    """Reported, not asserted: the cost of the detector per corpus file (after intake's
    decode), with the slowest files named."""
    times = sorted(seconds for _, _, seconds in corpus_results)
    median = statistics.median(times) * 1000
    p95 = times[max(0, round(0.95 * len(times)) - 1)] * 1000
    slowest = sorted(corpus_results, key=lambda result: -result[2])[:3]
    with capsys.disabled():
        print(
            f"\nprovenance detector on {len(times)} corpus files: median {median:.1f} ms, "
            f"p95 {p95:.1f} ms; slowest: "
            + ", ".join(f"{row['file'][7:]} {seconds * 1000:.0f} ms" for row, _, seconds in slowest)
        )
    assert all(seconds > 0 for seconds in times)
