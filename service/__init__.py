"""Linmod serving: a FastAPI app that classifies text with an ONNX Linformer model."""

__version__ = "0.1.0"
