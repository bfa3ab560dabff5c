"""The training workers that say they are there: what device each has, and how fast it has
trained. A worker writes its own row when it starts and stamps it while it runs; one whose
stamp is older than AFINA_WORKER_TIMEOUT_SECONDS no longer counts."""

from datetime import datetime

from sqlalchemy import JSON, BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from afina.models.base import Base


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # `Job.worker`'s name
    hostname: Mapped[str] = mapped_column(String(255))
    # The training queues it takes, comma-separated, in its order (`train-80g,train`): up to
    # 16 names of up to 64 characters (`Settings.worker_queues`).
    queue: Mapped[str] = mapped_column(String(1040))
    device_kind: Mapped[str] = mapped_column(String(16))  # "cuda" or "cpu"
    device_name: Mapped[str] = mapped_column(String(255))
    memory_total: Mapped[int] = mapped_column(BigInteger)
    memory_free: Mapped[int] = mapped_column(BigInteger)
    cpu_cores: Mapped[int]
    # The most ranks a job may train on here (`resources.gpus`): the GPUs its process sees,
    # or its CPU cores on a node without one.
    max_ranks: Mapped[int] = mapped_column(default=1, server_default="1")
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime] = mapped_column(index=True)
    # Training tokens a second this worker measured, by model size ("<parameters>:<bits>").
    throughput: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
