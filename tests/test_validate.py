"""`lvm-ray validate`: the bundled sample exports + a labels table -> data, predictions, evaluation, report.

The truth each run is held to comes from elsewhere: what `ingest` alone stores and quarantines from
the same exports, LVH computed here from the made-up CMR masses (Mosteller BSA, 72/55 g/m2), and
c-statistics recomputed here with scikit-learn from the predictions validate wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from lvm_ray import store
from lvm_ray.cli import app
from lvm_ray.demo import BUNDLED_SAMPLES
from lvm_ray.evaluate import evaluate
from lvm_ray.ingest import ingest
from lvm_ray.score import read_predictions
from tests.browser import assert_not_blank, screenshot
from tests.helpers import tiny_checkpoint
from tests.test_evaluate import make_predictions
from tests.test_report import _parse

SOURCES = [str(BUNDLED_SAMPLES / "ptbxl"), str(BUNDLED_SAMPLES / "formats")]
HEIGHT_CM, WEIGHT_KG = 170.0, 75.0
BSA = np.sqrt(HEIGHT_CM * WEIGHT_KG / 3600.0)  # Mosteller, written out here
THRESHOLD = {"M": 72.0, "F": 55.0}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> tuple[object, list[str]]:
    """What ingest alone (in-process, no Ray) makes of the bundled samples: stored ids and the quarantine."""
    out = tmp_path_factory.mktemp("ingest_alone") / "data"
    result = ingest(SOURCES, str(out))
    ids = store.read_table(str(out), columns=["ecg_id"]).column("ecg_id").to_pylist()
    assert result.n_quarantined > 0 and len(ids) >= 8  # the samples include bad records; enough to evaluate
    return result, ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return tiny_checkpoint(str(tmp_path_factory.mktemp("run") / "run"))


def cmr_labels(ids: list[str]) -> pd.DataFrame:
    """Made-up CMR LV masses for all stored ECGs but the last, straddling both sexes' LVH thresholds."""
    labelled = ids[:-1]
    masses = [150.0, 80.0, 200.0, 90.0, 130.0, 70.0, 180.0, 100.0, 160.0, 75.0][: len(labelled)]
    sexes = ["M", "F"] * (len(labelled) // 2 + 1)
    table = pd.DataFrame(
        {
            "ecg_id": labelled,
            "lv_mass_g": masses,
            "sex": sexes[: len(labelled)],
            "height_cm": HEIGHT_CM,
            "weight_kg": WEIGHT_KG,
        }
    )
    # A row for a recording that is not in the exports: matched to nothing, evaluated nowhere.
    return pd.concat([table, pd.DataFrame({"ecg_id": ["not-an-ecg"], "lv_mass_g": [300.0], "sex": ["M"]})])


def run_validate(*args: str) -> object:
    return CliRunner().invoke(app, ["validate", *SOURCES, *args])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def screenshot_is_drawn(html: Path, tmp_path: Path) -> None:
    """Headless Chromium draws the report: the screenshot is neither blank nor text only."""
    image = screenshot(html, tmp_path / "validate.png", (1200, 3000), tmp_path / "chromium-profile")
    assert_not_blank(image, "Chromium screenshot of the validation report")
    assert (np.asarray(image.convert("L"), dtype=float) < 240).mean() > 0.03  # figures, not just text


def test_evaluate_against_an_lvh_column(tmp_path) -> None:
    """evaluate(lvh_column=): the labels' LVH is the reference where there is no CMR LV mass."""
    frame = make_predictions(n=600, seed=4)
    frame["echo_lvh"] = (frame["lv_mass_g"] / frame["bsa_m2"] > frame["sex"].map(THRESHOLD)).astype(int)
    y = frame["echo_lvh"].to_numpy() == 1
    cmr = evaluate(frame, str(tmp_path / "cmr"))
    no_mass = frame.drop(columns=["lv_mass_g"])
    by_column = evaluate(no_mass, str(tmp_path / "column"), lvh_column="echo_lvh")
    assert by_column["reference"] == "lvh_column" and by_column["continuous_score"] == "lvmi_pred"
    # The column holds exactly CMR LVH here, so every c-statistic and DeLong P is the CMR evaluation's.
    assert by_column["c_statistics"] == cmr["c_statistics"] and by_column["delong_p"] == cmr["delong_p"]
    assert by_column["c_statistics"]["lvm_ai_lvmi"]["auc"] == pytest.approx(roc_auc_score(y, frame["lvmi_pred"]))
    assert by_column["pearson_r"] is None and by_column["bland_altman"]["n"] == 0

    # With CMR mass present, CMR LVH stays the reference (the paper's), and a note says the column is unused.
    both = evaluate(frame.assign(echo_lvh=1 - frame["echo_lvh"]), str(tmp_path / "both"), lvh_column="echo_lvh")
    assert both["reference"] == "cmr_lvmi" and both["c_statistics"] == cmr["c_statistics"] and both["notes"]

    # Half the BSAs unknown: one continuous score for all (predicted LV mass); LVM-AI LVH where it is known.
    part = no_mass.copy()
    part.loc[::2, ["bsa_m2", "lvmi_pred"]] = np.nan
    m = evaluate(part, str(tmp_path / "part"), lvh_column="echo_lvh")
    known = np.arange(len(part)) % 2 == 1
    assert m["continuous_score"] == "lv_mass_pred_g" and m["n"] == len(part)
    assert m["c_statistics"]["lvm_ai_lvmi"]["auc"] == pytest.approx(roc_auc_score(y, part["lv_mass_pred_g"]))
    call = frame["lvh_pred"].to_numpy(dtype=float)
    assert m["c_statistics"]["lvm_ai_lvh"]["auc"] == pytest.approx(roc_auc_score(y[known], call[known]))
    assert m["binary_calls"]["lvm_ai_lvh"]["n"] == known.sum() == m["binary_calls"]["lvm_ai_lvh"]["n_not_measurable"]
    assert len(m["notes"]) == 3
    table = (tmp_path / "part" / "table.md").read_text()
    assert "LVM-AI (predicted LV mass, continuous)" in table and "Note: Predicted LVMI needs a BSA" in table

    with pytest.raises(ValueError, match="column 'lvh_likelihood' must hold an LVH label"):
        evaluate(no_mass.assign(lvh_likelihood=35.0), str(tmp_path / "bad"), lvh_column="lvh_likelihood")


def test_validate_with_cmr_labels(ray_cluster, ingested, checkpoint, tmp_path) -> None:
    result, ids = ingested
    labels = cmr_labels(ids)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "validation"
    args = ["--labels", str(tmp_path / "labels.csv"), "--checkpoint", checkpoint, "--out", str(out)]

    first = run_validate(*args)
    assert first.exit_code == 0, first.output
    outputs = json.loads((out / "outputs.json").read_text())
    for name, path in outputs["paths"].items():
        assert Path(path).exists(), name
    # validate's ingest is the ingest stage: same ECGs stored, same records quarantined for the same reasons.
    counts = outputs["ingest"]
    assert counts["stored"] == result.n_stored == len(ids)
    assert counts["quarantined"] == result.n_quarantined == len(store.read_quarantine(str(out / "data")))
    assert counts["quarantine_by_reason"] == result.quarantine_by_reason
    assert counts["labelled"] == len(ids) - 1
    assert sorted(read_predictions(str(out / "predictions"))["ecg_id"]) == sorted(ids)

    metrics = json.loads(Path(outputs["paths"]["metrics"]).read_text())
    truth = labels[labels["ecg_id"].isin(ids)]
    expected_lvh = int((truth["lv_mass_g"] / BSA > truth["sex"].map(THRESHOLD)).sum())
    assert metrics["n"] == outputs["evaluation"]["n"] == len(truth) == len(ids) - 1
    assert metrics["exclusions"] == {"missing_lv_mass_g": 1}
    assert metrics["reference"] == "cmr_lvmi" and 0 < metrics["n_lvh"] == expected_lvh < len(truth)
    pairs = pd.read_parquet(out / "evaluation" / "pairs.parquet").set_index("ecg_id")
    np.testing.assert_allclose(pairs.loc[truth["ecg_id"], "lv_mass_g"], truth["lv_mass_g"])
    np.testing.assert_allclose(pairs["bsa_m2"], BSA)
    predictions = read_predictions(str(out / "predictions")).set_index("ecg_id").loc[truth["ecg_id"]]
    lvh = (truth["lv_mass_g"] / BSA > truth["sex"].map(THRESHOLD)).to_numpy()
    auc = roc_auc_score(lvh, predictions["lv_mass_pred_g"] / BSA)
    assert metrics["c_statistics"]["lvm_ai_lvmi"]["auc"] == pytest.approx(auc, abs=1e-12)

    report = Path(outputs["paths"]["report"])
    parsed = _parse(report)
    assert {"fig-scatter", "fig-bland-altman", "fig-roc"} <= {img["id"] for img in parsed.images}
    text = " ".join(parsed.text)
    assert "Any ECG rule" in text and outputs["model_version"] in text
    screenshot_is_drawn(report, tmp_path)

    # A re-run resumes: the dataset is reused (not re-read) and every ECG is already scored.
    manifest = (out / "data" / "manifest.json").read_text()
    again = run_validate(*args)
    assert again.exit_code == 0, again.output
    assert "reused" in again.output and f"0 scored now, {len(ids)} already there" in again.output
    assert (out / "data" / "manifest.json").read_text() == manifest

    # Another model's validation is not mixed in: refused before anything runs, one line.
    other = tiny_checkpoint(str(tmp_path / "other_run"), seed=1)
    mixed = run_validate(*args[:2], "--checkpoint", other, "--out", str(out))
    assert mixed.exit_code == 2 and len(error_lines(mixed.output)) == 1
    assert "holds a validation of another model" in mixed.output

    # --overwrite redoes it all and replaces only validate's own outputs: a user's file stays.
    (out / "my-notes.txt").write_text("keep me")
    redone = run_validate(*args[:2], "--checkpoint", other, "--out", str(out), "--overwrite")
    assert redone.exit_code == 0, redone.output
    assert (out / "my-notes.txt").read_text() == "keep me"
    assert f"{len(ids)} scored now" in redone.output
    assert json.loads((out / "outputs.json").read_text())["model_version"] != outputs["model_version"]


def test_validate_with_an_lvh_column_and_no_cmr_mass(ray_cluster, ingested, checkpoint, tmp_path) -> None:
    """PTB-XL-like labels: a cardiologist's LVH statement, no LV mass (and, in PTB-XL, mostly no height)."""
    _, ids = ingested
    metadata = pd.read_csv(BUNDLED_SAMPLES / "ptbxl" / "metadata.csv")
    ptbxl = dict(zip(metadata["record_id"].astype(str), metadata["lvh"], strict=True))
    others = [i for i in ids if i not in ptbxl]
    made_up = {ecg_id: float(k % 2 == 0) for k, ecg_id in enumerate(others[:-1])}  # the last: no label
    labels = pd.DataFrame({"ecg_id": list(ptbxl) + list(made_up), "lvh": list(ptbxl.values()) + list(made_up.values())})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "validation"
    done = run_validate(
        "--labels", str(tmp_path / "labels.csv"), "--checkpoint", checkpoint, "--out", str(out), "--lvh-column", "lvh"
    )
    assert done.exit_code == 0, done.output
    outputs = json.loads((out / "outputs.json").read_text())
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["n"] == len(labels) == len(ids) - 1
    assert metrics["exclusions"] == {"missing_lvh_label": 1}
    assert metrics["reference"] == "lvh_column" and metrics["n_lvh"] == int(labels["lvh"].sum())
    assert metrics["pearson_r"] is None and metrics["mae_g"] is None  # no CMR mass: skipped, not invented
    assert any("No CMR LV mass" in note for note in metrics["notes"])

    predictions = read_predictions(str(out / "predictions")).set_index("ecg_id").loc[labels["ecg_id"]]
    # PTB-XL records carry no height: no BSA, so the continuous score is predicted LV mass.
    assert predictions["lvmi_pred"].isna().any() and metrics["continuous_score"] == "lv_mass_pred_g"
    y = labels["lvh"].to_numpy() == 1
    auc = roc_auc_score(y, predictions["lv_mass_pred_g"])
    assert metrics["c_statistics"]["lvm_ai_lvmi"]["auc"] == pytest.approx(auc, abs=1e-12)
    assert outputs["evaluation"]["c_statistics"]["lvm_ai_lvmi"] == pytest.approx(auc, abs=1e-12)
    rule = predictions["lvh_any_rule"]
    known = rule.notna().to_numpy()
    if 0 < y[known].sum() < known.sum():
        expected = roc_auc_score(y[known], rule[known].astype(float))
        assert metrics["c_statistics"]["any_rule"]["auc"] == pytest.approx(expected, abs=1e-12)

    parsed = _parse(out / "report.html")
    figures = {img["id"] for img in parsed.images}
    assert "fig-roc" in figures and not figures & {"fig-scatter", "fig-bland-altman"}  # no CMR mass to plot
    text = " ".join(parsed.text)
    assert "Reference LVH: the labels' column lvh" in text and "No CMR LV mass" in text


@pytest.fixture()
def no_ray(monkeypatch):
    """A tripwire: these mistakes must be reported before validate connects to Ray."""

    def tripwire(*args, **kwargs):
        raise AssertionError("validate started Ray before checking its arguments")

    monkeypatch.setattr("lvm_ray.ray_utils.ensure_connected", tripwire)


@pytest.mark.parametrize(
    ("table", "extra", "message"),
    [
        ("ok", ["--checkpoint", "{tmp}/no-such-run"], "no checkpoint at"),
        ("missing", [], "labels table not found"),
        ("no_reference", [], "has no lv_mass_g column (CMR LV mass) and no --lvh-column"),
        ("no_id", [], "needs an ecg_id or patient_id column"),
        ("likelihood", ["--lvh-column", "lvh_likelihood"], "must hold an LVH label"),
        ("likelihood", ["--lvh-column", "lvh_statement"], "is not a column of labels table"),
        ("ok", ["--exports-missing"], "ECG source not found"),
    ],
)
def test_wrong_arguments_give_one_line_before_ray(no_ray, checkpoint, tmp_path, table, extra, message) -> None:
    tables = {
        "ok": pd.DataFrame({"ecg_id": ["1"], "lv_mass_g": [120.0]}),
        "no_reference": pd.DataFrame({"ecg_id": ["1"], "age": [60]}),
        "no_id": pd.DataFrame({"record": ["1"], "lv_mass_g": [120.0]}),
        "likelihood": pd.DataFrame({"ecg_id": ["1", "2"], "lvh_likelihood": [0.0, 35.0]}),
    }
    labels = tmp_path / "labels.csv"
    if table in tables:
        tables[table].to_csv(labels, index=False)
    extra = [e.format(tmp=tmp_path) for e in extra]
    sources = [*SOURCES, str(tmp_path / "no-such-export")] if "--exports-missing" in extra else SOURCES
    extra = [e for e in extra if e != "--exports-missing"]
    command = ["validate", *sources, "--labels", str(labels), "--checkpoint", checkpoint, "--out", str(tmp_path / "v")]
    result = CliRunner().invoke(app, [*command, *extra])
    assert result.exit_code == 2, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "v").exists()  # nothing written


def test_refuses_a_folder_of_user_files(no_ray, checkpoint, tmp_path) -> None:
    pd.DataFrame({"ecg_id": ["1"], "lv_mass_g": [120.0]}).to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.docx").write_text("years of work")
    result = run_validate("--labels", str(tmp_path / "labels.csv"), "--checkpoint", checkpoint, "--out", str(out))
    assert result.exit_code == 2 and "already holds files that are not lvm-ray's" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["thesis.docx"]
    inside = run_validate(
        "--labels", str(tmp_path / "labels.csv"), "--checkpoint", checkpoint, "--out", f"{SOURCES[1]}/validation"
    )
    assert inside.exit_code == 2 and "is (or is inside) the input" in inside.output


def test_labels_that_match_no_ecg_give_one_line(ray_cluster, checkpoint, tmp_path) -> None:
    """ids from another numbering (e.g. file names with their suffix): caught after ingest, before scoring."""
    pd.DataFrame({"ecg_id": ["ecg_0001.xml", "ecg_0002.xml"], "lv_mass_g": [120.0, 150.0]}).to_csv(
        tmp_path / "labels.csv", index=False
    )
    out = tmp_path / "validation"
    result = run_validate("--labels", str(tmp_path / "labels.csv"), "--checkpoint", checkpoint, "--out", str(out))
    assert result.exit_code == 2
    lines = error_lines(result.output)
    assert len(lines) == 1 and "matched none of the" in lines[0] and "'ecg_0001.xml'" in lines[0]
    assert not (out / "predictions").exists()  # nothing was scored


@pytest.mark.slow
def test_validate_an_imported_keras_model(ray_cluster, ingested, tmp_path) -> None:
    """The released-model workflow: `lvm-ray import-keras` an ML4H .h5, then validate; the masses are Keras's."""
    import hashlib

    kt = pytest.importorskip("tests.test_keras_import")  # the published architecture built in Keras 3 (torch)
    result, ids = ingested
    table = store.read_table(result.out)
    ecg, order = store.ecg_array(table), table.column("ecg_id").to_pylist()
    n = len(order)
    meta = {"sex": np.array(["M", "F"] * n, dtype=object)[:n], "age": np.full(n, 60.0), "bmi": np.full(n, 25.0)}
    model = kt.ml4h_model(covariates=False, seed=3)
    kt.spread_heads(model, ecg, meta)
    h5 = tmp_path / "ecg_rest_raw_lvm_symmetric_loss.h5"
    model.save(str(h5))
    (z,) = kt.keras_predict(kt.keras.saving.load_model(str(h5), compile=False), ecg, meta)
    keras_grams = pd.Series(z[:, 0] * kt.LVM_SD + kt.LVM_MEAN, index=order)
    assert keras_grams.std() > 15.0  # predictions that differ, or agreement would prove nothing

    run = tmp_path / "ml4h_run"
    assert CliRunner().invoke(app, ["import-keras", str(h5), "--run", str(run)]).exit_code == 0
    cmr_labels(ids).to_csv(tmp_path / "labels.csv", index=False)
    out = tmp_path / "validation"
    done = run_validate("--labels", str(tmp_path / "labels.csv"), "--checkpoint", str(run), "--out", str(out))
    assert done.exit_code == 0, done.output

    outputs = json.loads((out / "outputs.json").read_text())
    assert outputs["model_provenance"]["source_sha256"] == hashlib.sha256(h5.read_bytes()).hexdigest()
    predictions = read_predictions(str(out / "predictions")).set_index("ecg_id")
    np.testing.assert_allclose(predictions.loc[order, "lv_mass_pred_g"], keras_grams.loc[order], atol=0.05, rtol=0)
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["n"] == len(ids) - 1 and metrics["pearson_r"] is not None
