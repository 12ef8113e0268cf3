"""Ray Serve endpoint over real HTTP: schema-valid answers, 4xx for bad input (and the service
stays up after each), nothing the client sent in the logs, same numbers as scoring."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest
import wfdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvm_ray import store
from lvm_ray.api import MAX_BODY_BYTES
from lvm_ray.ingest import ingest
from lvm_ray.schema import LEADS
from lvm_ray.score import read_predictions, score
from tests.helpers import tiny_checkpoint
from tests.test_calibrate import calibrated_checkpoint

PTBXL = Path(__file__).parent / "fixtures" / "ptbxl" / "records500" / "00000"
RECORDS = sorted(p.with_suffix("") for p in PTBXL.glob("*.hea"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    """One Serve app for the module (serve.run costs seconds): (base URL, checkpoint, workdir)."""
    from ray import serve

    from lvm_ray.serve import build_app

    workdir = tmp_path_factory.mktemp("serve")
    checkpoint = calibrated_checkpoint(str(workdir / "model.pt"))  # with prediction intervals
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": checkpoint, "max_batch_size": 8}), name="lvm-ray-test", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=60) as client:
        yield client, checkpoint, workdir
    serve.shutdown()


@pytest.fixture(scope="module")
def openapi(service) -> dict:
    client, _, _ = service
    doc = client.get("/openapi.json").json()
    assert "/v1/predict" in doc["paths"] and "/v1/predict/file" in doc["paths"]
    return doc


def _validate(doc: dict, body: dict, name: str = "PredictResponse") -> None:
    jsonschema.validate(body, {"$ref": f"#/components/schemas/{name}", "components": doc["components"]})


def _record_json(path: Path, **extra) -> dict:
    record = wfdb.rdrecord(str(path))
    return {
        "ecg": (record.p_signal.T * 1000).tolist(),
        "leads": record.sig_name,
        "sample_rate": record.fs,
        "ecg_id": path.name,
        **extra,
    }


def _npy_body(path: Path, dtype=np.float32) -> bytes:
    """The record as an application/x-npy body: microvolts, rows in the canonical lead order."""
    from lvm_ray.signals import normalise_lead_name

    record = wfdb.rdrecord(str(path))
    names = [normalise_lead_name(n) for n in record.sig_name]
    buffer = io.BytesIO()
    np.save(buffer, (record.p_signal.T * 1000)[[names.index(lead) for lead in LEADS]].round().astype(dtype))
    return buffer.getvalue()


NPY = {"content-type": "application/x-npy"}


def test_health_model_and_openapi(service, openapi):
    client, _, _ = service
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    info = client.get("/v1/model").json()
    _validate(openapi, info, "ModelInfo")
    assert info["preset"] == "lvm-cpu" and info["input_sample_rate_hz"] == 100
    assert info["interval_level"] == 0.9 and info["calibration"]["provenance"]["n_ecgs"] == 200
    assert info["calibration"]["provenance"]["data"] == "synth:41"


def test_real_ptbxl_json_and_file_upload(service, openapi):
    client, _, _ = service
    assert RECORDS, "PTB-XL fixtures missing"
    for path in RECORDS:
        response = client.post("/v1/predict", json=_record_json(path, sex="M", height_cm=175, weight_kg=80))
        assert response.status_code == 200, response.text
        body = response.json()
        _validate(openapi, body)
        assert body["ecg_id"] == path.name and np.isfinite(body["lv_mass_g"])
        assert body["lvmi"] == pytest.approx(body["lv_mass_g"] / np.sqrt(175 * 80 / 3600))
        assert isinstance(body["lvh"], bool)
        assert body["lv_mass_lo_g"] < body["lv_mass_hi_g"] and body["interval_level"] == 0.9
        assert 0 < body["lvh_probability_calibrated"] < 1
        assert body["rules"]["measurements"]["sokolow_lyon_uv"] is not None
        files = [("files", (p.name, p.read_bytes())) for p in (path.with_suffix(".hea"), path.with_suffix(".dat"))]
        uploaded = client.post("/v1/predict/file", files=files)
        assert uploaded.status_code == 200, uploaded.text
        _validate(openapi, uploaded.json())
        assert uploaded.json()["lv_mass_g"] == pytest.approx(body["lv_mass_g"], rel=1e-5)
        assert any("height_cm" in w for w in uploaded.json()["warnings"])  # no BSA in a bare upload


def test_eight_lead_and_millivolt_input(service):
    client, _, _ = service
    full = _record_json(RECORDS[0])
    twelve = client.post("/v1/predict", json=full).json()
    names = [n.upper() for n in full["leads"]]
    keep = [names.index(lead.upper()) for lead in ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")]
    eight = {"ecg": [list(np.asarray(full["ecg"][i]) / 1000) for i in keep], "units": "mV", "sample_rate": 500}
    response = client.post("/v1/predict", json=eight)
    assert response.status_code == 200, response.text
    assert any("derived lead" in w for w in response.json()["warnings"])
    # PTB-XL's own limb leads equal the derived ones within rounding, so the mass agrees closely.
    assert response.json()["lv_mass_g"] == pytest.approx(twelve["lv_mass_g"], rel=0.02)


def test_serving_and_batch_scoring_agree(service, tmp_path, ray_cluster):
    client, checkpoint, _ = service
    data = str(tmp_path / "data")
    ingest([str(p) + ".hea" for p in RECORDS], data, use_ray=False)
    preds = read_predictions(score(data, checkpoint, str(tmp_path / "preds"), num_actors=1).out).set_index("ecg_id")
    table = store.read_table(data)
    for ecg_id, wave in zip(table.column("ecg_id").to_pylist(), store.ecg_array(table), strict=True):
        body = client.post("/v1/predict", json={"ecg": wave.tolist(), "leads": list(LEADS), "ecg_id": ecg_id}).json()
        assert body["lv_mass_g"] == pytest.approx(preds.loc[ecg_id, "lv_mass_pred_g"], rel=1e-5, abs=1e-4)
        assert body["model_version"] == preds.loc[ecg_id, "model_version"]
        assert body["lv_mass_hi_g"] == pytest.approx(preds.loc[ecg_id, "lv_mass_pred_hi_g"], rel=1e-5)
        assert body["rules"]["measurements"]["sokolow_lyon_uv"] == pytest.approx(preds.loc[ecg_id, "sokolow_lyon_uv"])


@pytest.mark.parametrize(
    ("mutate", "status", "words"),
    [
        (lambda b: b.update(ecg=b["ecg"][:5]), 422, "leads"),
        (
            lambda b: b.update(leads=["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V7"]),
            422,
            "unknown lead name 'V7'",
        ),
        (
            lambda b: b.update(leads=["I", "I", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]),
            422,
            "duplicate lead(s) I",
        ),
        (lambda b: b["ecg"][3].__setitem__(7, float("nan")), 422, "NaN"),
        (lambda b: b.update(sample_rate=20000), 422, "out of range"),
        (lambda b: b["ecg"][2].pop(), 422, "wrong shape"),
        (lambda b: b.update(ecg=[row[:1000] for row in b["ecg"]]), 422, "too short"),
        (lambda b: b.update(sample_rate=-5), 422, "greater than 0"),
        (lambda b: b.update(sex="X"), 422, "sex"),
    ],
)
def test_bad_requests_get_named_4xx(service, mutate, status, words):
    client, _, _ = service
    body = _record_json(RECORDS[0])
    body["leads"] = list(LEADS)
    mutate(body)
    response = client.post("/v1/predict", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert words.lower() in response.text.lower()


def test_unreadable_upload_and_oversized_body(service):
    client, _, _ = service
    response = client.post("/v1/predict/file", files=[("files", ("ecg.xml", b"<not-an-ecg>"))])
    assert response.status_code == 422 and "unreadable file" in response.text
    response = client.post(
        "/v1/predict", content=b"x" * (9 * 1024 * 1024), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and "too large" in response.text


_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=5)
)
_row = st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=60)
_bodies = st.one_of(
    st.dictionaries(
        st.sampled_from(
            ["ecg", "units", "sample_rate", "leads", "sex", "age", "height_cm", "weight_kg", "ecg_id", "junk"]
        ),
        st.one_of(_json_leaf, st.lists(_json_leaf, max_size=4), st.lists(_row, max_size=14)),
        max_size=6,
    ),
    st.fixed_dictionaries(
        {
            "ecg": st.lists(_row, min_size=0, max_size=14),
            "sample_rate": st.one_of(st.floats(allow_nan=True), st.integers(-5, 20000)),
            "leads": st.one_of(st.none(), st.lists(st.sampled_from([*LEADS, "V7", "avr", "", "II "]), max_size=14)),
            "units": st.sampled_from(["uV", "mV", "V", ""]),
        }
    ),
    st.lists(_json_leaf, max_size=3),
    _json_leaf,
)


@settings(max_examples=220, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies)
def test_malformed_requests_never_5xx(service, body):
    client, _, _ = service
    response = client.post("/v1/predict", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code < 500, (body, response.text)


def test_still_serving_after_fuzzing(service, openapi):
    client, _, _ = service
    response = client.post("/v1/predict", json=_record_json(RECORDS[0]))
    assert response.status_code == 200
    _validate(openapi, response.json())


# --------------------------------------------------------------------------------------------
# binary bodies (application/x-npy): the same answers as JSON, 4xx for anything else


def test_openapi_documents_the_json_and_the_npy_body(openapi):
    for path in ("/v1/predict", "/v1/explain"):
        operation = openapi["paths"][path]["post"]
        assert set(operation["requestBody"]["content"]) == {"application/json", "application/x-npy"}
        assert {p["name"] for p in operation["parameters"]} >= {"sample_rate", "sex", "height_cm", "bsa_m2"}
    assert "ecg" in openapi["components"]["schemas"]["PredictRequest"]["properties"]
    response = openapi["components"]["schemas"]["PredictResponse"]["properties"]
    assert {"lv_mass_sd_g", "lvh_probability_sd"} <= set(response)


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_npy_body_answers_as_the_json_body(service, openapi, dtype):
    client, _, _ = service
    for path in RECORDS:
        covariates = {"sex": "M", "height_cm": 175, "weight_kg": 80, "ecg_id": path.name}
        body = _record_json(path, **covariates)
        body["ecg"] = np.round(body["ecg"]).tolist()  # the same microvolts as the int16 array
        from_json = client.post("/v1/predict", json=body)
        assert from_json.status_code == 200, from_json.text
        from_npy = client.post("/v1/predict", content=_npy_body(path, dtype), headers=NPY, params=covariates)
        assert from_npy.status_code == 200, from_npy.text
        _validate(openapi, from_npy.json())
        a, b = from_json.json(), from_npy.json()
        assert b["ecg_id"] == path.name and b["warnings"] == a["warnings"] == []
        for key in ("lv_mass_g", "lvmi", "lv_mass_lo_g", "lv_mass_hi_g", "lvh_probability_calibrated"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert b["lvh"] == a["lvh"] and b["rules"]["flags"] == a["rules"]["flags"]
        for name, value in a["rules"]["measurements"].items():
            assert b["rules"]["measurements"][name] == pytest.approx(value, rel=1e-6, abs=1e-6), name


def test_npy_body_at_another_rate_and_on_explain(service):
    client, _, _ = service
    record = wfdb.rdrecord(str(RECORDS[0]))
    from_json = client.post("/v1/predict", json=_record_json(RECORDS[0])).json()
    at_250 = np.load(io.BytesIO(_npy_body(RECORDS[0], np.float64)))[:, ::2]
    buffer = io.BytesIO()
    np.save(buffer, at_250)
    response = client.post("/v1/predict", content=buffer.getvalue(), headers=NPY, params={"sample_rate": 250})
    assert response.status_code == 200, response.text
    assert "resampled from 250 Hz to 500 Hz" in response.json()["warnings"]
    assert response.json()["lv_mass_g"] == pytest.approx(from_json["lv_mass_g"], rel=0.05)
    explained = client.post("/v1/explain", content=_npy_body(RECORDS[0]), headers=NPY, params={"sex": "F"})
    assert explained.status_code == 200, explained.text
    assert explained.json()["explanation"]["leads"] == list(LEADS) and record.fs == 500


_GOOD = np.zeros((12, 5000), np.float32)


def _saved(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "params", "status", "words"),
    [
        (b"not an array", {}, 422, "not an .npy array"),
        (_saved(np.array([object()] * 12, dtype=object), allow_pickle=True), {}, 422, "Python objects"),
        (_saved(np.zeros((12, 5000), np.complex64)), {}, 422, "dtype <c8"),
        (_saved(np.zeros((3, 12, 5000), np.float32)), {}, 422, "shape (3, 12, 5000)"),
        (_saved(np.zeros((7, 5000), np.float32)), {}, 422, "the array has 7 leads"),
        (_saved(_GOOD)[:-100], {}, 422, "truncated"),
        (_saved(np.where(np.arange(12)[:, None] == 6, np.nan, _GOOD)), {}, 422, "NaN/inf) in lead(s) V1"),
        (_saved(_GOOD), {}, 422, "unusable ECG"),  # flat lines
        (_saved(_GOOD[:, :1000]), {}, 422, "too short"),
        (_saved(_GOOD), {"sample_rate": "0"}, 422, "greater than 0"),
        (_saved(_GOOD), {"sample_rate": "20000"}, 422, "out of range"),
        (_saved(_GOOD), {"sex": "X"}, 422, "'M' or 'F'"),
        (_saved(_GOOD), {"colour": "red"}, 422, "Extra inputs"),
        (b"\x93NUMPY" + b"x" * (9 * 1024 * 1024), {}, 413, "too large"),
    ],
)
def test_bad_npy_bodies_get_named_4xx(service, content, params, status, words):
    client, _, _ = service
    response = client.post("/v1/predict", content=content, headers=NPY, params=params)
    assert response.status_code == status, response.text
    assert words in response.text
    _assert_still_serving(client)


_npy_bytes = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: b"\x93NUMPY\x01\x00" + b),
    st.tuples(st.integers(1, 14), st.integers(0, 6000), st.sampled_from(["<f4", "<i2", ">f8", "|u1", "<f2"])).map(
        lambda t: _saved(np.ones((t[0], t[1]), dtype=t[2]))
    ),
    st.tuples(st.integers(0, 239_000), st.binary(max_size=8)).map(lambda t: _saved(_GOOD)[: t[0]] + t[1]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(content=_npy_bytes, rate=st.sampled_from([None, "500", "nan", "-1", "1e400", "abc"]))
def test_malformed_npy_bodies_never_5xx(service, content, rate):
    client, _, _ = service
    params = {} if rate is None else {"sample_rate": rate}
    response = client.post("/v1/predict", content=content, headers=NPY, params=params)
    assert response.status_code < 500, response.text


# --------------------------------------------------------------------------------------------
# an ensemble: its spreads are fields of their own, the rule flags are the rules' alone


def test_an_ensemble_answers_with_its_spreads_over_http(service, openapi, tmp_path):
    from ray import serve

    from lvm_ray.rules import RULE_FLAG_COLUMNS
    from lvm_ray.serve import build_app
    from tests.test_api import lvh_ensemble

    client, _, _ = service
    url = lvh_ensemble(str(tmp_path / "ensemble.pt"))
    serve.run(build_app({"checkpoint": url, "max_batch_size": 4}), name="lvm-ray-ensemble", route_prefix="/ensemble")
    try:
        body = _record_json(RECORDS[0], sex="F", height_cm=165, weight_kg=60)
        response = client.post("/ensemble/v1/predict", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        _validate(openapi, answer)
        assert answer["lv_mass_sd_g"] > 0 and 0 < answer["lvh_probability_sd"] < 0.5
        assert 0 < answer["lvh_probability"] < 1
        assert list(answer["rules"]["flags"]) == list(RULE_FLAG_COLUMNS)
        assert all(isinstance(v, bool) or v is None for v in answer["rules"]["flags"].values())
        single = client.post("/v1/predict", json=body).json()  # the module's one-model app
        assert single["lv_mass_sd_g"] is None and single["lvh_probability_sd"] is None
    finally:
        serve.delete("lvm-ray-ensemble")


def test_serve_settings_reach_the_deployment():
    from lvm_ray.serve import build_app

    def no_model():
        raise AssertionError("binding must not load the model")

    app = build_app(
        {"checkpoint": "unused", "num_replicas": "2", "num_cpus": "0.5", "max_batch_size": 48, "torch_threads": 1},
        loader=no_model,
    )
    deployment = app._bound_deployment
    assert deployment.num_replicas == 2 and deployment.ray_actor_options["num_cpus"] == 0.5
    assert deployment.max_ongoing_requests == 64  # never below a batch
    assert deployment.init_args[1:] == (48, 0.0, "unused", 1)
    with pytest.raises(ValueError, match="unknown serve args: batch_size"):
        build_app({"checkpoint": "unused", "batch_size": 8}, loader=no_model)
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        build_app({"checkpoint": "unused", "max_batch_size": 0}, loader=no_model)


# --------------------------------------------------------------------------------------------
# /v1/explain: the prediction with attributions; the same numbers as the library


def test_explain_json_and_upload_agree_with_predict_and_the_library(service, openapi):
    from lvm_ray.api import PredictRequest, canonical_request, raw_from_request
    from lvm_ray.explain import explain
    from lvm_ray.predict import Predictor

    client, checkpoint, _ = service
    assert {"/v1/explain", "/v1/explain/file"} <= set(openapi["paths"])
    body = _record_json(RECORDS[0], sex="M", height_cm=175, weight_kg=80)
    predicted = client.post("/v1/predict", json=body).json()
    response = client.post("/v1/explain", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    _validate(openapi, out, "ExplainResponse")
    assert out["lv_mass_g"] == pytest.approx(predicted["lv_mass_g"], rel=1e-5)
    assert out["lvmi"] == pytest.approx(predicted["lvmi"], rel=1e-5)
    e = out["explanation"]
    assert e["method"] == "integrated_gradients" and e["units"] == "g" and e["leads"] == list(LEADS)
    assert list(e["lead_share"]) == list(LEADS) and sum(e["lead_share"].values()) == pytest.approx(1.0)
    assert len(e["attribution"]) == 12 and {len(row) for row in e["attribution"]} == {500}
    assert e["samples_per_point"] == 10 and e["point_ms"] == 20.0
    # Completeness: the points still sum to the prediction's distance from the flat baseline.
    total = sum(sum(row) for row in e["attribution"])
    assert total == pytest.approx(e["explained_output"] - e["baseline_output"], abs=1e-3)
    assert e["explained_output"] == pytest.approx(out["lv_mass_g"], rel=1e-4)
    # The endpoint's shares are the library's on the same canonical ECG.
    wave, metadata, _ = canonical_request(raw_from_request(PredictRequest(**body)))
    offline = explain(Predictor.from_checkpoint(checkpoint, use_gpu=False), wave[None], metadata)
    np.testing.assert_allclose(list(e["lead_share"].values()), offline.lead_share[0], rtol=1e-4, atol=1e-6)
    files = [
        ("files", (p.name, p.read_bytes())) for p in (RECORDS[0].with_suffix(".hea"), RECORDS[0].with_suffix(".dat"))
    ]
    uploaded = client.post("/v1/explain/file", files=files, data={"sex": "M", "height_cm": "175", "weight_kg": "80"})
    assert uploaded.status_code == 200, uploaded.text
    _validate(openapi, uploaded.json(), "ExplainResponse")
    np.testing.assert_allclose(
        list(uploaded.json()["explanation"]["lead_share"].values()), list(e["lead_share"].values()), rtol=1e-3
    )


def test_explain_requests_are_batched_together(service):
    """Concurrent explanations share the replica's batches and each gets its own ECG's answer."""
    import concurrent.futures

    client, _, _ = service
    bodies = [_record_json(path) for path in RECORDS[:3]] * 2
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: client.post("/v1/explain", json=b), bodies))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    by_id = {}
    for body, answer in zip(bodies, answers, strict=True):
        shares = list(answer.json()["explanation"]["lead_share"].values())
        by_id.setdefault(body["ecg_id"], []).append(shares)
    for shares in by_id.values():  # the same ECG alone or in a batch: the same attribution
        np.testing.assert_allclose(shares[0], shares[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("path", "content", "content_type", "status"),
    [
        ("/v1/explain", b'{"hello": "world"}', "application/json", 422),
        ("/v1/explain", b"[1, 2, 3]", "application/json", 422),
        ("/v1/explain", b"this is not json", "application/json", 422),
        ("/v1/explain", json.dumps({"ecg": [[0.0] * 200] * 12}).encode(), "application/json", 422),
        ("/v1/explain", b"\x00\xff\x10garbage", "application/octet-stream", 415),
        ("/v1/explain", b"x" * (9 * 1024 * 1024), "application/json", 413),
        ("/v1/explain/file", b"<not-an-ecg/>", None, 422),
    ],
)
def test_explain_bodies_that_are_not_an_ecg_get_4xx(service, path, content, content_type, status):
    client, _, _ = service
    if content_type is None:  # an upload whose file is not an ECG export
        response = client.post(path, files=[("files", ("ecg.xml", content))])
    else:
        response = client.post(path, content=content, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert response.json()["detail"]
    assert client.post("/v1/explain", json=_record_json(RECORDS[1])).status_code == 200  # still answering


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_bodies)
def test_malformed_explain_requests_never_5xx(service, body):
    client, _, _ = service
    response = client.post("/v1/explain", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code < 500, (body, response.text)


def test_model_info_serves_the_model_card(service, openapi):
    client, _, _ = service
    info = client.get("/v1/model").json()
    _validate(openapi, info, "ModelInfo")
    card = info["model_card"]
    assert card["model_version"] == info["model_version"]
    assert card["model"]["preset"] == "lvm-cpu" and card["model"]["input"]["sample_rate_hz"] == 100
    assert card["provenance"]["kind"] == "unknown"  # a bare checkpoint file: said plainly
    assert card["markdown"].startswith("# Model card: lvm-cpu")


# --------------------------------------------------------------------------------------------
# bad uploads, chunked bodies, content types: 4xx, the service stays up, nothing logged

MARKER = "zqx7lvmclientname"  # in every hostile file name below; must never reach a log


def _multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"lvmrayboundary") -> tuple[bytes, dict]:
    """A multipart body built byte by byte (clients' libraries would clean odd names up)."""
    body = b""
    for filename, content in parts:
        body += b"--" + boundary + b"\r\n"
        body += b'Content-Disposition: form-data; name="files"; filename="' + filename + b'"\r\n'
        body += b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    return body, {"content-type": f"multipart/form-data; boundary={boundary.decode()}"}


def _assert_still_serving(client: httpx.Client) -> None:
    response = client.post("/v1/predict", json=_record_json(RECORDS[0]))
    assert response.status_code == 200, response.text


def _ray_log_text() -> str:
    import ray._private.worker

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return "\n".join(
        p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file() and p.suffix in {".log", ".out", ".err"}
    )


@pytest.mark.parametrize(
    ("filename", "words"),
    [
        (b"..", "is a folder"),
        (b".", "is a folder"),
        (b"../../etc/" + MARKER.encode() + b"/", "is a folder"),
        (MARKER.encode() + b"x" * 300 + b".xml", "bytes long (at most 255)"),
        (MARKER.encode() + b"\x00.xml", "control character"),
        (MARKER.encode() + b"\x01.xml", "control character"),
        (b"C:\\exports\\" + MARKER.encode() + b".txt", "unsupported file type"),
        (MARKER.encode() + b".xml", "unreadable file"),
    ],
)
def test_hostile_upload_names_get_a_clear_4xx(service, filename, words):
    client, _, _ = service
    body, headers = _multipart([(filename, b"<not-an-ecg/>")])
    response = client.post("/v1/predict/file", content=body, headers=headers)
    assert 400 <= response.status_code < 500, response.text
    assert words in response.json()["detail"]
    _assert_still_serving(client)


def test_two_uploads_with_one_name_and_too_many_files(service):
    client, _, _ = service
    body, headers = _multipart([(b"a.hea", b"x"), (b"a.hea", b"y")])
    response = client.post("/v1/predict/file", content=body, headers=headers)
    assert response.status_code == 422 and "same name" in response.text
    body, headers = _multipart([(f"{i}.xml".encode(), b"x") for i in range(20)])
    response = client.post("/v1/predict/file", content=body, headers=headers)
    assert response.status_code == 422 and "at most 8 files" in response.text


def test_no_client_file_name_is_ever_logged(service):
    """Runs after the hostile uploads above (and sends its own): Ray's logs never quote the names."""
    client, _, _ = service
    for filename in (b"..", MARKER.encode() + b"y" * 300 + b".hea", MARKER.encode() + b"\x00.dat"):
        body, headers = _multipart([(filename, b"garbage")])
        assert client.post("/v1/predict/file", content=body, headers=headers).status_code < 500
    _assert_still_serving(client)
    time.sleep(2)  # log lines reach their files asynchronously
    text = _ray_log_text()
    # The replica's access log lines are there, so the check below reads the right files.
    assert "/v1/predict/file" in text, "Ray's request logs were not found: the check below would prove nothing"
    assert MARKER not in text


def _chunks(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


def _post_chunked(port: int, path: str, content_type: str, chunks: Iterator[bytes]) -> tuple[int, bytes]:
    """POST with Transfer-Encoding: chunked (no Content-Length) on a raw socket; (status, body).

    A raw socket because the server answers 413 before the client has sent everything, which
    HTTP libraries report as a broken pipe instead of reading the answer.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        sock.sendall((head + "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode())
        try:
            for chunk in chunks:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server has answered and closed: read what it said
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_chunked_bodies_are_counted_against_the_limit(service):
    client, _, _ = service
    port = client.base_url.port
    status, body = _post_chunked(port, "/v1/predict", "application/json", _chunks(MAX_BODY_BYTES + 1024 * 1024))
    assert status == 413 and b"too large" in body, body
    upload_head = b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.xml"\r\n\r\n'
    chunks = iter([upload_head, *_chunks(MAX_BODY_BYTES + 1024 * 1024)])
    status, body = _post_chunked(port, "/v1/predict/file", "multipart/form-data; boundary=b", chunks)
    assert status == 413 and b"too large" in body, body
    # A chunked body within the limit is read as usual.
    payload = json.dumps(_record_json(RECORDS[0])).encode()
    status, body = _post_chunked(port, "/v1/predict", "application/json", iter([payload[:1000], payload[1000:]]))
    assert status == 200, body
    assert json.loads(body)["ecg_id"] == RECORDS[0].name
    _assert_still_serving(client)


@pytest.mark.parametrize(
    ("path", "content_type", "expected"),
    [
        ("/v1/predict", "text/plain", "application/json"),
        ("/v1/predict", "application/x-www-form-urlencoded", "application/json"),
        ("/v1/predict", None, "application/json"),
        ("/v1/predict/file", "application/json", "multipart/form-data"),
        ("/v1/predict/file", "application/xml", "multipart/form-data"),
    ],
)
def test_wrong_content_type_gets_415_naming_the_expected_one(service, path, content_type, expected):
    client, _, _ = service
    headers = {"content-type": content_type} if content_type else {}
    response = client.post(path, content=json.dumps(_record_json(RECORDS[0])), headers=headers)
    assert response.status_code == 415, response.text
    assert expected in response.json()["detail"]
    _assert_still_serving(client)


def test_json_with_a_charset_is_accepted(service):
    client, _, _ = service
    body = json.dumps(_record_json(RECORDS[0]))
    response = client.post("/v1/predict", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 200, response.text


def test_gpu_serving_reserves_a_gpu_for_each_replica():
    """With use_gpu a replica asks Ray for a GPU, so it lands on a GPU node (or the autoscaler adds
    one) instead of failing on a CPU node; without it, it holds none."""
    from lvm_ray.serve import build_app

    def no_model():
        raise AssertionError("binding must not load the model")

    gpu = build_app({"checkpoint": "unused", "use_gpu": "true"}, loader=no_model)
    cpu = build_app({"checkpoint": "unused"}, loader=no_model)
    assert gpu._bound_deployment.ray_actor_options.get("num_gpus") == 1
    assert not cpu._bound_deployment.ray_actor_options.get("num_gpus")


# --------------------------------------------------------------------------------------------
# `lvm-ray serve`: one line with the URL, printed once the app answers


#: Runs `lvm-ray serve` with Python's SIGINT handler, as a terminal's foreground job has it: a
#: background shell (CI) starts its children with SIGINT ignored, and a child keeps that.
_SERVE_AS_FOREGROUND_JOB = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('lvm_ray.cli', run_name='__main__')"
)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_cli_prints_its_url_only_when_ready_and_stops_on_ctrl_c_or_sigterm(tmp_path, stop):
    """A separate `lvm-ray serve` process (its own embedded Ray): the URL line comes when /readyz
    already answers, the console holds none of Ray's chatter, and Ctrl-C (SIGINT) or `kill`
    (SIGTERM, as systemd and docker stop send it) stops it cleanly with one line, exit 0."""
    checkpoint = tiny_checkpoint(str(tmp_path / "model.pt"))
    port = _free_port()
    env = {**os.environ, "RAY_ADDRESS": "", "LVM_RAY_ADDRESS": ""}  # never join the test session's cluster
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE_AS_FOREGROUND_JOB, "serve", "--checkpoint", checkpoint, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if f"http://127.0.0.1:{port}" in line:
                # Printed only once the app answers: /readyz works at once, no retry.
                response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
                assert response.status_code == 200 and response.json()["status"] == "ready"
                break
        else:
            pytest.fail(f"no URL line within 240 s: {lines}")
        assert any(f"http://127.0.0.1:{port}" in line for line in lines), lines
        proc.send_signal(stop)
        rest, _ = proc.communicate(timeout=120)
        lines += rest.splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, lines
    assert lines[-1] == "stopping", lines
    chatter = [line for line in lines if "pid=" in line or "(raylet)" in line or "INFO" in line or "Traceback" in line]
    chatter += [line for line in lines if "SIGTERM received" in line]  # Ray's own handler's stack dump
    assert not chatter, lines
    assert len(lines) <= 4, lines


def test_a_serve_start_outlives_proxies_that_serve_replaces(monkeypatch):
    """Serve's controller kills an HTTP proxy that misses its ready check (5 s, on a loaded machine)
    and starts another, while serve.start fails on the first one's death: lvm-ray serve tries again
    (then the controller exists and serve.start returns its client), and gives one line after
    SERVE_START_ATTEMPTS deaths."""
    import ray

    from lvm_ray import serve as serve_stage

    calls = []

    def dies(times: int):
        def start(http_options):
            calls.append(http_options)
            if len(calls) <= times:
                raise ray.exceptions.ActorDiedError()

        return start

    monkeypatch.setattr(serve_stage.serve, "start", dies(1))
    serve_stage._start_serve("127.0.0.1", 8123)
    assert calls == [{"host": "127.0.0.1", "port": 8123}] * 2
    calls.clear()
    monkeypatch.setattr(serve_stage.serve, "start", dies(serve_stage.SERVE_START_ATTEMPTS))
    with pytest.raises(serve_stage.ServeStartError, match="Ray Serve's HTTP proxy did not start: The actor died"):
        serve_stage._start_serve("127.0.0.1", 8123)
    assert len(calls) == serve_stage.SERVE_START_ATTEMPTS


@pytest.mark.slow
def test_the_serve_benchmark_reports_both_servers_and_bodies(tmp_path):
    """`jobs/benchmark.py serve` end to end (its own Ray, Serve behind HAProxy, the uvicorn
    baseline): today's keys for the .npy body at the top and the JSON body under "json"."""
    checkpoint = tiny_checkpoint(str(tmp_path / "model.pt"))
    out = tmp_path / "serve.json"
    command = [sys.executable, "jobs/benchmark.py", "serve", "--checkpoint", checkpoint, "--out", str(out)]
    command += ["--requests", "6", "--rounds", "2", "--concurrency", "1", "3", "--workers", "2", "--num-cpus", "0.5"]
    env = {**os.environ, "RAY_ADDRESS": "", "LVM_RAY_ADDRESS": ""}  # never join the test session's cluster
    proc = subprocess.run(
        command, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for part, body in ((report, "npy"), (report["json"], "json")):
        assert part["body"] == body and part["same_answer"] is True
        for side in ("ray_serve", "plain_fastapi"):
            assert set(part[side]) == {"1", "3"}
            assert {"p50_ms", "p99_ms", "rps"} <= set(part[side]["3"]) and part[side]["3"]["rps"] > 0
        assert set(part["ratio_rps_serve_to_fastapi"]) == {"1", "3"}
        assert len(part["rounds"]["ratio_rps_serve_to_fastapi"]["3"]) == 2
    assert report["serve_settings"]["proxy"] == "haproxy" and report["serve_settings"]["num_cpus"] == 0.5
    assert report["plain_fastapi_workers"] == 2


def test_haproxy_on_an_embedded_ray_drains_for_1_s_unless_you_set_it() -> None:
    """Ray's 30 s deregistration window made Ctrl-C on `lvm-ray serve --proxy haproxy` take 34 s."""
    from lvm_ray.serve import EMBEDDED_HAPROXY_DRAIN_S, HAPROXY_DRAIN_VARIABLE

    # In a child process: this one runs the session's Ray, where use_proxy rightly does nothing.
    script = f"""
import json, os
from lvm_ray.serve import use_proxy
def case(**env):
    for name in ("RAY_SERVE_ENABLE_HA_PROXY", {HAPROXY_DRAIN_VARIABLE!r}, "RAY_ADDRESS", "LVM_RAY_ADDRESS"):
        os.environ.pop(name, None)
    os.environ.update(env)
    get = os.environ.get
    return [use_proxy("haproxy"), get("RAY_SERVE_ENABLE_HA_PROXY"), get({HAPROXY_DRAIN_VARIABLE!r})]
print(json.dumps([case(), case({HAPROXY_DRAIN_VARIABLE}="12"), case(RAY_ADDRESS="127.0.0.1:1")]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    embedded, yours, joining = json.loads(proc.stdout)
    assert embedded == [True, "1", EMBEDDED_HAPROXY_DRAIN_S]
    assert yours == [True, "1", "12"]  # a value you set wins
    # Joining a cluster: its front end and drain are set where the cluster is started.
    assert joining == [False, None, None]


def test_cli_refuses_an_unknown_proxy_in_one_line(tmp_path) -> None:
    from typer.testing import CliRunner

    from lvm_ray.cli import app

    checkpoint = tiny_checkpoint(str(tmp_path / "model.pt"))
    result = CliRunner().invoke(app, ["serve", "--checkpoint", checkpoint, "--proxy", "nginx"])
    assert result.exit_code != 0
    assert result.output.strip() == "error: unknown proxy 'nginx': choose serve, haproxy"
