"""Batch scoring: every ecg_id exactly once, same numbers as the predictor, resumable after a kill."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from lvm_ray import store
from lvm_ray.predict import Predictor
from lvm_ray.score import ScoringError, read_predictions, score
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> str:
    from lvm_ray.synth import write_cohort

    out = str(tmp_path_factory.mktemp("score") / "cohort")
    write_cohort(240, 11, out, chunk_size=60)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "model.pt"))


def test_score_matches_predictor_and_is_idempotent(cohort, checkpoint, tmp_path, ray_cluster):
    out = str(tmp_path / "preds")
    result = score(cohort, checkpoint, out, batch_size=32, num_actors=2)
    assert (result.n_total, result.n_scored, result.n_skipped) == (240, 240, 0)
    preds = read_predictions(out)
    assert preds.ecg_id.is_unique and len(preds) == 240
    for column in (
        "lv_mass_pred_g",
        "lvmi_pred",
        "lvh_pred",
        "sokolow_lyon_uv",
        "lvh_any_rule",
        "model_version",
        "lv_mass_g",
        "sex",
        "bsa_m2",
        "patient_id",
    ):
        assert column in preds.columns, column
    assert not any(c.startswith("true_") for c in preds.columns)
    # The distributed path gives exactly what the predictor gives in-process.
    table = store.read_table(cohort).slice(0, 10)
    direct = Predictor.from_checkpoint(checkpoint).predict(
        store.ecg_array(table), {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("ecg_id", "sex", "bsa_m2")}
    )
    merged = direct.merge(preds, on="ecg_id", suffixes=("_direct", ""))
    np.testing.assert_allclose(merged.lv_mass_pred_g, merged.lv_mass_pred_g_direct, rtol=1e-5)
    np.testing.assert_allclose(merged.sokolow_lyon_uv, merged.sokolow_lyon_uv_direct, rtol=1e-9)
    expected_lvmi = preds.lv_mass_pred_g / preds.bsa_m2
    np.testing.assert_allclose(preds.lvmi_pred, expected_lvmi)
    # Scoring twice into the same output adds nothing.
    again = score(cohort, checkpoint, out, batch_size=32, num_actors=1)
    assert (again.n_scored, again.n_skipped) == (0, 240)
    assert len(read_predictions(out)) == 240
    # Another model's predictions are never mixed into the same folder.
    other = tiny_checkpoint(str(tmp_path / "other.pt"), seed=1)
    with pytest.raises(ScoringError, match="already holds predictions of model"):
        score(cohort, other, out)


def test_killed_scoring_job_completes_on_rerun(cohort, checkpoint, tmp_path, ray_cluster):
    """Kill the scoring driver once parts exist; the re-run ends with every ecg_id exactly once."""
    out = tmp_path / "preds"
    script = textwrap.dedent(
        f"""
        import time
        import ray
        from lvm_ray.predict import Predictor
        from lvm_ray.score import score

        def slow_loader():
            predictor = Predictor.from_checkpoint({checkpoint!r})
            inner = predictor.predict
            def predict(ecg, meta):
                time.sleep(0.5)  # slow enough to be killed part-way
                return inner(ecg, meta)
            predictor.predict = predict
            return predictor

        score({cohort!r}, {checkpoint!r}, {str(out)!r}, loader=slow_loader, batch_size=16, num_actors=1,
              rows_per_file=16, address={ray_cluster.get_runtime_context().gcs_address!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / "parts"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(parts.glob("*.parquet"))) < 2:
        assert proc.poll() is None, "scoring finished or died before it could be killed"
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    partial = read_predictions(str(out), columns=["ecg_id"])
    assert 0 < len(partial) < 240, len(partial)
    result = score(cohort, checkpoint, str(out), batch_size=32, num_actors=2)
    assert result.n_skipped == len(partial) and result.n_scored == 240 - len(partial)
    final = read_predictions(str(out), columns=["ecg_id"])
    assert len(final) == 240 and final.ecg_id.is_unique
    ids = set(store.read_table(cohort, columns=["ecg_id"]).column("ecg_id").to_pylist())
    assert set(final.ecg_id) == ids
