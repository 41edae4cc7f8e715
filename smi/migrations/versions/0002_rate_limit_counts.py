"""rate_limit_counts: the public endpoints' per-client request counts, shared by every API process.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

One row per (minute, client, route group); the primary key leads with the minute, so deleting the
minutes gone by walks the key instead of the whole table.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rate_limit_counts",
        sa.Column("minute", sa.Integer(), nullable=False),
        sa.Column("client", sa.String(64), nullable=False),
        sa.Column("route_group", sa.String(32), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("minute", "client", "route_group"),
    )


def downgrade() -> None:
    op.drop_table("rate_limit_counts")
