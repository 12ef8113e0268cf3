"""Ray Serve endpoint over real HTTP: schema-valid answers, 4xx for bad input, same numbers as scoring."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest
import wfdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvm_ray import store
from lvm_ray.ingest import ingest
from lvm_ray.schema import LEADS
from lvm_ray.score import read_predictions, score
from tests.helpers import tiny_checkpoint

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
    checkpoint = tiny_checkpoint(str(workdir / "model.pt"))
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


def test_health_model_and_openapi(service, openapi):
    client, _, _ = service
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    info = client.get("/v1/model").json()
    _validate(openapi, info, "ModelInfo")
    assert info["preset"] == "lvm-cpu" and info["input_sample_rate_hz"] == 100


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
