"""The machine a run or a measurement happened on: CPU, cores, memory and load, from /proc.

Torch is imported only by `machine_info`, so the benchmarks describe a machine without it.
"""

from __future__ import annotations

import math
import os
import platform
from typing import Any


def proc_fields(path: str) -> dict[str, str]:
    """`key: value` lines of a /proc file (the first of each key); empty where unreadable."""
    fields: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() not in fields:
                    fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def describe() -> dict[str, Any]:
    """CPU model, cores, memory and int8 instructions from /proc; the load at this moment."""
    cpu = proc_fields("/proc/cpuinfo")
    mem = proc_fields("/proc/meminfo")
    flags = set(cpu.get("flags", "").split())
    try:
        load = os.getloadavg()
    except OSError:
        load = (math.nan, math.nan, math.nan)
    return {
        "cpu": cpu.get("model name", platform.processor() or platform.machine() or "unknown"),
        "logical_cpus": os.cpu_count() or 0,
        "cores_per_socket": int(cpu.get("cpu cores", "0") or 0),
        "memory_gib": round(int(mem.get("MemTotal", "0 kB").split()[0]) / 2**20, 1),
        "available_gib": round(int(mem.get("MemAvailable", "0 kB").split()[0]) / 2**20, 1),
        "int8_dot": sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}) or ["none"],
        "load_1min": round(load[0], 2),
        "python": platform.python_version(),
    }


def machine_info() -> dict[str, Any]:
    """The machine a training run or a parity check ran on, as run.json and parity.json say."""
    import torch

    m = describe()
    return {
        "cpu": m["cpu"],
        "cores": torch.get_num_threads(),
        "memory_gib": m["memory_gib"] or None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": m["python"],
    }
