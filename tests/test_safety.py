"""Never lose a user's data: every stage refuses folders it did not write, and replaces only its own output.

Each case here destroyed files in lvm-ray 0.1 (issue "Never lose a user's data").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lvm_ray import store
from lvm_ray.cli import app
from lvm_ray.synth import write_cohort
from tests.helpers import tiny_checkpoint

runner = CliRunner()


def _tree(root: Path) -> dict[str, int]:
    """Every file under root with its size: what a user would miss."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("safety") / "cohort")
    write_cohort(48, 5, root, chunk_size=24)
    return root


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """A folder holding a user's own files."""
    folder = tmp_path / "thesis"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "sub" / "thesis.docx").write_bytes(b"\x50\x4b" * 100)
    return folder


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0, result.output
    text = result.output.strip()
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_rules_into_its_own_input_is_refused_and_the_dataset_survives(cohort, ray_cluster):
    before = _tree(Path(cohort))
    result = runner.invoke(app, ["rules", "--data", cohort, "--out", cohort])
    _one_line_error(result, "is (or is inside) the input")
    assert _tree(Path(cohort)) == before
    store.verify(cohort)
    inside = runner.invoke(app, ["rules", "--data", cohort, "--out", f"{cohort}/rules"])
    _one_line_error(inside, "input")


def test_rules_into_a_folder_of_user_files_is_refused(cohort, user_folder, ray_cluster):
    before = _tree(user_folder)
    result = runner.invoke(app, ["rules", "--data", cohort, "--out", str(user_folder)])
    _one_line_error(result, str(user_folder), "not lvm-ray's")
    assert _tree(user_folder) == before


def test_rules_replaces_only_its_own_table(cohort, tmp_path, ray_cluster):
    out = tmp_path / "rules"
    assert runner.invoke(app, ["rules", "--data", cohort, "--out", str(out)]).exit_code == 0
    assert json.loads((out / "_rules.json").read_text())["n"] == 48
    assert runner.invoke(app, ["rules", "--data", cohort, "--out", str(out)]).exit_code == 0
    from lvm_ray.measure import read_rules

    assert len(read_rules(str(out))) == 48
    assert not list(tmp_path.glob("rules.partial-*")) and not list(tmp_path.glob("rules.old-*"))


def test_score_overwrite_keeps_user_files_and_refuses_foreign_folders(cohort, user_folder, tmp_path, ray_cluster):
    checkpoint = tiny_checkpoint(str(tmp_path / "model.pt"))
    before = _tree(user_folder)
    refused = runner.invoke(
        app, ["score", "--data", cohort, "--checkpoint", checkpoint, "--out", str(user_folder), "--overwrite"]
    )
    _one_line_error(refused, "not lvm-ray's")
    assert _tree(user_folder) == before
    _one_line_error(
        runner.invoke(app, ["score", "--data", cohort, "--checkpoint", checkpoint, "--out", cohort]), "input"
    )

    out = tmp_path / "preds"
    args = ["score", "--data", cohort, "--checkpoint", checkpoint, "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    (out / "README.txt").write_text("what these predictions are for")  # a note the user added later
    again = runner.invoke(app, [*args, "--overwrite"])
    assert again.exit_code == 0, again.output
    assert (out / "README.txt").read_text() == "what these predictions are for"
    from lvm_ray.score import read_predictions

    final = read_predictions(str(out), columns=["ecg_id"])
    assert len(final) == 48 and final.ecg_id.is_unique


def test_missing_checkpoint_is_reported_before_ray_starts(cohort, tmp_path):
    result = runner.invoke(
        app, ["score", "--data", cohort, "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "p")]
    )
    _one_line_error(result, "no checkpoint")
    assert not (tmp_path / "p").exists()


def test_train_refuses_dataset_and_user_folders_and_overwrite_keeps_user_files(cohort, user_folder, tmp_path):
    _one_line_error(runner.invoke(app, ["train", "--data", cohort, "--run", cohort]), "holds a dataset")
    before = _tree(user_folder)
    _one_line_error(runner.invoke(app, ["train", "--data", cohort, "--run", str(user_folder)]), "not an lvm-ray run")
    assert _tree(user_folder) == before

    from lvm_ray.runs import RUN_FILE, remove_run_outputs

    run = tmp_path / "run"
    (run / "ray").mkdir(parents=True)
    (run / RUN_FILE).write_text("{}")
    (run / "my_plot.png").write_bytes(b"png")
    remove_run_outputs(str(run))
    assert sorted(p.name for p in run.iterdir()) == ["my_plot.png"]


def test_report_mistakes_get_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(
        runner.invoke(app, ["report", "--eval", str(empty), "--out", str(tmp_path / "r.html")]), "metrics.json"
    )
    missing = str(tmp_path / "missing")
    _one_line_error(
        runner.invoke(app, ["report", "--eval", missing, "--out", str(tmp_path / "r.html")]), "does not exist"
    )
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps({"n": 0}))
    _one_line_error(
        runner.invoke(app, ["report", "--eval", str(evaluation), "--out", str(tmp_path / "r.html")]), "n = 0"
    )
    (evaluation / "metrics.json").write_text(json.dumps({"n": 10}))
    _one_line_error(
        runner.invoke(app, ["report", "--eval", str(evaluation), "--outcomes", str(empty), "--out", "r.html"]),
        "outcomes.json",
    )
    _one_line_error(runner.invoke(app, ["report", "--eval", str(evaluation), "--out", str(empty)]), "is a folder")
    assert not list(tmp_path.glob("*.html"))


def test_missing_inputs_of_evaluate_and_outcomes_get_one_line(cohort, tmp_path):
    missing = str(tmp_path / "no_predictions")
    _one_line_error(runner.invoke(app, ["evaluate", "--predictions", missing, "--out", str(tmp_path / "e")]), missing)
    _one_line_error(
        runner.invoke(
            app,
            ["outcomes", "--predictions", missing, "--followup", str(tmp_path / "f.csv"), "--out", str(tmp_path / "o")],
        ),
    )


def test_score_warns_about_amplitude_normalised_ecgs(tmp_path, ray_cluster):
    """A recording scaled to 1 mV per lead is ingested flagged, scored, and the summary warns about it."""
    import numpy as np

    from lvm_ray.synth import generate_batch

    exports = tmp_path / "exports"
    exports.mkdir()
    ecg = generate_batch(3, seed=9).ecg.astype(float)
    for i, wave in enumerate(ecg):
        if i == 0:  # every lead rescaled to exactly 1 mV peak to peak
            wave = (wave - wave.min(axis=1, keepdims=True)) / np.ptp(wave, axis=1, keepdims=True) * 1000.0
        np.save(exports / f"ecg{i}.npy", wave)
    data = str(tmp_path / "data")
    ingested = runner.invoke(app, ["ingest", str(exports), "--out", data, "--sample-rate", "500"])
    assert ingested.exit_code == 0, ingested.output
    assert "flagged" in ingested.output
    checkpoint = tiny_checkpoint(str(tmp_path / "model.pt"))
    out = tmp_path / "preds"
    scored = runner.invoke(app, ["score", "--data", data, "--checkpoint", checkpoint, "--out", str(out)])
    assert scored.exit_code == 0, scored.output
    assert "warning: 1 ECG(s) look amplitude-normalised" in scored.output
    from lvm_ray.score import read_predictions

    preds = read_predictions(str(out), columns=["ecg_id", "quality_flag"]).set_index("ecg_id")
    assert preds.loc["ecg0", "quality_flag"].startswith("amplitude-normalised")
    assert preds.loc[["ecg1", "ecg2"], "quality_flag"].isna().all()
    strict = runner.invoke(
        app, ["ingest", str(exports), "--out", str(tmp_path / "strict"), "--sample-rate", "500", "--strict"]
    )
    assert strict.exit_code == 1 and "quarantined (--strict)" in strict.output


def test_synth_never_replaces_a_dataset_silently(tmp_path, user_folder):
    out = str(tmp_path / "cohort")
    assert runner.invoke(app, ["synth", "--n", "20", "--seed", "1", "--out", out, "--chunk-size", "20"]).exit_code == 0
    first = store.read_manifest(out)["shards"]
    _one_line_error(runner.invoke(app, ["synth", "--n", "20", "--seed", "2", "--out", out]), "already holds a dataset")
    assert store.read_manifest(out)["shards"] == first
    replaced = runner.invoke(
        app, ["synth", "--n", "20", "--seed", "2", "--out", out, "--chunk-size", "20", "--overwrite"]
    )
    assert replaced.exit_code == 0 and store.read_manifest(out)["shards"] != first
    before = _tree(user_folder)
    _one_line_error(
        runner.invoke(app, ["synth", "--n", "20", "--out", str(user_folder), "--overwrite"]), "not lvm-ray's"
    )
    assert _tree(user_folder) == before


def test_a_demo_stopped_by_sigterm_says_so_in_one_line(tmp_path, ray_cluster, monkeypatch) -> None:
    """`lvm-ray demo` (make demo) stopped part-way by a real SIGTERM (`kill`), delivered here the
    moment it starts writing its cohort: one line and exit 143, not a traceback or Ray's stack dump."""
    import os
    import signal
    import time

    import lvm_ray.synth

    def killed_while_writing(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # runs the process's real SIGTERM handler
        time.sleep(10)  # the handler raises here
        raise AssertionError("SIGTERM did not stop the demo")

    monkeypatch.setattr(lvm_ray.synth, "write_cohort", killed_while_writing)
    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path / "demo")])
    assert result.exit_code == 143, result.output
    message = f"interrupted: the demo's outputs in {tmp_path / 'demo'} are incomplete; run it again to redo them"
    assert result.output.strip().splitlines()[-1] == message, result.output
    assert "Traceback" not in result.output
    assert signal.getsignal(signal.SIGTERM) == before  # the handler does not outlive the command
