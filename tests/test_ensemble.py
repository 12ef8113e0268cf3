"""Ensembles: one checkpoint of K members; Predictor averages them (probabilities for a binary
target) and reports their spread; a one-member ensemble and a plain run predict the same numbers;
scoring, serving and `train --ensemble` go through the same path."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from lvm_ray import store
from lvm_ray.model import (
    ENSEMBLE_KEY,
    CheckpointError,
    build_model,
    ensemble_payload,
    load_checkpoint,
    read_payload,
    save_checkpoint,
    write_payload,
)
from lvm_ray.predict import Predictor, spread_column
from lvm_ray.presets import get_preset, model_to_target, prepare_covariates, prepare_input
from lvm_ray.schema import LEADS
from lvm_ray.stats import auroc
from lvm_ray.synth import generate_batch, write_cohort
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def people() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Six synthetic ECGs with the metadata a Predictor reads (sex, height, weight, age)."""
    batch = generate_batch(6, seed=3)
    meta = {c: batch.table[c].to_numpy() for c in ("ecg_id", "sex", "height_cm", "weight_kg", "age")}
    return batch.ecg, meta


def _members(tmp_path: Path, preset: str = "lvm-cpu", k: int = 3) -> list[str]:
    return [tiny_checkpoint(str(tmp_path / f"m{i}.pt"), preset=preset, seed=10 + i) for i in range(k)]


def _ensemble(tmp_path: Path, members: list[str], name: str = "ensemble.pt") -> str:
    url = str(tmp_path / name)
    write_payload(url, ensemble_payload([read_payload(m) for m in members], runs=[f"members/{i}" for i in range(3)]))
    return url


def test_ensemble_averages_the_members_and_reports_their_spread(tmp_path, people):
    ecg, meta = people
    members = _members(tmp_path)
    url = _ensemble(tmp_path, members)
    alone = [Predictor.from_checkpoint(m, use_gpu=False).predict(ecg, meta) for m in members]
    ensemble = Predictor.from_checkpoint(url, use_gpu=False)
    out = ensemble.predict(ecg, meta)

    grams = np.stack([a["lv_mass_pred_g"].to_numpy() for a in alone])
    assert np.ptp(grams, axis=0).min() > 0  # the members really disagree, so the test can fail
    np.testing.assert_allclose(out["lv_mass_pred_g"], grams.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(out["lv_mass_pred_sd_g"], grams.std(axis=0, ddof=1), rtol=1e-9)
    # LVMI and the LVH call come from the averaged mass (lvh.derive), rules from the ECG alone.
    bsa = np.sqrt(meta["height_cm"] * meta["weight_kg"] / 3600.0)
    np.testing.assert_allclose(out["lvmi_pred"], out["lv_mass_pred_g"] / bsa, rtol=1e-6)
    pd.testing.assert_series_equal(out["sokolow_lyon_uv"], alone[0]["sokolow_lyon_uv"])
    # Its identity is its members', in order: not any member's, and stable across loads.
    assert "/ensemble3/" in ensemble.version
    assert ensemble.version not in {Predictor.checkpoint_version(m) for m in members}
    assert Predictor.checkpoint_version(url) == ensemble.version
    assert (out["model_version"] == ensemble.version).all()
    assert ensemble.training_summary["ensemble"]["size"] == 3
    assert len(load_checkpoint(url).members) == 3


def test_the_ensemble_as_one_network_gives_the_mean_in_grams(tmp_path, people):
    """Predictor.network (what gradient explanations differentiate) is the members' mean output."""
    ecg, meta = people
    predictor = Predictor.from_checkpoint(_ensemble(tmp_path, _members(tmp_path)), use_gpu=False)
    x = torch.from_numpy(prepare_input(ecg, predictor.preset))
    with torch.no_grad():
        z = predictor.network(x).main.numpy()
    grams = predictor.predict(ecg, meta)["lv_mass_pred_g"].to_numpy()
    np.testing.assert_allclose(model_to_target(z, predictor.preset), grams, rtol=1e-5)
    single = Predictor.from_checkpoint(tiny_checkpoint(str(tmp_path / "s.pt")), use_gpu=False)
    assert single.network is single.model


def test_a_binary_ensemble_averages_probabilities_not_logits(tmp_path, people):
    ecg, meta = people
    preset = get_preset("ptbxl-lvh")
    urls = []
    for i, bias in enumerate((3.0, -1.0)):  # members far apart: mean of probabilities != sigmoid(mean logit)
        torch.manual_seed(i)
        model = build_model(preset).eval()
        with torch.no_grad():
            model.out.weight.zero_()
            model.out.bias.fill_(bias)
        urls.append(str(tmp_path / f"b{i}.pt"))
        save_checkpoint(urls[-1], model, preset, epoch=1)
    url = str(tmp_path / "binary.pt")
    write_payload(url, ensemble_payload([read_payload(u) for u in urls]))
    out = Predictor.from_checkpoint(url, use_gpu=False).predict(ecg, meta)
    expected = (1 / (1 + np.exp(-3.0)) + 1 / (1 + np.exp(1.0))) / 2
    np.testing.assert_allclose(out["lvh_prob"], expected, rtol=1e-6)
    assert spread_column(preset) == "lvh_prob_sd"
    np.testing.assert_allclose(out["lvh_prob_sd"], np.std([1 / (1 + np.exp(-3.0)), 1 / (1 + np.exp(1.0))], ddof=1))


def test_one_member_and_a_plain_checkpoint_predict_exactly_the_same(tmp_path, people):
    ecg, meta = people
    plain = tiny_checkpoint(str(tmp_path / "plain.pt"), seed=4)
    one = str(tmp_path / "one.pt")
    write_payload(one, ensemble_payload([read_payload(plain)]))
    single = Predictor.from_checkpoint(plain, use_gpu=False)
    a = single.predict(ecg, meta)
    b = Predictor.from_checkpoint(one, use_gpu=False).predict(ecg, meta)
    pd.testing.assert_frame_equal(a.drop(columns="model_version"), b.drop(columns="model_version"))
    assert not [c for c in a.columns if c.endswith(("_sd", "_sd_g"))]  # a single model: today's columns
    # ... and today's numbers: the network's own output, in grams.
    loaded = load_checkpoint(plain)
    x = torch.from_numpy(prepare_input(ecg, loaded.preset))
    cov = prepare_covariates(meta, len(ecg), loaded.preset)
    with torch.no_grad():
        raw = loaded.model(x, torch.from_numpy(cov) if cov.shape[1] else None).main.numpy()
    np.testing.assert_array_equal(a["lv_mass_pred_g"].to_numpy(), model_to_target(raw, loaded.preset))
    assert loaded.members == [] and ENSEMBLE_KEY not in read_payload(plain)


def test_members_of_different_presets_make_no_ensemble(tmp_path):
    a = read_payload(tiny_checkpoint(str(tmp_path / "a.pt"), preset="lvm-cpu"))
    b = read_payload(tiny_checkpoint(str(tmp_path / "b.pt"), preset="ptbxl-lvh"))
    with pytest.raises(CheckpointError, match="different presets"):
        ensemble_payload([a, b])
    with pytest.raises(CheckpointError, match="at least one member"):
        ensemble_payload([])


def test_score_averages_an_ensemble_like_the_predictor(tmp_path, ray_cluster):
    from lvm_ray.score import read_predictions, score

    data = str(tmp_path / "data")
    write_cohort(40, 31, data, chunk_size=20)
    url = _ensemble(tmp_path, _members(tmp_path))
    scored = read_predictions(score(data, url, str(tmp_path / "preds"), num_actors=1).out).set_index("ecg_id")
    table = store.read_table(data)
    meta = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("ecg_id", "sex", "height_cm", "weight_kg")}
    direct = Predictor.from_checkpoint(url, use_gpu=False).predict(store.ecg_array(table), meta).set_index("ecg_id")
    for column in ("lv_mass_pred_g", "lv_mass_pred_sd_g", "lvmi_pred"):
        np.testing.assert_allclose(scored.loc[direct.index, column], direct[column], rtol=1e-6)
    assert (scored["model_version"] == direct["model_version"].iloc[0]).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_answers_with_the_ensemble_mean(tmp_path, ray_cluster, people):
    from ray import serve

    from lvm_ray.serve import build_app

    ecg, meta = people
    url = _ensemble(tmp_path, _members(tmp_path))
    direct = Predictor.from_checkpoint(url, use_gpu=False).predict(ecg, meta)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"checkpoint": url, "max_batch_size": 4}), name="lvm-ray-ensemble", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            info = client.get("/v1/model").json()
            assert info["model_version"] == direct["model_version"].iloc[0]
            assert info["training"]["ensemble"]["size"] == 3
            for i in range(2):
                body = {
                    "ecg": ecg[i].tolist(),
                    "leads": list(LEADS),
                    "ecg_id": str(meta["ecg_id"][i]),
                    "sex": str(meta["sex"][i]),
                    "height_cm": float(meta["height_cm"][i]),
                    "weight_kg": float(meta["weight_kg"][i]),
                }
                answer = client.post("/v1/predict", json=body).json()
                assert answer["lv_mass_g"] == pytest.approx(direct["lv_mass_pred_g"].iloc[i], rel=1e-5)
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_train_ensemble_end_to_end(tmp_path, ray_cluster):
    """Two members of the real-data preset on a binary target: one RUN, members with their own
    seeds and metrics, the best epoch chosen by validation AUROC, the ensemble's validation AUROC
    recomputed from its predictions, a re-run that trains nothing, and a folder it must not touch."""
    from lvm_ray.ensemble import train_ensemble
    from lvm_ray.runs import TrainError
    from lvm_ray.splits import ids_in_split
    from lvm_ray.train import split_predictions

    data, run = str(tmp_path / "cohort"), str(tmp_path / "run")
    write_cohort(240, 41, data, chunk_size=120)
    kwargs = dict(preset="ptbxl-lvh", target="hypertension", num_workers=1, max_epochs=2, cache_inputs=True)
    result = train_ensemble(data, run, 2, seed=5, **kwargs)

    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["kind"] == "ensemble" and record["status"] == "finished"
    assert record["ensemble"]["seeds"] == [5, 6]
    payload = read_payload(run)
    for i in range(2):
        member = tmp_path / "run" / "members" / str(i)
        assert json.loads((member / "run.json").read_text())["config"]["seed"] == 5 + i
        member_state = read_payload(str(member))["model_state"]
        for name, tensor in payload[ENSEMBLE_KEY]["members"][i]["model_state"].items():
            assert torch.equal(tensor, member_state[name])
        # The preset selects by validation AUROC: the best epoch is the one with the highest.
        history = [json.loads(line) for line in (member / "metrics.jsonl").read_text().splitlines()]
        aurocs = [h["val_auroc"] for h in history]
        assert result.members[i]["best_epoch"] == 1 + int(np.argmax(aurocs))
    # The ensemble's validation AUROC is that of its averaged predictions on the run's val split.
    val_ids = ids_in_split(store.read_parquet(str(tmp_path / "run" / "split.parquet")), "val")
    arrays = split_predictions(str(tmp_path / "run" / "model.pt"), data, val_ids)
    assert result.val_metrics["auroc"] == pytest.approx(auroc(arrays["true"] > 0.5, arrays["pred"]))
    assert result.val_metrics["n"] == len(val_ids)
    # Re-running the same command trains nothing: every member is finished.
    before = (tmp_path / "run" / "members" / "0" / "metrics.jsonl").read_text()
    again = train_ensemble(data, run, 2, seed=5, **kwargs)
    assert again.val_metrics == pytest.approx(result.val_metrics)
    assert (tmp_path / "run" / "members" / "0" / "metrics.jsonl").read_text() == before
    # An ensemble of another size, or into a plain run's folder, is refused with a clear message.
    with pytest.raises(TrainError, match="another ensemble"):
        train_ensemble(data, run, 3, seed=5, **kwargs)
    with pytest.raises(TrainError, match="single-model run"):  # a member is a plain run folder
        train_ensemble(data, str(tmp_path / "run" / "members" / "0"), 2, **kwargs)
