"""Model inputs from shard rows (no Ray, no torch): what training reads and preprocesses once.

No torch here, so a Ray task that only reads and preprocesses a shard (``lvm_ray.train_inputs``)
does not pay for importing it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lvm_ray import store
from lvm_ray.presets import Preset, lvh_labels, prepare_covariates, prepare_input, target_to_model
from lvm_ray.schema import WAVEFORM_SHAPE

#: Columns the model inputs, labels and covariates may draw on (those present are read).
LABEL_SOURCES = ("lv_mass_g", "bsa_m2", "sex", "height_cm", "weight_kg", "age", "bmi")


def input_columns(preset: Preset, extra: Iterable[str | None] = ()) -> list[str]:
    """The shard columns a preset's inputs, target and labels need (before checking presence)."""
    wanted = ["ecg_id", "patient_id", "ecg", preset.target.column, *extra, *LABEL_SOURCES]
    wanted += [c.name for c in preset.covariates]
    return [c for c in dict.fromkeys(wanted) if c]


def featurize(batch: Mapping[str, Any], preset: Preset) -> dict[str, np.ndarray]:
    """A batch of shard rows (numpy columns) -> model inputs: x, cov (if any), y, lvh."""
    n = len(batch["ecg"])
    ecg = np.asarray(batch["ecg"]).reshape(n, *WAVEFORM_SHAPE)
    x = np.zeros((0, *preset.input.shape), dtype=np.float32) if n == 0 else prepare_input(ecg, preset)
    out: dict[str, np.ndarray] = {"x": x}
    if preset.covariates:
        out["cov"] = prepare_covariates(batch, n, preset)
    out["y"] = target_to_model(np.asarray(batch[preset.target.column]), preset)
    out["lvh"] = lvh_labels(batch, n) if preset.lvh_head else np.full(n, -1, dtype=np.int64)
    return out


def featurize_shard(data: str, path: str, columns: list[str], codes: Mapping[str, int], preset: Preset) -> dict:
    """One shard's rows whose ecg_id has a split code in ``codes``, as model inputs with ecg_id and split.

    Only those rows' waveforms are decoded and decimated.
    """
    table = store.read_shard(data, path, columns)
    ids = np.asarray(table.column("ecg_id").to_numpy(zero_copy_only=False)).astype(str)
    split = np.array([codes.get(i, -1) for i in ids], dtype=np.int8)
    keep = np.flatnonzero(split >= 0)
    rows = table.take(keep)
    batch = {c: rows.column(c).to_numpy(zero_copy_only=False) for c in rows.column_names if c != "ecg"}
    batch["ecg"] = store.ecg_array(rows)
    out = featurize(batch, preset)
    out["ecg_id"] = ids[keep]
    out["split"] = split[keep]
    return out


def featurize_shards(
    data: str, paths: Sequence[str], columns: list[str], codes: Mapping[str, int], preset: Preset
) -> list[dict[str, np.ndarray]]:
    """:func:`featurize_shard` of several shards in turn, in one process (its imports paid once).

    A list, not one concatenated array: no second copy of the inputs in the task's memory.
    """
    return [featurize_shard(data, path, columns, codes, preset) for path in paths]
