"""Benchmarks: attention scaling, engine precisions and the service under load (see RESULTS.md)."""
