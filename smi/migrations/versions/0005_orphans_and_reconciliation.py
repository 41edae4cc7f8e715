"""submit_intents, orphan_jobs, reconciliations: every Upsampler job we caused is known and booked (issue 16).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

submit_intents: one row per POST to Upsampler, written before it (its nonce goes into the submission's signed
webhook URL) and its outcome after, so a retry knows when a job may exist at Upsampler. orphan_jobs: an
Upsampler job of ours that is no current submission, booked once (its key). reconciliations: one UTC day
compared with Upsampler's status endpoint.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "submit_intents",
        sa.Column("nonce", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("reported_id", sa.String(128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("nonce"),
    )
    op.create_index("ix_submit_intents_job_id", "submit_intents", ["job_id"])
    op.create_table(
        "orphan_jobs",
        sa.Column("upsampler_id", sa.String(128), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("credits", sa.Float(), nullable=False),
        sa.Column("found_by", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("upsampler_id"),
    )
    op.create_index("ix_orphan_jobs_job_id", "orphan_jobs", ["job_id"])
    op.create_table(
        "reconciliations",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("jobs", sa.Integer(), nullable=False),
        sa.Column("upsampler_ids", sa.Integer(), nullable=False),
        sa.Column("booked_credits", sa.Float(), nullable=False),
        sa.Column("reported_credits", sa.Float(), nullable=False),
        sa.Column("booked_now", sa.Integer(), nullable=False),
        sa.Column("differences", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("day"),
    )


def downgrade() -> None:
    op.drop_table("reconciliations")
    op.drop_index("ix_orphan_jobs_job_id", table_name="orphan_jobs")
    op.drop_table("orphan_jobs")
    op.drop_index("ix_submit_intents_job_id", table_name="submit_intents")
    op.drop_table("submit_intents")
