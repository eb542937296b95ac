"""What every benchmark records about the machine it ran on (standard library and numpy only)."""

from __future__ import annotations

import datetime as dt
import os
import platform

import numpy as np


def machine_info(**extra) -> dict:
    """CPU model, cores, Python/numpy versions, platform and date, plus the caller's ``extra`` entries."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        **extra,
    }


def load_avg():
    """1, 5 and 15-minute load averages, or None where the system has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write_json(path, results) -> None:
    """Write ``results`` to ``path`` as indented JSON (its folder made if needed); numpy scalars and
    arrays become numbers and lists, anything else unknown its ``str``."""
    import json

    def default(o):
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        return str(o)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=default)
