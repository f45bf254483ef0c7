"""Group writes (a scan stores the files that arrived together in a few statements) leave
exactly the rows that the same writes one at a time leave, on Postgres and on SQLite."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import repository
from db.migrate import upgrade
from db.models import (
    AuditEvent,
    Detection,
    Image,
    ReviewCase,
    ReviewCaseSignal,
    ReviewState,
    Source,
    SourceKind,
    SourceStatus,
    Verdict,
    VerdictLabel,
)

ENSEMBLE = repository.EnsembleRecord("weighted-mean@" + "e" * 16, "e" * 64, {"threshold": 0.5})


@pytest.fixture(params=["postgresql", "sqlite"])
def session(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[Session]:
    if request.param == "postgresql":
        yield request.getfixturevalue("db_session")
        return
    upgrade(sqlite_url)
    engine = sqlalchemy.create_engine(sqlite_url)
    with Session(engine) as opened:
        yield opened
    engine.dispose()


def _sha(prefix: str, n: int) -> str:
    return (prefix + str(n)).ljust(64, "0")


def _facts(prefix: str, n: int) -> repository.ImageFacts:
    return repository.ImageFacts(sha256=_sha(prefix, n), size_bytes=100 + n, format="PNG")


def _ref(prefix: str, name: str) -> repository.SourceRef:
    return repository.SourceRef(SourceKind.CLI, f"{prefix}/{name}", local_path=f"/{name}")


def _detection(name: str, score: float | None) -> repository.DetectionRecord:
    return repository.DetectionRecord(
        detector_name=name,
        detector_version="1",
        weights_sha256=None,
        score=score,
        evidence={"items": [{"kind": "c2pa", "ai": True}]} if name == "prov" else {},
        latency_ms=1.0,
        error=None if score is not None else "RuntimeError: out of memory",
    )


def _verdict(ensemble_id: int, label: VerdictLabel, score: float) -> repository.VerdictRecord:
    flagged = label == VerdictLabel.LIKELY_AI
    return repository.VerdictRecord(
        ensemble_id=ensemble_id,
        ensemble_version=ENSEMBLE.version,
        detector_set_digest="d" * 64,
        detector_set={"detectors": [{"name": "model", "version": "1", "score": score}]},
        ai_score=score,
        label=label,
        flagged=flagged,
        reason="because",
    )


def _one_at_a_time(session: Session, prefix: str, ensemble_id: int) -> list[Any]:
    """The scenario with the single-row functions; returns what each call returned."""
    images = {n: repository.get_or_create_image(session, _facts(prefix, n)).id for n in (1, 2, 3)}
    returned: list[Any] = []
    for name, image, reason in [
        ("a", 1, None),
        ("b", 2, None),
        ("b", 2, None),  # the same file twice
        ("gone", None, "missing"),
        ("big", 3, "too_large"),
    ]:
        source, _ = repository.record_source(session, _ref(prefix, name), None)
        if image is not None:
            repository.attach_image(session, source.id, images[image])
        if reason is not None:
            repository.mark_source_rejected(session, source.id, reason, f"{name} refused")
        returned.append(source.id)
    for image, name, score in [(1, "model", 0.9), (1, "prov", None), (2, "model", 0.2)]:
        returned.append(
            repository.save_detection(session, images[image], _detection(name, score)).id
        )
    returned.append(repository.save_detection(session, images[1], _detection("prov", 0.7)).id)
    for image, label, score in [
        (1, VerdictLabel.LIKELY_AI, 0.9),
        (2, VerdictLabel.NO_INDICATION, 0.2),
        (2, VerdictLabel.NO_INDICATION, 0.2),
    ]:
        verdict, created = repository.save_verdict(
            session, images[image], _verdict(ensemble_id, label, score), actor="t"
        )
        returned.append((verdict.id, created))
    return returned


def _grouped(session: Session, prefix: str, ensemble_id: int) -> list[Any]:
    """The same scenario with the group functions, each group in one call."""
    images = repository.get_or_create_images(session, [_facts(prefix, n) for n in (1, 2, 2, 3)])
    image = {n: images[_sha(prefix, n)] for n in (1, 2, 3)}
    returned: list[Any] = repository.record_sources(
        session,
        [
            repository.SourceIntake(_ref(prefix, "a"), image[1]),
            repository.SourceIntake(_ref(prefix, "b"), image[2]),
            repository.SourceIntake(_ref(prefix, "b"), image[2]),
            repository.SourceIntake(_ref(prefix, "gone"), None, "missing", "gone refused"),
            repository.SourceIntake(_ref(prefix, "big"), image[3], "too_large", "big refused"),
        ],
    )
    saved = repository.save_detections(
        session,
        [
            (image[1], _detection("model", 0.9)),
            (image[1], _detection("prov", None)),
            (image[2], _detection("model", 0.2)),
        ],
    )
    returned += [row.id for row in saved]
    (answered,) = repository.save_detections(session, [(image[1], _detection("prov", 0.7))])
    returned.append(answered.id)
    verdicts = repository.save_verdicts(
        session,
        [
            (image[1], _verdict(ensemble_id, VerdictLabel.LIKELY_AI, 0.9)),
            (image[2], _verdict(ensemble_id, VerdictLabel.NO_INDICATION, 0.2)),
            (image[2], _verdict(ensemble_id, VerdictLabel.NO_INDICATION, 0.2)),
        ],
        actor="t",
    )
    returned += [(verdict.id, created) for verdict, created in verdicts]
    return returned


def _stored(session: Session, prefix: str) -> dict[str, Any]:
    """Every row the scenario left under ``prefix``, without ids and times."""
    session.flush()
    images = {
        row.id: row.sha256.removeprefix(prefix)
        for row in session.scalars(select(Image).where(Image.sha256.startswith(prefix)))
    }
    sources = sorted(
        (
            s.ref_key.removeprefix(prefix),
            images.get(s.image_id) if s.image_id else None,
            s.status.value,
            s.reject_reason,
            s.reject_message,
            s.seen_count,
        )
        for s in session.scalars(select(Source).where(Source.ref_key.startswith(prefix + "/")))
    )
    detections = sorted(
        (images[d.image_id], d.detector_name, d.score, d.error, str(d.evidence))
        for d in session.scalars(select(Detection).where(Detection.image_id.in_(images)))
    )
    verdicts = {
        v.id: v for v in session.scalars(select(Verdict).where(Verdict.image_id.in_(images)))
    }
    cases = {
        c.id: c for c in session.scalars(select(ReviewCase).where(ReviewCase.image_id.in_(images)))
    }
    signals = sorted(
        (images[cases[s.case_id].image_id], s.kind, s.value)
        for s in session.scalars(
            select(ReviewCaseSignal).where(ReviewCaseSignal.case_id.in_(cases))
        )
    )
    audit = sorted(
        (e.action, e.subject_type)
        for e in session.scalars(
            select(AuditEvent).where(
                (AuditEvent.subject_type == "verdict") & AuditEvent.subject_id.in_(verdicts)
                | (AuditEvent.subject_type == "review_case") & AuditEvent.subject_id.in_(cases)
            )
        )
    )
    return {
        "images": sorted(images.values()),
        "sources": sources,
        "detections": detections,
        "verdicts": sorted(
            (images[v.image_id], v.label.value, v.flagged, v.ai_score) for v in verdicts.values()
        ),
        "cases": sorted((images[c.image_id], c.state.value, c.score) for c in cases.values()),
        "signals": signals,
        "audit": audit,
    }


def test_a_group_stores_what_the_same_writes_one_at_a_time_store(session: Session) -> None:
    ensemble_id = repository.register_ensemble(session, ENSEMBLE).id
    single = _one_at_a_time(session, "s", ensemble_id)
    grouped = _grouped(session, "g", ensemble_id)
    expected = _stored(session, "s")
    assert _stored(session, "g") == expected
    # The scenario is not empty: the same file twice is one source seen twice, a refusal
    # keeps its reason, a failure was replaced by an answer, one verdict opened a case with
    # its signals, and the verdict repeated in its group was stored once.
    assert ("/b", "2".ljust(63, "0"), "pending", None, None, 2) in expected["sources"]
    assert ("/big", "3".ljust(63, "0"), "rejected", "too_large", "big refused", 1) in expected[
        "sources"
    ]
    assert [d[3] for d in expected["detections"]] == [None, None, None]
    assert expected["cases"] == [("1".ljust(63, "0"), "open", 0.9)]
    assert {kind for _, kind, _ in expected["signals"]} == {"detector", "provenance", "source"}
    assert expected["audit"].count(("verdict.created", "verdict")) == 2
    # What the calls returned has the same shape: a source named twice is one id, the
    # answered detection is the row of the failure it replaced, a repeated verdict is the
    # same row and not stored twice.
    for returned in (single, grouped):
        sources, detections, verdicts = returned[:5], returned[5:9], returned[9:]
        assert sources[1] == sources[2] and len(set(sources)) == 4
        assert detections[3] == detections[1]
        assert [created for _, created in verdicts] == [True, True, False]
        assert verdicts[1][0] == verdicts[2][0]


def test_a_source_seen_again_keeps_its_status_unless_refused(session: Session) -> None:
    """A file scanned before is seen again (its count grows); it stays scored until the new
    scan stores its verdict, unless this intake refused it."""
    image = repository.get_or_create_images(session, [_facts("x", 1)])[_sha("x", 1)]
    kept, refused = _ref("x", "kept"), _ref("x", "refused")
    first = repository.record_sources(
        session, [repository.SourceIntake(kept, image), repository.SourceIntake(refused, image)]
    )
    repository.mark_sources_scored(session, first)
    again = repository.record_sources(
        session,
        [
            repository.SourceIntake(kept, image),
            repository.SourceIntake(refused, None, "decode_error", "broken now"),
        ],
    )
    assert again == first
    rows = {s.ref_key: s for s in session.scalars(select(Source).where(Source.id.in_(first)))}
    for row in rows.values():
        session.refresh(row)
    assert (rows[kept.ref_key].status, rows[kept.ref_key].seen_count) == (SourceStatus.SCORED, 2)
    assert rows[refused.ref_key].status == SourceStatus.REJECTED
    assert rows[refused.ref_key].reject_message == "broken now"
    assert rows[refused.ref_key].image_id == image  # an unread refusal keeps the bytes known


def test_reused_detections_and_reviews_of_a_group(session: Session) -> None:
    ensemble_id = repository.register_ensemble(session, ENSEMBLE).id
    ids = repository.get_or_create_images(session, [_facts("r", n) for n in (1, 2, 3)])
    one, two, three = (ids[_sha("r", n)] for n in (1, 2, 3))
    repository.save_detections(
        session, [(one, _detection("model", 0.9)), (two, _detection("model", None))]
    )
    reusable = repository.reusable_detections_of(session, [one, two, three], {"model": "1"})
    assert {image: set(found) for image, found in reusable.items()} == {
        one: {"model"},
        two: set(),  # a failure is run again
        three: set(),
    }
    assert repository.reusable_detections_of(session, [one], {"model": "2"}) == {one: {}}
    repository.save_verdicts(
        session,
        [
            (one, _verdict(ensemble_id, VerdictLabel.LIKELY_AI, 0.9)),
            (two, _verdict(ensemble_id, VerdictLabel.NO_INDICATION, 0.1)),
        ],
        actor="t",
    )
    repository.lock_images(session, [three, one, two, one])
    found = repository.with_verdicts_of(
        session, [one, two, three], ensemble_version=ENSEMBLE.version
    )
    assert set(found) == {one}
    single = repository.with_verdicts(session, one, ensemble_version=ENSEMBLE.version)
    assert single is not None and found[one].case.id == single.case.id
    assert found[one].opened_by.id == single.opened_by.id
    current = found[one].current
    assert current is not None and single.current is not None
    assert current.id == single.current.id


def test_a_later_verdict_in_the_group_follows_the_case_the_group_opened(
    session: Session,
) -> None:
    """A flagged verdict, then one that clears the image, both in one group: the case the
    first opens is withdrawn by the second, as when they are saved one at a time."""
    ensemble_id = repository.register_ensemble(session, ENSEMBLE).id
    ids = repository.get_or_create_images(session, [_facts("w", 1), _facts("w", 2)])
    one, two = ids[_sha("w", 1)], ids[_sha("w", 2)]
    flagged = _verdict(ensemble_id, VerdictLabel.LIKELY_AI, 0.9)
    cleared = dataclasses.replace(
        _verdict(ensemble_id, VerdictLabel.NO_INDICATION, 0.1), detector_set_digest="c" * 64
    )
    for verdict in (flagged, cleared):
        repository.save_verdict(session, one, verdict, actor="t")
    repository.save_verdicts(session, [(two, flagged), (two, cleared)], actor="t")
    cases = repository.cases_for_images(session, [one, two])
    for case in cases.values():
        session.refresh(case)
    assert [cases[image].state for image in (one, two)] == [ReviewState.WITHDRAWN] * 2
    actions = {
        image: [
            e.action
            for e in session.scalars(
                select(AuditEvent)
                .where(
                    AuditEvent.subject_type == "review_case",
                    AuditEvent.subject_id == cases[image].id,
                )
                .order_by(AuditEvent.id)
            )
        ]
        for image in (one, two)
    }
    assert actions[one] == actions[two] == ["review_case.opened", "review_case.withdrawn"]
