"""detection attempts counted per message

A detector task's deliveries are counted per message, not per (image, detector): copies
of the same work sent again (the reconciler, a repeated intake) no longer use up the
attempts of the message in flight, which made a slow worker give up on healthy images.
Existing rows keep their counts under the empty message id.

Cheap on a large database: a column with a constant default (no table rewrite on
PostgreSQL 11+) and one unique index rebuilt over a small bookkeeping table.

Rolling upgrade: the previous release's workers read one row per (image, detector) and
fail once a second message's row exists. Stop them before the new ones run (the upgrade
order in docs/fleet.md).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 00:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("detection_attempts") as batch:
        batch.add_column(
            sa.Column("message_id", sa.String(length=255), server_default="", nullable=False)
        )
        batch.drop_constraint(op.f("uq_detection_attempts_image_id_detector_name"), type_="unique")
        batch.create_unique_constraint(
            op.f("uq_detection_attempts_image_id_detector_name_message_id"),
            ["image_id", "detector_name", "message_id"],
        )


def downgrade() -> None:
    # One row per (image, detector) again: the deliveries of all its messages added up.
    op.execute(
        "UPDATE detection_attempts SET attempts = (SELECT sum(d.attempts) FROM "
        "detection_attempts d WHERE d.image_id = detection_attempts.image_id AND "
        "d.detector_name = detection_attempts.detector_name)"
    )
    op.execute(
        "DELETE FROM detection_attempts WHERE id NOT IN (SELECT min(d.id) FROM "
        "detection_attempts d GROUP BY d.image_id, d.detector_name)"
    )
    with op.batch_alter_table("detection_attempts") as batch:
        batch.drop_constraint(
            op.f("uq_detection_attempts_image_id_detector_name_message_id"), type_="unique"
        )
        batch.create_unique_constraint(
            op.f("uq_detection_attempts_image_id_detector_name"), ["image_id", "detector_name"]
        )
        batch.drop_column("message_id")
