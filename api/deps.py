"""Request dependencies: settings, a database session, the artifact store, the queue, the tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.core.errors import ApiError
from service.broker import JobQueue
from service.config import Settings
from service.crud import keys as keys_crud
from service.storage import ArtifactStore
from service.tables import Tenant

bearer = HTTPBearer(auto_error=False, description="An API key from `qdpo keys create --tenant NAME`.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
QueueDep = Annotated[JobQueue, Depends(get_queue)]


def get_current_tenant(session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Tenant:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(401, "missing_api_key", "send your API key as 'Authorization: Bearer <key>'", "Authorization", headers=challenge)
    tenant = keys_crud.authenticate(session, key=credentials.credentials)
    if tenant is None:
        raise ApiError(
            401, "invalid_api_key", "the API key is unknown or revoked; create one with `qdpo keys create --tenant NAME`", "Authorization", headers=challenge
        )
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]
