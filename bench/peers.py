"""The serving-framework peers' own environment: created by the benchmark on first use, beside the
project's, so neither LitServe nor Ray ever enters the service's install.

    python -m bench.peers            # create or update .venv-peers and print its python
"""

from __future__ import annotations

import subprocess
import sys
import venv
from importlib.metadata import version
from pathlib import Path

from bench.common import BENCH_DIR

PEERS_VENV = BENCH_DIR.parent / ".venv-peers"
PEER_SERVER = BENCH_DIR / "peer_server.py"
# Pinned: a peer's figures are only comparable run to run at one version.
PEER_PACKAGES = ["litserve==0.2.19", "ray[serve]==2.60.0"]
PEERS = {"LitServe": "litserve", "Ray Serve": "ray"}


def shared_packages() -> list[str]:
    """The model-side packages at this environment's versions, so only the server differs (the
    CPU build of ONNX Runtime: the peers run on the CPU)."""
    import onnxruntime

    return [
        f"onnxruntime=={onnxruntime.__version__}",
        *(f"{name}=={version(name)}" for name in ("tokenizers", "numpy")),
    ]


def ensure_venv() -> tuple[Path | None, str]:
    """The peers' python, created and installed if missing; (None, why) when that fails."""
    python = PEERS_VENV / "bin" / "python"
    stamp = PEERS_VENV / ".installed"
    wanted = " ".join(PEER_PACKAGES + shared_packages())
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python, "ok"
    try:
        if not python.exists():
            venv.create(PEERS_VENV, with_pip=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *wanted.split()],
            check=True, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return None, f"could not install {wanted} into {PEERS_VENV.name}: {detail[-300:]}"
    stamp.write_text(wanted)
    return python, "ok"


def command(python: Path, framework: str, model_dir: Path, port: int, precision: str) -> list[str]:
    return [
        str(python), str(PEER_SERVER), framework, "--model-dir", str(model_dir),
        "--port", str(port), "--precision", precision,
    ]  # fmt: skip


if __name__ == "__main__":
    found, why = ensure_venv()
    print(found if found else why)
    sys.exit(0 if found else 1)
