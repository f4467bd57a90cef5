"""Linmod serving: a FastAPI app that classifies text with an ONNX Linformer model."""

import os

# ONNX Runtime's Linux wheels (1.29 on) send usage telemetry to Microsoft unless this is set
# before the library loads; a self-hosted service keeps it off (docs/deployment.md, "Telemetry").
# A value the user set stands.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
