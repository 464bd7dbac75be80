"""Fixtures of the serving tests: real models trained once per session, storage filled once, services on demand."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import migrations
from llmcf.settings import Settings
from ranker.registry import TrainResult
from ranker.serving.app import Limits, RankerService
from ranker.serving.server import ServeOptions, build_service
from storage.repository import Repository
from tests.ranker.serving.support import Populated, populate_storage, train_version


@pytest.fixture(scope="session")
def serving_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("serving-home")
    return Settings.from_env({"LLMCF_HOME": str(home), "LLMCF_RANKER_POOL_SYNC_S": "0.2"})


@pytest.fixture(scope="session")
def versions(serving_settings: Settings) -> dict[str, TrainResult]:
    """Two DeepFM+ICT versions (trained differently, so they score differently: a response shows which one scored it)
    and the DeepFM backbone alone, registered as candidates in the session database."""
    return {
        "ict_a": train_version(serving_settings, ict=True),
        "ict_b": train_version(serving_settings, ict=True, epochs=1, learning_rate=3e-3),
        "backbone": train_version(serving_settings, ict=False, epochs=1),
    }


@pytest.fixture(scope="session")
def populated(serving_settings: Settings, versions: dict[str, TrainResult]) -> Populated:
    """The session database (SQLite under the session home) as the pipeline leaves it: items, embeddings, interactions,
    CoT samples."""
    migrations.upgrade(serving_settings.database_url)
    with Repository.from_settings(serving_settings) as repository:
        return populate_storage(repository, serving_settings, samples=120)


@pytest.fixture
def make_service(serving_settings: Settings, tmp_path: Path) -> Iterator[Callable[..., RankerService]]:
    """`make_service(kind=..., database_url=..., **limits)`: a service with its own example pool."""
    repositories: list[Repository] = []

    def make(kind: str = "deepfm+ict", database_url: str | None = None, **limits: object) -> RankerService:
        url = database_url or serving_settings.database_url
        migrations.upgrade(url)
        repository = Repository.from_url(url)
        repositories.append(repository)
        return build_service(serving_settings, ServeOptions(kind=kind), repository, limits=Limits(**limits))  # type: ignore[arg-type]

    yield make
    for repository in repositories:
        repository.close()
