"""Train / validation / test assignment, always by patient (no Ray).

A run assigns every row once, in the driver's index pass, and writes ``RUN/split.parquet``
(ecg_id, patient_id, split); everything later (the training datasets, the test evaluation)
reads that table instead of assigning again. See docs/architecture.md, "Run folder".
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_CODES: dict[str, int] = {name: i for i, name in enumerate(SPLITS)}
EXCLUDED = -1


class SplitError(ValueError):
    """A split cannot be made (missing split column, no labelled rows in a split)."""


def _canon(value: Any) -> str | None:
    """A split-column value as a comparable string (8, 8.0 and '8' are equal); None for missing."""
    if value is None:
        return None
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        if float(value).is_integer():
            return str(int(value))
    return str(value).strip()


def hash_unit(keys: Sequence[Any], salt: str) -> np.ndarray:
    """Stable uniform [0, 1) numbers from keys (blake2b of salt:key): the same everywhere, every time."""
    out = np.empty(len(keys), dtype=np.float64)
    for i, key in enumerate(keys):
        digest = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64
    return out


@dataclass(frozen=True)
class SplitSpec:
    """How ECGs are assigned to train / val / test, always by patient.

    Without ``column``: a hash of patient_id puts ``test_fraction`` of the patients in test and
    ``val_fraction`` of the rest in validation. With ``column`` (e.g. strat_fold): rows whose
    value is in ``val_values`` / ``test_values`` go there, the rest (or only ``train_values``)
    train; rows with no value are excluded.
    """

    column: str | None = None
    val_values: tuple[str, ...] = ()
    test_values: tuple[str, ...] = ()
    train_values: tuple[str, ...] | None = None
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    salt: str = "lvm-ray-split-v1"

    def __post_init__(self) -> None:
        if not 0.0 <= self.test_fraction < 1.0 or not 0.0 < self.val_fraction < 1.0:
            raise SplitError("test_fraction must be in [0, 1) and val_fraction in (0, 1)")
        if self.column is not None and not self.val_values:
            raise SplitError(f"split column {self.column!r} needs val_values (e.g. --val-values 8)")
        object.__setattr__(self, "val_values", tuple(_canon(v) for v in self.val_values))
        object.__setattr__(self, "test_values", tuple(_canon(v) for v in self.test_values))
        if self.train_values is not None:
            object.__setattr__(self, "train_values", tuple(_canon(v) for v in self.train_values))

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> SplitSpec:
        """Inverse of ``dataclasses.asdict`` (JSON lists back to tuples; unknown keys ignored)."""
        d = {k: v for k, v in payload.items() if k in cls.__dataclass_fields__}
        for key in ("val_values", "test_values"):
            d[key] = tuple(d.get(key) or ())
        if d.get("train_values") is not None:
            d["train_values"] = tuple(d["train_values"])
        return cls(**d)

    def assign(
        self, patient_ids: Sequence[Any], ecg_ids: Sequence[Any], column_values: Sequence[Any] | None = None
    ) -> np.ndarray:
        """Split codes (0 train, 1 val, 2 test, -1 excluded) for a batch of rows."""
        n = len(ecg_ids)
        codes = np.full(n, SPLIT_CODES["train"], dtype=np.int8)
        if self.column is None:
            # ECGs without a patient id are their own patient.
            keys = [p if p is not None and p == p else f"ecg:{e}" for p, e in zip(patient_ids, ecg_ids, strict=True)]
            u = hash_unit(keys, self.salt)
            codes[u < self.test_fraction] = SPLIT_CODES["test"]
            val_hi = self.test_fraction + (1.0 - self.test_fraction) * self.val_fraction
            codes[(u >= self.test_fraction) & (u < val_hi)] = SPLIT_CODES["val"]
            return codes
        if column_values is None:
            raise SplitError(f"split column {self.column!r} is not in the dataset")
        for i, raw in enumerate(column_values):
            value = _canon(raw)
            if value is None:
                codes[i] = EXCLUDED
            elif value in self.val_values:
                codes[i] = SPLIT_CODES["val"]
            elif value in self.test_values:
                codes[i] = SPLIT_CODES["test"]
            elif self.train_values is not None and value not in self.train_values:
                codes[i] = EXCLUDED
        return codes

    def assign_frame(self, frame: pd.DataFrame) -> np.ndarray:
        """Split codes for a frame with ecg_id (and patient_id / the split column where present)."""
        n = len(frame)
        return self.assign(
            frame["patient_id"].tolist() if "patient_id" in frame else [None] * n,
            frame["ecg_id"].tolist(),
            frame[self.column].tolist() if self.column and self.column in frame else None,
        )


def split_names(codes: np.ndarray) -> np.ndarray:
    """Split codes -> 'train' / 'val' / 'test' / 'excluded' (what split.parquet stores)."""
    return np.array(["excluded", *SPLITS], dtype=object)[np.asarray(codes).astype(int) + 1]


def labelled(values: Any) -> np.ndarray:
    """True where a target value is known (numeric or boolean, not null)."""
    return pd.to_numeric(pd.Series(np.asarray(values, dtype=object)), errors="coerce").notna().to_numpy()


def keep_mask(batch: Mapping[str, Any], split: SplitSpec, target: str, which: str) -> np.ndarray:
    """Rows of a batch in split ``which`` whose target is known (assigning the split from ``split``).

    For callers without a run's split table (the benchmarks' in-memory baselines); a run's own
    steps use :func:`ids_in_split` on RUN/split.parquet instead.
    """
    n = len(batch["ecg_id"])
    codes = split.assign(
        list(batch["patient_id"]) if "patient_id" in batch else [None] * n,
        list(batch["ecg_id"]),
        list(batch[split.column]) if split.column else None,
    )
    return (codes == SPLIT_CODES[which]) & labelled(batch[target])


def ids_in_split(split_table: pd.DataFrame, which: str) -> frozenset[str]:
    """The labelled ecg_ids of one split in a run's split table."""
    rows = split_table["split"] == which
    if "labelled" in split_table:
        rows &= split_table["labelled"].astype(bool)
    return frozenset(split_table.loc[rows, "ecg_id"].astype(str))
