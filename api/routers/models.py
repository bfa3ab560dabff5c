"""`GET /v1/models`: the base models and the caller's fine-tuned models it can call."""

from fastapi import APIRouter

from afina.api.deps import DbDep, ProjectDep, SettingsDep, StorageDep
from afina.api.schemas.inference import ModelList, ModelObject
from afina.api.served_models import base_models, fine_tuned_models, resolve_model

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(db: DbDep, project: ProjectDep, settings: SettingsDep) -> ModelList:
    return ModelList(data=base_models(db, settings, project) + fine_tuned_models(db, project))


@router.get("/{model:path}", response_model=ModelObject)
def retrieve_model(
    model: str, db: DbDep, project: ProjectDep, settings: SettingsDep, storage: StorageDep
) -> ModelObject:
    """Any name generation takes, a checkpoint's too; 404 for any other."""
    resolve_model(db, settings, storage, project, model)
    listed = base_models(db, settings, project) + fine_tuned_models(db, project)
    found = next((entry for entry in listed if entry.id == model), None)
    return found or ModelObject(id=model, created=0, owned_by=project)
