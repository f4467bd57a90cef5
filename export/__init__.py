"""Export: the trained model to ONNX, quantized, and checked for parity."""

import service  # noqa: F401  (first: it keeps ONNX Runtime's telemetry off)
