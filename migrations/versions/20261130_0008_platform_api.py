"""the platform API: scans, idempotency keys, callbacks (secrets, allow-list, endpoints,
the delivery outbox and its attempts), batch re-scans, and the re-scan that listed a source

New tables and one nullable column without default on ``sources`` (no rewrite, no
backfill): the previous release's code runs unchanged against this schema.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 02:17:45
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "callback_endpoints",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("token_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("url_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["token_id"], ["api_tokens.id"], name=op.f("fk_callback_endpoints_token_id_api_tokens")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callback_endpoints")),
        sa.UniqueConstraint(
            "token_id", "url_sha256", name=op.f("uq_callback_endpoints_token_id_url_sha256")
        ),
    )
    op.create_table(
        "callback_hosts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("token_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["token_id"], ["api_tokens.id"], name=op.f("fk_callback_hosts_token_id_api_tokens")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callback_hosts")),
        sa.UniqueConstraint("token_id", "host", name=op.f("uq_callback_hosts_token_id_host")),
    )
    op.create_table(
        "callback_secrets",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("token_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("secret_encrypted", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["token_id"], ["api_tokens.id"], name=op.f("fk_callback_secrets_token_id_api_tokens")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callback_secrets")),
    )
    with op.batch_alter_table("callback_secrets", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_callback_secrets_token_id"), ["token_id"], unique=False
        )

    op.create_table(
        "idempotency_keys",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("token_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=False),
        sa.Column(
            "scan_ids",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["token_id"], ["api_tokens.id"], name=op.f("fk_idempotency_keys_token_id_api_tokens")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotency_keys")),
        sa.UniqueConstraint("token_id", "key", name=op.f("uq_idempotency_keys_token_id_key")),
    )
    op.create_table(
        "rescans",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("public_id", sa.String(length=40), nullable=False),
        sa.Column("token_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column(
            "selection",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "state",
            sa.Enum(
                "listing",
                "running",
                "done",
                "cancelled",
                name="rescan_state",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("cursor", sa.Text(), nullable=True),
        sa.Column("listed", sa.Integer(), nullable=False),
        sa.Column("queued", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("reused", sa.Integer(), nullable=False),
        sa.Column("rejected", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("cancelled", sa.Integer(), nullable=False),
        sa.Column(
            "counted_through",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
        ),
        sa.Column(
            "unfinished",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("counted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("listed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["token_id"], ["api_tokens.id"], name=op.f("fk_rescans_token_id_api_tokens")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rescans")),
        sa.UniqueConstraint("public_id", name=op.f("uq_rescans_public_id")),
    )
    op.create_table(
        "scans",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("public_id", sa.String(length=40), nullable=False),
        sa.Column("token_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column(
            "source_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("external_id", sa.String(length=255), nullable=True),
        sa.Column("callback_url", sa.Text(), nullable=True),
        sa.Column(
            "priority",
            sa.Enum(
                "normal",
                "low",
                name="scan_priority",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["source_id"], ["sources.id"], name=op.f("fk_scans_source_id_sources")
        ),
        sa.ForeignKeyConstraint(
            ["token_id"], ["api_tokens.id"], name=op.f("fk_scans_token_id_api_tokens")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scans")),
        sa.UniqueConstraint("public_id", name=op.f("uq_scans_public_id")),
        sa.UniqueConstraint("source_id", name=op.f("uq_scans_source_id")),
    )
    with op.batch_alter_table("scans", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_scans_token_id"), ["token_id", "external_id"], unique=False
        )

    op.create_table(
        "callback_deliveries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("public_id", sa.String(length=40), nullable=False),
        sa.Column("token_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "endpoint_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("scan_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("event_key", sa.String(length=128), nullable=False),
        sa.Column(
            "payload",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "state",
            sa.Enum(
                "pending",
                "delivered",
                "failed",
                "disabled",
                name="delivery_state",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["callback_endpoints.id"],
            name=op.f("fk_callback_deliveries_endpoint_id_callback_endpoints"),
        ),
        sa.ForeignKeyConstraint(
            ["scan_id"], ["scans.id"], name=op.f("fk_callback_deliveries_scan_id_scans")
        ),
        sa.ForeignKeyConstraint(
            ["token_id"], ["api_tokens.id"], name=op.f("fk_callback_deliveries_token_id_api_tokens")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callback_deliveries")),
        sa.UniqueConstraint(
            "endpoint_id", "event_key", name=op.f("uq_callback_deliveries_endpoint_id_event_key")
        ),
        sa.UniqueConstraint("public_id", name=op.f("uq_callback_deliveries_public_id")),
    )
    with op.batch_alter_table("callback_deliveries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_callback_deliveries_scan_id"), ["scan_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_callback_deliveries_state"), ["state", "next_attempt_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_callback_deliveries_token_id"), ["token_id"], unique=False
        )

    op.create_table(
        "callback_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "delivery_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["callback_deliveries.id"],
            name=op.f("fk_callback_attempts_delivery_id_callback_deliveries"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_callback_attempts")),
    )
    with op.batch_alter_table("callback_attempts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_callback_attempts_delivery_id"), ["delivery_id"], unique=False
        )

    with op.batch_alter_table("sources", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "rescan_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
            )
        )
        batch_op.create_index("ix_sources_rescan_id_id", ["rescan_id", "id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_sources_rescan_id_rescans"), "rescans", ["rescan_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("sources", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_sources_rescan_id_rescans"), type_="foreignkey")
        batch_op.drop_index("ix_sources_rescan_id_id")
        batch_op.drop_column("rescan_id")

    with op.batch_alter_table("callback_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_callback_attempts_delivery_id"))

    op.drop_table("callback_attempts")
    with op.batch_alter_table("callback_deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_callback_deliveries_token_id"))
        batch_op.drop_index(batch_op.f("ix_callback_deliveries_state"))
        batch_op.drop_index(batch_op.f("ix_callback_deliveries_scan_id"))

    op.drop_table("callback_deliveries")
    with op.batch_alter_table("scans", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_scans_token_id"))

    op.drop_table("scans")
    op.drop_table("rescans")
    op.drop_table("idempotency_keys")
    with op.batch_alter_table("callback_secrets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_callback_secrets_token_id"))

    op.drop_table("callback_secrets")
    op.drop_table("callback_hosts")
    op.drop_table("callback_endpoints")
