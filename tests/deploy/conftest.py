"""The deployment tests reuse the batch-job tests' helpers (PostgreSQL schemas, batch files,
server processes), which live beside those tests as top-level modules."""

from __future__ import annotations

import sys
from pathlib import Path

SERVICE_TESTS = Path(__file__).resolve().parents[1] / "service"
if str(SERVICE_TESTS) not in sys.path:
    sys.path.insert(0, str(SERVICE_TESTS))
