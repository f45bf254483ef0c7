"""fleet bookkeeping: detection attempts, dead letters

New tables only: the previous release's code runs unchanged against this schema.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 04:51:06.676778
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("channel", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
    )
    op.create_table(
        "detection_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("image_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("detector_name", sa.String(length=128), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_detection_attempts_image_id_images")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_detection_attempts")),
        sa.UniqueConstraint(
            "image_id", "detector_name", name=op.f("uq_detection_attempts_image_id_detector_name")
        ),
    )


def downgrade() -> None:
    op.drop_table("detection_attempts")
    op.drop_table("dead_letters")
