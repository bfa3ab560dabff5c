"""DPO and evaluation: the model (or checkpoint) a job trains further and its result files;
accuracy and reward metrics.

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

METRICS = (
    "mean_token_accuracy",
    "eval_mean_token_accuracy",
    "rewards_chosen",
    "rewards_rejected",
    "rewards_accuracies",
    "rewards_margins",
    "eval_rewards_accuracies",
)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("parent_model", sa.String(length=512), nullable=True))
        batch.add_column(sa.Column("parent_job_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("parent_step", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("result_files", sa.JSON(), server_default="[]", nullable=False))
    with op.batch_alter_table("job_metrics") as batch:
        for name in METRICS:
            batch.add_column(sa.Column(name, sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_metrics") as batch:
        for name in reversed(METRICS):
            batch.drop_column(name)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("result_files")
        batch.drop_column("parent_step")
        batch.drop_column("parent_job_id")
        batch.drop_column("parent_model")
