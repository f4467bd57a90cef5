"""The access log: a line for every error, and for the asked share of the other requests."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from service_testing import make_settings, serving

from service.app import create_app
from service.artifact import ArtifactConfig
from service.engine import FakeEngine
from service.middleware import LogSampler


def test_sampler_takes_the_share_asked_for_evenly_spaced() -> None:
    quarter = LogSampler(0.25)
    assert [i for i in range(12) if quarter.take()] == [0, 4, 8]
    tenth = LogSampler(0.1)
    assert [i for i in range(30) if tenth.take()] == [0, 10, 20]  # no float drift
    third = LogSampler(0.3)
    assert sum(third.take() for _ in range(1000)) == 300
    assert all(LogSampler(1.0).take() for _ in range(5))
    assert not any(LogSampler(0.0).take() for _ in range(5))


@pytest.mark.parametrize("rate", [1.0, 0.25])
async def test_access_log_keeps_every_error_and_the_sampled_share_of_the_rest(
    fake_artifact: Path,
    model_config: ArtifactConfig,
    caplog: pytest.LogCaptureFixture,
    rate: float,
) -> None:
    settings = make_settings(fake_artifact, access_log_sample=rate)
    app = create_app(settings, engine=FakeEngine(model_config))
    caplog.set_level(logging.INFO, logger="linmod.access")
    async with serving(app) as client:
        for i in range(12):
            response = await client.post("/v1/classify", json={"input": f"text {i}"})
            assert response.status_code == 200
        for _ in range(3):
            assert (await client.post("/v1/classify", json={})).status_code == 422
    # (serving() polls /ready until it answers 200: its 503s are errors, logged too.)
    access = [
        r
        for r in caplog.records
        if r.name == "linmod.access" and getattr(r, "route", None) == "/v1/classify"
    ]
    ok = [r for r in access if getattr(r, "status", None) == 200]
    errors = [r for r in access if getattr(r, "status", None) == 422]
    assert len(errors) == 3  # errors are never sampled away
    assert not any(hasattr(r, "sample_rate") for r in errors)
    assert len(ok) == 12 * rate
    if rate < 1.0:  # a sampled line says so, for whoever counts requests from the log
        assert all(getattr(r, "sample_rate", None) == rate for r in ok)
    else:
        assert not any(hasattr(r, "sample_rate") for r in ok)
