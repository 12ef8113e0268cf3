"""The tree's rules, checked as behaviour: the pure domain imports no Ray, one home per derivation."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lvm_ray"
PURE = (
    "schema",
    "signals",
    "formats",
    "store",
    "synth",
    "rules",
    "presets",
    "model",
    "stats",
    "lvh",
    "splits",
    "fitting",
    "runs",
    "api",
    "predict",
    "evaluate",
    "outcomes",
    "report",
    "progress",
    "conformal",
    "explain",
    "modelcard",
    "keras_import",
    "inputs",
)


def _ray_modules_after_importing(*modules: str) -> list[str]:
    imports = "; ".join(f"import lvm_ray.{m}" for m in modules)
    code = f"import sys; {imports}; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


def test_pure_modules_import_no_ray():
    if not _ray_modules_after_importing(*PURE):
        return
    culprits = [m for m in PURE if _ray_modules_after_importing(m)]  # only on failure: name them
    pytest.fail(f"these pure modules pull in Ray: {', '.join(culprits)}")


def test_one_definition_of_mosteller_bsa():
    hits = [
        f"{path.relative_to(PACKAGE)}:{i}"
        for path in PACKAGE.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"sqrt\(.*3600|/ 3600", line) and "def " not in line and not line.strip().startswith(("#", '"'))
    ]
    assert len(hits) == 1 and hits[0].startswith("lvh.py"), hits


def test_only_ray_utils_calls_ray_init():
    callers = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "ray.init(" in path.read_text() and path.name != "ray_utils.py"
    ]
    assert callers == []


def test_the_cli_and_the_training_workers_import_no_scipy_signal_or_stats():
    """Each costs ~1 s to import, in every `lvm-ray` call and every Ray Train process (driver,
    controller, workers); they are imported where they are used (resampling, the voltage rules,
    evaluation), not by the modules that only name them."""
    heavy = "('scipy.signal', 'scipy.stats')"
    code = f"import sys, lvm_ray.cli, lvm_ray.train; print(sorted(m for m in {heavy} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ast.literal_eval(proc.stdout.strip().splitlines()[-1]) == []
