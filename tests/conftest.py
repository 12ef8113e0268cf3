"""Shared fixtures: one local Ray cluster per test session, and the shared real data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import HELDOUT_N

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


@dataclass(frozen=True)
class TrainedRun:
    """A model trained by the real `train` stage on a synthetic CMR cohort, and a held-out cohort."""

    data: str  # the training cohort (train / val / test splits by patient)
    run: str  # RUN folder: model.pt, run.json, split.parquet, ...
    heldout: str  # an independent cohort (another seed, HELDOUT_N ECGs), never seen in training


@pytest.fixture(scope="session")
def trained_run(ray_cluster, tmp_path_factory) -> TrainedRun:
    """One lvm-cpu model for the whole session (about a minute here): tests that need a model
    that has learnt something (calibration, explanations) share it instead of training their own."""
    from lvm_ray.synth import write_cohort
    from lvm_ray.train import train

    root = tmp_path_factory.mktemp("trained")
    data, heldout, run = str(root / "cmr"), str(root / "heldout"), str(root / "run")
    write_cohort(1600, 21, data, chunk_size=400)
    write_cohort(HELDOUT_N, 22, heldout, chunk_size=1000)
    train(data, run, preset="lvm-cpu", num_workers=2, max_epochs=6, evaluate_test=False)
    return TrainedRun(data=data, run=run, heldout=heldout)
