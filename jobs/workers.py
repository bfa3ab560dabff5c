"""The registry of training workers: each writes its row when it starts (`register`), stamps
it while it runs (`refresh`) and removes it when it stops (`leave`); a worker that died
without a word stops counting once its stamp is older than the heartbeat timeout (`live`).
A row says the worker's device and memory and the training queues it takes, in its order
(`queues_of`: its first is its worker class's own, the one jobs routed to it go to). A
worker also keeps the training throughput it measured, by model size, for the estimate."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from afina.models import Worker
from afina.models.base import utcnow


@dataclass(frozen=True)
class Device:
    """What a worker trains on: "cuda" (its first GPU) or "cpu", and its memory in bytes;
    `ranks`: the most processes a job may train on there (its GPUs, or its cores)."""

    kind: str
    name: str
    memory_total: int
    memory_free: int
    cpu_cores: int
    ranks: int = 1


QUEUE_SEPARATOR = ","


def register(
    session: Session, worker_id: str, hostname: str, queues: Sequence[str], device: Device
) -> None:
    """Write (or write again, after a restart under the same name) this worker's row, with
    the training queues it takes (at least one); the throughput it measured before is kept."""
    if isinstance(queues, str) or not queues:
        raise ValueError(f"a training worker takes a list of training queues, not {queues!r}")
    now = utcnow()
    known = session.get(Worker, worker_id)
    row = known or Worker(id=worker_id, throughput={})
    row.hostname, row.queue = hostname, QUEUE_SEPARATOR.join(queues)
    row.device_kind, row.device_name = device.kind, device.name
    row.memory_total, row.memory_free, row.cpu_cores = (
        device.memory_total,
        device.memory_free,
        device.cpu_cores,
    )
    row.max_ranks = device.ranks
    row.started_at = row.heartbeat_at = now
    if known is None:
        session.add(row)


def refresh(session: Session, worker_id: str, memory_free: int) -> bool:
    """Stamp the worker's row; False when it is gone (removed as stale meanwhile)."""
    stamped = session.execute(
        update(Worker)
        .where(Worker.id == worker_id)
        .values(heartbeat_at=utcnow(), memory_free=memory_free)
    ).rowcount
    return bool(stamped)


def leave(session: Session, worker_id: str) -> None:
    session.execute(delete(Worker).where(Worker.id == worker_id))


def live(session: Session, timeout_seconds: float) -> Sequence[Worker]:
    """The workers stamped within the timeout, smallest memory first."""
    since = utcnow() - timedelta(seconds=timeout_seconds)
    query = select(Worker).where(Worker.heartbeat_at >= since)
    return session.scalars(query.order_by(Worker.memory_total, Worker.id)).all()


def queues_of(worker: Worker) -> list[str]:
    """The training queues the worker takes, in its order."""
    return [name for name in worker.queue.split(QUEUE_SEPARATOR) if name]


def taking(workers: Sequence[Worker], queue: str) -> list[Worker]:
    """Those of `workers` that take the training queue `queue`, in their order."""
    return [worker for worker in workers if queue in queues_of(worker)]


def size_key(parameters: int, bits: int | None) -> str:
    """How throughput is filed: the model's parameters to two significant figures, and the
    bits its base is loaded at (`7.2e+09:4`)."""
    return f"{parameters:.2g}:{bits or 16}"


def record_throughput(
    session: Session, worker_id: str, parameters: int, bits: int | None, tokens_per_second: float
) -> None:
    """Keep what a finished run measured; the newest figure for a size replaces the last."""
    row = session.get(Worker, worker_id)
    if row is not None:
        row.throughput = {**row.throughput, size_key(parameters, bits): tokens_per_second}
