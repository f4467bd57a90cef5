"""The compose files: the scale-out override passes `docker compose config` (with and without the
CPU override) and describes replicas behind HAProxy sharing PostgreSQL; HAProxy accepts its
configuration.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
from deploy_testing import REPO, docker_compose, run

HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"


def config(*files: str) -> dict[str, Any]:
    """The merged project, as `docker compose config` resolves it."""
    command = docker_compose()
    args = [a for f in files for a in ("-f", f)]
    done = run([*command, *args, "config", "--format", "json"])
    assert done.returncode == 0, done.stderr
    project: dict[str, Any] = json.loads(done.stdout)
    return project


def test_the_single_host_files_still_pass() -> None:
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cpu.yml"]):
        assert "app" in config(*files)["services"]


@pytest.mark.parametrize("cpu", [False, True], ids=["with-a-gpu-each", "cpu-only"])
def test_the_scale_override(cpu: bool) -> None:
    files = ["docker-compose.yml", *(["docker-compose.cpu.yml"] if cpu else [])]
    services = config(*files, "docker-compose.scale.yml")["services"]
    app, lb, postgres = services["app"], services["lb"], services["postgres"]

    # Replicas are reached only through the load balancer, and keep no state of their own.
    assert app["deploy"]["replicas"] == 3
    assert not app.get("ports") and not app.get("volumes")
    assert app["environment"]["LINMOD_DATABASE_URL"].startswith("postgresql+psycopg://linmod:")
    assert "@postgres:5432/linmod" in app["environment"]["LINMOD_DATABASE_URL"]
    assert app["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert app["healthcheck"]["test"][-1].count("/ready") == 1
    devices = app.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert bool(devices) is not cpu
    grace_s = int(app["stop_grace_period"].rstrip("s"))
    drain = ("LINMOD_DRAIN_DELAY_S", "LINMOD_DRAIN_GRACE_S", "LINMOD_SHUTDOWN_TIMEOUT_S")
    assert grace_s >= sum(float(app["environment"][name]) for name in drain)

    assert lb["image"].startswith("haproxy:")  # the official image
    (mount,) = lb["volumes"]
    assert mount["source"] == str(HAPROXY_CFG) and mount["read_only"]
    assert {p["target"] for p in lb["ports"]} == {8000, 8404}

    assert postgres["image"].startswith("postgres:")
    assert "pg_isready" in postgres["healthcheck"]["test"]
    (prometheus_config,) = [
        v["source"] for v in services["prometheus"]["volumes"] if v["target"].endswith(".yml")
    ]
    assert prometheus_config.endswith("deploy/prometheus.scale.yml")


def test_haproxy_accepts_its_configuration() -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (Debian: apt-get install haproxy)")
    done = run([haproxy, "-c", "-f", str(HAPROXY_CFG)])
    assert done.returncode == 0, done.stdout + done.stderr
    text = HAPROXY_CFG.read_text()
    # The replicas are found through Docker's DNS, checked on /ready, and retried.
    assert "server-template app 1-10 app:8000 resolvers docker" in text
    assert "http-check send meth GET uri /ready" in text
    assert "retry-on conn-failure empty-response response-timeout 503" in text


def test_prometheus_accepts_the_scale_configuration() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    done = run([promtool, "check", "config", str(REPO / "deploy" / "prometheus.scale.yml")])
    assert done.returncode == 0, done.stdout + done.stderr
