"""Initial schema: items, users, interactions, cot_samples, model_versions.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00

Written by hand to match storage/models.py at this revision; it uses plain SQLAlchemy types (not the models'), so it
keeps meaning the same thing when the models change later.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

ID = sa.String(128)


def timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "items",
        sa.Column("item_id", ID, nullable=False),
        sa.Column("title", sa.String(512), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("updated_at", timestamp(), nullable=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("stored_at", timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("item_id", name="pk_items"),
    )
    op.create_table(
        "users",
        sa.Column("user_id", ID, nullable=False),
        sa.Column("first_seen_at", timestamp(), nullable=False),
        sa.Column("last_seen_at", timestamp(), nullable=False),
        sa.Column("interactions", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_users"),
    )
    op.create_table(
        "interactions",
        sa.Column("interaction_id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("item_id", ID, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("label", sa.SmallInteger(), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("ts", timestamp(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("stored_at", timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("interaction_id", name="pk_interactions"),
    )
    op.create_index("ix_interactions_user_id_ts", "interactions", ["user_id", "ts"])
    op.create_index("ix_interactions_item_id_ts", "interactions", ["item_id", "ts"])
    op.create_index("ix_interactions_ts", "interactions", ["ts"])
    op.create_table(
        "cot_samples",
        sa.Column("sample_id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("item_id", ID, nullable=False),
        sa.Column("label", sa.SmallInteger(), nullable=False),
        sa.Column("ts", timestamp(), nullable=False),
        sa.Column("history", sa.JSON(), nullable=True),
        sa.Column("reason", sa.String(16), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("cot_text", sa.Text(), nullable=True),
        sa.Column("backend", sa.String(32), nullable=True),
        sa.Column("model", sa.String(256), nullable=True),
        sa.Column("stored_at", timestamp(), nullable=False),
        sa.Column("generated_at", timestamp(), nullable=True),
        sa.Column("cot_stored_at", timestamp(), nullable=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("sample_id", name="pk_cot_samples"),
        sa.CheckConstraint("status IN ('pending', 'generated')", name="ck_cot_samples_status"),
        sa.CheckConstraint(
            "reason IS NULL OR reason IN ('sampled', 'cold_start')", name="ck_cot_samples_reason"
        ),
    )
    op.create_index("ix_cot_samples_user_id_ts", "cot_samples", ["user_id", "ts"])
    op.create_table(
        "model_versions",
        sa.Column("version_id", ID, nullable=False),
        sa.Column("created_at", timestamp(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("parent_version", ID, nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("artifact_path", sa.Text(), nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("version_id", name="pk_model_versions"),
        sa.CheckConstraint(
            "status IN ('candidate', 'serving', 'retired', 'rejected')", name="ck_model_versions_status"
        ),
    )
    op.create_index(
        "ix_model_versions_kind_status_created_at", "model_versions", ["kind", "status", "created_at"]
    )


def downgrade() -> None:
    op.drop_table("model_versions")
    op.drop_table("cot_samples")
    op.drop_table("interactions")
    op.drop_table("users")
    op.drop_table("items")
