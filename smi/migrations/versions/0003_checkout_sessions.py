"""checkout_sessions: the Stripe Checkout Sessions started from a page (api/checkout.py), and their stage.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

One row per session, keyed by Stripe's session id: created when the customer is sent to Stripe, paid
when the webhook started its job (exactly once: the row and the job's unique order_id decide it).
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checkout_sessions",
        sa.Column("session_id", sa.String(255), nullable=False),
        sa.Column("order_id", sa.String(128), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.Column("publishable_key", sa.String(255), nullable=True),
        sa.Column("image_url", sa.String(), nullable=False),
        sa.Column("page_url", sa.String(), nullable=True),
        sa.Column("scale_factor", sa.Integer(), nullable=False),
        sa.Column("price_cents", sa.Integer(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("customer_email", sa.String(), nullable=True),
        sa.Column("payment_intent", sa.String(255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("session_id"),
    )
    op.create_index("ix_checkout_sessions_order_id", "checkout_sessions", ["order_id"], unique=True)
    op.create_index("ix_checkout_sessions_job_id", "checkout_sessions", ["job_id"])
    op.create_index("ix_checkout_sessions_status", "checkout_sessions", ["status"])
    op.create_index("ix_checkout_sessions_created_at", "checkout_sessions", ["created_at"])
    op.create_index("ix_checkout_sessions_paid_at", "checkout_sessions", ["paid_at"])


def downgrade() -> None:
    op.drop_table("checkout_sessions")
