"""lvm_ray.api without Ray: it imports none, its upload and body guards hold on their own, and the
plain-FastAPI baseline built from it answers like the Serve app (tests/test_serve.py)."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import wfdb
from fastapi import Request
from fastapi.exceptions import RequestValidationError

from lvm_ray.api import (
    MAX_FILE_NAME_BYTES,
    BadRequestError,
    PredictRequest,
    PredictResponse,
    canonical_request,
    create_app,
    parse_json_body,
    parse_npy_body,
    predict_one,
    raw_from_request,
    read_upload,
    response_from_row,
    upload_file_name,
)
from lvm_ray.formats import read_ecg
from lvm_ray.predict import Predictor
from lvm_ray.schema import LEADS as LEADS_12
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
    """lvm_ray.api.baseline_app (the benchmark's baseline) on real HTTP, with no Ray in the process:
    JSON and .npy bodies of one ECG give one answer; guards and 4xx as the Serve app."""
    checkpoint = tiny_checkpoint(str(tmp_path / "model.pt"))
    code = f"""
        import io, json, socket, sys, threading, time
        import httpx, numpy as np, uvicorn, wfdb
        from lvm_ray.api import baseline_app
        from lvm_ray.schema import LEADS
        from lvm_ray.signals import normalise_lead_name
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(baseline_app({checkpoint!r}), port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        record = wfdb.rdrecord({str(RECORD)!r})
        uv = record.p_signal.T * 1000
        body = {{"ecg": uv.tolist(), "leads": record.sig_name, "sample_rate": record.fs, "sex": "F"}}
        names = [normalise_lead_name(n) for n in record.sig_name]
        buffer = io.BytesIO()
        np.save(buffer, uv[[names.index(lead) for lead in LEADS]].astype(np.float32))
        url = f"http://127.0.0.1:{{port}}/v1/predict"
        ok = httpx.post(url, json=body, timeout=60)
        npy = httpx.post(url + "?sex=F&sample_rate=500", content=buffer.getvalue(),
                         headers={{"content-type": "application/x-npy"}}, timeout=60)
        bad_npy = httpx.post(url, content=b"not an array", headers={{"content-type": "application/x-npy"}})
        wrong_type = httpx.post(url, content=json.dumps(body), headers={{"content-type": "text/plain"}})
        too_big = httpx.post(url, content=b"x" * (9 << 20), headers={{"content-type": "application/json"}})
        ready = httpx.get(f"http://127.0.0.1:{{port}}/readyz").json()
        server.should_exit = True
        print(json.dumps({{"ok": [ok.status_code, ok.json()], "npy": [npy.status_code, npy.json()],
                          "bad_npy": [bad_npy.status_code, bad_npy.json()], "wrong_type": wrong_type.status_code,
                          "too_big": too_big.status_code, "ready": ready, "ray": "ray" in sys.modules}}))
    """
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    status, body = result["ok"]
    assert status == 200, body
    PredictResponse.model_validate(body)
    assert np.isfinite(body["lv_mass_g"])
    status, npy = result["npy"]
    assert status == 200, npy
    assert npy["lv_mass_g"] == pytest.approx(body["lv_mass_g"], rel=1e-5)
    assert npy["rules"]["flags"] == body["rules"]["flags"]
    sokolow = body["rules"]["measurements"]["sokolow_lyon_uv"]
    assert npy["rules"]["measurements"]["sokolow_lyon_uv"] == pytest.approx(sokolow)
    assert npy["warnings"] == body["warnings"] == ["height_cm and weight_kg not given: no LVMI or LVH"]
    status, bad = result["bad_npy"]
    assert status == 422 and "not an .npy array" in bad["detail"]
    assert (result["wrong_type"], result["too_big"]) == (415, 413)
    assert result["ready"]["status"] == "ready"
    assert result["ray"] is False


def test_the_benchmark_baseline_runs_one_predictor_per_uvicorn_worker(tmp_path) -> None:
    """jobs/bench_serve.py starts the baseline as `uvicorn --workers N lvm_ray.api:baseline_app`
    in its own processes, returns once every worker answers, and stops them all."""
    import importlib.util

    import httpx
    import psutil

    spec = importlib.util.spec_from_file_location("bench_serve", REPO_ROOT / "jobs" / "bench_serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    checkpoint = tiny_checkpoint(str(tmp_path / "model.pt"))
    port = bench._free_port()
    proc = bench._start_baseline(checkpoint, port, workers=2, timeout_s=300)
    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
        pids = {httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()["pid"] for _ in range(20)}
        assert pids <= {w.pid for w in workers} and len(workers) >= 2
        bodies = bench._bodies(str(RECORD))
        answers = {}
        for kind, (content, content_type, query) in bodies.items():
            response = httpx.post(
                f"http://127.0.0.1:{port}/v1/predict?{query}",
                content=content,
                headers={"content-type": content_type},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            answers[kind] = response.json()["lv_mass_g"]
        assert answers["npy"] == pytest.approx(answers["json"], rel=1e-5)
        load = bench._load(f"http://127.0.0.1:{port}/v1/predict", *bodies["json"][:2], 2, 4)
        assert set(load) == {"p50_ms", "p99_ms", "rps"} and load["rps"] > 0
    finally:
        bench._stop(proc)
    assert proc.poll() is not None
    # The workers exit on the group's SIGTERM, maybe a moment after their supervisor.
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


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


# ----------------------------------------------------------------------------- request bodies: JSON and .npy


def _record_uv() -> tuple[np.ndarray, list[str]]:
    """The PTB-XL record in microvolts, rows in the canonical lead order, and its own lead names."""
    from lvm_ray.schema import LEADS
    from lvm_ray.signals import normalise_lead_name

    record = wfdb.rdrecord(str(RECORD))
    names = [normalise_lead_name(n) for n in record.sig_name]
    return (record.p_signal.T * 1000)[[names.index(lead) for lead in LEADS]], record.sig_name


def _npy(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


def test_json_body_parses_as_fastapi_did() -> None:
    """The one-pass JSON reader gives the request FastAPI's json.loads + model validation gave."""
    uv, _ = _record_uv()
    payload = {"ecg": uv.round(1).tolist(), "sample_rate": 500, "sex": "M", "height_cm": 170.5, "ecg_id": "a"}
    parsed = parse_json_body(json.dumps(payload).encode())
    assert parsed == PredictRequest.model_validate(json.loads(json.dumps(payload)))
    raw = raw_from_request(parsed)
    np.testing.assert_array_equal(raw.signals_uv["V5"], uv.round(1)[10])


@pytest.mark.parametrize(
    ("body", "loc", "words"),
    [
        (b"this is not json", ["body"], "Invalid JSON"),
        (b"[1, 2, 3]", ["body"], "object"),
        (b'{"ecg": [[1.0]], "sex": "X"}', ["body", "sex"], "'M' or 'F'"),
        (b'{"ecg": [[1.0]], "sample_rate": -5}', ["body", "sample_rate"], "greater than 0"),
        (b'{"ecg": [[1.0]], "junk": 1}', ["body", "junk"], "Extra inputs"),
        (b'{"sample_rate": 500}', ["body", "ecg"], "Field required"),
    ],
)
def test_json_body_errors_are_located_422s(body: bytes, loc: list, words: str) -> None:
    with pytest.raises(RequestValidationError) as info:
        parse_json_body(body)
    errors = info.value.errors()
    assert list(errors[0]["loc"]) == loc and words in errors[0]["msg"]
    assert "input" not in errors[0]  # nothing the client sent is echoed (or logged)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.int32, np.uint16])
def test_npy_body_reads_every_int_and_float_dtype(dtype) -> None:
    uv, _ = _record_uv()
    values = np.clip(uv.round(), 0, None) if np.dtype(dtype).kind == "u" else uv
    array = values.astype(dtype)
    ecg = parse_npy_body(_npy(array), [("sample_rate", "500"), ("sex", "F"), ("bsa_m2", "1.7")])
    assert ecg.bsa_m2 == 1.7 and ecg.raw.sex == "F" and ecg.raw.sample_rate_hz == 500
    assert ecg.raw.source_format == "npy" and list(ecg.raw.signals_uv) == list(LEADS_12)
    np.testing.assert_array_equal(ecg.raw.signals_uv["V1"], array[6].astype(np.float64))


def test_npy_body_in_fortran_order_or_with_named_leads_is_the_same_ecg() -> None:
    uv, _ = _record_uv()
    canonical = canonical_request(parse_npy_body(_npy(uv.astype(np.float32)), []).raw)[0]
    fortran = parse_npy_body(_npy(np.asfortranarray(uv.astype(np.float32))), []).raw
    np.testing.assert_array_equal(canonical_request(fortran)[0], canonical)
    order = [11, 0, 5, 1, 2, 3, 4, 6, 7, 8, 9, 10]  # V6 first, ...
    names = ",".join(LEADS_12[i] for i in order)
    named = parse_npy_body(_npy(uv[order].astype(np.float32)), [("leads", names)]).raw
    np.testing.assert_array_equal(canonical_request(named)[0], canonical)
    millivolts = parse_npy_body(_npy(uv / 1000), [("units", "mV")]).raw
    np.testing.assert_allclose(millivolts.signals_uv["II"], uv[1], rtol=1e-12)
    eight = parse_npy_body(_npy(uv[[0, 1, 6, 7, 8, 9, 10, 11]]), []).raw
    assert list(eight.signals_uv) == ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]


def _header(shape: tuple, descr: str = "<f4") -> bytes:
    """An npy 1.0 header claiming ``shape`` (the data need not be there)."""
    text = repr({"descr": descr, "fortran_order": False, "shape": shape})
    text += " " * (-(len(text) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode()


_GOOD = np.zeros((12, 5000), np.float32)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"", "not an .npy array"),
        (b"this is not an array", "not an .npy array"),
        (json.dumps({"ecg": [[0.0]]}).encode(), "not an .npy array"),
        (b"\x93NUMPY\x09\x00garbage", "unsupported .npy format version 9.0"),
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': ", "unreadable .npy header"),
        (_npy(np.array([{"a": 1}] * 12, dtype=object), allow_pickle=True), "Python objects"),
        (_npy(np.zeros(12, dtype=[("a", "<f4"), ("b", "<i2")])), "Python objects or records"),
        (_npy(np.zeros((12, 5000), np.complex64)), "dtype <c8"),
        (_npy(np.zeros((12, 5000), bool)), "dtype |b1"),
        (_npy(np.zeros((12, 5000), "<U1")), "dtype <U1"),
        (_npy(np.zeros(60000, np.float32)), "shape (60000,)"),
        (_npy(np.zeros((1, 12, 5000), np.float32)), "shape (1, 12, 5000)"),
        (_npy(np.zeros((5, 5000), np.float32)), "the array has 5 leads"),
        (_npy(_GOOD)[:-1], "(truncated, or trailing bytes)"),
        (_npy(_GOOD) + b"\x00" * 4, "holds 240004 data bytes"),
        # A header may claim any size: nothing is allocated for data that is not there.
        (_header((12, 10**15)), "declares 12 x 1000000000000000 <f4 = 48000000000000000 bytes"),
        (_npy(np.where(np.arange(12)[:, None] == 3, np.nan, _GOOD)), "non-finite samples (NaN/inf) in lead(s) aVR"),
        (_npy(np.full((12, 5000), np.inf)), "non-finite samples"),
    ],
)
def test_bad_npy_bodies_say_what_is_wrong(body: bytes, words: str) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_npy_body(body, [])
    message = str(info.value)
    assert words in message and "\n" not in message


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ([("sample_rate", "0")], "greater than 0"),
        ([("sample_rate", "fast")], "valid number"),
        ([("sex", "X")], "'M' or 'F'"),
        ([("height_cm", "2")], "greater than 30"),
        ([("bsa_m2", "9")], "less than 5"),
        ([("ecg", "1,2,3")], "Extra inputs"),
        ([("units", "V")], "'uV' or 'mV'"),
    ],
)
def test_bad_npy_query_strings_are_located_422s(query, words) -> None:
    with pytest.raises(RequestValidationError) as info:
        parse_npy_body(_npy(_GOOD), query)
    error = info.value.errors()[0]
    assert error["loc"] == ("query", query[0][0]) and words in error["msg"]


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ([("sample_rate", "20000")], "out of range"),
        ([("sex", "M"), ("sex", "F")], "query parameter(s) sex given more than once"),
        ([("leads", "I,II")], "`leads` names 2 leads but the array has 12 rows"),
        ([("leads", ",".join(["I"] * 12))], "duplicate lead(s) I"),
        ([("leads", ",".join(["V7", *LEADS_12[1:]]))], "unknown lead name 'V7'"),
    ],
)
def test_npy_query_strings_that_do_not_fit_the_array(query, words) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_npy_body(_npy(_GOOD), query)
    assert words in str(info.value)


def test_the_body_parser_dispatches_on_the_media_type() -> None:
    from fastapi import HTTPException

    from lvm_ray.api import parse_ecg_body

    uv, _ = _record_uv()
    json_body = json.dumps({"ecg": uv.tolist(), "sample_rate": 500}).encode()
    from_json = parse_ecg_body("application/json", json_body)
    from_npy = parse_ecg_body("application/x-npy", _npy(uv), [("sample_rate", "500")])
    np.testing.assert_array_equal(canonical_request(from_json.raw)[0], canonical_request(from_npy.raw)[0])
    with pytest.raises(HTTPException) as info:
        parse_ecg_body("application/octet-stream", _npy(uv))
    assert info.value.status_code == 415
    assert info.value.detail == (
        "unsupported Content-Type 'application/octet-stream': send application/json or application/x-npy"
    )


# ----------------------------------------------------------------------------- responses: rules and spreads


def lvh_ensemble(url: str, k: int = 2) -> str:
    """A tiny K-member ensemble of lvm-cpu with an LVH head (randomly initialised members), so it
    predicts an LV mass SD and an LVH probability SD (lv_mass_pred_sd_g, lvh_prob_sd)."""
    import dataclasses

    import torch

    from lvm_ray.model import build_model, checkpoint_payload, ensemble_payload, write_payload
    from lvm_ray.presets import get_preset

    preset = dataclasses.replace(get_preset("lvm-cpu"), name="lvm-cpu-lvh-head-test", lvh_head=True)
    members = []
    for i in range(k):
        torch.manual_seed(40 + i)
        members.append(checkpoint_payload(build_model(preset).eval(), preset, epoch=0))
    write_payload(url, ensemble_payload(members, runs=[f"members/{i}" for i in range(k)]))
    return url


def test_an_ensembles_spreads_are_fields_not_rule_flags(tmp_path) -> None:
    from lvm_ray.rules import RULE_FLAG_COLUMNS

    request = PredictRequest(ecg=_record_uv()[0].tolist(), sex="M", height_cm=180, weight_kg=90)
    wave, metadata, warnings = canonical_request(raw_from_request(request))
    predictor = Predictor.from_checkpoint(lvh_ensemble(str(tmp_path / "ensemble.pt")), use_gpu=False)
    row = predictor.predict(wave[None], {k: np.array([v], dtype=object) for k, v in metadata.items()})
    assert {"lv_mass_pred_sd_g", "lvh_prob_sd"} <= set(row.columns)
    body = PredictResponse.model_validate(response_from_row(row.to_dict("records")[0], warnings))
    assert list(body.rules.flags) == list(RULE_FLAG_COLUMNS)  # exactly the rules' flags
    assert body.lv_mass_sd_g == pytest.approx(row["lv_mass_pred_sd_g"][0]) and body.lv_mass_sd_g > 0
    assert body.lvh_probability_sd == pytest.approx(row["lvh_prob_sd"][0]) and body.lvh_probability_sd > 0
    assert body.lvh_probability == pytest.approx(row["lvh_prob"][0])
    assert not any(k.endswith("_sd") or "_sd_" in k for k in body.prediction)
    single = Predictor.from_checkpoint(tiny_checkpoint(str(tmp_path / "one.pt")), use_gpu=False)
    row = single.predict(wave[None], {k: np.array([v], dtype=object) for k, v in metadata.items()})
    body = PredictResponse.model_validate(response_from_row(row.to_dict("records")[0], warnings))
    assert body.lv_mass_sd_g is None and body.lvh_probability_sd is None
    assert list(body.rules.flags) == list(RULE_FLAG_COLUMNS)


def test_a_given_bsa_gives_the_lvmi_without_height_and_weight(tmp_path) -> None:
    uv, _ = _record_uv()
    ecg = parse_npy_body(_npy(uv.astype(np.float32)), [("sex", "M"), ("bsa_m2", "2.0")])
    predictor = Predictor.from_checkpoint(tiny_checkpoint(str(tmp_path / "model.pt")), use_gpu=False)
    body = predict_one(predictor, ecg)
    assert body["lvmi"] == pytest.approx(body["lv_mass_g"] / 2.0)
    assert isinstance(body["lvh"], bool) and body["warnings"] == []
