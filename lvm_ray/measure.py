"""Stage `rules`: voltage-rule measurements and flags for a whole dataset, with Ray Data.

Each task reads one shard, a row group at a time, measures it in batches with
``lvm_ray.rules.measure_batch`` (the same function batch scoring and serving call) and adds the
cart's rules where the source carried amplitudes; one task per CPU core at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from lvm_ray import store
from lvm_ray.rules import RulesConfig, cart_rules, measure_batch
from lvm_ray.schema import CART_FIELDS


@dataclass
class RulesResult:
    out: str
    n: int
    n_measurable: int
    prevalence: dict[str, float]
    seconds: float


def rules_batch(batch: dict[str, np.ndarray], config: RulesConfig) -> pa.Table:
    """One batch of shard rows -> ecg_id, measurements, flags, rules_error, and cart_ rules."""
    sex = list(batch["sex"])
    measured = measure_batch(np.asarray(batch["ecg"]), sex, config)
    cart = pd.DataFrame({name: batch[name] for name in batch if name.startswith("cart_")})
    cart["sex"] = sex
    frame = pd.concat(
        [pd.DataFrame({"ecg_id": batch["ecg_id"]}), measured, cart_rules(cart, config).reset_index(drop=True)], axis=1
    )
    return store.frame_to_arrow(frame)


#: The shard columns the rules read.
RULES_INPUTS = ("ecg_id", "sex", "ecg", *(f.name for f in CART_FIELDS))


def rules_of_shards(paths: pa.Table, data: str, config: RulesConfig, batch_size: int) -> pa.Table:
    """The rules rows of the shards named in ``paths`` (``store.SHARD_PATH_COLUMN``), read here."""
    tables = []
    for path in paths.column(store.SHARD_PATH_COLUMN).to_pylist():
        for rows in store.iter_row_groups(data, path, RULES_INPUTS):
            for start in range(0, rows.num_rows, batch_size):
                chunk = rows.slice(start, batch_size)
                batch = {c: chunk.column(c).to_numpy(zero_copy_only=False) for c in RULES_INPUTS if c != "ecg"}
                tables.append(rules_batch({**batch, "ecg": store.ecg_array(chunk)}, config))
    return pa.concat_tables(tables)


def measure_rules(
    data: str,
    out: str,
    config: RulesConfig = RulesConfig(),
    batch_size: int = 64,
    address: str | None = None,
    verbose: bool = False,
) -> RulesResult:
    """Write the rules table for every ECG of ``data`` to ``out`` (a folder of parquet).

    ``out`` must be new, empty, or an earlier rules table (which is replaced, atomically: the
    new table is written beside it and moved into place when complete). Anything else there is
    refused, never deleted.
    """
    import ray
    import ray.data

    from lvm_ray.ray_utils import cpu_cores, ensure_connected, shard_paths_dataset, worker_error

    started = time.time()
    n_shards = len(store.read_manifest(data)["shards"])
    store.check_output(out, "rules", inputs=[data])
    ensure_connected(address, verbose=verbose, dashboard=False)
    dataset = shard_paths_dataset(data)
    tmp = store.temporary_sibling(out)
    try:
        try:
            dataset.map_batches(
                rules_of_shards,
                fn_kwargs={"data": data, "config": config, "batch_size": batch_size},
                batch_size=1,  # one shard per task
                batch_format="pyarrow",
                num_cpus=1,
                compute=ray.data.TaskPoolStrategy(size=min(cpu_cores(), n_shards)),  # concurrency= warns
            ).write_parquet(tmp, mode="error")
        except ray.exceptions.RayError as exc:  # e.g. a task found a shard unreadable: its own line
            raise (worker_error(exc, (store.StoreError,)) or exc) from None
        table = read_rules(tmp)
        store.write_json(
            store.join_url(tmp, store.OUTPUT_MARKERS["rules"]),
            {"kind": "rules", "data": data, "n": len(table), "comparison": config.comparison},
        )
        store.commit_folder(tmp, out)
    finally:
        if store.exists(tmp):
            fs, path = store.filesystem(tmp)
            fs.rm(path, recursive=True)
    flags = [c for c in table.columns if c.startswith("lvh_")]
    return RulesResult(
        out=out,
        n=len(table),
        n_measurable=int(table["qrs_ms"].notna().sum()),
        prevalence={c: float(table[c].dropna().astype(bool).mean()) for c in flags if table[c].notna().any()},
        seconds=time.time() - started,
    )


def read_rules(out: str) -> pd.DataFrame:
    """The rules table written by :func:`measure_rules` (its parquet parts, in any order)."""
    return store.read_any_table(out)
