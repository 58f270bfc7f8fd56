"""FastAPI dependencies: the settings, the database session, the Ray runtime."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from service.config import Settings
from service.db import session_scope
from service.ray_runtime import RayRuntime


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> sa.Engine:
    engine: sa.Engine = request.app.state.engine
    return engine


def get_ray(request: Request) -> RayRuntime:
    runtime: RayRuntime = request.app.state.ray
    return runtime


def get_session(engine: Annotated[sa.Engine, Depends(get_engine)]) -> Iterator[Session]:
    with session_scope(engine) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[sa.Engine, Depends(get_engine)]
RayDep = Annotated[RayRuntime, Depends(get_ray)]
SessionDep = Annotated[Session, Depends(get_session)]
