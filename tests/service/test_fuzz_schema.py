"""Schemathesis against the app's own OpenAPI schema, on a real server process (fake engine):
every operation gets generated requests, valid and invalid, with and without the key; none may
answer 5xx, and the server must still serve afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode
from service_testing import free_port, wait_server_ready

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
# Per operation and generation mode. 125 gave 1,808 requests over 14 operations (hypothesis stops
# early where it finds no new case); 150 leaves room above 2,000.
EXAMPLES = 150
KEY = "fuzz-key"


@pytest.fixture(scope="module")
def server(fake_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("fuzz")
    url = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINMOD_")}
    env["LINMOD_API_KEYS"] = KEY
    cmd = [
        sys.executable, str(HERE / "fake_server.py"), "--model-dir", str(fake_artifact),
        "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--log-format", "json",
        "--log-level", "warning", "--database-url", f"sqlite:///{tmp / 'jobs.db'}",
        "--job-poll-s", "0.05", "--drain-grace-s", "2",
    ]  # fmt: skip
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    wait_server_ready(proc, url, log, timeout=180)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_no_generated_request_gets_a_server_error(server: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    schema = schemathesis.openapi.from_dict(httpx.get(f"{server}/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    skipped: list[str] = []
    session = requests.Session()

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,  # the same requests on every CI run
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            # Nine in ten with the key, so most requests get past the key check.
            @given(case=strategy, keyed=st.integers(0, 9).map(bool))
            def run(case: schemathesis.Case, keyed: bool) -> None:
                if keyed:
                    generated = {
                        k: v
                        for k, v in (case.headers or {}).items()
                        if k.lower() != "authorization"
                    }
                    case.headers = {**generated, **headers}
                response = case.call(base_url=server, session=session, timeout=30)
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    errors.append(f"{case.method} {case.formatted_path}: {response.text[:300]}")

            try:
                run()
            except Unsatisfiable:  # nothing invalid to send (an operation without parameters)
                skipped.append(f"{operation.method.upper()} {operation.path} {mode.value}")

    total = sum(statuses.values())
    print(
        f"\nschemathesis: {len(operations)} operations, {total} requests, statuses {sorted(statuses.items())}"
    )
    assert not errors, errors[:10]
    assert total >= 2000, statuses
    assert httpx.get(f"{server}/health").status_code == 200
    alive = httpx.post(f"{server}/v1/classify", json={"input": "still here"}, headers=headers)
    assert alive.status_code == 200, alive.text
