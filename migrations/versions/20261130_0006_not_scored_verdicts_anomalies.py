"""verdicts: the label ``not_scored``; images: decode anomalies

An upload refused before any detector saw it (not an image, damaged, too large, ...) whose
bytes were read now gets a verdict too: ``not_scored``, with the reason, flagged when the
ensemble configuration sends that rejection reason to review. Only the CHECK constraint
of the label changes. Images gain ``anomalies``: what the decoder stepped over to read the
pixels (damaged ancillary PNG chunks), evidence for a moderator.

Cheap on a large database: a CHECK constraint replaced (PostgreSQL validates it in one
scan of ``verdicts``, without rewriting the table) and a nullable column without default
(no rewrite, no backfill).

Rolling upgrade: the previous release's code cannot load a verdict labelled
``not_scored``; stop its workers before the new ones run (the upgrade order in
docs/fleet.md).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LABELS_BEFORE = ("likely_ai", "no_indication", "inconclusive")
LABELS_AFTER = (*LABELS_BEFORE, "not_scored")


def upgrade() -> None:
    _set_labels(LABELS_BEFORE, LABELS_AFTER)
    with op.batch_alter_table("images") as batch:
        batch.add_column(
            sa.Column(
                "anomalies",
                sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
                nullable=True,
            )
        )


def downgrade() -> None:
    # A "not scored" verdict has no earlier meaning; the source keeps its rejection. A case
    # it opened keeps its moderator's work, pointed at the image's newest other verdict; only
    # a case with no other verdict to point at goes.
    op.execute(
        "UPDATE review_cases SET verdict_id = (SELECT max(v.id) FROM verdicts v "
        "WHERE v.image_id = review_cases.image_id AND v.label <> 'not_scored') "
        "WHERE verdict_id IN (SELECT id FROM verdicts WHERE label = 'not_scored') "
        "AND EXISTS (SELECT 1 FROM verdicts v WHERE v.image_id = review_cases.image_id "
        "AND v.label <> 'not_scored')"
    )
    op.execute(
        "DELETE FROM review_cases WHERE verdict_id IN "
        "(SELECT id FROM verdicts WHERE label = 'not_scored')"
    )
    op.execute("DELETE FROM verdicts WHERE label = 'not_scored'")
    _set_labels(LABELS_AFTER, LABELS_BEFORE)
    with op.batch_alter_table("images") as batch:
        batch.drop_column("anomalies")


def _set_labels(before: tuple[str, ...], after: tuple[str, ...]) -> None:
    def label(values: tuple[str, ...]) -> sa.Enum:
        return sa.Enum(
            *values, name="verdict_label", native_enum=False, create_constraint=True, length=32
        )

    with op.batch_alter_table("verdicts") as batch:
        if op.get_bind().dialect.name == "postgresql":
            # The CHECK constraint of a non-native enum is not altered with the column type.
            batch.drop_constraint(op.f("ck_verdicts_verdict_label"), type_="check")
            batch.create_check_constraint("verdict_label", sa.column("label").in_(after))
        else:  # SQLite: the table is rebuilt with the new column type and its constraint
            batch.alter_column("label", existing_type=label(before), type_=label(after))
