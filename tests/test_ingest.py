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
from lvm_ray.ingest import IngestOptions, discover_sources, format_summary, ingest
from lvm_ray.schema import LEADS, QUALITY_FLAG

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
    meta_by_id = meta.set_index(meta.record_id.astype(str))
    table = store.read_table(out, columns=["ecg_id", "patient_id", "age", "sex", "lvh", "strat_fold", "original_fs"])
    stored = set(table.column("ecg_id").to_pylist())
    quarantine = store.read_quarantine(out)
    assert len(expected_ids) == 353
    # every good record stored (any real record the checks reject must say why)
    real_rejects = quarantine[quarantine.ecg_id.isin(expected_ids)]
    assert stored | set(real_rejects.ecg_id) == expected_ids
    # PTB-XL itself holds byte-identical recordings: 137/138, 456/457 and 459/460 (same patient, same
    # time) and 145/463 (two patient ids, a year apart, different strat_folds). Each later copy is
    # quarantined naming the stored record it duplicates.
    copies = real_rejects[real_rejects.reason.str.startswith("duplicate recording")]
    originals = {copy: reason.split("'")[1] for copy, reason in zip(copies.ecg_id, copies.reason, strict=True)}
    assert originals == {"138": "137", "457": "456", "460": "459", "463": "145"}
    for copy, original in originals.items():
        assert original in stored
        a, b = (
            wfdb.rdrecord(str(shared_data / "ptbxl" / meta_by_id.loc[i, "path_500hz"])).p_signal
            for i in (copy, original)
        )
        np.testing.assert_array_equal(a, b)
    assert len(real_rejects) - len(copies) <= 3, real_rejects.reason.tolist()
    # every broken input quarantined with its own reason
    by_uri = {Path(u).stem: r for u, r in zip(quarantine.source_uri, quarantine.reason, strict=True)}
    for name, words in broken.items():
        assert name in by_uri, f"{name} was not quarantined"
        assert words.lower() in by_uri[name].lower(), (name, by_uri[name])
    assert result.n_stored == len(stored) and result.n_quarantined == len(quarantine)
    assert result.n_sources == 353 + len(broken)
    # covariates and labels from PTB-XL's metadata travel with the shards
    frame = table.to_pandas().set_index("ecg_id")
    row = meta_by_id.loc["1"]
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


def test_true_duplicates_across_shards_are_quarantined_naming_the_kept_record(tmp_path, ray_cluster):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    gains = 1.0 + 0.1 * np.arange(12)[:, None]  # leads of different size, as in a real ECG
    waves = [rng.normal(0, 300, size=(12, 5000)) * gains for _ in range(40)]
    for i, wave in enumerate(waves):
        np.savez(src / f"ecg{i:02d}.npz", ecg=wave, sample_rate_hz=500.0)
    (src / "resent").mkdir()
    for i in range(3):  # the same recordings sent again (listed after the originals)
        np.savez(src / "resent" / f"ecg{i:02d}.npz", ecg=waves[i], sample_rate_hz=500.0)
    out = str(tmp_path / "ds")
    result = ingest([str(src)], out, options=IngestOptions(max_rows_per_shard=16), use_ray=True)
    ids = store.read_table(out, columns=["ecg_id"]).column("ecg_id").to_pylist()
    assert sorted(ids) == [f"ecg{i:02d}" for i in range(40)]
    assert result.n_quarantined == 3
    quarantine = store.read_quarantine(out).sort_values("ecg_id")
    assert quarantine.ecg_id.tolist() == ["resent/ecg00", "resent/ecg01", "resent/ecg02"]
    assert quarantine.reason.tolist() == [
        f"duplicate recording: same waveform as ecg_id 'ecg{i:02d}' (kept that one)" for i in range(3)
    ]
    store.verify(out)


def _two_sites(root: Path) -> Path:
    """siteA/ecg.xml and siteB/ecg.xml: two different MUSE recordings with the same file name."""
    for site, sample in (("siteA", "musephi_muse_ecg1.xml"), ("siteB", "ml4h_muse_ecg_deidentified_1.xml")):
        (root / site).mkdir(parents=True)
        shutil.copy(FIXTURES / "formats" / "ge_muse" / sample, root / site / "ecg.xml")
    return root


def test_same_file_name_at_two_sites_gets_two_ids_and_labels_join_on_them(tmp_path):
    export = _two_sites(tmp_path / "export")
    shutil.copy(export / "siteA" / "ecg.xml", export / "siteA" / "ecg_again.xml")  # a true duplicate
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"ecg_id": ["siteA/ecg", "siteB/ecg"], "lv_mass_g": [150.0, 180.0]}).to_csv(labels, index=False)
    out = str(tmp_path / "ds")
    result = ingest([str(export)], out, labels=str(labels), use_ray=False)
    frame = store.read_table(out, columns=["ecg_id", "lv_mass_g", "original_fs"]).to_pandas().set_index("ecg_id")
    assert frame.lv_mass_g.to_dict() == {"siteA/ecg": 150.0, "siteB/ecg": 180.0}
    assert frame.original_fs.to_dict() == {"siteA/ecg": 500.0, "siteB/ecg": 240.0}
    quarantine = store.read_quarantine(out)
    assert quarantine.ecg_id.tolist() == ["siteA/ecg_again"]
    assert quarantine.reason.tolist() == ["duplicate recording: same waveform as ecg_id 'siteA/ecg' (kept that one)"]
    assert (result.labels_key, result.labels_matched, result.warnings) == ("ecg_id", 2, [])
    assert "labels       : 2 of 2 ECGs matched by ecg_id" in format_summary(result)


def test_ids_are_paths_under_the_sources_common_folder(tmp_path):
    export = _two_sites(tmp_path / "export")

    def ids(*sources):
        entries, _ = discover_sources([str(s) for s in sources])
        return [e["ecg_id"] for e in entries]

    assert ids(export) == ["siteA/ecg", "siteB/ecg"]
    assert ids(export / "siteA", export / "siteB") == ["siteA/ecg", "siteB/ecg"]
    assert ids(export / "siteA") == ids(export / "siteA" / "ecg.xml") == ["ecg"]
    assert ids(str(export) + "/*/ecg.xml") == ["siteA/ecg", "siteB/ecg"]
    assert ids(export, export / "siteA" / "ecg.xml") == ["siteA/ecg", "siteB/ecg"]  # listed twice, read once
    np.savez(export / "siteA" / "ecg.npz", ecg=np.zeros((12, 5000)), sample_rate_hz=500.0)
    assert ids(export / "siteA") == ["ecg.npz", "ecg.xml"]  # same stem: the suffix stays
    # PTB-XL keeps its metadata's record ids; a file named like one keeps its suffix.
    np.savez(export / "siteB" / "1.npz", ecg=np.zeros((12, 5000)), sample_rate_hz=500.0)
    assert ids(PTBXL_FIXTURE, export / "siteB") == ["1", "2", "3", "1.npz", "ecg"]


def _write_mv_npz(path: Path, signal_mv: np.ndarray) -> None:
    np.savez(path, ecg=signal_mv, sample_rate_hz=500.0, units="mV")


def test_amplitude_normalised_records_are_flagged_and_strict_quarantines_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    x = wfdb.rdrecord(str(PTBXL_FIXTURE / "records500" / "00000" / "00002_hr")).p_signal.T  # mV, LEADS order
    _write_mv_npz(src / "real.npz", x)
    _write_mv_npz(src / "one_mv.npz", (x - x.min(1, keepdims=True)) / np.ptp(x, axis=1, keepdims=True) - 0.5)
    _write_mv_npz(src / "z_scored.npz", (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True))
    out = str(tmp_path / "ds")
    result = ingest([str(src)], out, use_ray=False)
    rows = store.read_table(out, columns=["ecg_id", QUALITY_FLAG]).to_pylist()
    flags = {row["ecg_id"]: row[QUALITY_FLAG] for row in rows}
    assert flags["real"] is None
    assert flags["one_mv"] == "amplitude-normalised: all 12 leads span the same peak-to-peak (1000 uV)"
    assert "same standard deviation (1000 uV) and mean 0 (z-scored)" in flags["z_scored"]
    assert (result.n_stored, result.n_flagged, result.flagged_by_reason) == (3, 2, {"amplitude-normalised": 2})
    assert result.manifest["n_flagged"] == 2
    summary = format_summary(result)
    assert "flagged      : 2" in summary and "warning: 2 stored ECG(s) look amplitude-normalised" in summary

    strict = ingest([str(src)], out, options=IngestOptions(reject_flagged=True), use_ray=False, overwrite=True)
    assert (strict.n_stored, strict.n_quarantined, strict.n_flagged) == (1, 2, 0)
    reasons = store.read_quarantine(out).set_index("ecg_id").reason
    assert reasons["one_mv"] == flags["one_mv"] and reasons["z_scored"] == flags["z_scored"]


def test_nothing_stored_and_labels_matching_nothing_are_said_plainly(tmp_path):
    flat = tmp_path / "flat.npz"
    np.savez(flat, ecg=np.zeros((12, 5000)), sample_rate_hz=500.0)
    result = ingest([str(flat)], str(tmp_path / "none"), use_ray=False)
    assert result.n_stored == 0
    assert result.warnings == [
        f"no ECG was stored: all 1 source(s) were quarantined (reasons in {tmp_path}/none/quarantine.parquet)"
    ]
    assert "warning: no ECG was stored" in format_summary(result)

    labels = tmp_path / "labels.csv"
    pd.DataFrame({"ecg_id": ["1", "2"], "lv_mass_g": [100.0, 120.0]}).to_csv(labels, index=False)
    good = str(PTBXL_FIXTURE / "records500" / "00000" / "00001_hr.hea")
    result = ingest([good], str(tmp_path / "ds"), labels=str(labels), use_ray=False)
    assert result.labels_matched == 0
    assert result.warnings == [
        f"the labels table {labels} matched none of the 1 stored ECGs by ecg_id (the table has e.g. '1', the ECGs "
        "e.g. '00001_hr': an ecg_id is the file's path under the sources' common folder, without suffix); "
        "its columns are empty in the dataset"
    ]


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
    # --out naming an existing file, and labels tables that cannot be used: one line naming the file
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    result = runner.invoke(app, ["ingest", good, "--out", str(a_file)])
    assert result.exit_code == 2 and result.output.strip() == f"error: --out {a_file} is an existing file, not a folder"
    assert a_file.read_text() == "keep me"
    export = _two_sites(tmp_path / "export")
    result = runner.invoke(app, ["ingest", str(export), "--out", str(export / "ds")])
    assert result.exit_code == 2 and f"is (or is inside) the input {export}" in result.output
    assert not (export / "ds").exists()
    garbage = tmp_path / "labels.csv"
    garbage.write_text('not a table\n"ecg_id,1,2\nx,y,z,w,v\n')
    result = runner.invoke(app, ["ingest", good, "--out", str(tmp_path / "y"), "--labels", str(garbage)])
    assert result.exit_code == 2 and f"error: cannot read labels table {garbage}:" in result.output
    assert len(result.output.strip().splitlines()) == 1
    binary = tmp_path / "labels_bin.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    result = runner.invoke(app, ["ingest", good, "--out", str(tmp_path / "y"), "--labels", str(binary)])
    assert result.exit_code == 2 and f"labels table {binary}" in result.output
    no_key = tmp_path / "no_key.csv"
    no_key.write_text("id,lv_mass_g\n00001_hr,150\n")
    result = runner.invoke(app, ["ingest", good, "--out", str(tmp_path / "y"), "--labels", str(no_key)])
    assert result.exit_code == 2
    assert f"error: labels table {no_key} needs an ecg_id or patient_id column; it has 'id', 'lv_mass_g'" in (
        result.output
    )
