"""funnel_counts: buttons shown and modals opened, per UTC day, stage and (page URL, image URL) (smi/funnel.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

The key is (day, stage, SHA-256 of the URL pair): short whatever the URLs' length, and an upsert adds to it.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "funnel_counts",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("pair_sha256", sa.String(64), nullable=False),
        sa.Column("site", sa.String(255), nullable=False),
        sa.Column("page_url", sa.String(2048), nullable=False),
        sa.Column("image_url", sa.String(2048), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("day", "stage", "pair_sha256"),
    )
    op.create_index("ix_funnel_counts_site", "funnel_counts", ["site"])


def downgrade() -> None:
    op.drop_index("ix_funnel_counts_site", table_name="funnel_counts")
    op.drop_table("funnel_counts")
