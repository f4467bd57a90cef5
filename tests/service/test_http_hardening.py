"""The HTTP edge under hostile use: keys checked before the body is read, keys from a file or the
environment, open routes as documented, security headers, bounded method labels and multipart
forms, and a /ready that tells an anonymous caller nothing of the server's internals.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import pytest
from service_testing import ControlledEngine, make_settings, serving, until

from service.app import create_app
from service.artifact import ArtifactConfig
from service.cli import settings_from_args
from service.engine import FakeEngine
from service.settings import Settings
from service.state import get_state

AUTH = {"authorization": "Bearer k1"}


Serve = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def keyed(fake_artifact: Path, model_config: ArtifactConfig) -> Serve:
    """Serve an app with the key k1 and these settings."""

    def make(**overrides: object) -> AbstractAsyncContextManager[httpx.AsyncClient]:
        settings = make_settings(fake_artifact, api_keys="k1", **overrides)
        return serving(create_app(settings, engine=FakeEngine(model_config)))

    return make


@pytest.mark.parametrize(
    ("path", "content", "content_type"),
    [
        ("/v1/classify", b"{not json", "application/json"),
        ("/v1/moderations", b'{"input": "\\ud800', "application/json"),
        ("/v1/classify", b"x" * 10, "text/plain"),
        ("/v1/files", b"--x\r\n", "multipart/form-data; boundary=x"),
        ("/v1/batches", b"[", "application/json"),
        ("/v1/nowhere", b"", "application/json"),
    ],
)
async def test_without_a_key_any_body_is_a_401(
    keyed: Serve, path: str, content: bytes, content_type: str
) -> None:
    async with keyed() as client:
        response = await client.post(path, content=content, headers={"content-type": content_type})
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_api_key"
        with_key = await client.post(
            "/v1/classify",
            content=b"{not json",
            headers={"content-type": "application/json"} | AUTH,
        )
        assert with_key.status_code == 400


async def test_open_routes_and_the_option_to_close_info(keyed: Serve) -> None:
    async with keyed() as client:
        for path in ("/health", "/ready", "/metrics", "/info", "/docs", "/openapi.json"):
            assert (await client.get(path)).status_code == 200, path
    async with keyed(public_info=False) as client:
        for path in ("/health", "/ready", "/metrics"):
            assert (await client.get(path)).status_code == 200, path
        for path in ("/info", "/docs", "/openapi.json", "/redoc"):
            assert (await client.get(path)).status_code == 401, path
            assert (await client.get(path, headers=AUTH)).status_code == 200, path


def test_keys_from_a_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# rotated monthly\nfile-key-1\n\n  file-key-2  \n")
    monkeypatch.setenv("LINMOD_API_KEYS", "env-key")
    settings = settings_from_args(["--api-keys-file", str(keys)])
    assert settings.api_keys == ["env-key", "file-key-1", "file-key-2"]
    monkeypatch.delenv("LINMOD_API_KEYS")
    monkeypatch.setenv("LINMOD_API_KEYS_FILE", str(keys))
    assert Settings().api_keys == ["file-key-1", "file-key-2"]
    (tmp_path / "empty").write_text("# none\n")
    with pytest.raises(ValueError, match="holds no keys"):
        Settings(api_keys_file=tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot read"):
        Settings(api_keys_file=tmp_path / "missing")


async def test_security_headers(fake_client: httpx.AsyncClient) -> None:
    for response in (
        await fake_client.post("/v1/classify", json={"input": "hi"}),
        await fake_client.post("/v1/classify", json={"input": 1}),
        await fake_client.get("/v1/files/file-none"),
        await fake_client.get("/metrics"),
    ):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-store"
    docs = await fake_client.get("/docs")
    assert docs.headers["x-content-type-options"] == "nosniff"
    assert "no-store" not in docs.headers.get("cache-control", "")


async def test_method_labels_come_from_a_fixed_set(fake_client: httpx.AsyncClient) -> None:
    for method in ("BREW", "X" * 50, "PROPFIND", "get"):
        await fake_client.request(method, "/v1/classify")
    text = (await fake_client.get("/metrics")).text
    methods = {
        line.split('method="', 1)[1].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith("linmod_http_requests_total{")
    }
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert "other" in methods


async def test_ready_hides_the_warm_up_error(
    fake_artifact: Path, model_config: ArtifactConfig
) -> None:
    engine = ControlledEngine(model_config, fail_if=lambda ids: True)
    app = create_app(make_settings(fake_artifact), engine=engine)
    async with app.router.lifespan_context(app):
        state = get_state(app)
        await until(lambda: state.startup_error is not None)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        async with client:
            ready = await client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "startup_failed"
        assert "boom" not in ready.text and "boom" in state.startup_error


async def test_a_form_with_many_fields_is_refused(fake_client: httpx.AsyncClient) -> None:
    parts = "".join(
        f'--b\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nv\r\n' for i in range(50)
    )
    body = (parts + "--b--\r\n").encode()
    response = await fake_client.post(
        "/v1/files", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 400, response.text
    assert "more than 8 fields" in response.json()["error"]["message"]
    header = '--b\r\nContent-Disposition: form-data; name="purpose"\r\nX-Pad: ' + "p" * 20000
    response = await fake_client.post(
        "/v1/files",
        content=(header + "\r\n\r\nbatch\r\n--b--\r\n").encode(),
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code == 400, response.text
