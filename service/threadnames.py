"""The service's threads under their own names in the kernel, not only in Python.

Python (before 3.14) keeps a thread's name to itself: `top -H`, `ps -L`, perf and /proc show every
thread under the process's name. Named there too, the engine, tokenizer and database threads can
be told apart from the event loop (the main thread) by any tool, and their CPU time read apart
(`bench.load` does, from /proc).
"""

from __future__ import annotations

import threading

from setproctitle import setthreadtitle

KERNEL_NAME_BYTES = 15  # Linux keeps a thread name's first 15 bytes


def name_this_thread(name: str | None = None) -> None:
    """Give the calling thread `name` (default: its Python name) in the kernel; as a
    ThreadPoolExecutor `initializer`, it names each of the pool's threads as it starts."""
    setthreadtitle((name or threading.current_thread().name)[:KERNEL_NAME_BYTES])
