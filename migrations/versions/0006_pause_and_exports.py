"""Pause and resume, deleted models and merged exports: the `paused` status, when a pause was
asked for and when the model was deleted, and the exports table.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")


def _statuses(names: Sequence[str]) -> sa.Enum:
    return sa.Enum(*names, name="job_status", native_enum=False, create_constraint=True, length=32)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column(
            "status",
            existing_type=_statuses(STATUSES),
            type_=_statuses((*STATUSES, "paused")),
            existing_nullable=False,
        )
        batch.add_column(sa.Column("pause_requested_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("model_deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "job_exports",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "queued",
                "running",
                "succeeded",
                "failed",
                name="export_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("checkpoint_step", sa.Integer(), nullable=True),
        sa.Column("bytes", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("run_id", sa.String(length=32), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_exports_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_exports")),
    )
    op.create_index(op.f("ix_job_exports_job_id"), "job_exports", ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_job_exports_job_id"), table_name="job_exports")
    op.drop_table("job_exports")
    op.execute("UPDATE jobs SET status = 'queued' WHERE status = 'paused'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("model_deleted_at")
        batch.drop_column("pause_requested_at")
        batch.alter_column(
            "status",
            existing_type=_statuses((*STATUSES, "paused")),
            type_=_statuses(STATUSES),
            existing_nullable=False,
        )
