"""The train stage: Ray Data streams the shards into a Ray Train TorchTrainer (DDP).

Layout of a run at ``RUN`` (a local path or an fsspec URL every worker can reach)::

    RUN/run.json        the run's configuration (TrainConfig), split summary, status, result
    RUN/split.parquet   ecg_id, patient_id, split ('train' / 'val' / 'test') of every usable ECG
    RUN/metrics.jsonl   one line of metrics per epoch (rewritten each epoch by rank 0)
    RUN/model.pt        the best model by validation loss (what ``score`` and ``serve`` load)
    RUN/test_metrics.json  the best model on the held-out test split (when there is one)
    RUN/ray/            Ray Train's storage: a checkpoint per epoch (weights, optimiser,
                        scheduler, best weights, history), used to resume

Splits are patient-disjoint: a stable hash of patient_id (no global pass needed), or the
values of an explicit split column (PTB-XL's strat_fold). Re-running the same command resumes
from the latest checkpoint; a killed worker is restarted from it (FailureConfig).

The pure helpers (:func:`train_epoch`, :func:`validate_epoch`, :func:`epoch_metrics`,
:class:`SplitSpec`) have no Ray and are shared with the single-process baseline in
``jobs/benchmark.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import posixpath
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import torch
from torch import nn

from lvm_ray import __version__, store
from lvm_ray.model import (
    MODEL_FILE,
    CheckpointError,
    build_model,
    check_payload,
    checkpoint_payload,
    read_payload,
    to_cpu,
    total_loss,
    unwrap,
    write_payload,
)
from lvm_ray.presets import (
    DEFAULT_PRESET,
    Preset,
    get_preset,
    lvh_labels,
    model_to_target,
    prepare_covariates,
    prepare_input,
    target_to_model,
)
from lvm_ray.schema import WAVEFORM_SHAPE

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_CODES: dict[str, int] = {name: i for i, name in enumerate(SPLITS)}
EXCLUDED = -1
RUN_FILE = "run.json"
SPLIT_FILE = "split.parquet"
METRICS_FILE = "metrics.jsonl"
TEST_METRICS_FILE = "test_metrics.json"
RAY_DIR = "ray"
FAULT_MARKER = "_fault_injected"
#: Columns the model inputs, labels and covariates may draw on (those present are read).
_LABEL_SOURCES = ("lv_mass_g", "bsa_m2", "sex", "height_cm", "weight_kg", "age", "bmi")


class TrainError(RuntimeError):
    """A run cannot start or resume (bad target, mismatched run directory, failed workers)."""


# --- splits ---------------------------------------------------------------------------------------


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
            raise ValueError("test_fraction must be in [0, 1) and val_fraction in (0, 1)")
        if self.column is not None and not self.val_values:
            raise ValueError(f"split column {self.column!r} needs val_values (e.g. --val-values 8)")
        object.__setattr__(self, "val_values", tuple(_canon(v) for v in self.val_values))
        object.__setattr__(self, "test_values", tuple(_canon(v) for v in self.test_values))
        if self.train_values is not None:
            object.__setattr__(self, "train_values", tuple(_canon(v) for v in self.train_values))

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
            raise TrainError(f"split column {self.column!r} is not in the dataset")
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


# --- configuration and results --------------------------------------------------------------------


@dataclass(frozen=True)
class FaultInjection:
    """Testing aid: SIGKILL the worker of ``rank`` once, after ``after_batches`` batches of ``epoch``."""

    epoch: int
    rank: int = 1
    after_batches: int = 2


@dataclass(frozen=True)
class TrainConfig:
    """One training run, fully resolved (what run.json records and the workers receive)."""

    data: str
    run: str
    preset: Preset
    split: SplitSpec = field(default_factory=SplitSpec)
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_epochs: int = 30
    #: Global batch size (split across workers).
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    plateau_patience: int = 3
    plateau_factor: float = 0.5
    early_stopping_patience: int = 6
    seed: int = 0
    max_failures: int = 3
    #: Materialise the preprocessed inputs in the object store after the first pass (small data).
    cache_inputs: bool = False
    placement_strategy: str = "PACK"
    #: Rows of the per-worker local shuffle buffer (streamed shards arrive in manifest order).
    shuffle_buffer: int = 1024
    fault: FaultInjection | None = None

    @property
    def per_worker_batch(self) -> int:
        return max(1, self.batch_size // self.num_workers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preset"] = self.preset.to_dict()
        return d

    def identity(self) -> dict[str, Any]:
        """What must match for a re-run to resume this run (not epochs, workers or resources)."""
        return {
            "data": self.data,
            "preset": self.preset.to_dict(),
            "split": dataclasses.asdict(self.split),
            "batch_size": self.batch_size,
            "seed": self.seed,
        }


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
    train_samples_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- run directory helpers --------------------------------------------------------------------------


def _url(run: str, name: str) -> str:
    return store.join_url(run, name)


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def _storage(run: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train under RUN/ray, for a path or any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(run)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return os.path.abspath(path), None
    import pyarrow.fs as pafs

    return path.rstrip("/"), pafs.PyFileSystem(pafs.FSSpecHandler(fs))


# --- pure training helpers (no Ray) ---------------------------------------------------------------


def featurize(batch: Mapping[str, Any], preset: Preset) -> dict[str, np.ndarray]:
    """A batch of shard rows (numpy columns) -> model inputs: x, cov (if any), y, lvh."""
    n = len(batch["ecg"])
    ecg = np.asarray(batch["ecg"]).reshape(n, *WAVEFORM_SHAPE)
    if n == 0:
        x = np.zeros((0, *preset.input.shape), dtype=np.float32)
    else:
        x = prepare_input(ecg, preset)
    out: dict[str, np.ndarray] = {"x": x}
    if preset.covariates:
        out["cov"] = prepare_covariates(batch, n, preset)
    out["y"] = target_to_model(np.asarray(batch[preset.target.column]), preset)
    out["lvh"] = lvh_labels(batch, n) if preset.lvh_head else np.full(n, -1, dtype=np.int64)
    return out


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)).to(device) for k, v in batch.items()}


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA, a no-op elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    n: int = 0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.n if self.n else float("nan")


def train_epoch(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer,
    preset: Preset,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> EpochStats:
    """One pass over the training batches (dicts with x, y, lvh and maybe cov)."""
    model.train()
    stats = EpochStats()
    start = time.perf_counter()
    for i, raw in enumerate(batches):
        batch = _to_device(raw, device)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            output = model(batch["x"], batch.get("cov"))
            loss = total_loss(preset, output, batch["y"], batch.get("lvh"))
        loss.backward()
        optimizer.step()
        n = int(batch["y"].shape[0])
        stats.loss_sum += float(loss.detach()) * n
        stats.n += n
        if on_batch is not None:
            on_batch(i)
    stats.seconds = time.perf_counter() - start
    return stats


@dataclass
class Predictions:
    """Validation outputs of one process: summed loss and per-row model outputs and labels."""

    loss_sum: float = 0.0
    n: int = 0
    main: list[np.ndarray] = field(default_factory=list)
    y: list[np.ndarray] = field(default_factory=list)
    lvh_prob: list[np.ndarray] = field(default_factory=list)
    lvh: list[np.ndarray] = field(default_factory=list)

    def arrays(self) -> dict[str, np.ndarray]:
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
        return {"main": cat(self.main), "y": cat(self.y), "lvh_prob": cat(self.lvh_prob), "lvh": cat(self.lvh)}


@torch.no_grad()
def validate_epoch(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], preset: Preset, device: torch.device
) -> Predictions:
    """Loss and outputs over validation batches (no gradient, eval mode)."""
    model.eval()
    out = Predictions()
    for raw in batches:
        batch = _to_device(raw, device)
        with _autocast(device):
            output = model(batch["x"], batch.get("cov"))
            loss = total_loss(preset, output, batch["y"], batch.get("lvh"))
        n = int(batch["y"].shape[0])
        out.loss_sum += float(loss) * n
        out.n += n
        out.main.append(output.main.float().cpu().numpy())
        out.y.append(batch["y"].float().cpu().numpy())
        if output.lvh_logits is not None:
            out.lvh_prob.append(torch.softmax(output.lvh_logits.float(), dim=1)[:, 1].cpu().numpy())
            out.lvh.append(batch["lvh"].cpu().numpy())
    return out


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties averaged); NaN when one class is absent."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(np.asarray(scores, dtype=float)).rank().to_numpy()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def epoch_metrics(preset: Preset, main: np.ndarray, y: np.ndarray, lvh_prob: np.ndarray, lvh: np.ndarray) -> dict:
    """Readable metrics of model outputs against labels (target units / AUROC)."""
    metrics: dict[str, float] = {"n": int(len(y))}
    if not len(y):
        return metrics
    if preset.target.task == "binary":
        metrics["auroc"] = auroc(y > 0.5, main)
        prob = model_to_target(main, preset)
        metrics["accuracy"] = float(((prob > 0.5) == (y > 0.5)).mean())
    else:
        pred, true = model_to_target(main, preset), model_to_target(y, preset)
        metrics["mae"] = float(np.abs(pred - true).mean())
        metrics["pearson_r"] = float(np.corrcoef(pred, true)[0, 1]) if len(y) > 2 and np.std(pred) > 0 else float("nan")
    if len(lvh_prob):
        known = lvh >= 0
        metrics["lvh_auroc"] = auroc(lvh[known] == 1, lvh_prob[known])
    return metrics


# --- the worker loop ------------------------------------------------------------------------------


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _write_text(url: str, text: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(text)


def _maybe_inject_fault(cfg: TrainConfig, epoch: int, rank: int) -> Callable[[int], None] | None:
    fault = cfg.fault
    if fault is None or fault.epoch != epoch or fault.rank != rank:
        return None
    marker = _url(cfg.run, FAULT_MARKER)

    def hook(batch_index: int) -> None:
        if batch_index + 1 >= fault.after_batches and not _exists(marker):
            _wait_for_committed_checkpoint(cfg.run, epoch - 1)
            _write_text(marker, f"killed rank {rank} in epoch {epoch}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _wait_for_committed_checkpoint(run: str, epoch: int, timeout_s: float = 60.0) -> None:
    """Fault injection: wait until Ray Train's controller has registered the checkpoint of ``epoch``.

    The controller collects reports by polling the workers, so a worker killed right after
    ``report`` may take its last checkpoint with it; the test wants a deterministic resume point.
    """
    url = store.join_url(run, RAY_DIR, "checkpoint_manager_snapshot.json")
    deadline = time.monotonic() + timeout_s
    while epoch > 0 and time.monotonic() < deadline:
        try:
            latest = store.read_json(url).get("latest_checkpoint_result") or {}
            if int(latest.get("metrics", {}).get("epoch", 0)) >= epoch:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.5)


def train_func(config: dict[str, Any]) -> None:
    """Ray Train worker loop: resume, then per epoch train, validate, checkpoint, report."""
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = config["config"]
    preset = cfg.preset
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed + rank)

    model = build_model(preset)
    optimizer = torch.optim.RAdam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
    )
    state: dict[str, Any] = {
        "epoch": 0,
        "best_val_loss": float("inf"),
        "best_epoch": 0,
        "best_state": None,
        "best_metrics": {},
        "bad_epochs": 0,
        "history": [],
        "resumed_from": [],
        "finished": False,
        "worker_nodes": [],
    }
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            payload = read_payload(os.path.join(directory, MODEL_FILE))
        check_payload(payload, preset)
        model.load_state_dict(payload["model_state"])
        saved = payload["training_state"]
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state.update({k: saved[k] for k in state if k in saved})
        state["resumed_from"] = [*state["resumed_from"], int(state["epoch"])]
        if rank == 0:
            print(f"[lvm-ray train] resuming {cfg.run} after epoch {state['epoch']}", flush=True)
    if state["epoch"] >= cfg.max_epochs or state["bad_epochs"] >= cfg.early_stopping_patience:
        return  # finished before: nothing to resume
    state["worker_nodes"] = [str(n) for n in _all_gather(_node_id())]

    model = ray.train.torch.prepare_model(model)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    batch_size = cfg.per_worker_batch

    for epoch in range(int(state["epoch"]) + 1, cfg.max_epochs + 1):
        start = time.perf_counter()
        stats = train_epoch(
            model,
            train_shard.iter_torch_batches(
                batch_size=batch_size, local_shuffle_buffer_size=cfg.shuffle_buffer or None, drop_last=False
            ),
            optimizer,
            preset,
            device,
            on_batch=_maybe_inject_fault(cfg, epoch, rank),
        )
        preds = validate_epoch(model, val_shard.iter_torch_batches(batch_size=batch_size), preset, device)
        gathered = _all_gather((stats.loss_sum, stats.n, preds.loss_sum, preds.n, preds.arrays()))
        train_n = sum(g[1] for g in gathered)
        val_n = sum(g[3] for g in gathered)
        train_loss = sum(g[0] for g in gathered) / max(train_n, 1)
        val_loss = sum(g[2] for g in gathered) / max(val_n, 1)
        parts = [g[4] for g in gathered]
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        val_metrics = epoch_metrics(preset, merged["main"], merged["y"], merged["lvh_prob"], merged["lvh"])
        scheduler.step(val_loss)
        improved = val_loss < state["best_val_loss"]
        if improved:
            state.update(
                best_val_loss=val_loss,
                best_epoch=epoch,
                best_state=to_cpu(unwrap(model).state_dict()),
                best_metrics=val_metrics,
                bad_epochs=0,
            )
        else:
            state["bad_epochs"] += 1
        seconds = time.perf_counter() - start
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            **{f"val_{k}": v for k, v in val_metrics.items()},
            "lr": optimizer.param_groups[0]["lr"],
            "best_epoch": state["best_epoch"],
            "train_samples": train_n,
            "epoch_s": seconds,
            "train_samples_per_s": train_n / max(stats.seconds, 1e-9),
            "time": time.time(),
        }
        state["history"] = [*state["history"], record]
        state["epoch"] = epoch
        stop = state["bad_epochs"] >= cfg.early_stopping_patience
        state["finished"] = stop or epoch >= cfg.max_epochs
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        metrics["finished"] = bool(state["finished"])
        if rank == 0:
            _write_text(_url(cfg.run, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in state["history"]))
            shown = val_metrics.get("pearson_r", val_metrics.get("auroc", float("nan")))
            label = "r" if preset.target.task == "regression" else "auroc"
            print(
                f"[lvm-ray train] epoch {epoch}/{cfg.max_epochs} train_loss={train_loss:.4f} "
                f"val_loss={val_loss:.4f} val_{label}={shown:.3f} lr={record['lr']:.2g} "
                f"{'*' if improved else ' '} {seconds:.1f}s",
                flush=True,
            )
            training_state = {
                "optimizer": to_cpu(optimizer.state_dict()),
                "scheduler": scheduler.state_dict(),
                **state,
            }
            with tempfile.TemporaryDirectory() as tmp:
                write_payload(
                    os.path.join(tmp, MODEL_FILE),
                    checkpoint_payload(
                        model,
                        preset,
                        epoch=epoch,
                        metrics=metrics,
                        split=dataclasses.asdict(cfg.split),
                        training_state=training_state,
                    ),
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
        if stop:
            break


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


# --- the driver -----------------------------------------------------------------------------------


def _columns_present(data: str) -> list[str]:
    return [c["name"] for c in store.read_manifest(data)["columns"]]


def _index_pass(cfg_data: str, target: str, split: SplitSpec) -> pd.DataFrame:
    """ecg_id, patient_id, split and the target of every row, reading only scalar columns."""
    present = set(_columns_present(cfg_data))
    if target not in present:
        raise TrainError(f"target column {target!r} is not in {cfg_data}; columns: {', '.join(sorted(present))}")
    if split.column is not None and split.column not in present:
        raise TrainError(f"split column {split.column!r} is not in {cfg_data}")
    columns = [c for c in dict.fromkeys(["ecg_id", "patient_id", target, split.column]) if c and c in present]
    frames = []
    for table in store.iter_shards(cfg_data, columns=columns):
        frame = table.to_pandas()
        frame["split"] = split.assign(
            frame.get("patient_id", pd.Series([None] * len(frame))).tolist(),
            frame["ecg_id"].tolist(),
            frame[split.column].tolist() if split.column else None,
        )
        frames.append(frame)
    index = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*columns, "split"])
    return index


def keep_mask(batch: Mapping[str, Any], split: SplitSpec, target: str, which: str) -> np.ndarray:
    """Rows of a batch in split ``which`` whose target is known."""
    codes = split.assign(
        list(batch["patient_id"]) if "patient_id" in batch else [None] * len(batch["ecg_id"]),
        list(batch["ecg_id"]),
        list(batch[split.column]) if split.column else None,
    )
    values = pd.to_numeric(pd.Series(np.asarray(batch[target], dtype=object)), errors="coerce")
    return (codes == SPLIT_CODES[which]) & values.notna().to_numpy()


def _featurize_split(batch: dict[str, np.ndarray], cfg: TrainConfig, which: str) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: keep one split's labelled rows, build model inputs."""
    keep = keep_mask(batch, cfg.split, cfg.preset.target.column, which)
    # Ray Data batches are read-only views: index (copies) rather than modify.
    return featurize({k: np.asarray(v)[keep] for k, v in batch.items()}, cfg.preset)


def build_datasets(cfg: TrainConfig) -> dict[str, Any]:
    """Ray Datasets 'train' and 'val' of model inputs, streamed from the shards."""
    from lvm_ray.ray_utils import read_ecg_dataset

    present = set(_columns_present(cfg.data))
    wanted = ["ecg_id", "patient_id", "ecg", cfg.preset.target.column, cfg.split.column, *_LABEL_SOURCES]
    wanted += [c.name for c in cfg.preset.covariates]
    columns = [c for c in dict.fromkeys(wanted) if c and c in present]
    datasets = {}
    for which in ("train", "val"):
        ds = read_ecg_dataset(cfg.data, columns=columns).map_batches(
            _featurize_split, fn_kwargs={"cfg": cfg, "which": which}, batch_format="numpy", batch_size=128
        )
        if cfg.cache_inputs:
            ds = ds.materialize()
            if which == "train":  # cheap on materialised blocks; streaming relies on the shuffle buffer
                ds = ds.randomize_block_order()
        datasets[which] = ds
    return datasets


def _resolve_target(preset: Preset, target: str | None, task: str | None, index: pd.DataFrame) -> Preset:
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
    """Resolve a TrainConfig from a preset and overrides (target statistics from ``index``)."""
    base = get_preset(preset)
    split = split or SplitSpec()
    if target is not None and target != base.target.column:
        if index is None:
            raise TrainError("a retargeted preset needs the index pass")
        base = _resolve_target(base, target, task, index)
    o = base.optim
    return TrainConfig(
        data=data,
        run=run,
        preset=base,
        split=split,
        num_workers=num_workers,
        use_gpu=use_gpu,
        max_epochs=max_epochs or o.max_epochs,
        batch_size=batch_size or o.batch_size,
        lr=lr or o.lr,
        weight_decay=overrides.pop("weight_decay", o.weight_decay),
        plateau_patience=overrides.pop("plateau_patience", o.plateau_patience),
        plateau_factor=overrides.pop("plateau_factor", o.plateau_factor),
        early_stopping_patience=overrides.pop("early_stopping_patience", o.early_stopping_patience),
        **overrides,
    )


def build_trainer(cfg: TrainConfig, datasets: Mapping[str, Any]) -> Any:
    """The TorchTrainer: ScalingConfig from the config, storage under RUN/ray, FailureConfig."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage_path, storage_fs = _storage(cfg.run)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_func,
        train_loop_config={"config": cfg},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            name=RAY_DIR,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=dict(datasets),
    )


def _gpus_available() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def _load_run_record(run: str) -> dict[str, Any] | None:
    url = _url(run, RUN_FILE)
    return store.read_json(url) if _exists(url) else None


def train(
    data: str,
    run: str,
    preset: str = DEFAULT_PRESET,
    target: str | None = None,
    num_workers: int = 2,
    use_gpu: bool = False,
    max_epochs: int | None = None,
    address: str | None = None,
    *,
    task: str | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    split_column: str | None = None,
    val_values: Sequence[str] = (),
    test_values: Sequence[str] = (),
    test_fraction: float = 0.2,
    val_fraction: float = 0.2,
    cpus_per_worker: float = 1.0,
    max_failures: int = 3,
    seed: int = 0,
    cache_inputs: bool = False,
    evaluate_test: bool = True,
    overwrite: bool = False,
    placement_strategy: str = "PACK",
    fault: FaultInjection | None = None,
) -> TrainResult:
    """Train (or resume) a model on DATA into RUN with Ray Train; return the run's result.

    ``preset``: a name from :mod:`lvm_ray.presets`; ``target``: any numeric column (regression on
    its z-score) or 0/1 column (binary classification), default the preset's (lv_mass_g).
    ``split_column`` + ``val_values`` (+ ``test_values``) split by a column such as strat_fold;
    otherwise patients are hashed into test / val / train by the fractions. ``use_gpu`` falls
    back to CPU when the cluster has no GPU. Re-running the same command resumes the run;
    ``overwrite`` starts RUN over.
    """
    from lvm_ray.ray_utils import connect

    started = time.time()
    split = SplitSpec(
        column=split_column,
        val_values=tuple(str(v) for v in val_values),
        test_values=tuple(str(v) for v in test_values),
        test_fraction=0.0 if split_column else test_fraction,
        val_fraction=val_fraction,
    )
    base = get_preset(preset)
    if target is None:
        target = base.target.column
    index = _index_pass(data, target, split)
    cfg = make_config(
        data,
        run,
        base,
        target=target,
        task=task,
        num_workers=num_workers,
        use_gpu=use_gpu,
        max_epochs=max_epochs,
        batch_size=batch_size,
        lr=lr,
        split=split,
        index=index,
        cpus_per_worker=cpus_per_worker,
        max_failures=max_failures,
        seed=seed,
        cache_inputs=cache_inputs,
        placement_strategy=placement_strategy,
        fault=fault,
    )
    labelled = index[target].notna() if target in index else pd.Series(False, index=index.index)
    counts = {name: int(((index["split"] == code) & labelled).sum()) for name, code in SPLIT_CODES.items()}
    if counts["train"] == 0 or counts["val"] == 0:
        raise TrainError(f"need labelled rows in train and val splits, got {counts}")

    # Resume or start: run.json pins what the run is.
    fs, run_path = fsspec.core.url_to_fs(run)
    record = _load_run_record(run)
    if record is not None and overwrite:
        fs.rm(run_path, recursive=True)
        record = None
    if record is not None:
        if record.get("identity") != json.loads(json.dumps(cfg.identity(), default=str)):
            raise TrainError(
                f"{run} holds another run (different data, preset, target or split); "
                "pass overwrite=True / --overwrite to replace it or choose another --run"
            )
        done = record.get("status") == "finished" and record.get("result")
        if done and record["config"]["max_epochs"] >= cfg.max_epochs:
            log.info("run %s is already finished; returning its result", run)
            return TrainResult(**record["result"])
    fs.makedirs(run_path, exist_ok=True)
    index_out = index[["ecg_id", *[c for c in ("patient_id",) if c in index]]].copy()
    index_out["split"] = np.array(["excluded", *SPLITS])[index["split"].to_numpy().astype(int) + 1]
    store.write_table(_url(run, SPLIT_FILE), index_out)
    run_record = {
        "package_version": __version__,
        "status": "running",
        "started_unix": started,
        "config": cfg.to_dict(),
        "identity": cfg.identity(),
        "split_counts": counts,
        "split_file": SPLIT_FILE,
    }
    store.write_json(_url(run, RUN_FILE), run_record)

    connect(address)
    if cfg.use_gpu and _gpus_available() < 1:
        log.warning("--use-gpu asked for but the cluster has no GPU: training on CPUs")
        print("[lvm-ray train] no GPU in the cluster: falling back to CPU workers", flush=True)
        cfg = dataclasses.replace(cfg, use_gpu=False)
    datasets = build_datasets(cfg)
    try:
        result = build_trainer(cfg, datasets).fit()
        error = result.error
    except Exception as exc:  # ray.train.TrainingFailedError: workers failed more than max_failures
        error = exc
    if error is not None:
        store.write_json(_url(run, RUN_FILE), {**run_record, "status": "failed", "error": str(error)[-4000:]})
        raise TrainError(f"training failed (re-run the same command to resume): {error}") from error
    if result.checkpoint is None:
        raise TrainError("training produced no checkpoint")
    with result.checkpoint.as_directory() as directory:
        payload = read_payload(os.path.join(directory, MODEL_FILE))
    state = payload["training_state"]
    best = build_model(cfg.preset)
    best.load_state_dict(state["best_state"] or payload["model_state"])
    model_url = _url(run, MODEL_FILE)
    write_payload(
        model_url,
        checkpoint_payload(
            best,
            cfg.preset,
            epoch=int(state["best_epoch"]),
            metrics=state["best_metrics"],
            split={**dataclasses.asdict(cfg.split), "counts": counts},
            training_state={"best_val_loss": state["best_val_loss"], "history": state["history"]},
        ),
    )
    _write_text(_url(run, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in state["history"]))
    test_metrics = None
    if evaluate_test and counts["test"] > 0:
        test_metrics = evaluate_run(run, data, which="test")
        store.write_json(_url(run, TEST_METRICS_FILE), test_metrics)
    rates = [h["train_samples_per_s"] for h in state["history"] if "train_samples_per_s" in h]
    train_result = TrainResult(
        run=run,
        model_path=model_url,
        preset=cfg.preset.name,
        target=cfg.preset.target.column,
        task=cfg.preset.target.task,
        epochs_run=int(state["epoch"]),
        best_epoch=int(state["best_epoch"]),
        best_val_loss=float(state["best_val_loss"]),
        val_metrics=dict(state["best_metrics"]),
        test_metrics=test_metrics,
        split_counts=counts,
        resumed_from=[int(e) for e in state["resumed_from"]],
        worker_nodes=list(state.get("worker_nodes", [])),
        wall_s=time.time() - started,
        train_samples_per_s=float(np.median(rates)) * cfg.num_workers if rates else None,
    )
    store.write_json(
        _url(run, RUN_FILE),
        {**run_record, "status": "finished", "finished_unix": time.time(), "result": train_result.to_dict()},
    )
    return train_result


# --- evaluation of a run on one of its splits -------------------------------------------------------


class _Predictor:
    """Ray Data actor: load RUN/model.pt once, predict batches of one split."""

    def __init__(self, run: str, split: SplitSpec, which: str) -> None:
        from lvm_ray.model import load_checkpoint

        torch.set_num_threads(1)
        self.loaded = load_checkpoint(run)
        self.split, self.which = split, which

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        preset = self.loaded.preset
        keep = keep_mask(batch, self.split, preset.target.column, self.which)
        feats = featurize({k: np.asarray(v)[keep] for k, v in batch.items()}, preset)
        with torch.no_grad():
            out = self.loaded.model(
                torch.from_numpy(feats["x"]), torch.from_numpy(feats["cov"]) if "cov" in feats else None
            )
        lvh_prob = (
            torch.softmax(out.lvh_logits, 1)[:, 1].numpy() if out.lvh_logits is not None else np.full(keep.sum(), -1.0)
        )
        return {"main": out.main.numpy(), "y": feats["y"], "lvh_prob": lvh_prob, "lvh": feats["lvh"]}


def evaluate_run(run: str, data: str, which: str = "test", address: str | None = None) -> dict[str, Any]:
    """Metrics of RUN's best model on one of its splits (scalars only travel to the driver)."""
    import ray.data

    from lvm_ray.ray_utils import connect, read_ecg_dataset

    connect(address)
    record = _load_run_record(run)
    if record is None:
        raise TrainError(f"no run at {run}")
    split_d = dict(record["config"]["split"])
    for key in ("val_values", "test_values"):
        split_d[key] = tuple(split_d[key])
    if split_d.get("train_values") is not None:
        split_d["train_values"] = tuple(split_d["train_values"])
    split = SplitSpec(**split_d)
    preset = Preset.from_dict(read_payload(_url(run, MODEL_FILE))["preset"])
    present = set(_columns_present(data))
    wanted = ["ecg_id", "patient_id", "ecg", preset.target.column, split.column, *_LABEL_SOURCES]
    wanted += [c.name for c in preset.covariates]
    columns = [c for c in dict.fromkeys(wanted) if c and c in present]
    ds = read_ecg_dataset(data, columns=columns).map_batches(
        _Predictor,
        fn_constructor_args=(run, split, which),
        batch_format="numpy",
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
    )
    parts: dict[str, list[np.ndarray]] = {"main": [], "y": [], "lvh_prob": [], "lvh": []}
    for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        for key in parts:
            parts[key].append(np.asarray(batch[key]))
    arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    lvh_prob = arrays["lvh_prob"] if preset.lvh_head else np.zeros(0)
    metrics = epoch_metrics(preset, arrays["main"], arrays["y"], lvh_prob, arrays["lvh"])
    return {"split": which, **metrics}


__all__ = [
    "CheckpointError",
    "EpochStats",
    "FaultInjection",
    "Predictions",
    "SplitSpec",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "build_datasets",
    "build_trainer",
    "epoch_metrics",
    "evaluate_run",
    "featurize",
    "make_config",
    "train",
    "train_epoch",
    "train_func",
    "validate_epoch",
]
