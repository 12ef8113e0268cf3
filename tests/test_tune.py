"""Preset files (what `lvm-ray tune` writes and `train --preset-file` reads) and the tuning stage:
ASHA trials on the validation split only, the best configuration written as a preset that trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lvm_ray.presets import (
    PRESETS,
    Preset,
    PresetFileError,
    get_preset,
    load_preset_file,
    preset_file_text,
)
from lvm_ray.tune import TuneError, apply_choices, check_tune_folder, epoch_choices


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_every_preset_survives_a_preset_file(tmp_path, name, suffix):
    path = tmp_path / f"preset{suffix}"
    path.write_text(preset_file_text(get_preset(name), yaml_format=suffix == ".yaml"))
    assert load_preset_file(str(path)) == get_preset(name)


@pytest.mark.parametrize(
    ("content", "suffix", "words"),
    [
        (None, ".json", "does not exist"),
        ("{not json", ".json", "is not valid JSON"),
        ("a: [b", ".yaml", "is not valid YAML"),
        ("[1, 2]", ".json", "does not hold a preset"),
        (json.dumps({"name": "x", "arch": {"kernel_sizes": 3}}), ".json", "kernel_sizes"),
        (json.dumps({"name": "x", "optim": {"selection_metric": "auroc"}}), ".json", "does not fit a regression"),
    ],
)
def test_bad_preset_files_are_named_in_one_line(tmp_path, content, suffix, words):
    path = tmp_path / f"bad{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PresetFileError, match=words) as info:
        load_preset_file(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_train_cli_reports_a_bad_preset_file_without_a_traceback(tmp_path):
    from lvm_ray.cli import app

    result = CliRunner().invoke(
        app,
        ["train", "--data", str(tmp_path), "--run", str(tmp_path / "r"), "--preset-file", str(tmp_path / "no.json")],
    )
    assert result.exit_code != 0
    assert "error: preset file" in result.output and "Traceback" not in result.output


def test_choices_change_what_they_name_and_nothing_else():
    base = get_preset("ptbxl-lvh")
    tuned = apply_choices(base, {"lr": 1e-3, "width": 1.5, "kernel_size": 11, "dropout": 0.1, "max_epochs": 6}, "t")
    assert tuned.arch.stem_filters == 24 and tuned.arch.block_filters == (24, 36, 48, 48)
    assert tuned.arch.kernel_size == 11 and tuned.arch.dropout == 0.1
    assert tuned.optim.lr == 1e-3 and tuned.optim.max_epochs == 6
    assert (tuned.input, tuned.target, tuned.covariates, tuned.augment) == (
        base.input,
        base.target,
        base.covariates,
        base.augment,
    )
    assert tuned.optim.selection_metric == base.optim.selection_metric and tuned.name == "t"
    assert epoch_choices(16) == [8, 12, 16] and epoch_choices(10) == [5, 8, 10] and epoch_choices(1) == [1]


def test_tune_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TuneError, match="not an lvm-ray tuning"):
        check_tune_folder(str(tmp_path), overwrite=True)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "tune.json").write_text("{}")
    with pytest.raises(TuneError, match="pass --overwrite"):
        check_tune_folder(str(earlier), overwrite=False)
    check_tune_folder(str(earlier), overwrite=True)
    assert not (earlier / "tune.json").exists()


@pytest.mark.slow
def test_tune_picks_the_best_validation_trial_and_its_preset_trains(tmp_path, ray_cluster):
    from lvm_ray.cli import app
    from lvm_ray.splits import ids_in_split
    from lvm_ray.store import read_parquet
    from lvm_ray.synth import write_cohort
    from lvm_ray.tune import tune

    data, run = str(tmp_path / "cohort"), tmp_path / "tune"
    write_cohort(240, 51, data, chunk_size=120)
    result = tune(data, str(run), target="hypertension", num_samples=2, max_epochs=2, grace_period=1)

    summary = json.loads((run / "tune.json").read_text())
    assert summary["metric"] == "val_auroc" and len(summary["trials"]) == 2
    # The winner is the best validation AUROC any trial reached at any epoch, read from the trials' own records.
    val_n = len(ids_in_split(read_parquet(str(run / "split.parquet")), "val"))
    best_seen = {}
    for trial_dir in (run / "trials").iterdir():
        history = [json.loads(line) for line in (trial_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(h["val_n"] == val_n for h in history)  # validated on the val split only
        best_seen[trial_dir.name] = max(h["val_auroc"] for h in history)
    assert result.best_trial == max(best_seen, key=best_seen.get)
    assert result.best_value == pytest.approx(max(best_seen.values()))

    preset = load_preset_file(result.preset_file)
    assert preset.arch == apply_choices(get_preset("ptbxl-lvh"), summary["best"]["choices"]).arch
    assert preset.optim.lr == summary["best"]["choices"]["lr"]
    assert preset.target.column == "hypertension" and preset.optim.selection_metric == "auroc"
    trained = CliRunner().invoke(
        app,
        ["train", "--data", data, "--run", str(tmp_path / "run"), "--preset-file", result.preset_file]
        + ["--num-workers", "1", "--max-epochs", "1"],
    )
    assert trained.exit_code == 0, trained.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert Preset.from_dict(record["config"]["preset"]).arch == preset.arch
    assert record["config"]["preset"]["name"] == "ptbxl-lvh-tuned"
    assert Path(result.preset_file).name == "best_preset.json"
