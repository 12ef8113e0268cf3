"""A training run's folder and records (no Ray): layout, configuration, result, index pass.

Layout of a run at ``RUN`` (a local path or an fsspec URL every worker can reach)::

    RUN/run.json        the run's configuration (TrainConfig), split summary, status, result
    RUN/split.parquet   ecg_id, patient_id, split ('train' / 'val' / 'test' / 'excluded'), labelled
    RUN/metrics.jsonl   one line of metrics per epoch (rewritten each epoch by rank 0)
    RUN/model.pt        the best model by validation loss (what ``score`` and ``serve`` load)
    RUN/test_metrics.json  the best model on the held-out test split (when there is one)
    RUN/ray/            Ray Train's storage: a checkpoint per epoch, used to resume
    RUN/members/<i>/    an ensemble's members, each a run folder like this one (``lvm_ray.ensemble``)

The split of every row is assigned once (:func:`index_pass`) and written to split.parquet;
the training datasets and the test evaluation read it. See docs/architecture.md, "Run folder".
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from lvm_ray import store
from lvm_ray.model import MODEL_FILE
from lvm_ray.presets import DEFAULT_PRESET, Preset, get_preset
from lvm_ray.splits import SPLIT_CODES, SplitSpec, labelled

RUN_FILE = "run.json"
SPLIT_FILE = "split.parquet"
METRICS_FILE = "metrics.jsonl"
TEST_METRICS_FILE = "test_metrics.json"
RAY_DIR = "ray"
FAULT_MARKER = "_fault_injected"
#: An ensemble run's members, each a run folder of its own: RUN/members/<i> (``lvm_ray.ensemble``).
MEMBERS_DIR = "members"
#: Everything a run writes: the only names ``--overwrite`` removes from RUN.
RUN_OUTPUTS = (
    RUN_FILE,
    SPLIT_FILE,
    METRICS_FILE,
    MODEL_FILE,
    TEST_METRICS_FILE,
    RAY_DIR,
    FAULT_MARKER,
    MEMBERS_DIR,
    "model_card.md",
    "model_card.json",
)


class TrainError(RuntimeError):
    """A run cannot start or resume (bad target, mismatched run directory, failed workers)."""


def run_url(run: str, name: str) -> str:
    """A file of the run folder (any URL)."""
    return store.join_url(run, name)


@dataclass(frozen=True)
class FaultInjection:
    """Testing aid: SIGKILL the worker of ``rank`` once, after ``after_batches`` batches of ``epoch``."""

    epoch: int
    rank: int = 1
    after_batches: int = 2


@dataclass(frozen=True)
class TrainConfig:
    """One training run, fully resolved (what run.json records and the workers receive).

    The optimiser and schedule are the preset's ``optim`` with any overrides applied, so the
    checkpoint's preset always records the learning rate, batch and schedule actually used:
    ``optim.batch_size`` is the batch of each worker (the global batch is that times
    ``num_workers``) and ``optim.lr`` the learning rate after :func:`scaled_lr`.
    """

    data: str
    run: str
    preset: Preset
    split: SplitSpec = field(default_factory=SplitSpec)
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    seed: int = 0
    max_failures: int = 3
    #: Keep the preprocessed inputs in the object store (one read of the shards for all epochs):
    #: True / False, or None to decide by size (under a quarter of the object store).
    cache_inputs: bool | None = None
    placement_strategy: str = "PACK"
    #: Rows of the per-worker local shuffle buffer (streamed shards arrive in manifest order).
    shuffle_buffer: int = 1024
    fault: FaultInjection | None = None
    #: How ``preset.optim.lr`` was set (:func:`make_config`): 'sqrt' (the preset's learning rate
    #: scaled by :func:`scaled_lr`), 'given' (an explicit lr, used as is) or 'none' (as built).
    lr_scaling: str = "none"
    #: The batch and learning rate the preset was tuned with (one worker); None: as built.
    reference_batch: int | None = None
    reference_lr: float | None = None

    @property
    def max_epochs(self) -> int:
        return self.preset.optim.max_epochs

    @property
    def per_worker_batch(self) -> int:
        """The preset's batch is per worker (each GPU gets a full batch)."""
        return self.preset.optim.batch_size

    @property
    def global_batch(self) -> int:
        """ECGs per optimiser step over all workers (DDP averages their gradients)."""
        return self.per_worker_batch * self.num_workers

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preset"] = self.preset.to_dict()
        d["per_worker_batch"], d["global_batch"] = self.per_worker_batch, self.global_batch
        return d

    def identity(self) -> dict[str, Any]:
        """What must match for a re-run to resume this run (not epochs, workers or resources).

        The optimisation is the global batch and the learning rate: a run may resume on another
        number of workers when ``--batch-size`` keeps the global batch (e.g. 16 x 64 for 32 x 32).
        """
        preset = self.preset.to_dict()
        preset["optim"] = {k: v for k, v in preset["optim"].items() if k not in ("max_epochs", "batch_size")}
        return {
            "data": self.data,
            "preset": preset,
            "global_batch": self.global_batch,
            "split": dataclasses.asdict(self.split),
            "seed": self.seed,
        }


def scaled_lr(reference_lr: float, global_batch: int, reference_batch: int) -> float:
    """The learning rate for ``global_batch``: square-root scaling, ``lr x sqrt(global / reference)``.

    RAdam is an Adam-family optimiser: its per-parameter step is normalised by the gradient's
    second moment, so the step grows with the learning rate, not with the batch, and the
    variance-matching rule for such optimisers is square-root scaling (Malladi et al., NeurIPS
    2022; Hoffer et al., 2017). Linear scaling (Goyal et al., 2017) is derived for SGD and would
    multiply the rate by 32 on 32 workers. RAdam's rectification damps the first steps itself
    (the job of the warm-up that linear scaling needs), so no separate warm-up is added. One
    worker at the preset's batch gets the preset's learning rate exactly.
    """
    if global_batch < 1 or reference_batch < 1:
        raise TrainError(f"batch sizes must be positive, got global {global_batch}, reference {reference_batch}")
    return reference_lr * math.sqrt(global_batch / reference_batch)


@dataclass
class TrainResult:
    """What a finished run reports (also in RUN/run.json)."""

    run: str
    model_path: str
    preset: str
    target: str
    task: str
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    val_metrics: dict[str, float]
    test_metrics: dict[str, float] | None
    split_counts: dict[str, int]
    resumed_from: list[int]
    worker_nodes: list[str]
    wall_s: float
    #: ECGs per second of the training loop over all workers (the median epoch).
    train_samples_per_s: float | None = None
    #: Seconds from the start of ``train`` to the first training batch (None when resumed).
    startup_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def history_text(history: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in history)


def columns_present(data: str) -> list[str]:
    return [c["name"] for c in store.read_manifest(data)["columns"]]


def index_pass(data: str, target: str, split: SplitSpec) -> pd.DataFrame:
    """ecg_id, patient_id, target, split code and 'labelled' of every row (scalar columns only)."""
    present = set(columns_present(data))
    if target not in present:
        raise TrainError(f"target column {target!r} is not in {data}; columns: {', '.join(sorted(present))}")
    if split.column is not None and split.column not in present:
        raise TrainError(f"split column {split.column!r} is not in {data}")
    columns = [c for c in dict.fromkeys(["ecg_id", "patient_id", target, split.column]) if c and c in present]
    frames = []
    for table in store.iter_shards(data, columns=columns):
        frame = table.to_pandas()
        frame["split"] = split.assign_frame(frame)
        frames.append(frame)
    index = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*columns, "split"])
    index["labelled"] = labelled(index[target]) if len(index) else np.zeros(0, dtype=bool)
    return index


def resolve_target(preset: Preset, target: str | None, task: str | None, index: pd.DataFrame) -> Preset:
    """Retarget the preset at ``target``: binary when its values are 0/1 (or task says so), else z-scored."""
    if target is None or target == preset.target.column:
        return preset
    train_values = index.loc[index["split"] == SPLIT_CODES["train"], target]
    values = (
        pd.to_numeric(train_values.map(lambda v: float(v) if isinstance(v, (bool, np.bool_)) else v), errors="coerce")
        .dropna()
        .to_numpy(dtype=float)
    )
    if len(values) < 2:
        raise TrainError(f"target column {target!r} has fewer than 2 numeric training values")
    inferred = "binary" if set(np.unique(values)) <= {0.0, 1.0} else "regression"
    task = task or inferred
    if task == "binary":
        if inferred != "binary":
            raise TrainError(f"target column {target!r} is not binary (values other than 0/1)")
        prevalence = float(values.mean())
        if not 0.0 < prevalence < 1.0:
            raise TrainError(f"binary target {target!r} has only one class in the training split")
        return preset.with_target(target, task="binary", pos_weight=1.0)
    return preset.with_target(target, task="regression", mean=float(values.mean()), sd=float(values.std() or 1.0))


def make_config(
    data: str,
    run: str,
    preset: str | Preset = DEFAULT_PRESET,
    target: str | None = None,
    task: str | None = None,
    num_workers: int = 2,
    use_gpu: bool = False,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    split: SplitSpec | None = None,
    index: pd.DataFrame | None = None,
    **overrides: Any,
) -> TrainConfig:
    """Resolve a TrainConfig from a preset and overrides (target statistics from ``index``).

    Optimiser overrides (``lr``, ``batch_size``, ``max_epochs``, ``weight_decay``,
    ``plateau_patience``, ``plateau_factor``, ``early_stopping_patience``) are applied to the
    preset's OptimSpec; the rest are TrainConfig fields. ``batch_size`` is per worker (default
    the preset's); without an explicit ``lr`` the preset's learning rate is scaled to the global
    batch (``batch_size x num_workers``) by :func:`scaled_lr`, against the preset's own batch.
    """
    base = get_preset(preset)
    split = split or SplitSpec()
    if target is not None and target != base.target.column:
        if index is None:
            raise TrainError("a retargeted preset needs the index pass")
        base = resolve_target(base, target, task, index)
    optim_fields = {f.name for f in dataclasses.fields(base.optim)}
    optim_overrides = {k: overrides.pop(k) for k in list(overrides) if k in optim_fields}
    optim_overrides.update({k: v for k, v in (("lr", lr), ("batch_size", batch_size), ("max_epochs", max_epochs)) if v})
    reference_batch, reference_lr = base.optim.batch_size, base.optim.lr
    global_batch = optim_overrides.get("batch_size", reference_batch) * num_workers
    given = "lr" in optim_overrides
    if not given:
        optim_overrides["lr"] = scaled_lr(reference_lr, global_batch, reference_batch)
    base = dataclasses.replace(base, optim=dataclasses.replace(base.optim, **optim_overrides))
    return TrainConfig(
        data=data,
        run=run,
        preset=base,
        split=split,
        num_workers=num_workers,
        use_gpu=use_gpu,
        lr_scaling="given" if given else "sqrt",
        reference_batch=reference_batch,
        reference_lr=reference_lr,
        **overrides,
    )


def load_run_record(run: str) -> dict[str, Any] | None:
    url = run_url(run, RUN_FILE)
    return store.read_json(url) if store.exists(url) else None


def remove_run_outputs(run: str) -> None:
    """Remove what a run wrote (RUN_OUTPUTS) and nothing else: user files in RUN stay."""
    fs, path = store.filesystem(run)
    for name in RUN_OUTPUTS:
        target = store.join_url(path, name)
        if fs.exists(target):
            fs.rm(target, recursive=True)


def check_run_folder(run: str) -> None:
    """Refuse a RUN that holds a dataset or files that are not a run's (never mix or delete them)."""
    fs, path = store.filesystem(run)
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise TrainError(f"--run {run} is a file, not a folder")
    if store.dataset_exists(run):
        raise TrainError(f"--run {run} holds a dataset; choose another folder for the run")
    foreign = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    foreign = [n for n in foreign if n not in RUN_OUTPUTS and not n.startswith(".")]
    if foreign and not fs.exists(store.join_url(path, RUN_FILE)):
        shown = ", ".join(sorted(foreign)[:3]) + (" ..." if len(foreign) > 3 else "")
        raise TrainError(f"--run {run} is a non-empty folder that is not an lvm-ray run ({shown}); choose another")
