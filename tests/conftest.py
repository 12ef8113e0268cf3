"""Shared fixtures: one local Ray cluster per test session, and the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"


def _shared_data_dir() -> Path:
    return Path(os.environ.get("LVM_RAY_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $LVM_RAY_SHARED_DATA): the large real data; skips plainly when absent."""
    path = _shared_data_dir()
    if not (path / "ptbxl" / "metadata.csv").exists():
        pytest.skip(f"shared real data not found at {path} (set LVM_RAY_SHARED_DATA); CI always has it")
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (ray.init costs seconds here)."""
    import ray

    from lvm_ray.ray_utils import ensure_connected

    # The same function (and object-store cap) users get; 4 logical CPUs on the 2 physical cores.
    ensure_connected(None, num_cpus=4)
    yield ray
    ray.shutdown()
