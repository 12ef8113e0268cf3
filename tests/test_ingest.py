"""Ingest stage: real PTB-XL records with deliberately broken inputs, labels, URLs, the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb
from typer.testing import CliRunner

from lvm_ray import store
from lvm_ray.cli import app
from lvm_ray.ingest import IngestOptions, ingest
from lvm_ray.schema import LEADS

FIXTURES = Path(__file__).parent / "fixtures"
PTBXL_FIXTURE = FIXTURES / "ptbxl"


def _broken_inputs(shared_data: Path, folder: Path) -> dict[str, str]:
    """Write one broken input per failure mode; return {ecg_id: expected words in the reason}."""
    folder.mkdir()
    good = shared_data / "ptbxl" / "records500" / "00000" / "00001_hr"
    record = wfdb.rdrecord(str(good))
    # 1. a truncated signal file
    for suffix in (".hea", ".dat"):
        shutil.copy(str(good) + suffix, folder / f"truncated{suffix}")
    (folder / "truncated.hea").write_text((folder / "truncated.hea").read_text().replace("00001_hr", "truncated"))
    dat = (folder / "truncated.dat").read_bytes()
    (folder / "truncated.dat").write_bytes(dat[:1000])
    # 2. a record missing lead V3 (11 channels)
    keep = [i for i, name in enumerate(record.sig_name) if name.upper() != "V3"]
    wfdb.wrsamp(
        "missing_v3",
        fs=500,
        units=["mV"] * 11,
        sig_name=[record.sig_name[i] for i in keep],
        p_signal=record.p_signal[:, keep],
        fmt=["16"] * 11,
        adc_gain=[1000.0] * 11,
        baseline=[0] * 11,
        write_dir=str(folder),
    )
    # 3. NaN samples (stored as WFDB's invalid-sample sentinel)
    with_nan = record.p_signal.copy()
    with_nan[100:200, 7] = np.nan
    wfdb.wrsamp(
        "with_nan",
        fs=500,
        units=["mV"] * 12,
        sig_name=record.sig_name,
        p_signal=with_nan,
        fmt=["16"] * 12,
        adc_gain=[1000.0] * 12,
        baseline=[0] * 12,
        write_dir=str(folder),
    )
    # 4. a corrupt header
    (folder / "corrupt_header.hea").write_text("corrupt_header 12 500 five-thousand\nthis is not a signal line\n")
    (folder / "corrupt_header.dat").write_bytes(dat)
    # 5. an XML with no waveforms (a MUSE export stripped of its Waveform elements)
    muse = (shared_data / "formats" / "ge_muse" / "musephi_muse_ecg1.xml").read_text(errors="replace")
    start, end = muse.find("<Waveform>"), muse.rfind("</Waveform>") + len("</Waveform>")
    (folder / "no_waveform.xml").write_text(muse[:start] + muse[end:])
    # 6. the 13-sample aECG
    shutil.copy(shared_data / "formats" / "hl7_aecg" / "fda_minimum_aecg_13samples.xml", folder / "aecg_13.xml")
    return {
        "truncated": "truncated",
        "missing_v3": "missing lead(s) V3",
        "with_nan": "NaN",
        "corrupt_header": "header",
        "no_waveform": "waveform",
        "aecg_13": "",  # reader's own id may differ; checked by source_uri below
    }


@pytest.mark.slow
def test_ptbxl_with_broken_inputs(shared_data, tmp_path, ray_cluster):
    broken = _broken_inputs(shared_data, tmp_path / "broken")
    out = str(tmp_path / "ds")
    result = ingest(
        [str(shared_data / "ptbxl"), str(tmp_path / "broken")],
        out,
        options=IngestOptions(ptbxl_rate="500"),
        use_ray=True,
    )
    meta = pd.read_csv(shared_data / "ptbxl" / "metadata.csv")
    expected_ids = set(meta.loc[meta.path_500hz.notna(), "record_id"].astype(str))
    table = store.read_table(out, columns=["ecg_id", "patient_id", "age", "sex", "lvh", "strat_fold", "original_fs"])
    stored = set(table.column("ecg_id").to_pylist())
    quarantine = store.read_quarantine(out)
    assert len(expected_ids) == 353
    # every good record stored (any real record the checks reject must say why)
    real_rejects = quarantine[quarantine.ecg_id.isin(expected_ids)]
    assert stored | set(real_rejects.ecg_id) == expected_ids
    assert len(real_rejects) <= 3, real_rejects.reason.tolist()
    # every broken input quarantined with its own reason
    by_uri = {Path(u).stem: r for u, r in zip(quarantine.source_uri, quarantine.reason, strict=True)}
    for name, words in broken.items():
        assert name in by_uri, f"{name} was not quarantined"
        assert words.lower() in by_uri[name].lower(), (name, by_uri[name])
    assert result.n_stored == len(stored) and result.n_quarantined == len(quarantine)
    assert result.n_sources == 353 + len(broken)
    # covariates and labels from PTB-XL's metadata travel with the shards
    frame = table.to_pandas().set_index("ecg_id")
    row = meta.set_index(meta.record_id.astype(str)).loc["1"]
    assert frame.loc["1", "age"] == row.age and frame.loc["1", "sex"] == row.sex
    assert frame.loc["1", "patient_id"] == str(int(row.patient_id)) and frame.loc["1", "strat_fold"] == row.strat_fold
    assert set(frame["original_fs"]) == {500.0}
    store.verify(out)


def test_single_record_round_trip_in_process(tmp_path):
    record_path = PTBXL_FIXTURE / "records500" / "00000" / "00001_hr"
    out = str(tmp_path / "one")
    result = ingest([str(record_path) + ".hea"], out, use_ray=False)
    assert (result.n_stored, result.n_quarantined) == (1, 0)
    table = store.read_table(out)
    source = wfdb.rdrecord(str(record_path))
    order = [[n.upper() for n in source.sig_name].index(lead.upper()) for lead in LEADS]
    np.testing.assert_allclose(store.ecg_array(table)[0], source.p_signal[:, order].T * 1000, atol=0.5 + 1e-9)
    assert table.column("ecg_id").to_pylist() == ["00001_hr"]
    assert table.column("source_format").to_pylist() == ["wfdb"]


def test_labels_join_and_memory_url(tmp_path):
    labels = pd.DataFrame(
        {
            "ecg_id": ["00001_hr"],
            "lv_mass_g": [123.4],
            "height_cm": [170.0],
            "weight_kg": [85.0],
            "sex": ["male"],
            "cohort": ["test"],
        }
    )
    labels_path = tmp_path / "labels.csv"
    labels.to_csv(labels_path, index=False)
    out = "memory://ingest-test/labelled"
    ingest(
        [str(PTBXL_FIXTURE / "records500" / "00000" / "00001_hr.hea")],
        out,
        labels=str(labels_path),
        overwrite=True,
        use_ray=False,
    )
    frame = store.read_table(out).to_pandas()
    assert frame.loc[0, "lv_mass_g"] == 123.4 and frame.loc[0, "sex"] == "M" and frame.loc[0, "cohort"] == "test"
    assert frame.loc[0, "bsa_m2"] == pytest.approx(np.sqrt(170 * 85 / 3600))


def test_duplicate_ids_across_shards_are_quarantined(tmp_path, ray_cluster):
    src = tmp_path / "src"
    src.mkdir()
    wave = np.random.default_rng(0).normal(0, 300, size=(12, 5000))
    for i in range(40):
        np.savez(src / f"ecg{i:02d}.npz", ecg=wave, sample_rate_hz=500.0)
    (src / "dups").mkdir()
    for i in range(3):
        np.savez(src / "dups" / f"ecg{i:02d}.npz", ecg=wave, sample_rate_hz=500.0)
    out = str(tmp_path / "ds")
    result = ingest([str(src)], out, options=IngestOptions(max_rows_per_shard=16), use_ray=True)
    ids = store.read_table(out, columns=["ecg_id"]).column("ecg_id").to_pylist()
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 40
    assert result.n_quarantined == 3
    assert store.read_quarantine(out).reason.str.contains("duplicate ecg_id").all()
    store.verify(out)


def test_cli_ingest_strict_and_errors(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.npz"
    np.savez(bad, ecg=np.zeros((12, 5000)), sample_rate_hz=500.0)
    good = str(PTBXL_FIXTURE / "records500" / "00000" / "00001_hr.hea")
    out = str(tmp_path / "ds")
    result = runner.invoke(app, ["ingest", good, str(bad), "--out", out])
    assert result.exit_code == 0, result.output
    assert "stored       : 1" in result.output and "flat lead" in result.output
    result = runner.invoke(app, ["ingest", good, str(bad), "--out", out, "--overwrite", "--strict"])
    assert result.exit_code == 1 and "quarantined (--strict)" in result.output
    result = runner.invoke(app, ["ingest", good, "--out", out])
    assert result.exit_code == 2 and "already holds a dataset" in result.output
    result = runner.invoke(app, ["ingest", str(tmp_path / "nope.xml"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not found" in result.output
