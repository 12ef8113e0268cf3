"""Small builders shared by tests (imported as tests.helpers)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

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


def start_as_foreground_job(script: str) -> subprocess.Popen:
    """``python -c script`` in its own process group, as a terminal's foreground job (SIGINT to the
    group is Ctrl-C), its stdout and stderr piped as text."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen([sys.executable, "-c", script], start_new_session=True, **pipes)


def interrupt_when_ready(
    proc: subprocess.Popen, ready: Callable[[], object], what: str, stop: int, code: int, timeout_s: float = 180
) -> str:
    """Wait (up to 240 s) until ``ready()``, send ``stop`` to ``proc``'s process group (as a terminal
    does on Ctrl-C), and check the stage ended with exit ``code`` and its one interrupted line:
    no traceback, no stack dump of Ray's own SIGTERM handler, no line of Ray's core worker.
    Returns its stderr."""
    deadline = time.time() + 240
    while time.time() < deadline and not ready():
        assert proc.poll() is None, f"{what} ended before it could be interrupted: {proc.communicate()}"
        time.sleep(0.2)
    os.killpg(proc.pid, stop)
    _, stderr = proc.communicate(timeout=timeout_s)
    assert proc.returncode == code, (proc.returncode, stderr[-2000:])
    assert "interrupted: re-run the same command to resume" in stderr
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr[-2000:]
    # Nor the ERROR line Ray's core worker copies to stderr for Ray Data's actor pools (#53727).
    assert "core_worker.cc" not in stderr, stderr[-2000:]
    return stderr
