"""The synthetic cohort generator: consistency, determinism and calibration to real cohorts.

One cohort of 1500 people is generated per module (a few seconds); the calibration targets are
the ones docs/method.md ("Synthetic cohorts") sets: voltage rules as poor as in UK Biobank, an LV
mass signal that a model can find but not perfectly, and follow-up whose log-hazard ratios a
Cox model recovers.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from lvm_ray.lvh import body_surface_area
from lvm_ray.schema import LEAD_INDEX, LEADS, N_SAMPLES, true_column
from lvm_ray.signals import check_quality
from lvm_ray.synth import (
    DOWER_MATRIX,
    GENERATOR_VERSION,
    INVERSE_DOWER_MATRIX,
    OUTCOMES,
    SynthConfig,
    generate_batch,
    generate_people,
    leads_to_vcg,
    truth,
    vcg_to_leads,
    write_cohort,
)

SEED = 20240
N = 1500


@pytest.fixture(scope="module")
def cohort():
    return generate_batch(N, SEED)


def _amp(table: pd.DataFrame, kind: str, lead: str) -> np.ndarray:
    return table[true_column(kind, lead)].to_numpy()


def _lvh(table: pd.DataFrame) -> np.ndarray:
    lvmi = table.lv_mass_g / table.bsa_m2
    return (lvmi > np.where(table.sex == "M", 72.0, 55.0)).to_numpy()


def _any_rule(table: pd.DataFrame) -> np.ndarray:
    """The three published rules (strict '>') on the true amplitudes."""
    sokolow = _amp(table, "s", "V1") + np.maximum(_amp(table, "r", "V5"), _amp(table, "r", "V6"))
    cornell = _amp(table, "r", "aVL") + _amp(table, "s", "V3")
    cornell_threshold = np.where(table.sex == "M", 2800.0, 2000.0)
    return (sokolow > 3500) | (cornell > cornell_threshold) | (_amp(table, "r", "aVL") > 1100)


# --- lead transforms and waveform consistency ------------------------------------------------


def test_inverse_dower_is_the_pseudo_inverse_of_dower():
    assert DOWER_MATRIX.shape == (8, 3) and INVERSE_DOWER_MATRIX.shape == (3, 8)
    np.testing.assert_allclose(INVERSE_DOWER_MATRIX @ DOWER_MATRIX, np.eye(3), atol=2e-3)
    np.testing.assert_allclose(np.linalg.pinv(DOWER_MATRIX), INVERSE_DOWER_MATRIX, atol=1e-3)
    vcg = np.random.default_rng(0).normal(size=(2, 3, 50))
    np.testing.assert_allclose(leads_to_vcg(vcg_to_leads(vcg)), vcg, atol=0.01 * np.abs(vcg).max())


def test_shapes_columns_and_ids(cohort):
    assert cohort.ecg.shape == (N, len(LEADS), N_SAMPLES) and cohort.ecg.dtype == np.int16
    table = cohort.table
    assert len(table) == len(cohort.followup) == N
    for name in (
        "ecg_id",
        "patient_id",
        "ecg_datetime",
        "source_format",
        "source_uri",
        "original_fs",
        "age",
        "sex",
        "height_cm",
        "weight_kg",
        "bsa_m2",
        "lv_mass_g",
        "hypertension",
        "bmi",
        "true_qrs_ms",
        "true_qrs_onsets",
        "true_hr_bpm",
    ):
        assert name in table.columns, name
    for lead in LEADS:
        assert (table[true_column("r", lead)] >= 0).all() and (table[true_column("s", lead)] >= 0).all()
    assert table.ecg_id.iloc[0] == f"syn-{SEED}-0000000" and table.patient_id.iloc[7] == f"synp-{SEED}-0000007"
    assert table.ecg_id.is_unique
    assert (table.source_format == "synthetic").all() and (table.original_fs == 500.0).all()
    assert set(table.sex) == {"M", "F"}
    assert table.hypertension.dtype == bool
    np.testing.assert_allclose(table.bsa_m2, body_surface_area(table.height_cm, table.weight_kg))
    np.testing.assert_allclose(table.bmi, table.weight_kg / (table.height_cm / 100) ** 2)
    assert (cohort.followup.ecg_id == table.ecg_id).all()


def test_limb_leads_obey_einthoven_and_goldberger_within_rounding(cohort):
    ecg = cohort.ecg.astype(np.int32)
    lead = {name: ecg[:, i] for i, name in enumerate(LEADS)}
    # Each lead is rounded on its own from consistent floats: at most 1 uV off.
    assert np.abs(lead["I"] + lead["III"] - lead["II"]).max() <= 1
    assert np.abs(2 * lead["aVR"] + lead["I"] + lead["II"]).max() <= 2
    assert np.abs(2 * lead["aVL"] - 2 * lead["I"] + lead["II"]).max() <= 2
    assert np.abs(2 * lead["aVF"] - 2 * lead["II"] + lead["I"]).max() <= 2


def test_every_ecg_passes_the_quality_checks_bad_leads_included(cohort):
    reasons = [check_quality(e.astype(np.float64)) for e in cohort.ecg]
    assert [r for r in reasons if r] == []
    bad = cohort.table.bad_lead.notna()
    assert 0.003 < bad.mean() < 0.04  # ~1.5%


def test_noise_is_at_realistic_levels_and_bad_leads_are_noisier():
    """Noise = the ECG minus the same ECG rendered without noise (same beats, same seed)."""
    n = 200
    noisy = generate_batch(n, 99, config=replace(SynthConfig(), bad_lead_fraction=0.1))
    quiet_cfg = replace(SynthConfig(), hum_median_uv=0.0, emg_median_uv=0.0, wander_median_uv=0.0)
    clean = generate_batch(n, 99, config=quiet_cfg)
    noise = noisy.ecg.astype(np.float64) - clean.ecg
    high = noise - np.apply_along_axis(lambda x: np.convolve(x, np.ones(25) / 25, "same"), 2, noise)
    hf_rms = high[:, :, 50:-50].std(axis=2)
    total_rms = noise.std(axis=2)
    good = noisy.table.bad_lead.isna().to_numpy()
    assert 3.0 < np.median(hf_rms[good]) < 30.0  # EMG + hum: a few to tens of uV
    assert 20.0 < np.median(total_rms[good]) < 150.0  # baseline wander dominates
    rows = np.flatnonzero(~good)
    assert len(rows) >= 5
    for row in rows:
        lead = LEAD_INDEX[noisy.table.bad_lead.iloc[row]]
        assert hf_rms[row, lead] > 3 * np.median(hf_rms[row])
    # Same beats: the clean and noisy recordings agree but for the noise.
    assert np.corrcoef(noisy.ecg[0, 7], clean.ecg[0, 7])[0, 1] > 0.9


def test_true_amplitudes_match_the_median_beat_of_the_noisy_recording(cohort):
    """The rules module measures R/S on the median beat; the truth must agree within ~50 uV."""
    rules = pytest.importorskip("lvm_ray.rules")
    n = 120
    measured = rules.measure_batch(cohort.ecg[:n], cohort.table.sex.iloc[:n].tolist())
    assert measured.rules_error.isna().all()
    table = cohort.table.iloc[:n]
    clean = table.bad_lead.isna().to_numpy()
    errors = np.concatenate(
        [
            np.abs(measured[f"{kind}_uv_{lead}"].to_numpy() - _amp(table, kind, lead))[clean]
            for kind in ("r", "s")
            for lead in LEADS
        ]
    )
    assert np.quantile(errors, 0.95) < 50.0
    assert np.median(np.abs(measured.qrs_ms - table.true_qrs_ms)) < 6.0
    assert np.median(np.abs(measured.hr_bpm - table.true_hr_bpm)) < 2.0


def test_rhythm_and_intervals(cohort):
    table = cohort.table
    assert table.true_hr_bpm.between(50, 100).all()
    assert table.true_pr_ms.between(120, 200).all()
    assert 85 < table.true_qrs_ms.mean() < 100 and table.true_qrs_ms.between(70, 150).all()
    assert (table.true_qt_ms > table.true_qrs_ms + 150).all()


def test_qrs_onsets_mark_where_each_qrs_complex_lies():
    """On noise-free recordings the PR segment just before each recorded onset is exactly flat,
    the window [onset, onset + true_qrs_ms) holds a QRS, onsets follow the heart rate, and the
    largest deflection of the recording lies in a window."""
    quiet = replace(SynthConfig(), hum_median_uv=0.0, emg_median_uv=0.0, wander_median_uv=0.0, bad_lead_fraction=0.0)
    batch = generate_batch(150, 5, config=quiet)
    peaks_in_qrs = 0
    for ecg, onsets, qrs_ms, hr in zip(
        batch.ecg.astype(np.float64),
        batch.table.true_qrs_onsets,
        batch.table.true_qrs_ms,
        batch.table.true_hr_bpm,
        strict=True,
    ):
        onsets = np.asarray(onsets)
        width = int(round(qrs_ms * 500 / 1000))
        assert len(onsets) >= 8 and (np.diff(onsets) > 0).all()
        assert onsets.min() >= 0 and onsets.max() < N_SAMPLES
        assert np.median(np.diff(onsets)) == pytest.approx(60 * 500 / hr, rel=0.1)
        for s in onsets:
            if s >= 10:  # the PR segment (the P wave ends >= 30 ms before the QRS) is isoelectric
                assert np.abs(ecg[:, s - 10 : s]).max() == 0.0
            if s + width <= N_SAMPLES:
                assert np.abs(ecg[:, s : s + width]).max() > 200.0
        in_qrs = np.zeros(N_SAMPLES, dtype=bool)
        for s in onsets:
            in_qrs[s : s + width + 1] = True
        peak = int(np.abs(ecg).max(axis=0).argmax())
        peaks_in_qrs += bool(in_qrs[peak] or peak < onsets[0])  # (a beat that began before the recording)
    assert peaks_in_qrs >= 0.95 * len(batch.table)
    # The same onsets without rendering waveforms, and the same waveform with or without noise.
    table, _ = generate_people(20, 5, config=quiet)
    assert table.true_qrs_onsets.tolist() == batch.table.true_qrs_onsets.iloc[:20].tolist()
    noisy = generate_batch(20, 5)
    assert noisy.table.true_qrs_onsets.tolist() == table.true_qrs_onsets.tolist()


# --- determinism ----------------------------------------------------------------------------


def test_same_seed_same_cohort_whatever_the_batching():
    a = generate_batch(6, 5)
    b = generate_batch(6, 5, config=replace(SynthConfig(), block_size=4))
    np.testing.assert_array_equal(a.ecg, b.ecg)
    pd.testing.assert_frame_equal(a.table, b.table)
    pd.testing.assert_frame_equal(a.followup, b.followup)
    tail = generate_batch(3, 5, start_index=3)
    np.testing.assert_array_equal(tail.ecg, a.ecg[3:])
    pd.testing.assert_frame_equal(tail.table, a.table.iloc[3:].reset_index(drop=True))
    assert tail.table.ecg_id.iloc[0] == "syn-5-0000003"


def test_different_start_index_or_seed_gives_different_ecgs():
    a = generate_batch(3, 5)
    shifted = generate_batch(3, 5, start_index=100)
    other = generate_batch(3, 6)
    assert not np.array_equal(a.ecg, shifted.ecg)
    assert not np.array_equal(a.ecg, other.ecg)
    assert set(a.table.ecg_id).isdisjoint(shifted.table.ecg_id)
    assert generate_batch(0, 5).ecg.shape == (0, len(LEADS), N_SAMPLES)


def test_generate_people_matches_generate_batch(cohort):
    table, followup = generate_people(40, SEED)
    pd.testing.assert_frame_equal(table, cohort.table.iloc[:40])
    pd.testing.assert_frame_equal(followup, cohort.followup.iloc[:40])


# --- covariates and calibration ---------------------------------------------------------------


def test_covariates_are_uk_biobank_like(cohort):
    table = cohort.table
    men = table.sex == "M"
    assert table.age.between(45, 80).all() and 61 < table.age.mean() < 66
    assert 0.44 < men.mean() < 0.52
    assert 0.30 < table.hypertension.mean() < 0.42
    assert 172 < table.height_cm[men].mean() < 179 and 159 < table.height_cm[~men].mean() < 166
    assert 25 < table.bmi.mean() < 29
    assert 85 < table.lv_mass_g.mean() < 96 and 20 < table.lv_mass_g.std() < 30
    assert 98 < table.lv_mass_g[men].mean() < 115 and 68 < table.lv_mass_g[~men].mean() < 82
    # Hypertension and body size mean more LV mass.
    assert table.lv_mass_g[table.hypertension].mean() > table.lv_mass_g[~table.hypertension].mean()
    assert np.corrcoef(table.bsa_m2[men], table.lv_mass_g[men])[0, 1] > 0.2


def test_cmr_lvh_prevalence(cohort):
    lvh = _lvh(cohort.table)
    men = (cohort.table.sex == "M").to_numpy()
    assert 0.03 < lvh.mean() < 0.15
    assert 0.01 < lvh[men].mean() < 0.2 and 0.01 < lvh[~men].mean() < 0.2


def test_sokolow_voltage_correlates_only_modestly_with_lv_mass(cohort):
    table = cohort.table
    sv1_rv5 = _amp(table, "s", "V1") + _amp(table, "r", "V5")
    sokolow = _amp(table, "s", "V1") + np.maximum(_amp(table, "r", "V5"), _amp(table, "r", "V6"))
    assert 0.4 < np.corrcoef(sv1_rv5, table.lv_mass_g)[0, 1] < 0.7
    assert 0.3 < np.corrcoef(sokolow, table.lv_mass_g)[0, 1] < 0.7
    assert 1500 < sokolow.mean() < 2800  # a realistic mean voltage (uV)


def test_voltage_falls_with_bmi_at_fixed_lv_mass(cohort):
    table = cohort.table
    y = _amp(table, "s", "V1") + _amp(table, "r", "V5")
    x = np.column_stack([np.ones(len(table)), table.lv_mass_g, table.bmi])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ coef
    cov = np.linalg.inv(x.T @ x) * residual.var(ddof=3)
    t_bmi = coef[2] / np.sqrt(cov[2, 2])
    assert coef[1] > 0 and coef[2] < 0 and t_bmi < -3


def test_any_voltage_rule_has_low_sensitivity_and_high_specificity(cohort):
    lvh = _lvh(cohort.table)
    flagged = _any_rule(cohort.table)
    sensitivity = flagged[lvh].mean()
    specificity = (~flagged[~lvh]).mean()
    assert sensitivity < 0.5 and specificity > 0.85
    assert 0.52 < (sensitivity + specificity) / 2 < 0.68


def test_lv_mass_is_in_the_waveform_beyond_voltage_but_not_perfectly(cohort):
    table = cohort.table
    lvh = _lvh(table)
    assert np.corrcoef(table.true_qrs_ms, table.lv_mass_g)[0, 1] > 0.3
    assert table.true_strain[lvh].mean() > 5 * table.true_strain[~lvh].mean()
    # A linear 'oracle' on noise-free ECG features plus age, sex and BMI (what LVM-AI sees),
    # fitted on one half and tested on the other: a model can find the mass, never exactly.
    amps = np.column_stack([table[true_column(k, lead)] for k in ("r", "s") for lead in LEADS])
    ecg_features = np.column_stack([np.log1p(amps), table.true_qrs_ms, table.true_strain])
    covariates = np.column_stack([table.age, table.sex == "M", table.bmi])
    y = np.log(table.lv_mass_g.to_numpy())
    train = np.arange(len(table)) % 2 == 0

    def oracle_r(features: np.ndarray) -> float:
        x = np.column_stack([np.ones(len(table)), features])
        coef, *_ = np.linalg.lstsq(x[train], y[train], rcond=None)
        return float(np.corrcoef(x[~train] @ coef, table.lv_mass_g[~train])[0, 1])

    with_covariates = oracle_r(np.column_stack([ecg_features, covariates]))
    ecg_only = oracle_r(ecg_features)
    assert 0.75 < with_covariates < 0.95
    assert 0.6 < ecg_only < with_covariates


# --- follow-up and truth --------------------------------------------------------------------


def test_followup_has_prevalent_cases_censoring_and_events(cohort):
    followup = cohort.followup
    cfg = SynthConfig()
    for outcome in OUTCOMES:
        prevalent = followup[f"{outcome}_prevalent"].to_numpy()
        event = followup[f"{outcome}_event"].to_numpy()
        time = followup[f"{outcome}_time_years"].to_numpy()
        assert prevalent.dtype == bool and event.dtype == bool
        assert (time >= 0).all() and (time <= cfg.admin_censor_years + 1e-9).all()
        # Prevalent cases are censored at the ECG: no incident event, no time at risk.
        assert not event[prevalent].any() and (time[prevalent] == 0).all()
        if outcome == "death":
            assert not prevalent.any()
        else:
            assert 0.002 < prevalent.mean() < 0.06
        # A few hundred incident events per 10,000 people.
        assert 100 < event.mean() * 10_000 < 1500, outcome
        censored = ~event & ~prevalent
        assert np.isclose(time[censored], cfg.admin_censor_years).mean() > 0.5  # administrative
        assert (time[censored] < cfg.admin_censor_years - 0.01).any()  # lost to follow-up / died


def test_truth_is_json_and_names_the_generating_parameters():
    cfg = SynthConfig()
    payload = json.loads(json.dumps(truth(cfg, 123, 7)))
    assert payload["seed"] == 7 and payload["n"] == 123 and payload["generator_version"] == GENERATOR_VERSION
    assert set(payload["log_hr_per_sd_lv_mass"]) == set(OUTCOMES)
    assert set(payload["log_hr_age_per_year"]) == set(OUTCOMES) and set(payload["log_hr_male"]) == set(OUTCOMES)
    assert payload["lv_mass_sd_g"] == cfg.lv_mass_sd_g and payload["lv_mass_mean_g"] == cfg.lv_mass_mean_g
    assert payload["lvh_thresholds_g_m2"] == {"M": 72.0, "F": 55.0}
    assert payload["parameters"]["voltage_mass_exponent"] == cfg.voltage_mass_exponent
    hr = payload["log_hr_per_sd_lv_mass"]
    assert all(0.2 <= v <= 0.5 for v in hr.values()) and hr["hf"] == max(hr.values())


def test_cox_on_true_lv_mass_recovers_the_log_hazard_ratios():
    lifelines = pytest.importorskip("lifelines")
    cfg = SynthConfig()
    table, followup = generate_people(5000, 31)  # no waveforms needed: fast
    for model in cfg.outcomes:
        name = model.name
        keep = ~followup[f"{name}_prevalent"].to_numpy()
        frame = pd.DataFrame(
            {
                "lv_mass_sd": (table.lv_mass_g - cfg.lv_mass_mean_g) / cfg.lv_mass_sd_g,
                "age": table.age,
                "male": (table.sex == "M").astype(float),
                "time": followup[f"{name}_time_years"],
                "event": followup[f"{name}_event"].astype(int),
            }
        )[keep]
        summary = lifelines.CoxPHFitter().fit(frame, "time", "event").summary
        # LV mass: the 95% CI must hold the truth (the study's question); age and sex: 99%, as
        # 15 intervals at 95% would miss one by chance about half the time.
        for covariate, value, z in (
            ("lv_mass_sd", model.log_hr_per_sd_lv_mass, 1.960),
            ("age", model.log_hr_age_per_year, 2.576),
            ("male", model.log_hr_male, 2.576),
        ):
            coef, se = summary.loc[covariate, "coef"], summary.loc[covariate, "se(coef)"]
            assert coef - z * se <= value <= coef + z * se, (name, covariate, value, coef, se)


def test_write_cohort_writes_shards_followup_and_truth(tmp_path):
    store = pytest.importorskip("lvm_ray.store")
    out = str(tmp_path / "cohort")
    calls: list[tuple[int, int]] = []
    summary = write_cohort(30, 3, out, chunk_size=12, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(12, 30), (24, 30), (30, 30)]
    assert summary["n"] == 30 and summary["n_quarantined"] == 0
    assert set(summary["incident_events"]) == set(OUTCOMES)
    manifest = store.read_manifest(out)
    assert manifest["n_rows"] == 30 and len(manifest["shards"]) == 3 and manifest["kind"] == "synthetic"
    table = store.read_table(out)
    assert sorted(table.column("ecg_id").to_pylist()) == [f"syn-3-{i:07d}" for i in range(30)]
    assert true_column("s", "V1") in table.column_names and "hypertension" in table.column_names
    batch = generate_batch(30, 3)
    order = np.argsort(table.column("ecg_id").to_pylist())
    np.testing.assert_array_equal(store.ecg_array(table)[order], batch.ecg)
    onsets = table.column("true_qrs_onsets").to_pylist()
    assert [onsets[i] for i in order] == batch.table.true_qrs_onsets.tolist()  # list<int32> round trip
    followup = store.read_any_table(f"{out}/followup.parquet")
    assert len(followup) == 30 and "hf_time_years" in followup.columns
    assert store.read_json(f"{out}/truth.json")["seed"] == 3


def test_ctrl_c_during_synth_says_how_to_write_it_again_and_overwrite_does(tmp_path):
    """Ctrl-C half-way: exit 130 and one line (a cohort is not resumed); --overwrite then rewrites it."""
    import signal
    import subprocess
    import sys
    import time

    from typer.testing import CliRunner

    from lvm_ray.cli import app
    from lvm_ray.store import read_manifest

    out = tmp_path / "cohort"
    # The child restores Python's SIGINT handler: a background CI shell starts it with SIGINT ignored.
    script = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); from lvm_ray.cli import app; app()"
    )
    command = [sys.executable, "-c", script, "synth", "--n", "20000", "--seed", "3", "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "shards").glob("*")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)  # half-way: the first shard is written
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    line = f"interrupted: {out} is incomplete; re-run with --overwrite to write it again"
    assert stderr.strip().splitlines()[-1] == line
    again = ["synth", "--n", "40", "--seed", "3", "--out", str(out), "--chunk-size", "20"]
    refused = CliRunner().invoke(app, again)
    assert refused.exit_code != 0 and "--overwrite" in refused.output and "Traceback" not in refused.output
    rewritten = CliRunner().invoke(app, [*again, "--overwrite"])
    assert rewritten.exit_code == 0, rewritten.output
    assert read_manifest(str(out))["n_rows"] == 40
