"""Stage `rules`: voltage-rule measurements and flags for a whole dataset, with Ray Data.

Each task measures one batch of ECGs with ``lvm_ray.rules.measure_batch`` (the same function
batch scoring and serving call) and adds the cart's rules where the source carried amplitudes.
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
    from lvm_ray.ray_utils import ensure_connected, read_ecg_dataset

    started = time.time()
    store.read_manifest(data)
    store.check_output(out, "rules", inputs=[data])
    ensure_connected(address, verbose=verbose, dashboard=False)
    columns = ["ecg_id", "sex", "ecg", *(f.name for f in CART_FIELDS)]
    dataset = read_ecg_dataset(data, columns=columns)
    tmp = store.temporary_sibling(out)
    try:
        dataset.map_batches(
            rules_batch, fn_kwargs={"config": config}, batch_size=batch_size, batch_format="numpy"
        ).write_parquet(tmp, mode="error")
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
