"""Annotated dependencies: settings, codebook, database session and clock come from app.state."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlmodel import Session

from ..app.cache import EvaluationCache
from ..codebook import Codebook
from ..config.settings import Settings
from ..storage.db import read_only, sessions


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_codebook(request: Request) -> Codebook:
    codebook: Codebook = request.app.state.codebook
    return codebook


def get_evaluation_cache(request: Request) -> EvaluationCache:
    cache: EvaluationCache = request.app.state.evaluations
    return cache


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_session(engine: Annotated[Engine, Depends(get_engine)]) -> Iterator[Session]:
    yield from sessions(engine)


def get_read_session(engine: Annotated[Engine, Depends(get_engine)]) -> Iterator[Session]:
    """For routes that only read: on SQLite no write lock, so they never wait behind a writer."""
    yield from sessions(read_only(engine))


def get_clock(request: Request) -> Callable[[], datetime]:
    clock: Callable[[], datetime] = request.app.state.clock
    return clock


SettingsDep = Annotated[Settings, Depends(get_settings)]
CodebookDep = Annotated[Codebook, Depends(get_codebook)]
EngineDep = Annotated[Engine, Depends(get_engine)]
EvaluationCacheDep = Annotated[EvaluationCache, Depends(get_evaluation_cache)]
# scope="function": commit before the response is sent, so a failed commit is never a 2xx.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
ReadSessionDep = Annotated[Session, Depends(get_read_session, scope="function")]
ClockDep = Annotated[Callable[[], datetime], Depends(get_clock)]
