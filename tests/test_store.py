"""Store: round trips through plain pyarrow and Ray Data, manifests, checksums, fsspec URLs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvm_ray import store
from lvm_ray.schema import WAVEFORM_SHAPE, shard_schema
from lvm_ray.signals import Rejection


def _chunk(n: int, start: int, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    ecg = rng.integers(-3000, 3000, size=(n, *WAVEFORM_SHAPE), dtype=np.int16)
    meta = pd.DataFrame({"ecg_id": [f"e{start + i}" for i in range(n)], "age": rng.uniform(40, 80, n), "sex": "F"})
    return meta, ecg


@pytest.mark.parametrize("root_kind", ["path", "file_url", "memory"])
def test_round_trip_plain_pyarrow(tmp_path, root_kind):
    root = {"path": str(tmp_path / "ds"), "file_url": f"file://{tmp_path}/ds", "memory": "memory://store-test/ds"}[
        root_kind
    ]
    rng = np.random.default_rng(0)
    writer = store.DatasetWriter(root, extra_fields=[pa.field("lvh", pa.bool_())])
    chunks = [_chunk(5, 0, rng), _chunk(3, 5, rng)]
    for meta, ecg in chunks:
        writer.write(meta.assign(lvh=True), ecg)
    writer.quarantine([Rejection("bad1", "x.xml", "muse", "flat lead(s) V2")])
    manifest = writer.close(extra={"kind": "test"})
    assert manifest["n_rows"] == 8 and manifest["n_quarantined"] == 1 and len(manifest["shards"]) == 2
    assert manifest["quarantine_by_reason"] == {"flat lead": 1}
    table = store.read_table(root)
    assert table.schema.field("ecg").type.shape == list(WAVEFORM_SHAPE)
    got = {i: w for i, w in zip(table.column("ecg_id").to_pylist(), store.ecg_array(table), strict=True)}
    for meta, ecg in chunks:
        for ecg_id, wave in zip(meta.ecg_id, ecg, strict=True):
            np.testing.assert_array_equal(got[ecg_id], wave)
    assert table.column("lvh").to_pylist() == [True] * 8
    assert table.column("lv_mass_g").null_count == 8  # absent labels are null, not zero
    store.verify(root)
    assert store.read_quarantine(root).reason.tolist() == ["flat lead(s) V2"]


def test_plain_pyarrow_reader_keeps_shape(tmp_path):
    rng = np.random.default_rng(1)
    writer = store.DatasetWriter(str(tmp_path / "ds"))
    meta, ecg = _chunk(2, 0, rng)
    writer.write(meta, ecg)
    writer.close()
    shard = next((tmp_path / "ds" / "shards").glob("*.parquet"))
    column = pq.read_table(shard).column("ecg").combine_chunks()
    np.testing.assert_array_equal(column.to_numpy_ndarray(), ecg)


def test_ray_data_reads_shape(tmp_path, ray_cluster):
    from lvm_ray.ray_utils import read_ecg_dataset

    rng = np.random.default_rng(2)
    writer = store.DatasetWriter(str(tmp_path / "ds"))
    meta, ecg = _chunk(4, 0, rng)
    writer.write(meta, ecg)
    writer.close()
    batch = read_ecg_dataset(str(tmp_path / "ds")).take_batch(4, batch_format="numpy")
    order = np.argsort(batch["ecg_id"])
    assert batch["ecg"].shape == (4, *WAVEFORM_SHAPE) and batch["ecg"].dtype == np.int16
    np.testing.assert_array_equal(batch["ecg"][order], ecg[np.argsort(meta.ecg_id.to_numpy())])


def test_checksum_and_errors(tmp_path):
    root = str(tmp_path / "ds")
    with pytest.raises(store.StoreError, match="no dataset"):
        store.read_table(root)
    writer = store.DatasetWriter(root)
    meta, ecg = _chunk(2, 0, np.random.default_rng(3))
    writer.write(meta, ecg)
    writer.close()
    with pytest.raises(store.StoreError, match="already holds a dataset"):
        store.DatasetWriter(root, overwrite=False)
    shard = next((tmp_path / "ds" / "shards").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(store.StoreError, match="checksum"):
        store.verify(root)
    with pytest.raises(ValueError, match="int16"):
        store.build_shard_table(meta, ecg.astype(np.float32), shard_schema())
    with pytest.raises(ValueError, match=r"\[n, 12, 5000\]"):
        store.build_shard_table(meta, ecg[:, :, :100], shard_schema())
