"""Training: the Linformer classifier, its data and its recipes."""

import service  # noqa: F401  (first: it keeps ONNX Runtime's telemetry off)
