"""Explanations: integrated gradients on the canonical grid, checked against known truth.

Plumbing (completeness, batching, the torch input path, Arrow round trips, figures, the report)
on small models; faithfulness and alignment on the session's trained lvm-cpu model
(``trained_run``), whose held-out synthetic cohort records where every QRS complex lies.
"""

from __future__ import annotations

import base64
import dataclasses
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lvm_ray import store
from lvm_ray.explain import (
    ATTRIBUTION_TYPE,
    ATTRIBUTIONS_DIR,
    SUMMARY_FILE,
    Explanation,
    attribute,
    canonical_input_module,
    downsample,
    ecg_figure,
    example_ids,
    explain,
    explanation_table,
    read_explanations,
    save_png,
    share_inside,
    top_fraction_mask,
    window_mask,
)
from lvm_ray.model import build_model
from lvm_ray.predict import Predictor
from lvm_ray.presets import CovariateSpec, InputSpec, get_preset, prepare_input
from lvm_ray.schema import LEADS, N_SAMPLES
from lvm_ray.synth import generate_batch
from tests.helpers import tiny_checkpoint

N_TRUTH = 50  # ECGs of the held-out cohort in the truth tests


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "model.pt")), use_gpu=False)


@pytest.fixture(scope="module")
def batch():
    return generate_batch(6, 17)


def _metadata(table: pd.DataFrame) -> dict[str, np.ndarray]:
    return {c: table[c].to_numpy() for c in ("ecg_id", "age", "sex", "height_cm", "weight_kg", "bsa_m2", "bmi")}


# --------------------------------------------------------------------------------------------
# the method on small models


@pytest.mark.parametrize(
    "spec",
    [
        get_preset("lvm-cpu").input,  # 100 Hz: the anti-aliased decimation by 5
        get_preset("lvm-ai-2021").input,  # 500 Hz: scaling only
        InputSpec(sample_rate_hz=250, n_samples=2000, scale_uv=500.0),  # decimation by 2, first 8 s
    ],
)
def test_the_torch_input_path_is_prepare_input(spec):
    preset = dataclasses.replace(get_preset("lvm-cpu"), input=spec)
    x = np.random.default_rng(3).integers(-4000, 4000, size=(3, 12, N_SAMPLES)).astype(np.int16)
    expected = prepare_input(x, preset)
    got = canonical_input_module(preset)(torch.from_numpy(x.astype(np.float32))).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-6 * np.abs(expected).max())


def test_attributions_are_complete_batch_independent_and_shared_by_lead(tiny, batch):
    metadata = _metadata(batch.table)
    e = explain(tiny, batch.ecg, metadata)
    assert e.attribution.shape == (6, 12, N_SAMPLES) and e.attribution.dtype == np.float32
    assert e.units == "g"
    # The explained output is the prediction (grams), and the attributions add up to its distance
    # from the flat baseline (completeness, up to the integration error captum reports).
    predicted = tiny.predict(batch.ecg, metadata).lv_mass_pred_g.to_numpy()
    np.testing.assert_allclose(e.output, predicted, rtol=1e-5)
    np.testing.assert_allclose(e.attribution.sum(axis=(1, 2)), e.output - e.baseline_output, atol=1e-4)
    np.testing.assert_allclose(e.delta, e.attribution.sum(axis=(1, 2)) - (e.output - e.baseline_output), atol=1e-4)
    np.testing.assert_allclose(e.lead_share.sum(axis=1), 1.0)
    expected_share = np.abs(e.attribution).sum(axis=2) / np.abs(e.attribution).sum(axis=(1, 2))[:, None]
    np.testing.assert_allclose(e.lead_share, expected_share, rtol=1e-5)
    # An ECG explained alone gets the attributions it gets in a batch.
    alone = explain(tiny, batch.ecg[2], {k: v[2:3] for k, v in metadata.items()})
    np.testing.assert_allclose(alone.attribution[0], e.attribution[2], atol=1e-6 * np.abs(e.attribution[2]).max())


def test_a_flat_lead_and_flat_samples_get_no_attribution(tiny, batch):
    ecg = batch.ecg[:1].copy()
    ecg[0, LEADS.index("V3")] = 0
    ecg[0, :, 1000:1500] = 0
    e = explain(tiny, ecg, _metadata(batch.table.iloc[:1]))
    assert e.lead_share[0, LEADS.index("V3")] == 0.0
    assert not e.attribution[0, :, 1000:1500].any()  # IG = (x - baseline) x mean gradient


def test_covariates_are_held_at_the_ecgs_own_values():
    preset = dataclasses.replace(
        get_preset("lvm-cpu"), name="lvm-cpu-age", covariates=(CovariateSpec("age", mean=60.0, sd=10.0),)
    )
    torch.manual_seed(1)
    model = build_model(preset).eval()
    ecg = generate_batch(2, 4).ecg[[0, 0]]  # the same ECG twice, at two ages
    e = attribute(model, preset, ecg, {"age": np.array([45.0, 80.0])})
    np.testing.assert_allclose(e.attribution.sum(axis=(1, 2)), e.output - e.baseline_output, atol=1e-4)
    assert e.baseline_output[0] != pytest.approx(e.baseline_output[1])  # the baseline keeps each one's age


def test_downsample_sums_whole_samples():
    a = np.random.default_rng(0).normal(size=(12, N_SAMPLES))
    points, step = downsample(a)
    assert points.shape == (12, 500) and step == 10
    np.testing.assert_allclose(points.sum(axis=1), a.sum(axis=1))
    np.testing.assert_allclose(points[:, 7], a[:, 70:80].sum(axis=1))
    points, step = downsample(a, max_points=7)  # 5000 / 7 does not divide: the last bin is short
    assert points.shape == (12, 7) and step == 715
    np.testing.assert_allclose(points.sum(axis=1), a.sum(axis=1))


def test_truth_helpers():
    mask = window_mask([10, 4995, -3], 8, n_samples=N_SAMPLES)
    assert mask.sum() == 8 + 5 + 5 and mask[10:18].all() and not mask[18] and mask[:5].all()
    a = np.zeros((12, N_SAMPLES))
    a[3, 12] = 2.0
    a[5, 100] = -2.0
    assert share_inside(a, mask) == pytest.approx(0.5)
    top = top_fraction_mask(a, 2 / a.size)
    assert top.sum() == 2 and top[3, 12] and top[5, 100]


# --------------------------------------------------------------------------------------------
# the explanations table, figures and the report


def _write_explanations(folder: Path, predictor: Predictor, synth) -> Explanation:
    """An explanations folder as `lvm-ray explain` writes it, without Ray (the Ray stage is tested below)."""
    metadata = _metadata(synth.table)
    explanation = explain(predictor, synth.ecg, metadata)
    table = explanation_table(predictor.predict(synth.ecg, metadata), explanation, synth.ecg)
    store.write_table(str(folder / ATTRIBUTIONS_DIR / "part-0.parquet"), table)
    store.write_json(str(folder / SUMMARY_FILE), {"status": "finished", "n": table.num_rows})
    return explanation


def test_explanation_table_round_trip(tiny, batch, tmp_path):
    e = _write_explanations(tmp_path / "ex", tiny, batch)
    schema = pq.read_schema(tmp_path / "ex" / ATTRIBUTIONS_DIR / "part-0.parquet")
    assert schema.field("attribution").type == ATTRIBUTION_TYPE  # Arrow fixed-shape tensor float32 [12, 5000]
    assert str(ATTRIBUTION_TYPE) == "extension<arrow.fixed_shape_tensor[value_type=float, shape=[12,5000]]>"
    frame, attributions, ecg = read_explanations(str(tmp_path / "ex"))
    assert frame.ecg_id.tolist() == batch.table.ecg_id.tolist()
    np.testing.assert_array_equal(attributions, e.attribution)
    np.testing.assert_array_equal(ecg, batch.ecg)
    np.testing.assert_allclose(np.stack(frame.lead_share), e.lead_share)
    assert store.output_kind(str(tmp_path / "ex")) == "explanations"


def test_example_ids_are_the_highest_median_and_lowest_lvmi():
    predictions = pd.DataFrame({"ecg_id": list("abcdef"), "lvmi_pred": [50.0, 90.0, np.nan, 70.0, 60.0, 80.0]})
    assert example_ids(predictions) == ["b", "d", "a"]  # 90 highest, 70 the median, 50 lowest; NaN left out
    no_lvmi = pd.DataFrame({"ecg_id": ["x", "y"], "lvmi_pred": [np.nan] * 2, "lv_mass_pred_g": [80.0, 120.0]})
    assert example_ids(no_lvmi) == ["y", "x"]


def _assert_not_blank(image: Image.Image, what: str) -> None:
    pixels = np.asarray(image.convert("RGB"), dtype=float)
    assert pixels.std() > 5, f"{what} looks blank"


def test_figure_is_a_printed_ecg_with_a_colour_band(tiny, batch):
    e = explain(tiny, batch.ecg[:1], _metadata(batch.table.iloc[:1]))
    image = Image.open(io.BytesIO(save_png(ecg_figure(batch.ecg[0], e.attribution[0], title="x"))))
    assert image.format == "PNG" and image.size[0] > 1000 and image.size[1] > 1000
    rgb = np.asarray(image.convert("RGB"), dtype=int).reshape(-1, 3)
    _assert_not_blank(image, "figure")
    grid = (rgb[:, 0] > 200) & (rgb[:, 1] < 190) & (rgb[:, 2] < 190)  # the pink paper grid
    trace = rgb.sum(axis=1) < 150  # the black traces
    band = (rgb[:, 2] - rgb[:, 0] > 40) | (rgb[:, 0] - rgb[:, 2] > 90)  # blue or red attribution
    assert grid.mean() > 0.005 and trace.mean() > 0.002 and band.mean() > 0.0005


def test_report_shows_three_example_ecgs_and_the_model_card(tiny, tmp_path):
    from lvm_ray.evaluate import evaluate
    from lvm_ray.report import ReportError, render_report
    from tests.browser import screenshot
    from tests.test_evaluate import make_predictions
    from tests.test_report import _parse

    synth = generate_batch(5, 23)
    _write_explanations(tmp_path / "ex", tiny, synth)
    evaluate(make_predictions(n=300, seed=2), str(tmp_path / "eval"))
    run = tmp_path / "run"
    tiny_checkpoint(str(run / "model.pt"))
    out = tmp_path / "report.html"
    render_report(str(tmp_path / "eval"), None, str(out), explanations=str(tmp_path / "ex"), run=str(run))
    parsed = _parse(out)
    images = {img["id"]: img for img in parsed.images}
    assert {"fig-explain-highest", "fig-explain-median", "fig-explain-lowest"} <= set(images)
    for name in ("highest", "median", "lowest"):
        src = images[f"fig-explain-{name}"]["src"]
        assert src.startswith("data:image/png;base64,")  # inline: the report stays self-contained
        _assert_not_blank(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))), name)
    text = " ".join(parsed.text)
    frame, _, _ = read_explanations(str(tmp_path / "ex"))
    highest = frame.loc[frame.lvmi_pred.idxmax(), "ecg_id"]
    assert f"Highest predicted LVMI: {highest}" in out.read_text()
    assert "Model card" in text and tiny.version in text and "not recorded" in text
    assert all(url.startswith("data:") for url in parsed.urls)
    with pytest.raises(ReportError, match="no explanations"):
        render_report(str(tmp_path / "eval"), None, str(out), explanations=str(tmp_path / "nothing"))
    image = screenshot(out, tmp_path / "shot.png", (1200, 9000), tmp_path / "profile").convert("RGB")
    pixels = np.asarray(image, dtype=int)
    # The explanation figures are drawn: the ECG paper's pink shows in the page.
    pink = (pixels[..., 0] > 200) & (pixels[..., 1] < 200) & (pixels[..., 2] < 200) & (pixels[..., 1] > 120)
    assert pink.mean() > 0.002, "no ECG paper grid drawn in Chromium"


# --------------------------------------------------------------------------------------------
# on a trained model: faithfulness and alignment against the synthetic truth


@pytest.fixture(scope="module")
def heldout(trained_run):
    table = next(store.iter_shards(trained_run.heldout))  # a shard holds more than N_TRUTH ECGs
    frame = table.drop_columns(["ecg"]).to_pandas().iloc[:N_TRUTH]
    assert "true_qrs_onsets" in frame, "the held-out cohort was generated by a synth.py without true_qrs_onsets"
    return frame, store.ecg_array(table)[:N_TRUTH]


@pytest.fixture(scope="module")
def trained(trained_run) -> Predictor:
    return Predictor.from_checkpoint(trained_run.run, use_gpu=False)


@pytest.fixture(scope="module")
def trained_explanation(trained, heldout):
    frame, ecg = heldout
    return explain(trained, ecg, _metadata(frame))


@pytest.mark.slow
def test_attribution_concentrates_on_the_true_qrs_complexes(heldout, trained_explanation):
    """Alignment: the share of |attribution| inside the true QRS windows is at least twice the
    share of time they cover (averaged over 50 ECGs): the model reads the QRS, as LV mass shows
    there (voltage, duration) in the generator."""
    frame, _ = heldout
    inside, covered = [], []
    for k, (onsets, qrs_ms) in enumerate(zip(frame.true_qrs_onsets, frame.true_qrs_ms, strict=True)):
        mask = window_mask(onsets, int(round(qrs_ms * 500 / 1000)))
        inside.append(share_inside(trained_explanation.attribution[k], mask))
        covered.append(mask.mean())
    assert 0.05 < np.mean(covered) < 0.2  # ~90 ms of every ~0.9 s
    assert np.mean(inside) >= 2 * np.mean(covered), (np.mean(inside), np.mean(covered))


@pytest.mark.slow
def test_deleting_the_most_attributed_samples_moves_the_prediction_most(trained, heldout, trained_explanation):
    """Faithfulness (deletion): setting the top 10% attributed samples to the baseline (0 uV, the
    isoelectric line) changes the prediction at least twice as much as setting a random 10%."""
    frame, ecg = heldout
    metadata = _metadata(frame)
    base, _ = trained.model_outputs(ecg, metadata)
    rng = np.random.default_rng(0)
    top, random = ecg.copy(), ecg.copy()
    for k in range(len(ecg)):
        top[k][top_fraction_mask(trained_explanation.attribution[k], 0.10)] = 0
        random[k][rng.random(ecg[k].shape) < 0.10] = 0
    after_top, _ = trained.model_outputs(top, metadata)
    after_random, _ = trained.model_outputs(random, metadata)
    change_top = np.abs(after_top - base).mean()
    change_random = np.abs(after_random - base).mean()
    assert change_top >= 2 * change_random, (change_top, change_random)


@pytest.mark.slow
def test_completeness_holds_on_the_trained_model(trained_explanation):
    distance = trained_explanation.output - trained_explanation.baseline_output
    error = np.abs(trained_explanation.attribution.sum(axis=(1, 2)) - distance)
    # 32 Gauss-Legendre steps on a ReLU network: a few per cent of the distance, under a gram.
    assert np.median(error / np.maximum(np.abs(distance), 1.0)) < 0.05 and np.median(error) < 1.0
    np.testing.assert_allclose(
        trained_explanation.delta, trained_explanation.attribution.sum(axis=(1, 2)) - distance, atol=1e-3
    )


# --------------------------------------------------------------------------------------------
# `lvm-ray explain` on Ray Data


@pytest.mark.slow
def test_explain_stage_writes_attributions_and_figures(trained_run, trained, heldout, tmp_path):
    from lvm_ray.explain_stage import ExplainStageError, explain_dataset

    frame, ecg = heldout
    ids = frame.ecg_id.iloc[[3, 7, 11]].tolist()
    out = str(tmp_path / "explained")
    result = explain_dataset(trained_run.heldout, trained_run.run, out, ids=ids, figures=True, num_actors=1)
    assert result.n == 3 and result.n_figures == 3 and result.model_version == trained.version
    got, attributions, waves = read_explanations(out)
    assert sorted(got.ecg_id) == sorted(ids)
    order = [frame.ecg_id.tolist().index(i) for i in got.ecg_id]
    np.testing.assert_array_equal(waves, ecg[order])
    # The same prediction and attributions as in-process (the one prediction path).
    expected = trained.predict(ecg[order], {k: v[order] for k, v in _metadata(frame).items()})
    np.testing.assert_allclose(got.lv_mass_pred_g, expected.lv_mass_pred_g, rtol=1e-5)
    offline = explain(trained, ecg[order], {k: v[order] for k, v in _metadata(frame).items()})
    np.testing.assert_allclose(attributions, offline.attribution, atol=1e-5 * np.abs(offline.attribution).max())
    np.testing.assert_allclose(np.stack(got.lead_share).sum(axis=1), 1.0)
    pngs = sorted((tmp_path / "explained" / "figures").glob("*.png"))
    assert len(pngs) == 3 and all(Image.open(p).format == "PNG" for p in pngs)
    summary = store.read_json(f"{out}/{SUMMARY_FILE}")
    assert summary["n"] == 3 and summary["method"] == "integrated_gradients"
    assert not any(p.name.startswith("explained.partial") for p in tmp_path.iterdir())
    # Output safety: never into the data, never over explanations without --overwrite.
    with pytest.raises(ExplainStageError, match="is \\(or is inside\\) the input"):
        explain_dataset(trained_run.heldout, trained_run.run, f"{trained_run.heldout}/ex", limit=1)
    with pytest.raises(ExplainStageError, match="already holds explanations"):
        explain_dataset(trained_run.heldout, trained_run.run, out, limit=1)
    with pytest.raises(ExplainStageError, match="1 --ids not in"):
        explain_dataset(trained_run.heldout, trained_run.run, str(tmp_path / "other"), ids=["no-such-ecg"])


@pytest.mark.slow
def test_cli_explain(trained_run, tmp_path):
    from lvm_ray.cli import app

    runner = CliRunner()
    out = str(tmp_path / "cli")
    args = ["explain", "--data", trained_run.heldout, "--checkpoint", trained_run.run, "--out", out]
    result = runner.invoke(app, [*args, "--limit", "2", "--steps", "8"])
    assert result.exit_code == 0, result.output
    assert "explain -> " in result.output and "ECGs         : 2" in result.output
    assert len(read_explanations(out)[0]) == 2
    result = runner.invoke(app, [*args, "--limit", "2", "--ids", "x"])
    assert result.exit_code != 0 and "error: give either --ids or --limit" in result.output
    assert "Traceback" not in result.output
