"""the review dashboard: claim leases, queue order and filters, every decision, sessions

- ``review_cases``: the state ``escalated``; ``score`` and ``queue_key`` (the queue's
  order), ``lease_expires_at`` (a claim is a lease), ``reviews_required`` (2 for a blind
  second review).
- ``review_decisions``: every moderator's decision on a case (the case keeps the final one).
- ``review_case_signals``: what the queue filters by (detector fired, provenance kind,
  source kind).
- ``dashboard_sessions``: signed-in dashboard sessions; ``api_tokens.blur_images``: a
  moderator's default for blurring images.

The backfill reads review cases only (one row per flagged image, thousands rather than
millions): their score from the verdict that opened them, the queue order from it, and
their filter signals. A case decided before this revision gets its decision copied into
``review_decisions`` so agreement and the export see it.

Rolling upgrade: the previous release's code cannot load a case in the state
``escalated``; stop its API processes before the new ones serve the dashboard.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 05:10:00
"""

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATES_BEFORE = ("open", "claimed", "decided", "withdrawn")
STATES_AFTER = (*STATES_BEFORE, "escalated")
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# Times bound through the column type, so SQLite stores them in the application's format.
_WHEN = sa.DateTime(timezone=True)
# The queue's default: one point of score counts as a day of waiting (workers.review).
_SCORE_HOURS = 24.0
_NO_SCORE = 0.5
HELD_CASE = "state IN ('claimed', 'escalated') AND assignee IS NOT NULL"


def upgrade() -> None:
    _set_states(STATES_BEFORE, STATES_AFTER)
    with op.batch_alter_table("review_cases") as batch:
        batch.add_column(sa.Column("score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("queue_key", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("reviews_required", sa.Integer(), server_default="1", nullable=False)
        )
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(
            sa.Column("blur_images", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
    op.create_table(
        "review_decisions",
        sa.Column("id", _ID, nullable=False),
        sa.Column("case_id", _ID, nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column(
            "decision",
            sa.Enum(
                "ai_generated",
                "not_ai_generated",
                "unsure",
                name="review_decision",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("from_state", sa.String(length=32), nullable=False),
        sa.Column("verdict_id", _ID, nullable=True),
        sa.Column("blind", sa.Boolean(), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["case_id"], ["review_cases.id"], name=op.f("fk_review_decisions_case_id_review_cases")
        ),
        sa.ForeignKeyConstraint(
            ["verdict_id"], ["verdicts.id"], name=op.f("fk_review_decisions_verdict_id_verdicts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_decisions")),
    )
    op.create_index(op.f("ix_review_decisions_case_id"), "review_decisions", ["case_id"])
    op.create_index(op.f("ix_review_decisions_actor"), "review_decisions", ["actor"])
    op.create_table(
        "review_case_signals",
        sa.Column("id", _ID, nullable=False),
        sa.Column("case_id", _ID, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("value", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["case_id"],
            ["review_cases.id"],
            name=op.f("fk_review_case_signals_case_id_review_cases"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_case_signals")),
        sa.UniqueConstraint(
            "case_id", "kind", "value", name=op.f("uq_review_case_signals_case_id_kind_value")
        ),
    )
    op.create_index(op.f("ix_review_case_signals_kind"), "review_case_signals", ["kind", "value"])
    op.create_table(
        "dashboard_sessions",
        sa.Column("id", _ID, nullable=False),
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("token_id", _ID, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["token_id"], ["api_tokens.id"], name=op.f("fk_dashboard_sessions_token_id_api_tokens")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dashboard_sessions")),
        sa.UniqueConstraint("public_id", name=op.f("uq_dashboard_sessions_public_id")),
    )
    op.create_index(op.f("ix_dashboard_sessions_token_id"), "dashboard_sessions", ["token_id"])
    _backfill()
    with op.batch_alter_table("review_cases") as batch:
        batch.alter_column("queue_key", existing_type=sa.DateTime(timezone=True), nullable=False)
    op.create_index(
        "ix_review_cases_state_queue_key", "review_cases", ["state", "queue_key"], unique=False
    )
    # One job per moderator. No case is held before this revision (claims came with it).
    op.create_index(
        "uq_review_cases_one_held_case",
        "review_cases",
        ["assignee"],
        unique=True,
        postgresql_where=sa.text(HELD_CASE),
        sqlite_where=sa.text(HELD_CASE),
    )


def _backfill() -> None:
    bind = op.get_bind()
    cases = bind.execute(
        sa.text(
            "SELECT c.id, c.image_id, c.opened_at, c.state, c.decision, c.note, c.assignee, "
            "c.decided_at, c.verdict_id, v.ai_score, v.detector_set, e.definition "
            "FROM review_cases c JOIN verdicts v ON v.id = c.verdict_id "
            "LEFT JOIN ensembles e ON e.id = v.ensemble_id"
        )
    ).all()
    for row in cases:
        opened = _aware(row.opened_at)
        score = row.ai_score
        weight = score if score is not None else _NO_SCORE
        bind.execute(
            sa.text(
                "UPDATE review_cases SET score = :score, queue_key = :key WHERE id = :id"
            ).bindparams(sa.bindparam("key", type_=_WHEN)),
            {
                "score": score,
                "key": opened - timedelta(hours=weight * _SCORE_HOURS),
                "id": row.id,
            },
        )
        for kind, value in _signals(bind, row):
            bind.execute(
                sa.text(
                    "INSERT INTO review_case_signals (case_id, kind, value) "
                    "VALUES (:case_id, :kind, :value)"
                ),
                {"case_id": row.id, "kind": kind, "value": value},
            )
        if row.state == "decided" and row.decision is not None:
            bind.execute(
                sa.text(
                    "INSERT INTO review_decisions (case_id, actor, decision, note, from_state, "
                    "verdict_id, blind, decided_at) VALUES (:case_id, :actor, :decision, "
                    ":note, 'claimed', :verdict_id, :blind, :decided_at)"
                ).bindparams(
                    sa.bindparam("decided_at", type_=_WHEN),
                    sa.bindparam("blind", type_=sa.Boolean()),
                ),
                {
                    "case_id": row.id,
                    "actor": row.assignee or "unknown",
                    "decision": row.decision,
                    "note": row.note,
                    "verdict_id": row.verdict_id,
                    "blind": False,
                    "decided_at": _aware(row.decided_at or row.opened_at),
                },
            )


def _signals(bind: sa.Connection, row: Any) -> set[tuple[str, str]]:
    """The same rule as ``db.repository.review.case_signals`` at this revision."""
    detector_set = _json(row.detector_set)
    definition = _json(row.definition) if row.definition is not None else {}
    threshold = float(definition.get("threshold", 0.5))
    signals: set[tuple[str, str]] = set()
    for entry in detector_set.get("detectors", []):
        score = entry.get("score")
        if isinstance(score, int | float) and score >= threshold:
            signals.add(("detector", str(entry.get("name"))[:128]))
    for (evidence,) in bind.execute(
        sa.text("SELECT evidence FROM detections WHERE image_id = :id"), {"id": row.image_id}
    ):
        for item in _json(evidence).get("items", []) or []:
            if isinstance(item, dict) and item.get("ai") and isinstance(item.get("kind"), str):
                signals.add(("provenance", item["kind"][:128]))
    for (kind,) in bind.execute(
        sa.text("SELECT DISTINCT kind FROM sources WHERE image_id = :id"), {"id": row.image_id}
    ):
        signals.add(("source", str(kind)))
    return signals


def _json(value: Any) -> dict[str, Any]:
    import json

    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, dict) else {}


def _aware(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def downgrade() -> None:
    # An escalated case goes back to waiting for a moderator; the decisions table goes, the
    # final decision stays on the case.
    op.execute(
        "UPDATE review_cases SET state = 'open', assignee = NULL, claimed_at = NULL "
        "WHERE state = 'escalated'"
    )
    op.drop_index("uq_review_cases_one_held_case", table_name="review_cases")
    op.drop_index("ix_review_cases_state_queue_key", table_name="review_cases")
    op.drop_index(op.f("ix_dashboard_sessions_token_id"), table_name="dashboard_sessions")
    op.drop_table("dashboard_sessions")
    op.drop_index(op.f("ix_review_case_signals_kind"), table_name="review_case_signals")
    op.drop_table("review_case_signals")
    op.drop_index(op.f("ix_review_decisions_actor"), table_name="review_decisions")
    op.drop_index(op.f("ix_review_decisions_case_id"), table_name="review_decisions")
    op.drop_table("review_decisions")
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("blur_images")
    with op.batch_alter_table("review_cases") as batch:
        batch.drop_column("reviews_required")
        batch.drop_column("lease_expires_at")
        batch.drop_column("queue_key")
        batch.drop_column("score")
    _set_states(STATES_AFTER, STATES_BEFORE)


def _set_states(before: tuple[str, ...], after: tuple[str, ...]) -> None:
    def state(values: tuple[str, ...]) -> sa.Enum:
        return sa.Enum(
            *values, name="review_state", native_enum=False, create_constraint=True, length=32
        )

    with op.batch_alter_table("review_cases") as batch:
        if op.get_bind().dialect.name == "postgresql":
            batch.drop_constraint(op.f("ck_review_cases_review_state"), type_="check")
            batch.create_check_constraint("review_state", sa.column("state").in_(after))
        else:
            batch.alter_column("state", existing_type=state(before), type_=state(after))
