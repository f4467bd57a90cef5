"""Fixtures of the service tests: a weightless model artifact and controllable fake engines."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from service_testing import FAKE_CONFIG, ControlledEngine, make_settings, serving, train_tokenizer

from service.app import create_app
from service.artifact import ArtifactConfig
from service.engine import FakeEngine


@pytest.fixture(scope="session")
def fake_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with config.json and tokenizer.json but no weights."""
    path = tmp_path_factory.mktemp("fake-artifact")
    (path / "config.json").write_text(json.dumps(FAKE_CONFIG))
    train_tokenizer().save(str(path / "tokenizer.json"))
    return path


@pytest.fixture
def model_config() -> ArtifactConfig:
    return ArtifactConfig.model_validate(FAKE_CONFIG)


@pytest.fixture
def engine(model_config: ArtifactConfig) -> ControlledEngine:
    return ControlledEngine(model_config)


@pytest.fixture
async def fake_client(
    fake_artifact: Path, model_config: ArtifactConfig
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app that serves the fake engine."""
    app = create_app(make_settings(fake_artifact), engine=FakeEngine(model_config))
    async with serving(app) as client:
        yield client
