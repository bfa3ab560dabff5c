"""Which models a caller can generate with, and what a `model` name means to the engine.

A name is one of:
- a fine-tuned model, `ft:...` (a succeeded job's `fine_tuned_model`), or its job's id;
- a checkpoint, `{job id}:ckpt-step-{n}` (any job's, even one still running);
- a base model that `GET /v1/models` lists: a literal entry of AFINA_ALLOWED_MODELS, or the
  base of one of the caller's succeeded jobs. Any other name is a 404, so a typo never
  makes the server try to download a model.
A fine-tuned model is served on its base quantized as it was trained; a base model called
by name gets the default quantization (4-bit NF4).
"""

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from afina.api.deps import owned_row
from afina.api.errors import APIError, shown_id
from afina.api.schemas.files import unix_seconds
from afina.api.schemas.inference import ModelObject
from afina.core.base_models import ModelRefused, check_allowed
from afina.core.job_config import JobConfig
from afina.core.settings import Settings
from afina.core.storage import ArtifactStorage, adapter_key, checkpoint_key
from afina.models import Job, JobCheckpoint, JobStatus
from afina.serving.protocol import AdapterSpec, BaseModelSpec, ModelSpec

CHECKPOINT_NAME = re.compile(r"(?P<job>ftjob-[A-Za-z0-9]+):ckpt-step-(?P<step>[0-9]{1,9})")
_GLOB = re.compile(r"[*?\[]")


def _not_found(name: str, param: str) -> APIError:
    return APIError(
        404,
        f"No model {shown_id(name)}: GET /v1/models lists the models you can call",
        param=param,
        code="model_not_found",
    )


def _base_spec(job: Job) -> BaseModelSpec:
    return BaseModelSpec(job.model, JobConfig.model_validate(job.config).quantization)


def _adapter(storage: ArtifactStorage, spec: ModelSpec) -> ModelSpec:
    assert spec.adapter is not None
    if not storage.exists(spec.adapter.key):
        raise APIError(
            404,
            f"the adapter files of {shown_id(spec.name)} are missing from storage",
            param=spec.param,
            code="adapter_not_found",
        )
    return spec


def _allowed(model: str, settings: Settings) -> bool:
    try:
        check_allowed(model, settings.allowed_models)
    except ModelRefused:
        return False
    return True


def _job_model(
    settings: Settings, storage: ArtifactStorage, job: Job | None, name: str, param: str
) -> ModelSpec:
    if job is None or job.model_deleted_at is not None:
        raise _not_found(name, param)
    if not _allowed(job.model, settings):
        raise APIError(
            403,
            f"the base model of {shown_id(name)}, {job.model!r}, is no longer in "
            "AFINA_ALLOWED_MODELS",
            param=param,
            code="model_not_allowed",
        )
    if job.status != JobStatus.SUCCEEDED or job.fine_tuned_model is None:
        raise APIError(
            409,
            f"job {job.id} is {job.status.value}: its model can be used once it has succeeded",
            param=param,
            code="model_not_ready",
        )
    spec = ModelSpec(
        job.fine_tuned_model,
        _base_spec(job),
        AdapterSpec(adapter_key(job.id), job.fine_tuned_model),
        param,
    )
    return _adapter(storage, spec)


def resolve_job(
    db: Session,
    settings: Settings,
    storage: ArtifactStorage,
    project: str,
    job_id: str,
    param: str = "job_id",
) -> ModelSpec:
    job = owned_row(db, Job, job_id, "ftjob", project)
    return _job_model(settings, storage, job, job_id, param)


def checkpoint_saved(db: Session, job_id: str, step: int) -> bool:
    """Whether the job saved a checkpoint at `step`."""
    found = select(JobCheckpoint.id).where(
        JobCheckpoint.job_id == job_id, JobCheckpoint.step == step
    )
    return db.scalar(found) is not None


def find_trained(db: Session, project: str, name: str) -> tuple[Job | None, int | None]:
    """The caller's job behind a fine-tuned model name (`ft:...`) or a saved checkpoint
    (`{job id}:ckpt-step-{n}`), and the checkpoint's step; (None, None) when there is none
    (or the model was deleted)."""
    if checkpoint := CHECKPOINT_NAME.fullmatch(name):
        job = owned_row(db, Job, checkpoint["job"], "ftjob", project)
        if job is not None and job.model_deleted_at is not None:
            return None, None
        step = int(checkpoint["step"])
        saved = job is not None and checkpoint_saved(db, job.id, step)
        return (job, step) if saved else (None, None)
    found = db.scalars(
        select(Job).where(
            Job.project == project,
            Job.fine_tuned_model == name,
            Job.model_deleted_at.is_(None),
        )
    )
    return found.first(), None


def resolve_model(
    db: Session,
    settings: Settings,
    storage: ArtifactStorage,
    project: str,
    name: str,
    param: str = "model",
) -> ModelSpec:
    if name.startswith("ft:"):
        job, _ = find_trained(db, project, name)
        return _job_model(settings, storage, job, name, param)
    if name.startswith("ftjob-") and ":" not in name:
        return resolve_job(db, settings, storage, project, name, param)
    if CHECKPOINT_NAME.fullmatch(name):
        job, step = find_trained(db, project, name)
        if job is None or step is None or not _allowed(job.model, settings):
            raise _not_found(name, param)
        key = checkpoint_key(job.id, step)
        return _adapter(storage, ModelSpec(name, _base_spec(job), AdapterSpec(key, name), param))
    if name not in {model.id for model in base_models(db, settings, project)}:
        raise _not_found(name, param)
    return ModelSpec(name, BaseModelSpec(name), param=param)


def base_models(db: Session, settings: Settings, project: str) -> list[ModelObject]:
    """The literal entries of the allow-list, and the bases of the caller's succeeded jobs
    that the allow-list still permits."""
    names = [pattern for pattern in settings.allowed_models if not _GLOB.search(pattern)]
    trained = db.execute(
        select(Job.model, Job.created_at)
        .where(Job.project == project, Job.status == JobStatus.SUCCEEDED)
        .order_by(Job.created_at)
    ).all()
    first_used = {}
    for model, created_at in trained:
        first_used.setdefault(model, unix_seconds(created_at))
    names += [m for m in first_used if m not in names and _allowed(m, settings)]
    return [
        ModelObject(id=name, created=first_used.get(name, 0), owned_by="system") for name in names
    ]


def fine_tuned_models(db: Session, settings: Settings, project: str) -> list[ModelObject]:
    """The caller's succeeded jobs' models (not deleted) whose base the allow-list still
    permits."""
    jobs = db.scalars(
        select(Job)
        .where(
            Job.project == project,
            Job.status == JobStatus.SUCCEEDED,
            Job.model_deleted_at.is_(None),
        )
        .order_by(Job.finished_at, Job.id)
    )
    return [
        ModelObject(
            id=job.fine_tuned_model,
            created=unix_seconds(job.finished_at or job.created_at),
            owned_by=project,
            parent=job.model,
        )
        for job in jobs
        if job.fine_tuned_model and _allowed(job.model, settings)
    ]
