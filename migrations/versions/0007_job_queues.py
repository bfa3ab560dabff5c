"""Routing jobs to worker classes: the training queue a job is sent to, room in a worker's
row for the several queues it takes, and the most ranks a job may train on there (its
node's GPUs, for multi-GPU jobs).

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # Every job stored before went to the one training queue.
        batch.add_column(
            sa.Column("queue", sa.String(length=64), server_default="train", nullable=False)
        )
    with op.batch_alter_table("workers") as batch:
        batch.alter_column(
            "queue",
            existing_type=sa.String(length=64),
            type_=sa.String(length=1040),
            existing_nullable=False,
        )
        batch.add_column(sa.Column("max_ranks", sa.Integer(), server_default="1", nullable=False))


def downgrade() -> None:
    # A worker writes its row again at its next stamp once it is gone: the rows of workers
    # whose queues would not fit go.
    op.execute("DELETE FROM workers WHERE length(queue) > 64")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("max_ranks")
        batch.alter_column(
            "queue",
            existing_type=sa.String(length=1040),
            type_=sa.String(length=64),
            existing_nullable=False,
        )
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("queue")
