"""The training workers, as `GET /v1/workers` (afina's) shows them."""

from typing import Literal

from pydantic import BaseModel

from afina.api.schemas.files import unix_seconds
from afina.models import Worker


class DeviceObject(BaseModel):
    kind: Literal["cuda", "cpu"]
    name: str
    memory_total: int
    memory_free: int


class WorkerObject(BaseModel):
    id: str
    object: Literal["worker"] = "worker"
    hostname: str
    queue: str
    device: DeviceObject
    cpu_cores: int
    started_at: int
    last_seen_at: int
    busy: bool
    job: str | None  # the caller's job it runs; another project's shows as `busy` alone
    throughput: dict[str, float]  # training tokens a second, by "<parameters>:<bits>"

    @classmethod
    def of(cls, row: Worker, running: str | None, own: bool) -> "WorkerObject":
        return cls(
            id=row.id,
            hostname=row.hostname,
            queue=row.queue,
            device=DeviceObject(
                kind=row.device_kind,  # type: ignore[arg-type]
                name=row.device_name,
                memory_total=row.memory_total,
                memory_free=row.memory_free,
            ),
            cpu_cores=row.cpu_cores,
            started_at=unix_seconds(row.started_at),
            last_seen_at=unix_seconds(row.heartbeat_at),
            busy=running is not None,
            job=running if own else None,
            throughput=row.throughput,
        )


class WorkerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WorkerObject]
