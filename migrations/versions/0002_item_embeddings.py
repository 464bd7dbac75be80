"""Item embeddings, and the CoT embedding of each sample.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02 00:00:00

Written by hand to match storage/models.py at this revision, in plain SQLAlchemy types. The stream worker embeds each
item once and keeps the vector here (float32 bytes), so a restarted worker never re-embeds the catalogue; the CoT
embedding travels with the generated sample, so the vector index can be rebuilt from PostgreSQL alone.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "item_embeddings",
        sa.Column("item_id", sa.String(128), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("dimension", sa.SmallInteger(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("item_id", name="pk_item_embeddings"),
    )
    op.add_column("cot_samples", sa.Column("cot_embedding", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    # A plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35 has it): batch mode would rebuild the table on SQLite from
    # reflection, which drops its CHECK constraints.
    op.drop_column("cot_samples", "cot_embedding")
    op.drop_table("item_embeddings")
