"""Facts about the machine this process runs on (no Ray: the pure modules use them too)."""

from __future__ import annotations

import os


def local_cores() -> int:
    """This process's usable cores (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


__all__ = ["local_cores"]
