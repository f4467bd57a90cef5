"""Benchmarks: attention scaling, engine precisions and the service under load (see RESULTS.md)."""

import service  # noqa: F401  (first: it keeps ONNX Runtime's telemetry off)
