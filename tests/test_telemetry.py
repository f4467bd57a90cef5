"""ONNX Runtime's usage telemetry stays off: every package that loads onnxruntime sets
ORT_DISABLE_TELEMETRY before the library is first imported, and a value the user set stands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Notes the variable at the moment onnxruntime is first imported: by the module itself, or after
# it, where the module imports onnxruntime only when first used.
WATCH = """
import importlib, importlib.abc, os, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime" and not seen:
            seen.append(os.environ.get("ORT_DISABLE_TELEMETRY", "unset"))
        return None
sys.meta_path.insert(0, Watch())
importlib.import_module(sys.argv[1])
import onnxruntime  # where the module imports it lazily, as it would on first use
print(seen[0])
"""


def variable_when_loaded(module: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    done = subprocess.run(
        [sys.executable, "-c", WATCH, module],
        cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return done.stdout.strip()


@pytest.mark.parametrize(
    "module", ["service.engine", "export.onnx_export", "export.parity", "bench.runners"]
)
def test_onnx_runtime_loads_with_its_telemetry_off(module: str) -> None:
    assert variable_when_loaded(module) == "1"


def test_a_value_the_user_set_stands() -> None:
    assert variable_when_loaded("export.parity", ORT_DISABLE_TELEMETRY="0") == "0"
