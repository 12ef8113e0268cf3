"""The model card: every number it states comes from the checkpoint, the run record or the data.

Fast tests build run folders by hand (a real cohort, a real checkpoint, a split table) and check
the card against numbers computed here independently; the slow test reads the card that the
real `train` stage wrote for the session's trained model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lvm_ray import store
from lvm_ray.conformal import fit_calibration
from lvm_ray.model import build_model, count_parameters, save_checkpoint, write_calibration
from lvm_ray.modelcard import CARD_JSON, CARD_MARKDOWN, load_or_build, model_card, write_model_card
from lvm_ray.predict import Predictor
from lvm_ray.presets import get_preset
from lvm_ray.splits import SplitSpec
from lvm_ray.stats import fisher_z_ci
from lvm_ray.synth import write_cohort

SEED = 5
N = 80
COUNTS = {"train": 50, "val": 15, "test": 15, "excluded": 0}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> str:
    data = str(tmp_path_factory.mktemp("card") / "cohort")
    write_cohort(N, SEED, data, chunk_size=40)
    return data


def _run(folder: Path, data: str | None, *, seed: int = 0, provenance: dict | None = None, kind: str | None = None):
    """A run folder like `train` writes: model.pt with metrics and split, run.json, split.parquet, test metrics."""
    torch.manual_seed(seed)
    preset = get_preset("lvm-cpu")
    save_checkpoint(
        str(folder / "model.pt"),
        build_model(preset).eval(),
        preset,
        epoch=4,
        metrics={"n": 15, "mae": 12.5, "pearson_r": 0.61},
        split={**dataclasses.asdict(SplitSpec()), "counts": COUNTS},
        provenance=provenance,
    )
    record = {"status": "finished", "split_counts": COUNTS} if kind is None else {"kind": kind, "status": "finished"}
    if data is not None:
        record["config"] = {"data": data}
        ids = store.read_table(data, columns=["ecg_id"]).column("ecg_id").to_pylist()
        split = ["train"] * 50 + ["val"] * 15 + ["test"] * 15
        store.write_table(str(folder / "split.parquet"), pd.DataFrame({"ecg_id": sorted(ids), "split": split}))
        store.write_json(str(folder / "test_metrics.json"), {"split": "test", "n": 15, "mae": 14.0, "pearson_r": 0.5})
    store.write_json(str(folder / "run.json"), record)
    return str(folder)


def test_card_of_a_trained_run_states_its_checkpoint_and_data(cohort, tmp_path):
    run = _run(tmp_path / "run", cohort)
    card = write_model_card(run)
    markdown = (tmp_path / "run" / CARD_MARKDOWN).read_text()
    assert markdown == card["markdown"]
    assert json.loads((tmp_path / "run" / CARD_JSON).read_text())["model_version"] == card["model_version"]
    # The checkpoint: identity, architecture, input and normalisation.
    assert card["model_version"] == Predictor.checkpoint_version(run)
    assert card["model_version"] in markdown.splitlines()[0]
    assert card["model"]["parameters"] == count_parameters(build_model("lvm-cpu")) == 73985
    assert "73,985 parameters" in markdown
    assert card["model"]["input"]["sample_rate_hz"] == 100 and card["model"]["input"]["n_samples"] == 1000
    assert "microvolts / 1000, anti-aliased decimation of the canonical 500 Hz by 5" in markdown
    # The training data, described from the dataset and the run's split (computed here independently).
    table = store.read_table(cohort).drop_columns(["ecg"]).to_pandas().sort_values("ecg_id").iloc[:50]
    data = card["training_data"]
    assert data["reachable"] and data["n_stored"] == N and data["n_quarantined"] == 0
    assert data["source_formats"] == {"synthetic": N}
    assert data["n"] == 50 and data["sex"] == table.sex.value_counts().to_dict()
    assert data["age"]["mean"] == pytest.approx(table.age.mean())
    assert data["lv_mass_g"]["p50"] == pytest.approx(table.lv_mass_g.median())
    lvmi = table.lv_mass_g / table.bsa_m2
    assert data["cmr_lvh_prevalence"] == pytest.approx((lvmi > np.where(table.sex == "M", 72, 55)).mean())
    assert card["splits"]["counts"] == COUNTS and "train 50, val 15, test 15" in markdown
    # Synthetic provenance, said plainly.
    assert card["provenance"]["kind"] == "trained-synthetic" and card["provenance"]["seed"] == SEED
    assert "SYNTHETIC cohort" in markdown and "Do not use it on patients" in markdown
    # Metrics with the CIs a summary allows.
    val, test = card["metrics"]["validation"], card["metrics"]["test"]
    assert val["pearson_r_ci"] == pytest.approx(list(fisher_z_ci(0.61, 15)))
    assert test["pearson_r_ci"] == pytest.approx(list(fisher_z_ci(0.5, 15))) and test["mae"] == 14.0
    assert "0.610 (95% CI" in markdown
    assert card["calibration"] is None and "Not calibrated" in markdown


def test_the_card_follows_the_weights_and_the_calibration(cohort, tmp_path):
    run = _run(tmp_path / "run", cohort)
    written = write_model_card(run)
    assert load_or_build(run)["generated"] == written["generated"]  # the card on disk describes these weights
    _run(tmp_path / "run", cohort, seed=1)  # new weights, stale card
    assert load_or_build(run)["model_version"] == Predictor.checkpoint_version(run) != written["model_version"]
    rng = np.random.default_rng(0)
    true = rng.normal(90, 20, 400)
    calibration = fit_calibration(
        true * np.exp(rng.normal(0, 0.1, 400)),
        true,
        np.where(rng.random(400) < 0.5, "M", "F"),
        rng.normal(1.9, 0.2, 400),
        level=0.8,
        provenance={"stage": "calibrate", "data": cohort, "split": "val"},
    )
    write_calibration(f"{run}/model.pt", calibration.to_payload())
    # Same weights, new calibration: the card on disk is stale and is not served.
    assert load_or_build(run)["calibration"]["id"] == calibration.identity
    card = write_model_card(run)
    assert card["calibration"]["level"] == 0.8 and card["calibration"]["id"] == calibration.identity
    assert "nominal coverage | 80% (conformal" in card["markdown"]
    assert "Not calibrated" not in card["markdown"]


def test_imported_weights_are_said_to_be_imported(tmp_path):
    provenance = {
        "source": "keras-hdf5",
        "source_file": "lvm_ai.h5",
        "source_sha256": "ab" * 32,
        "imported_by": "lvm-ray 0.1",
    }
    run = _run(tmp_path / "run", None, provenance=provenance, kind="keras-import")
    card = write_model_card(run)
    assert card["provenance"]["kind"] == "imported"
    assert "Weights imported from the Keras file lvm_ai.h5 (sha256 abababababababab...)" in card["markdown"]
    assert any(item.startswith("PROVENANCE: imported weights") for item in card["limitations"])
    assert card["training_data"]["data"] is None


def test_a_checkpoint_whose_data_moved_or_has_no_run_record(cohort, tmp_path):
    run = _run(tmp_path / "run", cohort)
    record = store.read_json(f"{run}/run.json")
    store.write_json(f"{run}/run.json", {**record, "config": {"data": str(tmp_path / "moved")}})
    card = model_card(run)
    assert card["training_data"]["reachable"] is False
    assert "not reachable now" in card["markdown"] and card["splits"]["counts"] == COUNTS
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "model.pt").write_bytes((tmp_path / "run" / "model.pt").read_bytes())
    card = model_card(str(alone / "model.pt"))
    assert card["provenance"]["kind"] == "unknown" and "PROVENANCE: not recorded" in card["markdown"]
    assert "run record" not in card["markdown"].splitlines()[2]


@pytest.mark.slow
def test_train_writes_the_model_card(trained_run):
    """The real `train` stage wrote RUN/model_card.md: it matches the checkpoint and the run record."""
    markdown = Path(trained_run.run, CARD_MARKDOWN).read_text()
    card = json.loads(Path(trained_run.run, CARD_JSON).read_text())
    record = store.read_json(f"{trained_run.run}/run.json")
    assert card["model_version"] == Predictor.checkpoint_version(trained_run.run)
    assert card["splits"]["counts"] == record["split_counts"]
    assert card["training_data"]["n"] == record["split_counts"]["train"]
    assert card["provenance"]["kind"] == "trained-synthetic" and "SYNTHETIC" in markdown
    val = card["metrics"]["validation"]
    assert 0 < val["n"] <= record["split_counts"]["val"] and val["pearson_r_ci"][0] < val["pearson_r"]
    if card["calibration"]:  # train calibrates on the validation split
        assert "nominal coverage" in markdown
