"""`/v1/models`: the base models and the caller's fine-tuned models it can call, and deleting
a fine-tuned model."""

from fastapi import APIRouter, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from afina.api.deps import DbDep, ProjectDep, SettingsDep, StorageDep
from afina.api.errors import KEYED, APIError, error_responses
from afina.api.schemas.inference import ModelDeleted, ModelList, ModelObject
from afina.api.served_models import (
    CHECKPOINT_NAME,
    base_models,
    find_trained,
    fine_tuned_models,
    resolve_model,
)
from afina.core.fields import shown
from afina.core.settings import Settings
from afina.core.storage import job_key
from afina.jobs import lifecycle
from afina.models import UNFINISHED, Job

router = APIRouter(prefix="/v1/models", tags=["models"], responses=error_responses(*KEYED))


def _listed(db: Session, settings: Settings, project: str) -> list[ModelObject]:
    return base_models(db, settings, project) + fine_tuned_models(db, settings, project)


@router.get("", response_model=ModelList)
def list_models(db: DbDep, project: ProjectDep, settings: SettingsDep) -> ModelList:
    return ModelList(data=_listed(db, settings, project))


@router.get("/{model:path}", response_model=ModelObject, responses=error_responses(403, 404, 409))
def retrieve_model(
    model: str, db: DbDep, project: ProjectDep, settings: SettingsDep, storage: StorageDep
) -> ModelObject:
    """Any name generation takes (a job id gives its fine-tuned model; a checkpoint is
    described here only); 404 for any other."""
    spec = resolve_model(db, settings, storage, project, model)
    found = next((entry for entry in _listed(db, settings, project) if entry.id == spec.name), None)
    return found or ModelObject(id=spec.name, created=0, owned_by=project, parent=spec.base.model)


@router.delete(
    "/{model:path}", response_model=ModelDeleted, responses=error_responses(400, 404, 409)
)
def delete_model(
    model: str, request: Request, db: DbDep, project: ProjectDep, storage: StorageDep
) -> ModelDeleted:
    """Delete a fine-tuned model: its adapter, its checkpoints and its exports leave storage
    and the serving cache; its job stays, with `model_deleted_at` set."""
    if CHECKPOINT_NAME.fullmatch(model):
        raise APIError(
            400,
            "A checkpoint is deleted with its fine-tuned model: DELETE /v1/models/{the job's "
            "fine_tuned_model}",
            param="model",
            code="model_not_deletable",
        )
    job, _ = find_trained(db, project, model)
    if job is None:
        raise APIError(
            404,
            f"No fine-tuned model {shown(model)} in this project (base models are not "
            "deleted here)",
            param="model",
            code="model_not_found",
        )
    continuing = db.scalar(
        select(Job.id).where(Job.parent_job_id == job.id, Job.status.in_(UNFINISHED)).limit(1)
    )
    if continuing is not None:  # its next run starts from this model's adapter
        raise APIError(
            409,
            f"Job {continuing} trains {shown(model)} further and has not ended: cancel it or "
            "let it end, then delete the model",
            param="model",
            code="model_in_use",
        )
    lifecycle.delete_model(db, job.id, model)
    db.commit()
    lifecycle.model_deleted(storage, job.id)
    request.app.state.inference.forget(job_key(job.id))
    return ModelDeleted(id=model)
