"""Small builders shared by tests (imported as tests.helpers)."""

from __future__ import annotations

import torch

from lvm_ray.model import build_model, save_checkpoint
from lvm_ray.presets import get_preset

#: ECGs of the session's held-out cohort (tests/conftest.py, trained_run): enough that sampling alone
#: keeps each sex's interval coverage within 87-93% (SE about 0.9 points with ~2000 ECGs a sex).
HELDOUT_N = 4000


def tiny_checkpoint(url: str, preset: str = "lvm-cpu", seed: int = 0) -> str:
    """A randomly initialised checkpoint of ``preset``: enough to test plumbing, not accuracy."""
    torch.manual_seed(seed)
    model = build_model(preset)
    model.eval()
    save_checkpoint(url, model, get_preset(preset), epoch=0, metrics={"note": "untrained test model"})
    return url
