"""The `synthsentry scan` contract, exercised as a user would: the real command in a
subprocess, real files, the embedded SQLite database or a real Postgres."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from badfiles import BAD_FILES, make_fifo, make_vanished, sample_picture, write_bad_files
from checkpoints import SUMSUB_MOBILENET, populate_hub_cache, write_sumsub_raw
from conftest import DatabaseFactory

REQUIRED_KEYS = {
    "path",
    "sha256",
    "status",
    "reason",
    "ai_score",
    "flagged",
    "verdict",
    "detectors",
}
TABLES = ("images", "sources", "detections", "verdicts", "review_cases", "audit_log")


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHSENTRY_")}
    env.update(
        SYNTHSENTRY_DATA_DIR=str(data_dir),
        SYNTHSENTRY_LOG_JSON="true",
        HF_HUB_OFFLINE="1",  # no network here; the built-in hf:// weights are unavailable
        HF_HOME=str(data_dir / "hf"),
    )
    env.update(extra)
    return env


Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run(tmp_path: Path) -> Run:
    data_dir = tmp_path / "data"

    def run(*args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "synthsentry.cli", *map(str, args)],
            capture_output=True,
            text=True,
            env=_env(data_dir, **env),
            timeout=600,
            check=False,
        )

    return run


def _lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def _counts(db_file: Path) -> dict[str, int]:
    with sqlite3.connect(db_file) as connection:
        return {t: connection.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


@pytest.fixture(scope="module")
def mj5_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint in the published Sumsub format with the MobileNetV3-L backbone."""
    path = tmp_path_factory.mktemp("weights") / "mj5.pt"
    write_sumsub_raw(path, SUMSUB_MOBILENET, seed=3)
    return path


@pytest.fixture
def mixed_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Good pictures and every kind of bad file; returns {relative path: expected status or
    rejection reason}."""
    folder = tmp_path / "uploads"
    (folder / "nested").mkdir(parents=True)
    expected: dict[str, str] = {}
    for name, reason in write_bad_files(folder).items():
        expected[name] = reason.value
    sample_picture((200, 150)).save(folder / "landscape.jpg", quality=90)
    sample_picture((90, 160)).convert("RGBA").save(folder / "nested" / "portrait.png")
    sample_picture((64, 64)).save(folder / "nested" / "misnamed.gif", "PNG")
    expected.update({"landscape.jpg": "scored", "nested/portrait.png": "scored"})
    expected["nested/misnamed.gif"] = "scored"
    return folder, expected


def test_scan_json_contract(
    run: Run, mixed_folder: tuple[Path, dict[str, str]], mj5_weights: Path
) -> None:
    folder, expected = mixed_folder
    result = run("scan", folder, "--json", "--detector", f"sumsub-mj5={mj5_weights}")
    lines = _lines(result)
    by_path = {str(Path(str(line["path"])).relative_to(folder)): line for line in lines}
    assert set(by_path) == set(expected), "one result per file, no more, no less"
    for rel, want in expected.items():
        line = by_path[rel]
        assert set(line) >= REQUIRED_KEYS, rel
        if want == "scored":
            assert line["status"] == "scored" and line["reason"] is None, line
            score = line["ai_score"]
            assert isinstance(score, float) and 0.0 <= score <= 1.0
            assert line["verdict"] in {"likely_ai", "no_indication"}
            assert line["flagged"] == (score >= 0.5)
            (detector,) = line["detectors"]  # type: ignore[misc]
            assert detector["name"] == "sumsub-mj5"
            assert detector["score"] == pytest.approx(score)
            assert detector["version"].startswith("1+o")
            assert detector["evidence"]["p_ai"] == pytest.approx(score)
            assert len(str(line["sha256"])) == 64
        else:
            assert line["status"] == "rejected", (rel, line)
            assert line["reason"] == want, (rel, line)
            # Not scored, with the reason; a recognised image the decoder refused goes to
            # review by default (SYNTHSENTRY_REVIEW_UNSCORED_REASONS).
            assert line["verdict"] == "not_scored", (rel, line)
            reviewed = want in {"decode_error", "decode_timeout", "truncated"}
            assert line["flagged"] is reviewed, (rel, line)
            assert str(line["verdict_reason"]).startswith(f"not scored ({want})")
            review = line["review"]
            assert (review is not None and review["state"] == "open") is reviewed, (rel, line)
            assert line["ai_score"] is None and line["detectors"] == []
            assert line["message"], "every rejection carries a human message"


def test_rescan_reuses_results_and_adds_no_rows(
    run: Run, tmp_path: Path, mixed_folder: tuple[Path, dict[str, str]], mj5_weights: Path
) -> None:
    folder, _ = mixed_folder
    detector = f"sumsub-mj5={mj5_weights}"
    first = _lines(run("scan", folder, "--json", "--detector", detector))
    db_file = tmp_path / "data" / "synthsentry.db"
    before = _counts(db_file)
    second = _lines(run("scan", folder, "--json", "--detector", detector))
    assert _counts(db_file) == before
    assert before["detections"] == sum(1 for line in first if line["status"] == "scored")
    scored_again = [line for line in second if line["status"] == "scored"]
    assert scored_again and all(d["reused"] for line in scored_again for d in line["detectors"])  # type: ignore[attr-defined]
    assert [line["ai_score"] for line in first] == [line["ai_score"] for line in second]
    with sqlite3.connect(db_file) as connection:
        seen = connection.execute("SELECT max(seen_count) FROM sources").fetchone()[0]
    assert seen == 2


def test_same_bytes_under_two_names_share_results_but_both_sources_are_kept(
    run: Run, tmp_path: Path, mj5_weights: Path
) -> None:
    folder = tmp_path / "copies"
    folder.mkdir()
    sample_picture().save(folder / "a.png")
    shutil.copyfile(folder / "a.png", folder / "b.png")
    lines = _lines(run("scan", folder, "--json", "--detector", f"sumsub-mj5={mj5_weights}"))
    assert lines[0]["sha256"] == lines[1]["sha256"]
    counts = _counts(tmp_path / "data" / "synthsentry.db")
    assert (counts["images"], counts["sources"], counts["detections"]) == (1, 2, 1)


def test_default_ensemble_names_what_it_skipped(run: Run, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    sample_picture().save(folder / "a.png")
    result = run("scan", folder, "--json")
    (line,) = _lines(result)
    for name in ("sumsub-v2", "sumsub-mj5", "commfor-vit384"):
        assert f"skipped detector {name}:" in result.stderr
    assert "hf://Sumsub/Sumsub-ffs-synthetic-2.0" in result.stderr
    assert line["status"] == "scored"
    # Only the model-free provenance check runs, and a plain drawing says nothing of origin.
    assert [d["name"] for d in line["detectors"]] == ["provenance"]  # type: ignore[union-attr]
    assert line["verdict"] == "inconclusive" and line["ai_score"] is None
    assert line["flagged"] is False


def test_default_ensemble_downloads_nothing_and_says_how_to_get_weights(
    run: Run, tmp_path: Path
) -> None:
    sample_picture().save(tmp_path / "a.png")
    result = run("scan", tmp_path / "a.png", "--json", HF_HUB_OFFLINE="0")
    assert result.returncode == 0, result.stderr
    assert "hf://OwensLab/commfor-model-384 are not in the local Hugging Face cache" in (
        result.stderr
    )
    assert "--detector commfor-vit384" in result.stderr


def test_default_ensemble_uses_weights_already_in_the_hub_cache(
    run: Run, tmp_path: Path, mj5_weights: Path
) -> None:
    # Laid out as huggingface_hub caches a download of the published repo.
    populate_hub_cache(
        tmp_path / "data" / "hf" / "hub",
        "Sumsub/Sumsub-ffs-synthetic-1.0_mj_5",
        {"model.pt": mj5_weights.read_bytes()},
        commit="4" * 40,
        ref="main",
    )
    sample_picture().save(tmp_path / "a.png")
    result = run("scan", tmp_path / "a.png", "--json")
    (line,) = _lines(result)
    names = [d["name"] for d in line["detectors"]]  # type: ignore[union-attr]
    assert names == ["sumsub-mj5", "provenance"]  # the registry's order
    assert "skipped detector sumsub-mj5" not in result.stderr
    assert "skipped detector sumsub-v2" in result.stderr
    assert line["ai_score"] is not None


def test_table_output_and_policy_footer(
    run: Run, mixed_folder: tuple[Path, dict[str, str]], mj5_weights: Path
) -> None:
    folder, expected = mixed_folder
    result = run("scan", folder, "--detector", f"sumsub-mj5={mj5_weights}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("VERDICT")
    assert "rejected: too_many_pixels" in result.stdout
    assert f"{len(expected)} files:" in result.stdout
    assert "indication for human review, not proof" in result.stdout


def test_help_states_the_policy(run: Run) -> None:
    result = run("scan", "--help")
    assert result.returncode == 0
    assert "not proof" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--detector", "no-such-detector"], "unknown detector 'no-such-detector'"),
        (["--threshold", "1.5"], "--threshold must be between 0 and 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_usage_errors_exit_2_with_a_message(
    run: Run, tmp_path: Path, args: list[str], message: str
) -> None:
    result = run("scan", tmp_path, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_an_object_key_that_is_not_utf8_is_a_usage_error(run: Run) -> None:
    result = run("status", os.fsdecode(b"s3://bucket/caf\xe9.png"))
    assert result.returncode == 2
    assert "not valid UTF-8" in result.stderr and "caf\\xe9.png" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--detector", "provenance", "--pool", "prefork"], "runs on threads"),
        (["--detector", "provenance", "--batch-size", "0"], "--batch-size and --concurrency"),
        (["--detector", "nope"], "unknown detector 'nope'"),
        (["--detector", "provenance", "--device", "tpu"], "device must be 'cpu', 'cuda'"),
    ],
)
def test_worker_usage_errors_exit_2_before_connecting(
    run: Run, args: list[str], message: str
) -> None:
    # The broker URL points nowhere: the options are refused before anything connects.
    result = run("worker", *args, SYNTHSENTRY_BROKER_URL="redis://127.0.0.1:1/0")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize("command", [["status", "s3://b/k"], ["reconcile", "--once"]])
def test_an_unknown_fleet_detector_is_a_usage_error(run: Run, command: list[str]) -> None:
    result = run(*command, SYNTHSENTRY_FLEET_DETECTORS='["provenance", "nope"]')
    assert result.returncode == 2, result.stderr
    assert "SYNTHSENTRY_FLEET_DETECTORS names unknown detectors: nope" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_short_visibility_timeout_is_refused(run: Run, tmp_path: Path) -> None:
    """A message must not be handed to a second worker while the first still holds it."""
    result = run(
        "scan",
        tmp_path,
        SYNTHSENTRY_TASK_TIME_LIMIT_SECONDS="60",
        SYNTHSENTRY_VISIBILITY_TIMEOUT_SECONDS="100",
    )
    assert result.returncode == 2
    assert "VISIBILITY_TIMEOUT_SECONDS (100) must exceed twice" in result.stderr


def test_requested_detector_without_weights_is_an_error_naming_the_uri(
    run: Run, tmp_path: Path
) -> None:
    result = run("scan", tmp_path, "--detector", "sumsub-v2")
    assert result.returncode == 1
    assert "hf://Sumsub/Sumsub-ffs-synthetic-2.0" in result.stderr


def test_bad_configuration_is_a_usage_error(run: Run, tmp_path: Path) -> None:
    result = run("scan", tmp_path, SYNTHSENTRY_DEVICE="tpu")
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr and "device" in result.stderr


def test_missing_unreadable_and_vanished_paths_are_results(run: Run, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    pipe = make_fifo(folder)  # a path that cannot be read as a file, even by root
    vanished = make_vanished(folder)
    lines = _lines(run("scan", tmp_path / "never-existed.jpg", pipe, vanished, "--json"))
    assert [line["reason"] for line in lines] == ["missing", "unreadable", "missing"]
    # Found by walking a folder, the pipe is a result too (and does not block the walk).
    (walked,) = _lines(run("scan", folder, "--json"))
    assert (walked["path"], walked["reason"]) == (str(pipe), "unreadable")


def test_thousand_files_with_bad_ones_are_all_accounted_for(run: Run, tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    picture = sample_picture((48, 32))
    for i in range(960):
        # Distinct bytes per file, as real uploads would be.
        picture.putpixel((i % 48, (i // 48) % 32), (i % 256, 0, 0))
        picture.save(folder / f"img_{i:04d}.png")
    bad = write_bad_files(folder / "bad")
    for i in range(40 - len(bad)):
        (folder / "bad" / f"junk_{i}.jpg").write_bytes(b"not an image %d" % i)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert len(files) == 1000
    lines = _lines(run("scan", folder, "--json", "--batch-size", "32"))
    assert len(lines) == 1000
    assert {str(line["path"]) for line in lines} == {str(p) for p in files}
    assert sum(line["status"] == "scored" for line in lines) == 960
    assert sum(line["status"] == "rejected" for line in lines) == 40


def test_a_damaged_ancillary_chunk_is_scored_and_named_in_the_image_evidence(
    run: Run, tmp_path: Path
) -> None:
    """A bad-CRC text chunk and an inflation bomb do not opt a PNG out of moderation: it is
    scored, the skipped chunks are listed, and they are stored with the image."""
    import io

    from badfiles import inflation_bomb, png_chunk, png_inserting, with_bad_crc

    folder = tmp_path / "damaged"
    folder.mkdir()
    clean = io.BytesIO()
    sample_picture((80, 60)).save(clean, "PNG")
    damaged = png_inserting(
        clean.getvalue(),
        [with_bad_crc(png_chunk(b"tEXt", b"Comment\x00hello")), inflation_bomb(b"iCCP")],
    )
    (folder / "damaged.png").write_bytes(damaged)
    (line,) = _lines(run("scan", folder, "--json", "--detector", "provenance"))
    assert line["status"] == "scored", line
    anomalies = line["image"]["anomalies"]  # type: ignore[index]
    assert len(anomalies) == 2 and any("CRC" in a for a in anomalies), anomalies
    with sqlite3.connect(tmp_path / "data" / "synthsentry.db") as connection:
        (stored,) = connection.execute("SELECT anomalies FROM images").fetchone()
    assert json.loads(stored) == anomalies


def _remove_deep(top: Path) -> None:
    """Remove a folder chain of any depth, deepest first, without recursion."""
    chain = [str(top)]
    while os.path.isdir(os.path.join(chain[-1], "d")):
        chain.append(os.path.join(chain[-1], "d"))
    for folder in reversed(chain):
        for name in os.listdir(folder):
            if not os.path.isdir(os.path.join(folder, name)):
                os.unlink(os.path.join(folder, name))
        os.rmdir(folder)


def test_a_folder_of_hostile_names_trees_and_files_gets_one_line_per_file(
    run: Run, tmp_path: Path, mj5_weights: Path, request: pytest.FixtureRequest
) -> None:
    """File names are bytes: a Latin-1 name gets its line (printable text plus its exact
    bytes), in JSON and in the table, and is stored; a tree deeper than Python's recursion
    limit is walked; every kind of bad file beside them is a result; the run exits 0."""
    import base64

    folder = tmp_path / "names"
    folder.mkdir()
    latin1 = os.fsdecode(bytes(folder) + b"/caf\xe9.png")
    sample_picture((60, 40)).save(latin1, "PNG")
    (Path(os.fsdecode(bytes(folder) + b"/bad-\xff.jpg"))).write_bytes(b"not an image")
    sample_picture((40, 60)).save(folder / "plain.png")
    deep = folder / "deep"
    nested = str(deep)
    for _ in range(1101):  # os.makedirs recurses once per level, so not used here
        os.mkdir(nested)
        nested = os.path.join(nested, "d")
    nested = os.path.dirname(nested)
    sample_picture((50, 50)).save(os.path.join(nested, "bottom.png"))

    request.addfinalizer(lambda: _remove_deep(deep))  # rmtree recurses once per level
    hostile = {
        f"hostile/{name}": reason.value
        for name, reason in write_bad_files(folder / "hostile").items()
    }

    weights = f"sumsub-mj5={mj5_weights}"
    lines = _lines(run("scan", folder, "--json", "--detector", weights))
    by_bytes = {
        base64.b64decode(str(line["path_bytes"]))
        if line["path_bytes"]
        else os.fsencode(str(line["path"])): line
        for line in lines
    }
    assert len(lines) == 4 + len(hostile) and len(by_bytes) == len(lines)
    for name, reason in hostile.items():
        line = by_bytes[os.fsencode(folder / name)]
        assert (line["status"], line["reason"]) == ("rejected", reason), line
    cafe = by_bytes[bytes(folder) + b"/caf\xe9.png"]
    assert cafe["status"] == "scored" and cafe["path"] == f"{folder}/caf\\xe9.png"
    bad = by_bytes[bytes(folder) + b"/bad-\xff.jpg"]
    assert (bad["status"], bad["reason"]) == ("rejected", "not_an_image")
    assert by_bytes[os.fsencode(folder / "plain.png")]["path_bytes"] is None
    assert by_bytes[os.fsencode(os.path.join(nested, "bottom.png"))]["status"] == "scored"
    stored = _counts(tmp_path / "data" / "synthsentry.db")
    # Every file whose bytes were read has a verdict: scored, or "not scored".
    assert stored["sources"] == len(lines)
    assert stored["verdicts"] == sum(1 for line in lines if line["sha256"])

    table = run("scan", folder, "--detector", weights)
    assert table.returncode == 0, table.stderr
    assert f"{folder}/caf\\xe9.png" in table.stdout
    assert f"{len(lines)} files" in table.stdout


@pytest.fixture
def fresh_postgres_url(committing_database: DatabaseFactory) -> str:
    # The CLI commits, so it gets a database of its own rather than the rolled-back one,
    # not yet migrated: the test checks that the scanner refuses it.
    return committing_database("cli", migrated=False)


def test_scan_into_postgres(
    run: Run, tmp_path: Path, fresh_postgres_url: str, mj5_weights: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    sample_picture().save(folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"")
    env = {"SYNTHSENTRY_DATABASE_URL": fresh_postgres_url}

    refused = run("scan", folder, "--json", **env)
    assert refused.returncode == 1
    assert "synthsentry db upgrade" in refused.stderr

    upgraded = run("db", "upgrade", **env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "password" not in upgraded.stdout
    detector = f"sumsub-mj5={mj5_weights}"
    first = _lines(run("scan", folder, "--json", "--detector", detector, **env))
    _lines(run("scan", folder, "--json", "--detector", detector, **env))
    engine = sa.create_engine(fresh_postgres_url)
    with engine.connect() as connection:
        counts = {
            t: connection.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES
        }
        reasons = connection.execute(sa.text("SELECT reject_reason FROM sources")).scalars()
        assert sorted(r or "" for r in reasons) == ["", "empty"]
    engine.dispose()
    assert (counts["images"], counts["sources"], counts["detections"], counts["verdicts"]) == (
        1,
        2,
        1,
        1,
    )
    assert [line["status"] for line in first] == ["scored", "rejected"]


def test_corpus_scan_is_stored_once(
    run: Run, tmp_path: Path, corpus_dir: Path, mj5_weights: Path
) -> None:
    images = corpus_dir / "images"
    files = sorted(p for p in images.rglob("*") if p.is_file())
    detector = f"sumsub-mj5={mj5_weights}"
    lines = _lines(run("scan", images, "--json", "--detector", detector, "--batch-size", "16"))
    assert len(lines) == len(files)
    assert all(set(line) >= REQUIRED_KEYS for line in lines)
    db_file = tmp_path / "data" / "synthsentry.db"
    before = _counts(db_file)
    assert before["sources"] == len(files)
    assert before["detections"] == sum(1 for line in lines if line["status"] == "scored")
    _lines(run("scan", images, "--json", "--detector", detector))
    assert _counts(db_file) == before


def test_bad_files_fixture_is_complete() -> None:
    # The contract tests above rely on every rejection reason that a file can produce.
    reasons = {reason.value for reason in BAD_FILES.values()}
    assert {
        "empty",
        "not_an_image",
        "truncated",
        "too_many_pixels",
        "unsupported_format",
        "decode_error",
        "too_large",
    } <= reasons


def test_detectors_list_reports_weights_status(run: Run, tmp_path: Path, mj5_weights: Path) -> None:
    config = tmp_path / "detectors.toml"
    config.write_text(
        f'[detectors.local-mj5]\nfamily = "sumsub"\nweights = "{mj5_weights}"\n'
        f'[detectors.local-mj5.options]\nbackbone = "{SUMSUB_MOBILENET}"\n'
        '[detectors.gone]\nfamily = "sumsub"\nweights = "/nonexistent/w.pt"\n',
        encoding="utf-8",
    )
    result = run("detectors", "list", "--json", SYNTHSENTRY_DETECTOR_CONFIG=str(config))
    rows = {row["name"]: row for row in _lines(result)}
    assert rows["local-mj5"]["weights_status"] == "local"
    assert rows["gone"]["weights_status"] == "missing"
    assert rows["sumsub-v2"]["weights_status"] == "not on this machine"
    assert rows["commfor-vit384"]["device"] == "cpu"
    table = run("detectors", "list", SYNTHSENTRY_DETECTOR_CONFIG=str(config))
    assert table.returncode == 0 and "WEIGHTS STATUS" in table.stdout


def test_detectors_verify_loads_checks_and_times(run: Run, mj5_weights: Path) -> None:
    import hashlib

    result = run("detectors", "verify", f"sumsub-mj5={mj5_weights}")
    assert result.returncode == 0, result.stderr
    digest = hashlib.sha256(mj5_weights.read_bytes()).hexdigest()
    assert f"weights sha256  {digest}" in result.stdout
    assert "first forward" in result.stdout and "probe score" in result.stdout


def test_detectors_verify_refuses_a_pinned_hash_mismatch(
    run: Run, tmp_path: Path, mj5_weights: Path
) -> None:
    config = tmp_path / "detectors.toml"
    config.write_text(
        f'[detectors.pinned]\nfamily = "sumsub"\nweights = "{mj5_weights}"\nsha256 = "{"0" * 64}"\n'
        f'[detectors.pinned.options]\nbackbone = "{SUMSUB_MOBILENET}"\n',
        encoding="utf-8",
    )
    result = run("detectors", "verify", "pinned", SYNTHSENTRY_DETECTOR_CONFIG=str(config))
    assert result.returncode == 1
    assert "sha256" in result.stderr and "0" * 64 in result.stderr


def test_production_refuses_the_embedded_database(run: Run, tmp_path: Path) -> None:
    result = run("scan", tmp_path, SYNTHSENTRY_ENVIRONMENT="production")
    assert result.returncode == 2
    assert "SYNTHSENTRY_DATABASE_URL must be set" in result.stderr
