"""`lvm-ray calibrate` and the calibration `train` makes: weights untouched, intervals that cover
what they claim on cohorts the model never saw, a calibrated probability of CMR LVH."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from lvm_ray import store
from lvm_ray.calibrate import calibrate
from lvm_ray.cli import app
from lvm_ray.conformal import Calibration, conformal_ranks
from lvm_ray.evaluate import evaluate
from lvm_ray.lvh import LVHConfig
from lvm_ray.model import build_model, read_payload, save_checkpoint
from lvm_ray.modelcard import write_model_card
from lvm_ray.predict import Predictor, model_version
from lvm_ray.presets import get_preset
from lvm_ray.score import read_predictions, score
from lvm_ray.splits import ids_in_split
from tests.helpers import HELDOUT_N

LEVEL = 0.9


def coverage_band(n_calibration: int, n_test: int, level: float = LEVEL, mass: float = 0.999) -> tuple[float, float]:
    """Where split-conformal coverage on ``n_test`` new ECGs falls with probability ``mass``.

    Given n calibration scores the interval's coverage is Beta(k_hi - k_lo, n + 1 - (k_hi - k_lo))
    (uniform spacings); the share of n_test new ECGs inside it is then beta-binomial.
    """
    k_lo, k_hi = conformal_ranks(n_calibration, level)
    a = k_hi - k_lo
    dist = stats.betabinom(n_test, a, n_calibration + 1 - a)
    return dist.ppf((1 - mass) / 2) / n_test, dist.ppf(1 - (1 - mass) / 2) / n_test


def calibrated_checkpoint(url: str, n: int = 200, seed: int = 41) -> str:
    """tests.helpers.tiny_checkpoint plus a calibration fitted in-process on ``n`` synthetic labelled ECGs
    (plumbing tests of score, serve and the API: the intervals of a random model are wide, but valid)."""
    from lvm_ray.conformal import fit_calibration
    from lvm_ray.model import write_calibration
    from lvm_ray.synth import generate_batch
    from tests.helpers import tiny_checkpoint

    tiny_checkpoint(url)
    batch = generate_batch(n, seed)
    meta = {c: batch.table[c].to_numpy() for c in ("ecg_id", "sex", "bsa_m2")}
    pred = Predictor.from_checkpoint(url, use_gpu=False).predict(batch.ecg, meta)
    provenance = {
        "data": f"synth:{seed}",
        "split": "all labelled rows",
        "model_version": model_version(read_payload(url)),
    }
    calibration = fit_calibration(
        pred.lv_mass_pred_g, batch.table.lv_mass_g, meta["sex"], meta["bsa_m2"], provenance=provenance
    )
    write_calibration(url, calibration.to_payload())
    return url


def _covered(frame) -> np.ndarray:
    return ((frame.lv_mass_pred_lo_g <= frame.lv_mass_g) & (frame.lv_mass_g <= frame.lv_mass_pred_hi_g)).to_numpy()


# --- a run made elsewhere (import-keras style: model.pt + run.json, no split) ----------------------------


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> tuple[str, str]:
    from lvm_ray.synth import write_cohort

    root = tmp_path_factory.mktemp("calibrate")
    site, other = str(root / "site"), str(root / "other")
    write_cohort(400, 31, site, chunk_size=200)
    write_cohort(300, 32, other, chunk_size=300)
    return site, other


def imported_run(folder: Path) -> str:
    """A run folder like `lvm-ray import-keras` writes: model.pt with provenance, run.json, no split."""
    torch.manual_seed(3)
    preset = get_preset("lvm-cpu")
    model = build_model(preset).eval()
    provenance = {"source": "keras", "file": "ecg_rest_raw_lvm_asymmetric_loss.h5", "sha256": "0" * 64}
    save_checkpoint(str(folder / "model.pt"), model, preset, provenance=provenance)
    (folder / "run.json").write_text(json.dumps({"kind": "keras-import", "status": "finished"}))
    return str(folder)


def test_calibrate_cli_on_an_imported_run_keeps_the_weights(cohorts, tmp_path, ray_cluster) -> None:
    site, other = cohorts
    run = imported_run(tmp_path / "run")
    card_before = write_model_card(run)["markdown"]  # as import-keras does
    before = read_payload(run)
    uncalibrated = Predictor.from_checkpoint(run)
    assert uncalibrated.calibration is None and uncalibrated.level is None
    result = CliRunner().invoke(app, ["calibrate", "--run", run, "--data", site])
    assert result.exit_code == 0, result.output
    assert "calibrate ->" in result.output and "weights unchanged" in result.output and "400 ECGs" in result.output
    after = read_payload(run)
    assert model_version(after) == model_version(before)
    assert after["model_state"].keys() == before["model_state"].keys()
    assert all(torch.equal(after["model_state"][k], v) for k, v in before["model_state"].items())
    assert after["provenance"] == before["provenance"] and after["preset"] == before["preset"]
    calibration = Calibration.from_payload(after["calibration"])
    prov = calibration.provenance
    assert prov["data"] == site and prov["split"] == "all labelled rows" and prov["stage"] == "calibrate"
    assert prov["n_ecgs"] == 400 and prov["n_by_group"]["M"] + prov["n_by_group"]["F"] == 400
    assert prov["model_version"] == model_version(before) and prov["created"]
    # The model card file on disk now states this calibration (not the uncalibrated model's).
    card = json.loads((tmp_path / "run" / "model_card.json").read_text())
    assert card["calibration"]["id"] == calibration.identity
    assert (tmp_path / "run" / "model_card.md").read_text() != card_before
    # The random model's predictions hardly vary: no regression, the plain log ratios.
    assert calibration.groups["M"].coef is None
    # On ECGs it was not calibrated on, the intervals cover what they claim (within sampling error).
    table = store.read_table(other)
    meta = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("ecg_id", "sex", "bsa_m2", "lv_mass_g")}
    predictor = Predictor.from_checkpoint(run)
    assert predictor.training_summary["calibration"]["provenance"]["data"] == site
    pred = predictor.predict(store.ecg_array(table), meta)
    pred["lv_mass_g"] = meta["lv_mass_g"]
    inside = _covered(pred)
    for sex in ("M", "F"):
        rows = meta["sex"] == sex
        lo, hi = coverage_band(prov["n_by_group"][sex], int(rows.sum()))
        assert lo <= inside[rows].mean() <= hi, (sex, inside[rows].mean(), lo, hi)
    assert pred.lvh_prob_calibrated.between(0, 1).all() and (pred.interval_level == LEVEL).all()


def test_calibrate_refuses_what_it_cannot_do(cohorts, tmp_path, ray_cluster) -> None:
    site, _ = cohorts
    run = imported_run(tmp_path / "run")
    runner = CliRunner()
    no_split = runner.invoke(app, ["calibrate", "--run", run, "--data", site, "--split", "val"])
    assert no_split.exit_code == 2 and "split.parquet" in no_split.output and "Traceback" not in no_split.output
    train_split = runner.invoke(app, ["calibrate", "--run", run, "--data", site, "--split", "train"])
    assert train_split.exit_code == 2 and "never the training split" in train_split.output
    level = runner.invoke(app, ["calibrate", "--run", run, "--data", site, "--interval-level", "90"])
    assert level.exit_code == 2 and "between 0 and 1" in level.output
    missing = runner.invoke(app, ["calibrate", "--run", str(tmp_path / "nothing"), "--data", site])
    assert missing.exit_code == 2 and "no checkpoint" in missing.output
    no_data = runner.invoke(app, ["calibrate", "--run", run, "--data", str(tmp_path / "no-data")])
    assert no_data.exit_code == 2 and "error:" in no_data.output
    assert "calibration" not in read_payload(run)  # nothing was written


# --- the model `lvm-ray train` made (the session's shared run) --------------------------------------


@pytest.mark.slow
def test_training_calibrates_on_the_validation_split(trained_run, tmp_path) -> None:
    payload = read_payload(trained_run.run)
    calibration = Calibration.from_payload(payload["calibration"])
    prov = calibration.provenance
    split = store.read_parquet(store.join_url(trained_run.run, "split.parquet"))
    assert prov["stage"] == "train" and prov["split"] == "val" and prov["data"] == trained_run.data
    assert prov["n_ecgs"] == len(ids_in_split(split, "val"))
    assert prov["model_version"] == model_version(payload)
    record = json.loads((Path(trained_run.run) / "run.json").read_text())
    assert record["calibration"]["id"] == calibration.identity
    # An ECG-only network cannot see body size: the recalibration regression finds a BSA term.
    assert all(calibration.groups[s].coef is not None and calibration.groups[s].coef[2] > 0 for s in ("M", "F"))
    # train took the validation predictions from the read it shared with the test split;
    # `lvm-ray calibrate --split val` reads the validation split alone: the same intervals.
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.pt", "run.json", "split.parquet"):
        shutil.copy(Path(trained_run.run) / name, run / name)
    alone = Calibration.from_payload(
        read_payload(calibrate(str(run), trained_run.data, split="val").model_path)["calibration"]
    )
    assert alone.provenance["n_by_group"] == prov["n_by_group"]
    pred = np.linspace(80.0, 260.0, 50)
    sex, bsa = np.where(np.arange(50) % 2 == 0, "M", "F"), np.linspace(1.5, 2.3, 50)
    ours = calibration.predict(pred, sex, bsa, LVHConfig().thresholds_g_m2)
    theirs = alone.predict(pred, sex, bsa, LVHConfig().thresholds_g_m2)
    for key in ("lo", "hi", "lvh_prob"):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def recalibrated(trained_run, tmp_path_factory) -> dict:
    """The trained model recalibrated with `lvm-ray calibrate` on a large independent cohort of the
    same population (seed 23), then the held-out cohort scored and evaluated with it."""
    from lvm_ray.synth import write_cohort

    root = tmp_path_factory.mktemp("recalibrated")
    run = root / "run"
    run.mkdir()
    for name in ("model.pt", "run.json", "split.parquet"):
        shutil.copy(Path(trained_run.run) / name, run / name)
    data = str(root / "calibration-cohort")
    write_cohort(6000, 23, data, chunk_size=1000)
    result = CliRunner().invoke(app, ["calibrate", "--run", str(run), "--data", data])
    assert result.exit_code == 0, result.output
    # The session's held-out cohort (HELDOUT_N ECGs): with 6000 calibration ECGs, sampling alone
    # keeps each sex's coverage within the 87-93% band.
    out = str(root / "preds")
    score(trained_run.heldout, str(run), out, num_actors=2)
    metrics = evaluate(out, str(root / "eval"))
    return {"run": str(run), "preds": read_predictions(out), "metrics": metrics, "eval": str(root / "eval")}


@pytest.mark.slow
def test_heldout_coverage_of_the_training_time_calibration(trained_run, recalibrated) -> None:
    """The intervals train made (calibrated on ~120 ECGs per sex) on the held-out ECGs.

    With that few calibration scores coverage itself varies by about +-3 points from run to run
    (beta-binomial), so the check is the 99.9% range for this calibration size, which a wrong
    quantile rule, a wrong score or swapped sexes would leave.
    """
    calibration = Calibration.from_payload(read_payload(trained_run.run)["calibration"])
    preds = recalibrated["preds"]  # lv_mass_pred_g does not depend on the calibration
    bands = calibration.predict(preds.lv_mass_pred_g, preds.sex, preds.bsa_m2, LVHConfig().thresholds_g_m2)
    frame = preds.assign(lv_mass_pred_lo_g=bands["lo"], lv_mass_pred_hi_g=bands["hi"])
    inside = _covered(frame)
    n = calibration.provenance["n_by_group"]
    for sex in ("M", "F"):
        rows = (preds.sex == sex).to_numpy()
        lo, hi = coverage_band(n[sex], int(rows.sum()))
        assert lo <= inside[rows].mean() <= hi, (sex, inside[rows].mean(), lo, hi)
    y = (preds.lv_mass_g / preds.bsa_m2 > np.where(preds.sex == "M", 72.0, 55.0)).to_numpy()
    assert np.mean((bands["lvh_prob"] - y) ** 2) < y.mean() * (1 - y.mean())


@pytest.mark.slow
def test_heldout_intervals_cover_87_to_93_percent_overall_and_in_each_sex(recalibrated) -> None:
    metrics, preds = recalibrated["metrics"], recalibrated["preds"]
    interval = metrics["interval"]
    assert interval["level"] == LEVEL and interval["n"] == HELDOUT_N
    assert 0.87 <= interval["coverage"] <= 0.93, interval
    for sex in ("M", "F"):
        assert 0.87 <= interval["by_sex"][sex]["coverage"] <= 0.93, (sex, interval["by_sex"][sex])
        assert 0.87 <= metrics["subgroups"]["sex"][sex]["interval_coverage"] <= 0.93
    assert interval["coverage"] == pytest.approx(_covered(preds).mean())
    # lvh_prob_calibrated: calibrated (slope near 1) and better than the prevalence-only forecast.
    prob = metrics["calibration"]["lvh_prob_calibrated"]
    assert 0.8 <= prob["slope"] <= 1.2, prob
    assert prob["brier"] < prob["brier_prevalence_only"], prob
    assert metrics["model_version"] == [model_version(read_payload(recalibrated["run"]))]


@pytest.mark.slow
def test_the_report_shows_the_heldout_intervals(recalibrated, tmp_path) -> None:
    from lvm_ray.report import render_report

    out = tmp_path / "report.html"
    render_report(recalibrated["eval"], None, str(out))
    text = out.read_text()
    for fig in ("fig-interval-coverage", "fig-subgroups", "fig-calibration"):
        assert f'id="{fig}"' in text, fig
