"""Indexes on the CoT samples' change times, for the ranker's example pool sync.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 00:00:00

The ranker reads the CoT samples stored (`stored_at`) or completed (`cot_stored_at`) since its horizon once a second
(`Repository.cot_samples_changed_since`); without these indexes every sync scanned the whole table.
"""

from typing import Sequence, Union

from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_index("ix_cot_samples_stored_at", "cot_samples", ["stored_at"])
    op.create_index("ix_cot_samples_cot_stored_at", "cot_samples", ["cot_stored_at"])


def downgrade() -> None:
    op.drop_index("ix_cot_samples_cot_stored_at", table_name="cot_samples")
    op.drop_index("ix_cot_samples_stored_at", table_name="cot_samples")
