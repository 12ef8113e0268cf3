"""lvm_ray.api without Ray: it imports none, its upload and body guards hold on their own, and the
plain-FastAPI baseline built from it answers like the Serve app (tests/test_serve.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import wfdb
from fastapi import Request

from lvm_ray.api import (
    MAX_FILE_NAME_BYTES,
    BadRequestError,
    PredictRequest,
    PredictResponse,
    canonical_request,
    create_app,
    raw_from_request,
    read_upload,
    response_from_row,
    upload_file_name,
)
from lvm_ray.formats import read_ecg
from lvm_ray.predict import Predictor
from tests.helpers import tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORD = REPO_ROOT / "tests" / "fixtures" / "ptbxl" / "records500" / "00000" / "00001_hr"


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


def test_api_imports_no_ray() -> None:
    proc = _run_python("import lvm_ray.api, sys; assert 'ray' not in sys.modules, 'lvm_ray.api imported ray'")
    assert proc.returncode == 0, proc.stderr


def test_plain_fastapi_baseline_serves_without_ray(tmp_path) -> None:
    """jobs/bench_serve.py's baseline app, on real HTTP, with no Ray in the process."""
    checkpoint = tiny_checkpoint(str(tmp_path / "model.pt"))
    code = f"""
        import importlib.util, json, socket, sys
        import httpx, numpy as np, wfdb
        spec = importlib.util.spec_from_file_location("benchmark", "jobs/bench_serve.py")
        benchmark = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(benchmark)
        from lvm_ray.predict import Predictor
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = benchmark._plain_fastapi(Predictor.from_checkpoint({checkpoint!r}), port)
        record = wfdb.rdrecord({str(RECORD)!r})
        body = {{"ecg": (record.p_signal.T * 1000).tolist(), "leads": record.sig_name, "sample_rate": record.fs}}
        url = f"http://127.0.0.1:{{port}}/v1/predict"
        ok = httpx.post(url, json=body, timeout=60)
        wrong_type = httpx.post(url, content=json.dumps(body), headers={{"content-type": "text/plain"}})
        too_big = httpx.post(url, content=b"x" * (9 << 20), headers={{"content-type": "application/json"}})
        server.should_exit = True
        print(json.dumps({{"ok": [ok.status_code, ok.json()], "wrong_type": wrong_type.status_code,
                          "too_big": too_big.status_code, "ray": "ray" in sys.modules}}))
    """
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    status, body = result["ok"]
    assert status == 200, body
    PredictResponse.model_validate(body)
    assert np.isfinite(body["lv_mass_g"])
    assert (result["wrong_type"], result["too_big"]) == (415, 413)
    assert result["ray"] is False


# ----------------------------------------------------------------------------- file names


@pytest.mark.parametrize(
    ("name", "plain"),
    [
        ("00001_hr.hea", "00001_hr.hea"),
        ("exports/site A/ecg (1).xml", "ecg (1).xml"),
        ("C:\\exports\\ecg.xml", "ecg.xml"),
        ("électrocardiogramme €.xml", "électrocardiogramme €.xml"),
    ],
)
def test_plain_names_are_kept(name: str, plain: str) -> None:
    assert upload_file_name(name, 1) == plain


@pytest.mark.parametrize(
    ("name", "words"),
    [
        (None, "has no file name"),
        ("", "has no file name"),
        ("..", "is a folder"),
        (".", "is a folder"),
        ("../..", "is a folder"),
        ("exports/", "is a folder"),
        ("a\x00b.xml", "control character"),
        ("a\nb.xml", "control character"),
        ("x" * 300, "300 bytes long"),
        ("é" * 128, "256 bytes long"),  # 128 characters, but 256 bytes in UTF-8
        ("bad\udcff.xml", "not valid UTF-8"),
    ],
)
def test_unusable_names_are_refused_without_quoting_them(name: str | None, words: str) -> None:
    with pytest.raises(BadRequestError, match="upload 3") as info:
        upload_file_name(name, 3)
    assert words in str(info.value)
    if name and len(name) > 2:
        assert name not in str(info.value)


def test_the_longest_name_is_accepted() -> None:
    name = "a" * (MAX_FILE_NAME_BYTES - 4) + ".xml"
    assert upload_file_name(name, 1) == name


# ----------------------------------------------------------------------------- uploads


def _wfdb_pair() -> list[tuple[str, bytes]]:
    return [(RECORD.name + suffix, RECORD.with_suffix(suffix).read_bytes()) for suffix in (".dat", ".hea")]


def test_a_wfdb_upload_reads_as_the_file_does() -> None:
    uploaded = read_upload(_wfdb_pair())  # the header found though it comes second
    direct = read_ecg(str(RECORD) + ".hea")
    assert uploaded.source_uri == "upload"
    assert uploaded.sample_rate_hz == direct.sample_rate_hz == 500
    assert set(uploaded.signals_uv) == set(direct.signals_uv)
    for lead, samples in direct.signals_uv.items():
        np.testing.assert_array_equal(uploaded.signals_uv[lead], samples)


@pytest.mark.parametrize(
    ("files", "words"),
    [
        ([], "at least one file"),
        ([(f"{i}.xml", b"") for i in range(9)], "at most 8 files"),
        ([("a.hea", b"x"), ("a.hea", b"y")], "same name"),
        ([("ecg.xml", b"<nothing/>")], "unreadable file (upload 1): unrecognised XML root element <nothing>"),
        ([("ecg.pdf", b"%PDF")], "unsupported file type '.pdf'"),
        ([(RECORD.name + ".hea", RECORD.with_suffix(".hea").read_bytes())], "unreadable file (upload 1)"),
    ],
)
def test_bad_uploads_say_what_is_wrong(files, words) -> None:
    with pytest.raises(BadRequestError) as info:
        read_upload(files)
    assert words in str(info.value)
    assert "lvm-ray-upload-" not in str(info.value)  # no scratch path in a message


# ----------------------------------------------------------------------------- conversion


def test_request_to_response_on_a_real_ecg(tmp_path) -> None:
    record = wfdb.rdrecord(str(RECORD))
    request = PredictRequest(
        ecg=(record.p_signal.T * 1000).tolist(),
        leads=record.sig_name,
        sample_rate=record.fs,
        ecg_id="00001_hr",
        sex="F",
        height_cm=160,
        weight_kg=60,
    )
    wave, metadata, warnings = canonical_request(raw_from_request(request))
    assert wave.shape == (12, 5000) and warnings == []
    predictor = Predictor.from_checkpoint(tiny_checkpoint(str(tmp_path / "model.pt")), use_gpu=False)
    row = predictor.predict(wave[None], {k: np.array([v], dtype=object) for k, v in metadata.items()})
    body = PredictResponse.model_validate(response_from_row(row.to_dict("records")[0], warnings))
    bsa = np.sqrt(160 * 60 / 3600)
    assert body.ecg_id == "00001_hr" and body.lvmi == pytest.approx(body.lv_mass_g / bsa)
    assert body.rules.measurements["sokolow_lyon_uv"] is not None
    # An uncalibrated checkpoint: no interval and no calibrated probability (null, not an error).
    assert body.lv_mass_lo_g is None and body.lv_mass_hi_g is None and body.lvh_probability_calibrated is None


def test_a_calibrated_model_answers_with_an_interval_and_its_provenance(tmp_path) -> None:
    from lvm_ray.api import ModelInfo, model_info
    from tests.test_calibrate import calibrated_checkpoint

    record = wfdb.rdrecord(str(RECORD))
    request = PredictRequest(
        ecg=(record.p_signal.T * 1000).tolist(),
        leads=record.sig_name,
        sample_rate=record.fs,
        sex="M",
        height_cm=180,
        weight_kg=85,
    )
    wave, metadata, warnings = canonical_request(raw_from_request(request))
    predictor = Predictor.from_checkpoint(calibrated_checkpoint(str(tmp_path / "model.pt")), use_gpu=False)
    row = predictor.predict(wave[None], {k: np.array([v], dtype=object) for k, v in metadata.items()})
    body = PredictResponse.model_validate(response_from_row(row.to_dict("records")[0], warnings))
    assert body.lv_mass_lo_g < body.lv_mass_hi_g and body.interval_level == 0.9
    assert body.lv_mass_lo_g == pytest.approx(row.lv_mass_pred_lo_g[0])
    assert 0 < body.lvh_probability_calibrated < 1
    assert "lvh_prob_calibrated" not in body.rules.flags  # a probability, not a voltage rule's flag
    info = ModelInfo.model_validate(model_info(predictor))
    assert info.interval_level == 0.9
    assert info.calibration["provenance"]["data"] == "synth:41" and info.calibration["provenance"]["n_ecgs"] == 200
    assert set(info.calibration["n"]) == {"M", "F", "all"}
    narrower = Predictor.from_checkpoint(str(tmp_path / "model.pt"), use_gpu=False, interval_level=0.5)
    assert model_info(narrower)["interval_level"] == 0.5


def test_eight_leads_without_body_size_warn_and_flat_lines_are_refused() -> None:
    record = wfdb.rdrecord(str(RECORD))
    names = [n.upper() for n in record.sig_name]
    rows = [
        (record.p_signal.T * 1000)[names.index(lead)].tolist() for lead in ("I", "II", *[f"V{i}" for i in range(1, 7)])
    ]
    _, metadata, warnings = canonical_request(raw_from_request(PredictRequest(ecg=rows, sample_rate=500)))
    assert warnings == [
        "derived lead(s) III, aVR, aVL, aVF from I and II",
        "height_cm and weight_kg not given: no LVMI or LVH",
    ]
    assert metadata["height_cm"] is None
    raw = raw_from_request(PredictRequest(ecg=np.zeros((8, 5000)).tolist(), sample_rate=500))
    with pytest.raises(BadRequestError, match="unusable ECG"):
        canonical_request(raw)


# ----------------------------------------------------------------------------- body limit (ASGI)


def _call(app, chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, dict, int]:
    """Drive the ASGI app directly with a chunked body; (status, JSON body, chunks it read)."""
    pending = list(chunks)
    read = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal read
        if not pending:
            return {"type": "http.request", "body": b"", "more_body": False}
        read += 1
        return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending)}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/echo",
        "raw_path": b"/echo",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body), read


def _echo_app(limit: int):
    app = create_app(max_body_bytes=limit)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    return app


def test_body_limit_counts_chunked_bodies_and_stops_reading() -> None:
    app = _echo_app(limit=100)
    chunked = [(b"content-type", b"application/octet-stream"), (b"transfer-encoding", b"chunked")]
    assert _call(app, [b"x" * 50, b"x" * 50], chunked)[:2] == (200, {"bytes": 100})  # exactly the limit
    status, body, read = _call(app, [b"x" * 60, b"x" * 41, *[b"x" * 1000] * 50], chunked)
    assert status == 413 and "too large" in body["detail"]
    assert read == 2, "reading must stop at the chunk that crosses the limit"


def test_body_limit_refuses_a_declared_length_before_reading() -> None:
    app = _echo_app(limit=100)
    status, body, read = _call(app, [b"x" * 101], [(b"content-length", b"101")])
    assert (status, read) == (413, 0) and "101 bytes" in body["detail"]
    status, body, read = _call(app, [b"x"], [(b"content-length", b"1e3")])
    assert status == 400 and "Content-Length" in body["detail"]
