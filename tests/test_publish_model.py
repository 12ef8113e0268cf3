"""jobs/publish_model.py: a served model is an immutable, versioned copy named by its digest."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from lvm_ray.model import MODEL_FILE, build_model, read_payload, save_checkpoint
from lvm_ray.predict import Predictor
from lvm_ray.presets import get_preset

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "jobs" / "publish_model.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("publish_model", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _publish(run: Path, to: Path, capsys: pytest.CaptureFixture[str]) -> _Result:
    """The script's main, in this process (the subprocess test below covers the real command)."""
    code = _script().main(["--run", str(run), "--to", str(to)])
    out = capsys.readouterr()
    return _Result(code, out.out, out.err)


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    preset = get_preset("lvm-cpu")
    save_checkpoint(str(folder / MODEL_FILE), build_model(preset), preset, epoch=7)
    return folder


def test_publish_copies_the_model_under_its_version_once(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    first = _publish(run, models, capsys)
    assert first.returncode == 0, first.stderr
    version = Predictor.checkpoint_version(str(run))
    _package, preset, label, digest = version.split("/")
    folder = models / f"{preset}-{label}-{digest}"
    assert first.stdout.splitlines() == [f"published {version}", f"  {folder / MODEL_FILE}"]
    # The copy is the same model: what GET /v1/model reports (model_version) ends with the folder's digest.
    assert Predictor.from_checkpoint(str(folder / MODEL_FILE)).version == version
    assert (folder / MODEL_FILE).read_bytes() == (run / MODEL_FILE).read_bytes()
    record = json.loads((folder / "published.json").read_text())
    assert record["model_version"] == version and record["source"] == str(run / MODEL_FILE)

    # Publishing the same bytes again changes nothing.
    again = _publish(run, models, capsys)
    assert again.returncode == 0 and again.stdout.startswith(f"already published {version}")
    assert json.loads((folder / "published.json").read_text()) == record

    # The live run file changes (same weights, e.g. a re-calibration): the published version is
    # never replaced under the same name.
    payload = read_payload(str(run))
    payload["metrics"] = {"recalibrated": 1.0}
    import torch

    torch.save(payload, run / MODEL_FILE)
    assert Predictor.checkpoint_version(str(run)) == version
    refused = _publish(run, models, capsys)
    assert refused.returncode == 1 and refused.stdout == ""
    (line,) = refused.stderr.splitlines()
    assert line.startswith(f"error: {folder / MODEL_FILE} already holds another file for model {version}")
    assert Predictor.from_checkpoint(str(folder / MODEL_FILE)).training_summary["metrics"] == {}


def test_publish_refuses_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    """The command itself: one error line and exit 1, no traceback, nothing written."""
    refused = subprocess.run(
        [sys.executable, str(SCRIPT), "--run", str(tmp_path / "nothing"), "--to", str(tmp_path / "models")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1
    (line,) = refused.stderr.splitlines()
    assert line.startswith("error: no checkpoint at") and not (tmp_path / "models").exists()
