"""``synthsentry eval`` end to end: real files scored by the scan engine into an evaluation
database (SQLite in tmp_path), the provenance detector (no weights) and a small Sumsub
checkpoint, the result document checked against its schema and against the database."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import migrate
from db.models import Detection, ReviewDecision, Verdict
from db.models import Image as ImageRow
from db.session import make_engine, make_sessionmaker
from synthsentry.cli import main
from workers.detectors.base import Detector, DetectorOutput, DetectorSpec
from workers.detectors.registry import BUILTIN_SPECS, build_detector
from workers.ensemble import EnsembleConfig
from workers.evaluation.datasets import ProblemKind, corpus_csv
from workers.evaluation.degrade import CONDITIONS
from workers.evaluation.metrics import Metrics
from workers.evaluation.run import (
    ENSEMBLE,
    EvaluationError,
    Scoring,
    evaluate,
    open_dataset,
    write_results,
)
from workers.intake import IntakeLimits
from workers.review import LabelledExample
from workers.review_export import write_examples

from checkpoints import SUMSUB_MOBILENET, write_sumsub_raw
from conftest import SettingsFactory
from provenance_fixtures import png_with_chunks, text_chunk

LIMITS = IntakeLimits(max_bytes=10 * 1024 * 1024, max_pixels=10_000_000, decode_timeout_s=10.0)
A1111 = "a red fox\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: {seed}, Model: {model}"
METRIC_KEYS = {*Metrics.__dataclass_fields__, "abstained", "answered"}
SUBJECT_KEYS = {"overall", "by_generator", "by_group", "roc", "reliability", "scores"}
EVIDENCE_KEYS = {"flagged", "flagged_ai", "flagged_real", "precision", "precision_ci"}


# --- the detectors -----------------------------------------------------------------------


class Counting:
    """A detector that counts the images it is asked to score, and otherwise is ``inner``."""

    def __init__(self, inner: Detector) -> None:
        self.inner = inner
        self.spec: DetectorSpec = inner.spec
        self.calls = 0

    @property
    def version(self) -> str:
        return self.inner.version

    @property
    def weights_sha256(self) -> str | None:
        return self.inner.weights_sha256

    def detect_batch(
        self, images: Sequence[Image.Image], raw: Sequence[bytes]
    ) -> list[DetectorOutput]:
        self.calls += len(images)
        return self.inner.detect_batch(images, raw)


def _no_weights(uri: str, name: str) -> Path:
    raise AssertionError(f"{name} needs no weights, asked for {uri}")


def provenance() -> Counting:
    return Counting(build_detector(BUILTIN_SPECS["provenance"], device="cpu", resolve=_no_weights))


@pytest.fixture(scope="module")
def mj5(tmp_path_factory: pytest.TempPathFactory) -> Detector:
    """The Sumsub MobileNetV3 architecture with seeded weights, in the published format."""
    weights = tmp_path_factory.mktemp("w") / "mj5.pt"
    write_sumsub_raw(weights, SUMSUB_MOBILENET, seed=3)
    return build_detector(
        BUILTIN_SPECS["sumsub-mj5"], device="cpu", resolve=lambda _uri, _name: weights
    )


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'eval.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def scoring(
    detectors: Sequence[Detector], sessions: sessionmaker[Session], threshold: float = 0.5
) -> Scoring:
    config = EnsembleConfig.for_detectors([d.spec for d in detectors], threshold=threshold)
    return Scoring(detectors, sessions, LIMITS, config, batch_size=4)


# --- the labelled set --------------------------------------------------------------------


def _picture(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """Smooth light and shade with sensor-like noise: something like a photograph."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack(
        [np.sin(3 * x + seed), np.cos(2 * y + seed), np.sin(2 * (x + y) - seed)], axis=-1
    )
    pixels = 127 + 90 * base + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_set(
    folder: Path, generators: Sequence[str], n_real: int, *, bad: bool = True
) -> tuple[Path, dict[str, int]]:
    """A CSV of AI images (PNG carrying a generator's settings in a text chunk; generator
    named on the row) and real ones (JPEG, no metadata, no generator), each in a group;
    ``bad`` adds a file no decoder reads, labelled AI. Returns the CSV and each file's
    label by name."""
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    labels: dict[str, int] = {}
    for i, generator in enumerate(generators):
        name = f"ai_{i}.png"
        settings = A1111.format(seed=i, model=generator)
        chunk = text_chunk("parameters", settings)
        (folder / name).write_bytes(png_with_chunks([chunk], _picture(100 + i)))
        rows.append([name, "ai", generator, "web" if i % 2 else "upload"])
        labels[name] = 1
    for i in range(n_real):
        name = f"real_{i}.jpg"
        _picture(200 + i).save(folder / name, quality=88)
        rows.append([name, "real", "", "web" if i % 2 else "upload"])
        labels[name] = 0
    if bad:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        rows.append(["broken.png", "ai", generators[0], ""])
        labels["broken.png"] = 1
    path = folder / "set.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "generator", "group"])
        writer.writerows(rows)
    return path, labels


# --- the document's shape ----------------------------------------------------------------


def check_document(document: dict[str, Any], detectors: Sequence[str]) -> None:
    """Every key the document promises is there, and it is strict JSON."""
    json.dumps(document, allow_nan=False)
    assert document["schema"] == 1
    assert set(document) >= {
        "schema",
        "created_at",
        "dataset",
        "threshold",
        "ensemble_version",
        "detectors",
        "conditions",
        "provenance",
    }
    assert set(document["dataset"]) >= {
        "source",
        "layout",
        "images",
        "ai",
        "real",
        "problems",
        "generators",
        "groups",
    }
    assert [d["name"] for d in document["detectors"]] == list(detectors)
    for d in document["detectors"]:
        assert set(d) == {"name", "version", "weights_sha256"}
    assert document["conditions"][0]["name"] == "identity"
    for condition in document["conditions"]:
        assert {"name", "description", "subjects"} <= set(condition)
        assert list(condition["subjects"]) == [*detectors, ENSEMBLE]
        for subject in condition["subjects"].values():
            assert set(subject) == SUBJECT_KEYS
            assert set(subject["overall"]) == METRIC_KEYS
            for part in ("by_generator", "by_group"):
                assert all(set(m) == METRIC_KEYS for m in subject[part].values())
            assert set(subject["roc"]) == {"fpr", "tpr"}
            assert len(subject["roc"]["fpr"]) == len(subject["roc"]["tpr"])
            assert set(subject["scores"]) == {"ai", "real"}
            assert len(subject["reliability"]) == 15
    provenance_part = document["provenance"]
    assert set(provenance_part) == {"detector", "signals", "any"}
    assert set(provenance_part["any"]) == EVIDENCE_KEYS
    assert all(set(s) == EVIDENCE_KEYS for s in provenance_part["signals"].values())


def _stable(document: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k != "created_at"}


# --- scoring with the scan engine --------------------------------------------------------


def test_a_labelled_set_is_measured_through_the_scan_engine_and_cached(
    tmp_path: Path, sessions: sessionmaker[Session], mj5: Detector
) -> None:
    generators = ["sdxl", "sdxl", "sdxl", "midjourney", "midjourney", "midjourney"]
    path, labels = write_set(tmp_path / "set", generators, n_real=6)
    dataset = open_dataset(path)
    assert dataset.layout == "csv"
    proven, model = provenance(), Counting(mj5)
    detectors: list[Detector] = [model, proven]

    document = evaluate(dataset, scoring=scoring(detectors, sessions), n_bootstrap=200, seed=7)
    check_document(document, ["sumsub-mj5", "provenance"])

    assert document["dataset"]["images"] == 13
    assert (document["dataset"]["ai"], document["dataset"]["real"]) == (7, 6)
    assert document["dataset"]["generators"] == ["midjourney", "sdxl"]
    assert document["dataset"]["groups"] == ["upload", "web"]
    assert document["detectors"][0]["weights_sha256"] == mj5.weights_sha256
    assert document["threshold"] == 0.5
    # The broken file was refused at intake: no detector saw it.
    assert (model.calls, proven.calls) == (12, 12)
    (identity,) = document["conditions"]
    assert identity["not_scored"] == 1
    subjects = identity["subjects"]

    # The model answers every decoded image; the refused one is its only abstention.
    model_overall = subjects["sumsub-mj5"]["overall"]
    assert (model_overall["abstained_ai"], model_overall["abstained_real"]) == (1, 0)
    assert model_overall["roc_auc"] is not None and model_overall["roc_auc_ci"] is not None

    # Provenance answers "AI" where a file declares it and abstains elsewhere: every real
    # image is an abstention, so a ranking metric is undefined rather than made up, and
    # its findings are measured apart, by precision.
    prov = subjects["provenance"]["overall"]
    assert (prov["abstained_ai"], prov["abstained_real"]) == (1, 6)
    assert prov["roc_auc"] is None and prov["fpr_at_threshold"] is None
    assert prov["tpr_at_threshold"] == 1.0
    assert subjects["provenance"]["scores"] == {"ai": [1.0] * 6, "real": []}
    found = document["provenance"]
    assert found["detector"] == "provenance"
    assert found["any"]["flagged"] == found["any"]["flagged_ai"] == 6
    assert found["any"]["precision"] == 1.0
    assert found["any"]["precision_ci"][1] == 1.0 and 0.5 < found["any"]["precision_ci"][0] < 1
    assert found["signals"]["generator_metadata"]["flagged_ai"] == 6
    assert found["signals"]["c2pa"]["flagged"] == 0

    # The ensemble is measured on the stored verdicts' ai_score: recompute its AUC from
    # the evaluation database with scikit-learn.
    with sessions() as session:
        rows = session.execute(
            select(ImageRow.sha256, Verdict.ai_score).join(Verdict, Verdict.image_id == ImageRow.id)
        ).all()
        model_rows = session.execute(
            select(Detection.score).where(Detection.detector_name == "sumsub-mj5")
        ).scalars()
        stored_model_scores = sorted(s for s in model_rows if s is not None)
    by_sha = {sha: score for sha, score in rows if score is not None}
    assert len(by_sha) == 12
    sha_of = {name: _sha256(tmp_path / "set" / name) for name in labels}
    y = [labels[name] for name in labels if sha_of[name] in by_sha]
    s = [by_sha[sha_of[name]] for name in labels if sha_of[name] in by_sha]
    ensemble = subjects[ENSEMBLE]["overall"]
    assert ensemble["roc_auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert sorted(subjects[ENSEMBLE]["scores"]["ai"] + subjects[ENSEMBLE]["scores"]["real"]) == (
        pytest.approx(sorted(s))
    )
    assert sorted(
        subjects["sumsub-mj5"]["scores"]["ai"] + subjects["sumsub-mj5"]["scores"]["real"]
    ) == pytest.approx(stored_model_scores)
    # The provenance finding raises the AI images' ai_score above the model's alone.
    assert ensemble["roc_auc"] >= model_overall["roc_auc"]

    # By generator: a generator's AI images against every real image (no real row names a
    # generator); the broken file counts for its generator as an abstention.
    sdxl = subjects["sumsub-mj5"]["by_generator"]["sdxl"]
    assert (sdxl["n_ai"], sdxl["n_real"], sdxl["abstained_ai"]) == (4, 6, 1)
    mid = subjects["sumsub-mj5"]["by_generator"]["midjourney"]
    assert (mid["n_ai"], mid["n_real"], mid["abstained"]) == (3, 6, 0)
    web = subjects["sumsub-mj5"]["by_group"]["web"]
    assert (web["n_ai"], web["n_real"]) == (3, 3)

    # A second run scores nothing: every detection is reused from the database.
    again = evaluate(dataset, scoring=scoring(detectors, sessions), n_bootstrap=200, seed=7)
    assert (model.calls, proven.calls) == (12, 12)
    assert _stable(again) == _stable(document)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_interrupted_evaluation_resumes_where_it_stopped(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    path, _ = write_set(tmp_path / "set", ["sdxl"] * 5, n_real=5, bad=False)
    dataset = open_dataset(path)
    detector = provenance()

    def stop_after(items: Any, *, total: int, what: str) -> Iterator[Any]:
        for n, item in enumerate(items):
            if n == 4:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        evaluate(dataset, scoring=scoring([detector], sessions), progress=stop_after)
    done = detector.calls
    with sessions() as session:
        stored = len(session.scalars(select(Detection)).all())
    # What was read before the stop is stored; the stream may have scored and stored more.
    assert 4 <= stored <= done <= 10
    document = evaluate(dataset, scoring=scoring([detector], sessions), n_bootstrap=0)
    assert detector.calls - done == 10 - stored  # only what was not stored is scored again
    assert document["provenance"]["any"]["flagged_ai"] == 5


def test_degradations_are_measured_on_copies_made_once(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    path, _ = write_set(tmp_path / "set", ["sdxl", "sdxl"], n_real=2)
    dataset = open_dataset(path)
    detector = provenance()
    work = tmp_path / "degraded"
    document = evaluate(
        dataset, scoring=scoring([detector], sessions), degrade=True, work_dir=work, n_bootstrap=20
    )
    check_document(document, ["provenance"])
    assert [c["name"] for c in document["conditions"]] == list(CONDITIONS)
    assert detector.calls == 4 * 7

    # Each decodable image has one copy per condition, named by its sha256; JPEG for the
    # JPEG conditions. The broken file has none and is not scored in any condition.
    copies = sorted(p.name for p in work.iterdir())
    assert len(copies) == 4 * 6
    shas = {_sha256(tmp_path / "set" / name) for name in ("ai_0.png", "ai_1.png")}
    for sha in shas:
        assert (work / f"{sha}.jpeg_30.jpg").read_bytes()[:2] == b"\xff\xd8"
        assert (work / f"{sha}.blur_5.png").read_bytes()[:4] == b"\x89PNG"
    for condition in document["conditions"]:
        assert condition["not_scored"] == 1
        prov = condition["subjects"]["provenance"]["overall"]
        if condition["name"] == "identity":
            assert prov["answered"] == 2
        else:
            # Re-encoding drops the generator's text chunk: nothing left to find.
            assert prov["answered"] == 0 and prov["abstained"] == 5
    jpeg = work / f"{sorted(shas)[0]}.jpeg_65.jpg"
    assert b"parameters" not in jpeg.read_bytes()
    assert b"parameters" in (tmp_path / "set" / "ai_0.png").read_bytes()

    # A rerun reuses the copies and the stored detections.
    written = {p: p.stat().st_mtime_ns for p in work.iterdir()}
    again = evaluate(
        dataset, scoring=scoring([detector], sessions), degrade=True, work_dir=work, n_bootstrap=20
    )
    assert detector.calls == 4 * 7
    assert {p: p.stat().st_mtime_ns for p in work.iterdir()} == written
    assert _stable(again) == _stable(document)


# --- recorded scores ---------------------------------------------------------------------


def _example(
    i: int, label: ReviewDecision, model: float | None, ai_score: float | None
) -> LabelledExample:
    detectors = (
        [] if ai_score is None else [{"name": "sumsub-mj5", "version": "1+a", "score": model}]
    )
    return LabelledExample(
        sha256=f"{i:064x}",
        label=label,
        decided_at="2026-11-01T10:00:00+00:00",
        decided_by="moderator",
        ensemble_version="weighted-mean@0123456789abcdef",
        ai_score=ai_score,
        detectors=detectors,
        sources=[f"s3://uploads/{i}.jpg"],
    )


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_review_export_is_measured_on_its_recorded_scores(tmp_path: Path, fmt: str) -> None:
    ai, real, unsure = (
        ReviewDecision.AI_GENERATED,
        ReviewDecision.NOT_AI_GENERATED,
        ReviewDecision.UNSURE,
    )
    examples = [
        _example(1, ai, 0.9, 0.9),
        _example(2, ai, 0.7, 0.7),
        _example(3, ai, None, 0.8),  # the model abstained; another detector answered
        _example(4, real, 0.2, 0.2),
        _example(5, real, 0.6, 0.6),
        _example(6, real, 0.1, None),  # a "not scored" verdict: nothing recorded
        _example(7, unsure, 0.5, 0.5),
    ]
    path = tmp_path / f"export.{fmt}"
    with path.open("w", encoding="utf-8", newline="") as out:
        write_examples(examples, fmt, out)  # type: ignore[arg-type]
    dataset = open_dataset(path)
    assert dataset.layout == "review_export"

    with pytest.raises(EvaluationError, match="review export"):
        evaluate(dataset, threshold=0.5, degrade=True, work_dir=tmp_path / "w")
    with pytest.raises(EvaluationError, match="threshold"):
        evaluate(dataset)

    document = evaluate(dataset, threshold=0.5, n_bootstrap=50)
    check_document(document, ["sumsub-mj5"])
    assert document["dataset"]["layout"] == "review_export"
    assert [p["kind"] for p in document["dataset"]["problems"]] == ["unsure"]
    assert document["detectors"] == [
        {"name": "sumsub-mj5", "version": "1+a", "weights_sha256": None}
    ]
    assert document["ensemble_version"] == "weighted-mean@0123456789abcdef"
    assert document["provenance"]["detector"] is None
    (identity,) = document["conditions"]
    assert identity["not_scored"] == 1
    ensemble = identity["subjects"][ENSEMBLE]
    assert sorted(ensemble["scores"]["ai"]) == [0.7, 0.8, 0.9]
    assert sorted(ensemble["scores"]["real"]) == [0.2, 0.6]
    assert ensemble["overall"]["roc_auc"] == pytest.approx(
        roc_auc_score([1, 1, 1, 0, 0], [0.9, 0.7, 0.8, 0.2, 0.6])
    )
    assert ensemble["overall"]["fpr_at_threshold"] == 0.5  # 0.6 of two real answers
    model = identity["subjects"]["sumsub-mj5"]["overall"]
    assert (model["abstained_ai"], model["abstained_real"]) == (1, 1)
    assert model["roc_auc"] == pytest.approx(roc_auc_score([1, 1, 0, 0], [0.9, 0.7, 0.2, 0.6]))


def test_results_are_written_as_strict_json_with_the_report(
    tmp_path: Path, sessions: sessionmaker[Session]
) -> None:
    path, _ = write_set(tmp_path / "set", ["sdxl"], n_real=1)
    document = evaluate(open_dataset(path), scoring=scoring([provenance()], sessions))
    written = write_results(document, tmp_path / "out")
    assert json.loads(written.results.read_text(encoding="utf-8")) == document
    assert written.report.is_file() and written.report.stat().st_size > 0


# --- the command -------------------------------------------------------------------------


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHSENTRY_")}
    env.update(
        SYNTHSENTRY_DATA_DIR=str(data_dir),
        SYNTHSENTRY_LOG_JSON="true",
        HF_HUB_OFFLINE="1",  # no network: the built-in hf:// weights are unavailable
        HF_HOME=str(data_dir / "hf"),
    )
    return env


def _eval(data_dir: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "synthsentry.cli", "eval", *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(data_dir),
        timeout=300,
        check=False,
    )


def test_the_command_writes_results_and_prints_a_summary(tmp_path: Path) -> None:
    path, _ = write_set(tmp_path / "set", ["sdxl", "sdxl"], n_real=2)
    data_dir = tmp_path / "data"
    result = _eval(data_dir, path, "--out", tmp_path / "out", "--bootstrap", "50")
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    check_document(document, ["provenance"])  # the only detector that runs offline here
    assert (tmp_path / "out" / "report.html").is_file()
    assert (data_dir / "eval.db").is_file()
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["identity", "provenance"] for line in lines)
    assert "precision 1.000" in result.stdout


def test_the_command_refuses_what_it_cannot_do(
    tmp_path: Path, isolated_settings: SettingsFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = isolated_settings()
    assert main(["eval", str(tmp_path / "nothing.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err

    export = tmp_path / "export.jsonl"
    with export.open("w", encoding="utf-8") as out:
        write_examples([_example(1, ReviewDecision.AI_GENERATED, 0.9, 0.9)], "jsonl", out)
    assert main(["eval", str(export), "--degrade"]) == 2
    assert "--degrade needs image files" in capsys.readouterr().err

    path, _ = write_set(tmp_path / "set", ["sdxl"], n_real=1, bad=False)
    assert main(["eval", str(path), "--database", settings.resolved_database_url]) == 2
    assert "the service's own database" in capsys.readouterr().err
    assert main(["eval", str(path), "--threshold", "1.5"]) == 2
    assert "--threshold" in capsys.readouterr().err


# --- the shared corpus -------------------------------------------------------------------


def test_the_corpus_end_to_end_with_the_default_detectors(corpus_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "corpus.csv"
    written, problems = corpus_csv(corpus_dir / "MANIFEST.tsv", data)
    rows = list(csv.DictReader(io.StringIO(data.read_text(encoding="utf-8"))))
    assert written == len(rows) > 0
    assert {p.kind for p in problems} <= {ProblemKind.UNLABELLED}  # "unknown" rows left out
    result = _eval(tmp_path / "data", data, "--out", tmp_path / "out", "--bootstrap", "200")
    assert result.returncode == 0, result.stderr
    document = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    names = [d["name"] for d in document["detectors"]]
    check_document(document, names)
    assert "provenance" in names
    assert document["dataset"]["images"] == written
    # Every AI image whose file carries a signal the manifest names (its "signal" column,
    # the CSV's group) is found, and no real image is: on this corpus provenance never
    # accuses a photograph. Files with no named signal may still hide one (a stealth
    # payload in the alpha channel), so those are only bounded.
    ai_rows = [row for row in rows if row["label"] == "ai"]
    by_group = document["conditions"][0]["subjects"]["provenance"]["by_group"]
    for group in {row["group"] for row in ai_rows} - {"none"}:
        in_group = sum(1 for row in ai_rows if row["group"] == group)
        assert by_group[group]["answered"] == by_group[group]["n_ai"] == in_group, group
    found = document["provenance"]["any"]
    signalled = sum(1 for row in ai_rows if row["group"] != "none")
    assert signalled <= found["flagged_ai"] <= len(ai_rows)
    assert found["flagged_real"] == 0 and found["precision"] == 1.0
    assert by_group["none"]["abstained_real"] == by_group["none"]["n_real"] > 0
