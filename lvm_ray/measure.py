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


def measure_rules(data: str, out: str, config: RulesConfig = RulesConfig(), batch_size: int = 64) -> RulesResult:
    """Write the rules table for every ECG of ``data`` to ``out`` (a folder of parquet, replaced)."""
    from lvm_ray.ray_utils import read_ecg_dataset

    started = time.time()
    columns = ["ecg_id", "sex", "ecg", *(f.name for f in CART_FIELDS)]
    dataset = read_ecg_dataset(data, columns=columns)
    dataset.map_batches(
        rules_batch, fn_kwargs={"config": config}, batch_size=batch_size, batch_format="numpy"
    ).write_parquet(out, mode="overwrite")
    table = read_rules(out)
    flags = [c for c in table.columns if c.startswith("lvh_")]
    return RulesResult(
        out=out,
        n=len(table),
        n_measurable=int(table["qrs_ms"].notna().sum()),
        prevalence={c: float(table[c].dropna().astype(bool).mean()) for c in flags if table[c].notna().any()},
        seconds=time.time() - started,
    )


def read_rules(out: str) -> pd.DataFrame:
    import pyarrow.dataset as ds

    fs, path = store.filesystem(out)
    return ds.dataset(path, filesystem=fs, format="parquet").to_table().to_pandas()
