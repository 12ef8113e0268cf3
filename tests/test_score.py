"""Batch scoring: every ecg_id exactly once, same numbers as the predictor, resumable after a kill."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from lvm_ray import store
from lvm_ray.model import read_payload
from lvm_ray.predict import INTERVAL_COLUMNS, Predictor, model_version
from lvm_ray.score import ScoringError, format_summary, read_predictions, score
from tests.helpers import interrupt_when_ready, start_as_foreground_job, tiny_checkpoint


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
    # An uncalibrated checkpoint still scores: the interval columns are there, and null.
    for column in INTERVAL_COLUMNS:
        assert column in preds.columns and preds[column].isna().all(), column
    assert "intervals    : none (uncalibrated" in format_summary(result)
    # The distributed path gives exactly what the predictor gives in-process.
    table = store.read_table(cohort).slice(0, 10)
    direct = Predictor.from_checkpoint(checkpoint).predict(
        store.ecg_array(table), {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("ecg_id", "sex", "bsa_m2")}
    )
    merged = direct.merge(preds, on="ecg_id", suffixes=("_direct", ""))
    np.testing.assert_allclose(merged.lv_mass_pred_g, merged.lv_mass_pred_g_direct, rtol=1e-5)
    # The batched rules sum in chunk order: batches of other ECGs change only float rounding.
    np.testing.assert_allclose(merged.sokolow_lyon_uv, merged.sokolow_lyon_uv_direct, rtol=1e-6)
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
            def predict(ecg, meta, **options):
                time.sleep(0.5)  # slow enough to be killed part-way
                return inner(ecg, meta, **options)
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


def test_ctrl_c_or_sigterm_ends_scoring_in_one_line_and_each_rerun_resumes(cohort, checkpoint, tmp_path, ray_cluster):
    """SIGINT to `lvm-ray score` (as Ctrl-C sends it) part-way; the same command again resumes, and
    SIGTERM (`kill`, SLURM at a time limit) part-way through that. Each time exit 130 / 143, one line
    (not the stack dump of Ray's own SIGTERM handler), the parts kept; the next run completes."""
    out = tmp_path / "preds"
    script = textwrap.dedent(
        f"""
        import signal
        import time
        from lvm_ray.cli import app

        # As a terminal's foreground job has it (a shell's background job, e.g. CI, inherits SIGINT ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from lvm_ray.predict import Predictor

        load = Predictor.from_checkpoint

        def slow_loader(*args, **kwargs):  # defined here: travels by value into the actors
            predictor = load(*args, **kwargs)
            inner = predictor.predict
            def predict(ecg, meta, **options):
                time.sleep(0.5)  # slow enough to be interrupted part-way
                return inner(ecg, meta, **options)
            predictor.predict = predict
            return predictor

        Predictor.from_checkpoint = slow_loader
        app(["score", "--data", {cohort!r}, "--checkpoint", {checkpoint!r}, "--out", {str(out)!r},
             "--batch-size", "8", "--num-actors", "1", "--address", {ray_cluster.get_runtime_context().gcs_address!r}])
        """
    )
    parts = out / "parts"

    interrupt_when_ready(
        start_as_foreground_job(script),
        lambda: list(parts.glob("*.parquet")),
        "scoring",
        signal.SIGINT,
        130,
        timeout_s=120,
    )
    first = len(read_predictions(str(out), columns=["ecg_id"]))
    assert 0 < first < 240, first
    files = len(list(parts.glob("*.parquet")))

    def wrote_a_part() -> bool:  # the rerun's own
        return len(list(parts.glob("*.parquet"))) > files

    stderr = interrupt_when_ready(
        start_as_foreground_job(script), wrote_a_part, "the resumed scoring", signal.SIGTERM, 143, timeout_s=120
    )
    second = len(read_predictions(str(out), columns=["ecg_id"]))
    assert first < second < 240, (first, second, stderr[-2000:])
    result = score(cohort, checkpoint, str(out), batch_size=32, num_actors=2)
    assert (result.n_skipped, result.n_scored) == (second, 240 - second)
    final = read_predictions(str(out), columns=["ecg_id"])
    assert len(final) == 240 and final.ecg_id.is_unique


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> str:
    """The tiny model with a calibration fitted in-process on other synthetic ECGs."""
    from tests.test_calibrate import calibrated_checkpoint

    url = str(tmp_path_factory.mktemp("calibrated") / "model.pt")
    version = model_version(read_payload(tiny_checkpoint(url)))
    calibrated_checkpoint(url)
    assert model_version(read_payload(url)) == version  # the calibration is not part of the model's identity
    return url


def test_score_writes_intervals_at_the_chosen_level(cohort, checkpoint, calibrated, tmp_path, ray_cluster):
    out90, out50 = str(tmp_path / "p90"), str(tmp_path / "p50")
    result = score(cohort, calibrated, out90, num_actors=1)
    assert result.interval_level == 0.9 and result.calibration_id
    assert "90% prediction intervals" in format_summary(result)
    score(cohort, calibrated, out50, num_actors=1, interval_level=0.5)
    p90 = read_predictions(out90).set_index("ecg_id").sort_index()
    p50 = read_predictions(out50).set_index("ecg_id").loc[p90.index]
    assert (p90.interval_level == 0.9).all() and (p50.interval_level == 0.5).all()
    assert (p90.lv_mass_pred_lo_g < p50.lv_mass_pred_lo_g).all() and (
        p90.lv_mass_pred_hi_g > p50.lv_mass_pred_hi_g
    ).all()
    np.testing.assert_array_equal(p90.lv_mass_pred_g, p50.lv_mass_pred_g)  # the level changes only the interval
    assert p90.lvh_prob_calibrated.between(0, 1).all()
    np.testing.assert_array_equal(p90.lvh_prob_calibrated, p50.lvh_prob_calibrated)
    # The same numbers as the predictor in-process (the one prediction path).
    table = store.read_table(cohort).slice(200, 10)
    meta = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("ecg_id", "sex", "bsa_m2")}
    direct = Predictor.from_checkpoint(calibrated).predict(store.ecg_array(table), meta).set_index("ecg_id")
    np.testing.assert_allclose(p90.loc[direct.index, "lv_mass_pred_hi_g"], direct.lv_mass_pred_hi_g, rtol=1e-5)
    # A folder holds one level: resuming it with another is refused, not mixed.
    with pytest.raises(ScoringError, match="another interval level"):
        score(cohort, calibrated, out50, interval_level=0.8)
    # The same weights without their calibration (the same model_version) are not mixed in either.
    with pytest.raises(ScoringError, match=r"another calibration \(\w+; now none\)"):
        score(cohort, checkpoint, out90)
    with pytest.raises(ScoringError, match="between 0 and 1"):
        score(cohort, calibrated, str(tmp_path / "bad"), interval_level=90)


def test_score_reuses_a_rules_table_or_skips_the_rules(cohort, checkpoint, tmp_path, ray_cluster):
    """--rules TABLE gives the rule columns that scoring measures itself; --no-rules leaves them out."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from lvm_ray.cli import app
    from lvm_ray.evaluate import evaluate
    from lvm_ray.measure import measure_rules
    from lvm_ray.rules import MEASURE_COLUMNS

    table = str(tmp_path / "rules")
    measure_rules(cohort, table)
    score(cohort, checkpoint, str(tmp_path / "measured"), batch_size=32, num_actors=2)
    measured = read_predictions(str(tmp_path / "measured"))
    reused = score(cohort, checkpoint, str(tmp_path / "reused"), batch_size=32, num_actors=2, rules=table)
    assert (reused.rules, reused.rules_table, reused.n_scored) == ("table", table, 240)
    assert f"voltage rules: from {table} (strict comparison)" in format_summary(reused)
    joined = read_predictions(str(tmp_path / "reused"))
    assert list(joined.columns) == list(measured.columns)  # same columns, same order
    joined, measured = (f.set_index("ecg_id").sort_index() for f in (joined, measured))
    for column in MEASURE_COLUMNS:
        if column == "rules_error" or column.startswith("lvh_"):
            assert joined[column].equals(measured[column]), column
        else:  # measured in other batches: float rounding only
            np.testing.assert_allclose(joined[column], measured[column], rtol=1e-9, err_msg=column)
    np.testing.assert_array_equal(joined.lv_mass_pred_g, measured.lv_mass_pred_g)

    # A table that lacks ECGs of the data, or holds another dataset's, is refused in one line.
    full = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "rules").glob("*.parquet")))
    pq.write_table(full.slice(0, 230), tmp_path / "partial.parquet")
    missing = sorted(set(full.column("ecg_id").to_pylist()) - set(full.slice(0, 230).column("ecg_id").to_pylist()))
    with pytest.raises(ScoringError, match=r"lacks 10 of the 240 ECGs to score in .* \(e\.g\. ecg_id '[^']+'\)") as err:
        score(cohort, checkpoint, str(tmp_path / "p1"), rules=str(tmp_path / "partial.parquet"))
    assert str(err.value).split("ecg_id '")[1].split("'")[0] in missing
    other = full.set_column(0, "ecg_id", pa.array([f"other-{i}" for i in range(len(full))]))
    pq.write_table(other, tmp_path / "other.parquet")
    result = CliRunner().invoke(
        app,
        ["score", "--data", cohort, "--checkpoint", checkpoint, "--out", str(tmp_path / "p2")]
        + ["--rules", str(tmp_path / "other.parquet")],
    )
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "lacks 240 of the 240 ECGs" in result.output and "another dataset's table" in result.output
    assert not (tmp_path / "p2").exists()  # checked before anything is written

    # --no-rules: no rule columns; everything else as measured; evaluate says the rules are unavailable.
    skipped = score(cohort, checkpoint, str(tmp_path / "none"), num_actors=1, rules=False)
    assert skipped.rules == "none" and "voltage rules: none" in format_summary(skipped)
    bare = read_predictions(str(tmp_path / "none")).set_index("ecg_id").sort_index()
    assert not set(MEASURE_COLUMNS) & set(bare.columns)
    assert list(bare.columns) == [c for c in measured.columns if c not in MEASURE_COLUMNS]
    np.testing.assert_array_equal(bare.lv_mass_pred_g, measured.lv_mass_pred_g)
    metrics = evaluate(str(tmp_path / "none"), str(tmp_path / "eval"))
    assert metrics["c_statistics"]["sokolow_lyon"]["note"] == "column lvh_sokolow_lyon not in the predictions"
    assert metrics["c_statistics"]["lvm_ai_lvmi"]["auc"] is not None
    # A folder holds rule columns for every row or for none.
    with pytest.raises(ScoringError, match="without the voltage-rule columns; pass --no-rules"):
        score(cohort, checkpoint, str(tmp_path / "none"), rules=table)


def test_an_unreadable_shard_stops_score_and_rules_in_one_line(cohort, checkpoint, tmp_path, ray_cluster):
    """A shard truncated after its manifest was written (read by an actor, or first, by the driver):
    one line naming it, from score and from rules, and nothing of the user's deleted."""
    from typer.testing import CliRunner

    from lvm_ray.cli import app

    for which in (-1, 0):  # the last shard (read in a worker), the first (its schema read by the driver)
        broken = tmp_path / f"broken{which}"
        shutil.copytree(cohort, broken)
        shard = broken / store.read_manifest(str(broken))["shards"][which]["path"]
        shard.write_bytes(shard.read_bytes()[:1000])
        for command in (
            ["score", "--data", str(broken), "--checkpoint", checkpoint, "--out", str(tmp_path / f"preds{which}")],
            ["rules", "--data", str(broken), "--out", str(tmp_path / f"rules{which}")],
        ):
            result = CliRunner().invoke(app, command)
            lines = result.output.strip().splitlines()
            assert result.exit_code == 2, result.output
            assert lines[-1].startswith(f"error: shard {shard} cannot be read"), result.output
            assert "re-create it" in lines[-1] and "Traceback" not in result.output
        assert len(list((broken / "shards").glob("*.parquet"))) == 4  # the dataset is left as it was
        assert not (tmp_path / f"rules{which}").exists()
