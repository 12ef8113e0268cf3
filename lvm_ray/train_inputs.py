"""The train stage's inputs: the model inputs of the train and val splits, read and preprocessed once.

Two ways, chosen by size (:func:`should_cache`):

- **Cached** (the inputs take under a quarter of the object store): Ray tasks, one per CPU left
  beside the Train workers, each read a share of the shards once and preprocess the rows of both
  splits into the object store (:class:`CachedInputs`). The tasks start before the Train workers
  and leave their CPUs free, so the read overlaps their start-up. Each worker
  then takes its rows (every W-th ECG of a split in ecg_id order: the same rows every run, the
  counts equal to one row) into memory as tensors and batches from there every epoch
  (:func:`lvm_ray.fitting.memory_batches`); a restarted worker takes them again from the object
  store. Ensembles and tuning trials share one build.
- **Streamed** (larger data): Ray Data streams and preprocesses the shards every epoch, each split
  keeping its own rows (``datasets['train']`` / ``['val']``, split across the workers by Ray Train).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from lvm_ray import store
from lvm_ray.inputs import featurize, featurize_shards, input_columns
from lvm_ray.presets import Preset
from lvm_ray.runs import TrainConfig, columns_present
from lvm_ray.splits import SPLIT_CODES, ids_in_split

#: The key of :class:`CachedInputs` in a datasets mapping (the others are Ray Datasets).
CACHED = "cached_inputs"
#: Cache when the preprocessed inputs take under this share of the cluster's object store.
CACHE_SHARE = 0.25
#: Cached splits: what each shard task keeps.
CACHED_SPLITS = ("train", "val")


def cached_input_bytes(cfg: TrainConfig, rows: int) -> int:
    """Object-store bytes the preprocessed inputs of ``rows`` ECGs take (float32 input + covariates)."""
    leads, samples = cfg.preset.input.shape
    return rows * (leads * samples + len(cfg.preset.covariates) + 4) * 4


def should_cache(cfg: TrainConfig, rows: int) -> bool:
    """cache_inputs True/False decides; None (auto): cache when the inputs take under a quarter of the object store."""
    if cfg.cache_inputs is not None:
        return bool(cfg.cache_inputs)
    import ray

    store_bytes = ray.cluster_resources().get("object_store_memory", 0)
    return cached_input_bytes(cfg, rows) < store_bytes * CACHE_SHARE


# --- cached: a few tasks read the shards, the worker's rows in memory -------------------------------


def read_tasks(cfg: TrainConfig, n_shards: int) -> int:
    """Tasks that read and preprocess the shards: the cluster's CPUs (on an embedded Ray, this
    machine's cores) free besides the Train workers, at least one and at most one per shard, each
    taking a share of the shards in turn.

    One task per shard would take the workers' CPUs, so their start would wait for the reads
    instead of running beside them; and each task process pays its imports (~2 s) again.
    """
    import ray

    from lvm_ray.ray_utils import cpu_cores

    cpus = min(ray.available_resources().get("CPU", 0), cpu_cores())  # an embedded Ray: the real cores
    return max(1, min(n_shards, int(cpus - cfg.num_workers * cfg.cpus_per_worker)))


@dataclass(frozen=True)
class CachedInputs:
    """The preprocessed train and val inputs in the object store: one entry per read task (Ray ObjectRefs,
    each a list of its shards' inputs).

    ``counts``: the rows of each split the shards hold (the labelled ECGs of RUN/split.parquet).
    """

    tasks: tuple[Any, ...]
    counts: Mapping[str, int]

    @classmethod
    def submit(cls, cfg: TrainConfig, split_table: pd.DataFrame) -> CachedInputs:
        """Start the read-and-preprocess tasks, :func:`read_tasks` of them (returns at once; :meth:`wait` waits)."""
        import ray

        present = set(columns_present(cfg.data))
        columns = [c for c in input_columns(cfg.preset) if c in present]
        ids = {which: ids_in_split(split_table, which) for which in CACHED_SPLITS}
        codes = ray.put({i: SPLIT_CODES[which] for which, members in ids.items() for i in members})
        task = ray.remote(featurize_shards).options(num_cpus=1, max_retries=2)
        paths = [s["path"] for s in store.read_manifest(cfg.data)["shards"]]
        groups = np.array_split(np.arange(len(paths)), read_tasks(cfg, len(paths)))
        tasks = tuple(task.remote(cfg.data, [paths[i] for i in group], columns, codes, cfg.preset) for group in groups)
        return cls(tasks=tasks, counts={which: len(members) for which, members in ids.items()})

    def wait(self) -> CachedInputs:
        """Block until every task's inputs are in the object store; a failed read raises here, in the driver."""
        import ray

        for ref in self.tasks:
            ray.get(ref)  # one at a time: the driver maps each, it does not hold them all
        return self

    def take(self, rank: int, world: int) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, int]]:
        """(The rows of worker ``rank`` of ``world`` per split, the rows of each split in all).

        A worker's rows are every world-th ECG of the split in ecg_id order (copies, in that order).
        """
        import ray

        parts = [part for task in ray.get(list(self.tasks)) for part in task]  # zero-copy object-store views
        ids = np.concatenate([p["ecg_id"] for p in parts])
        split = np.concatenate([p["split"] for p in parts])
        part_of = np.repeat(np.arange(len(parts)), [len(p["ecg_id"]) for p in parts])
        offset = np.concatenate([[0], np.cumsum([len(p["ecg_id"]) for p in parts])])
        keys = [k for k in parts[0] if k not in ("ecg_id", "split")]
        out: dict[str, dict[str, np.ndarray]] = {}
        totals: dict[str, int] = {}
        for which in CACHED_SPLITS:
            rows = np.flatnonzero(split == SPLIT_CODES[which])
            totals[which] = len(rows)
            mine = rows[np.argsort(ids[rows], kind="stable")][rank::world]
            arrays = {k: np.empty((len(mine), *parts[0][k].shape[1:]), dtype=parts[0][k].dtype) for k in keys}
            for p, part in enumerate(parts):
                at = np.flatnonzero(part_of[mine] == p)
                local = mine[at] - offset[p]
                for k in keys:
                    arrays[k][at] = part[k][local]
            out[which] = arrays
        return out, totals


def worker_tensors(arrays: Mapping[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """A worker's rows as tensors, on the GPU when they take under a quarter of its free memory."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    if device.type == "cuda":
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size < torch.cuda.mem_get_info(device)[0] * CACHE_SHARE:
            tensors = {k: t.to(device) for k, t in tensors.items()}
    return tensors


# --- streamed: Ray Data every epoch --------------------------------------------------------------------


def _featurize_split(batch: dict[str, np.ndarray], ids: frozenset[str], preset: Preset) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: keep the rows of one split (by RUN/split.parquet), build inputs."""
    keep = np.array([str(i) in ids for i in batch["ecg_id"]], dtype=bool)
    # Ray Data batches are read-only views: index (copies) rather than modify.
    return featurize({k: np.asarray(v)[keep] for k, v in batch.items()}, preset)


def build_datasets(cfg: TrainConfig, split_table: pd.DataFrame, wait: bool = True) -> dict[str, Any]:
    """The training inputs: ``{CACHED: CachedInputs}`` when they fit, else Ray Datasets 'train' and 'val'.

    ``wait``: return once the cached inputs are in the object store (their errors raise here);
    False returns at once, so the reads overlap the start of the Train workers.
    """
    from lvm_ray.ray_utils import read_ecg_dataset

    ids = {which: ids_in_split(split_table, which) for which in CACHED_SPLITS}
    if should_cache(cfg, sum(len(v) for v in ids.values())):
        cached = CachedInputs.submit(cfg, split_table)
        return {CACHED: cached.wait() if wait else cached}
    present = set(columns_present(cfg.data))
    columns = [c for c in input_columns(cfg.preset) if c in present]
    return {
        which: read_ecg_dataset(cfg.data, columns=columns).map_batches(
            _featurize_split,
            fn_kwargs={"ids": ids[which], "preset": cfg.preset},
            batch_format="numpy",
            batch_size=128,
        )
        for which in CACHED_SPLITS
    }


__all__ = [
    "CACHED",
    "CACHE_SHARE",
    "CachedInputs",
    "build_datasets",
    "read_tasks",
    "cached_input_bytes",
    "should_cache",
    "worker_tensors",
]
