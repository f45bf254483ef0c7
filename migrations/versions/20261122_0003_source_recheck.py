"""sources: when a pending upload is next checked for lost messages

New nullable / defaulted columns and an index: the previous release's code runs unchanged
against this schema.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("sources", sa.Column("recheck_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "sources",
        sa.Column("resend_count", sa.Integer(), server_default="0", nullable=False),
    )
    op.create_index(
        op.f("ix_sources_status_created_at"), "sources", ["status", "created_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_sources_status_created_at"), table_name="sources")
    op.drop_column("sources", "resend_count")
    op.drop_column("sources", "recheck_at")
