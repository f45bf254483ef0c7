"""ensembles: the configuration behind every verdict; withdrawn review cases

A verdict's identity now covers the whole ensemble configuration (rule, weights,
calibrations, threshold, decisive rules): each configuration is a row of ``ensembles``,
and new verdicts carry its digest-bearing version and id. Verdicts stored before keep a
null ``ensemble_id``; their ``ensemble_version`` names one legacy row per version, written
here (their weights were not recorded). Review cases gain the state ``withdrawn``.

Cheap on a large database: one read of the distinct versions before any lock, a nullable
column without default (no table rewrite, no backfill, no index build), a changed CHECK.

Rolling upgrade: the previous release's code stores verdicts against this schema as
before, but it cannot load a review case in the new ``withdrawn`` state (its enum does not
know it). Stop the previous release's workers before the new ones run: the upgrade order
in docs/fleet.md.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 09:00:00
"""

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATES_BEFORE = ("open", "claimed", "decided")
STATES_AFTER = (*STATES_BEFORE, "withdrawn")


def upgrade() -> None:
    op.create_table(
        "ensembles",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column(
            "definition", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ensembles")),
        sa.UniqueConstraint("digest", name=op.f("uq_ensembles_digest")),
        sa.UniqueConstraint("version", name=op.f("uq_ensembles_version")),
    )
    _record_legacy_versions()
    with op.batch_alter_table("verdicts") as batch:
        batch.add_column(
            sa.Column(
                "ensemble_id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                nullable=True,
            )
        )
        batch.create_foreign_key(
            op.f("fk_verdicts_ensemble_id_ensembles"), "ensembles", ["ensemble_id"], ["id"]
        )
    _set_review_states(STATES_BEFORE, STATES_AFTER)


def _record_legacy_versions() -> None:
    """One ``ensembles`` row per ensemble version that verdicts already name."""
    bind = op.get_bind()
    ensembles = sa.table(
        "ensembles",
        sa.column("version", sa.String),
        sa.column("digest", sa.String),
        sa.column("definition", sa.JSON().with_variant(postgresql.JSONB(), "postgresql")),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    verdicts = sa.table("verdicts", sa.column("ensemble_version", sa.String))
    versions = bind.execute(sa.select(verdicts.c.ensemble_version).distinct()).scalars().all()
    for version in versions:
        definition = {
            "rule": "weighted-mean",
            "legacy_version": version,
            "note": "stored before ensemble configurations were recorded: the threshold is in "
            "each verdict's reason; weights and calibrations are unknown",
        }
        canonical = json.dumps(definition, sort_keys=True, separators=(",", ":"))
        bind.execute(
            ensembles.insert().values(
                version=version,
                digest=hashlib.sha256(canonical.encode()).hexdigest(),
                definition=definition,
                created_at=datetime.now(UTC),
            )
        )


def _set_review_states(before: tuple[str, ...], after: tuple[str, ...]) -> None:
    def state(values: tuple[str, ...]) -> sa.Enum:
        return sa.Enum(
            *values, name="review_state", native_enum=False, create_constraint=True, length=32
        )

    with op.batch_alter_table("review_cases") as batch:
        if op.get_bind().dialect.name == "postgresql":
            # The CHECK constraint of a non-native enum is not altered with the column type.
            batch.drop_constraint(op.f("ck_review_cases_review_state"), type_="check")
            batch.create_check_constraint("review_state", sa.column("state").in_(after))
        else:  # SQLite: the table is rebuilt with the new column type and its constraint
            batch.alter_column("state", existing_type=state(before), type_=state(after))


def downgrade() -> None:
    op.execute("UPDATE review_cases SET state = 'open' WHERE state = 'withdrawn'")
    _set_review_states(STATES_AFTER, STATES_BEFORE)
    with op.batch_alter_table("verdicts") as batch:
        batch.drop_constraint(op.f("fk_verdicts_ensemble_id_ensembles"), type_="foreignkey")
        batch.drop_column("ensemble_id")
    op.drop_table("ensembles")
