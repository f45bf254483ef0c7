"""ensembles: provenance of fitted configurations; ensemble_activations

A configuration written by ``synthsentry calibrate`` carries where it came from (the
detectors it combines, the data it was fitted on, its threshold's guarantee) in the new
nullable ``ensembles.provenance``; ``ensemble_activations`` records each operator's
activation, the newest being the active configuration.

Cheap on a large database: a nullable column without default and a new table. The
previous release's code runs unchanged against this schema (it never reads either).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 06:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("ensembles") as batch:
        batch.add_column(
            sa.Column(
                "provenance",
                sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
                nullable=True,
            )
        )
    op.create_table(
        "ensemble_activations",
        sa.Column("id", _ID, nullable=False),
        sa.Column("ensemble_id", _ID, nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["ensemble_id"],
            ["ensembles.id"],
            name=op.f("fk_ensemble_activations_ensemble_id_ensembles"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ensemble_activations")),
    )
    op.create_index(
        op.f("ix_ensemble_activations_ensemble_id"), "ensemble_activations", ["ensemble_id"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_ensemble_activations_ensemble_id"), table_name="ensemble_activations")
    op.drop_table("ensemble_activations")
    with op.batch_alter_table("ensembles") as batch:
        batch.drop_column("provenance")
