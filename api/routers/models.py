"""`GET /v1/models`: the base models and the caller's fine-tuned models it can call."""

from fastapi import APIRouter
from sqlalchemy.orm import Session

from afina.api.deps import DbDep, ProjectDep, SettingsDep, StorageDep
from afina.api.errors import KEYED, error_responses
from afina.api.schemas.inference import ModelList, ModelObject
from afina.api.served_models import base_models, fine_tuned_models, resolve_model
from afina.core.settings import Settings

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
