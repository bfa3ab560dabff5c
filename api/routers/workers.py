"""`GET /v1/workers` (afina's): the training workers that are there now, their devices, and
whether each runs a job (which one, when it is the caller's)."""

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import Session

from afina.api.deps import DbDep, ProjectDep, SettingsDep
from afina.api.errors import KEYED, error_responses
from afina.api.schemas.workers import WorkerList, WorkerObject
from afina.jobs import workers
from afina.models import Job, JobStatus

router = APIRouter(prefix="/v1/workers", tags=["workers"], responses=error_responses(*KEYED))


def _running(db: Session) -> dict[str, tuple[str, str]]:
    """worker -> (job id, project) of each running job."""
    query = select(Job.worker, Job.id, Job.project).where(Job.status == JobStatus.RUNNING)
    return {worker: (job, project) for worker, job, project in db.execute(query) if worker}


@router.get("", response_model=WorkerList)
def list_workers(db: DbDep, project: ProjectDep, settings: SettingsDep) -> WorkerList:
    running = _running(db)
    listed = []
    for row in workers.live(db, settings.worker_timeout_seconds):
        job, owner = running.get(row.id, (None, None))
        listed.append(WorkerObject.of(row, job, own=owner == project))
    return WorkerList(data=listed)
