"""The train stage: Ray Data streams the shards into a Ray Train TorchTrainer (DDP).

Only the Ray parts live here: the worker loop (:func:`train_func`), the trainer builder
(:func:`build_trainer`), the driver (:func:`train`) and the evaluation of a run on one of its
splits (:func:`evaluate_run`, through the one prediction path, ``lvm_ray.predict.Predictor``).
The run folder and its records are ``lvm_ray.runs``, splits ``lvm_ray.splits``, the pure epoch
helpers ``lvm_ray.fitting``. Re-running the same command resumes from the latest checkpoint; a
killed worker is restarted from it (FailureConfig).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from lvm_ray import __version__, store
from lvm_ray.fitting import (
    epoch_metrics,
    make_optimizer,
    make_scheduler,
    memory_batches,
    selection_score,
    shuffled_order,
    step_scheduler,
    target_metrics,
    train_epoch,
    validate_epoch,
)
from lvm_ray.inputs import input_columns
from lvm_ray.lvh import derive
from lvm_ray.machine import local_cores
from lvm_ray.model import (
    MODEL_FILE,
    CheckpointError,
    build_model,
    check_payload,
    checkpoint_payload,
    read_payload,
    to_cpu,
    unwrap,
    write_payload,
)
from lvm_ray.presets import DEFAULT_PRESET, Preset, get_preset, lvh_labels
from lvm_ray.progress import EpochPrinter
from lvm_ray.runs import (
    FAULT_MARKER,
    METRICS_FILE,
    RAY_DIR,
    RUN_FILE,
    RUN_OUTPUTS,
    SPLIT_FILE,
    TEST_METRICS_FILE,
    FaultInjection,
    TrainConfig,
    TrainError,
    TrainResult,
    check_run_folder,
    columns_present,
    history_text,
    index_pass,
    load_run_record,
    make_config,
    remove_run_outputs,
)
from lvm_ray.signals import normalise_sex
from lvm_ray.splits import SPLIT_CODES, SPLITS, SplitError, SplitSpec, ids_in_split, split_names
from lvm_ray.train_inputs import CACHED, CachedInputs, build_datasets, worker_tensors

log = logging.getLogger(__name__)

#: Validation batch of cached inputs (eval-mode batch norm: the batch does not change the outputs).
VAL_BATCH = 256
#: Ray Train V2's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s, declared
#: in ray/train/v2/_internal/constants.py), so the run's start and end reach the driver up to that late.
#: A poll that misses it only waits longer (a worker is declared dead after 10 min), so 0.5 s is safe.
HEALTH_CHECK_INTERVAL_S = "0.5"


def _url(run: str, name: str) -> str:
    return store.join_url(run, name)


def _storage(run: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train under RUN/ray, for a path or any fsspec URL."""
    fs, path = store.filesystem(run)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return os.path.abspath(path), None
    import pyarrow.fs as pafs

    return path.rstrip("/"), pafs.PyFileSystem(pafs.FSSpecHandler(fs))


# --- the worker loop ------------------------------------------------------------------------------


def _all_gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _maybe_inject_fault(cfg: TrainConfig, epoch: int, rank: int) -> Callable[[int], None] | None:
    fault = cfg.fault
    if fault is None or fault.epoch != epoch or fault.rank != rank:
        return None
    marker = _url(cfg.run, FAULT_MARKER)

    def hook(batch_index: int) -> None:
        if batch_index + 1 >= fault.after_batches and not store.exists(marker):
            _wait_for_committed_checkpoint(cfg.run, epoch - 1)
            store.write_text(marker, f"killed rank {rank} in epoch {epoch}\n")
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


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def _stamp_first(batches: Iterable[Any], stamps: dict[str, float]) -> Iterator[Any]:
    """Pass batches through, noting in ``stamps`` when the first one arrived (the end of start-up)."""
    for i, batch in enumerate(batches):
        if i == 0:
            stamps["first_batch_time"] = time.time()
        yield batch


def _broadcast_buffers(model: torch.nn.Module) -> None:
    """Every worker validates with rank 0's batch-norm statistics: those of the checkpoint."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)


def _worker_inputs(
    config: dict[str, Any], cfg: TrainConfig, rank: int, world: int, device: torch.device
) -> tuple[Callable[[int], Iterable[Any]], Callable[[], Iterable[Any]]]:
    """(an epoch's training batches, the validation batches) of this worker.

    Cached inputs: this worker's rows, taken once from the object store into memory, a fresh
    order every epoch (from seed, rank and epoch, so a resumed run sees the same batches), the
    same number of batches on every worker. Streamed: Ray Data shards of each split.
    """
    import ray.train

    batch_size = cfg.per_worker_batch
    cached: CachedInputs | None = config.get("cached")
    if cached is None:
        train_shard = ray.train.get_dataset_shard("train")
        val_shard = ray.train.get_dataset_shard("val")
        return (
            lambda epoch: train_shard.iter_torch_batches(
                batch_size=batch_size, local_shuffle_buffer_size=cfg.shuffle_buffer or None, drop_last=False
            ),
            lambda: val_shard.iter_torch_batches(batch_size=batch_size),
        )
    arrays, totals = cached.take(rank, world)
    train_rows = worker_tensors(arrays["train"], device)
    val_rows = worker_tensors(arrays["val"], device)
    n_rows = len(train_rows["y"])
    per_worker = totals["train"] // world  # DDP needs the same number of steps on every worker
    return (
        lambda epoch: memory_batches(
            train_rows, batch_size, shuffled_order(n_rows, per_worker, (cfg.seed, rank, epoch))
        ),
        lambda: memory_batches(val_rows, max(batch_size, VAL_BATCH)),
    )


def train_func(config: dict[str, Any]) -> None:
    """Ray Train worker loop: resume, then per epoch train, validate, checkpoint, report."""
    import ray.train
    import ray.train.torch

    stamps = {"worker_start_time": time.time()}
    cfg: TrainConfig = config["config"]
    preset = cfg.preset
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed + rank)

    model = build_model(preset)
    optimizer = make_optimizer(preset, model.parameters())
    scheduler = make_scheduler(preset, optimizer)
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
    patience = preset.optim.early_stopping_patience
    if state["epoch"] >= cfg.max_epochs or state["bad_epochs"] >= patience:
        return  # finished before: nothing to resume
    state["worker_nodes"] = [str(n) for n in _all_gather(_node_id())]

    # Rank 0's batch-norm statistics are the checkpoint's and are broadcast before validating, so the
    # per-step broadcast of DDP's default (a second collective each step) changes nothing: skip it.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"forward_sync_buffers": False})
    train_batches, val_batches = _worker_inputs(config, cfg, rank, world, device)
    stamps["inputs_ready_time"] = last = time.time()

    for epoch in range(int(state["epoch"]) + 1, cfg.max_epochs + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        stats = train_epoch(
            model,
            _stamp_first(train_batches(epoch), stamps) if stamps else train_batches(epoch),
            optimizer,
            preset,
            device,
            on_batch=_maybe_inject_fault(cfg, epoch, rank),
        )
        val_start, train_cpu = time.perf_counter(), time.process_time() - cpu_start
        _broadcast_buffers(model)
        preds = validate_epoch(unwrap(model), val_batches(), preset, device)
        gathered = _all_gather((stats.loss_sum, stats.n, preds.loss_sum, preds.n, preds.arrays()))
        train_n = sum(g[1] for g in gathered)
        val_n = sum(g[3] for g in gathered)
        train_loss = sum(g[0] for g in gathered) / max(train_n, 1)
        val_loss = sum(g[2] for g in gathered) / max(val_n, 1)
        parts = [g[4] for g in gathered]
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        val_metrics = epoch_metrics(preset, merged["main"], merged["y"], merged["lvh_prob"], merged["lvh"])
        step_scheduler(scheduler, val_loss)
        # The preset's selection metric picks the best epoch (the validation loss unless it names another).
        best_so_far = selection_score(preset, state["best_val_loss"], state["best_metrics"])
        improved = selection_score(preset, val_loss, val_metrics) < best_so_far
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
        now = time.time()
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            **{f"val_{k}": v for k, v in val_metrics.items()},
            "lr": optimizer.param_groups[0]["lr"],
            "best_epoch": state["best_epoch"],
            "improved": bool(improved),
            "train_samples": train_n,
            # epoch_s: this epoch's training and validation; cycle_s: since the previous epoch's
            # record (so also that epoch's checkpoint and report), or since the inputs were ready.
            "epoch_s": time.perf_counter() - start,
            "cycle_s": now - last,
            "train_s": stats.seconds,
            "val_s": time.perf_counter() - val_start,
            "train_cpu_s": train_cpu,  # rank 0's CPU seconds (all its threads) in the training loop
            "train_samples_per_s": train_n / max(stats.seconds, 1e-9),
            "time": now,
            **stamps,  # start-up times, in the first epoch after a (re)start only
        }
        stamps, last = {}, now
        state["history"] = [*state["history"], record]
        state["epoch"] = epoch
        stop = state["bad_epochs"] >= patience
        state["finished"] = stop or epoch >= cfg.max_epochs
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        metrics["finished"] = bool(state["finished"])
        if rank == 0:
            # The driver prints each epoch from this file (once; worker output stays in Ray's logs).
            store.write_text(_url(cfg.run, METRICS_FILE), history_text(state["history"]))
            training_state = {"optimizer": to_cpu(optimizer.state_dict()), "scheduler": scheduler.state_dict(), **state}
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


# --- trainer ----------------------------------------------------------------------------------------


def build_trainer(cfg: TrainConfig, datasets: Mapping[str, Any], callbacks: Sequence[Any] = ()) -> Any:
    """The TorchTrainer: ScalingConfig from the config, storage under RUN/ray, FailureConfig.

    ``datasets``: :func:`build_datasets`'s (cached inputs go to the workers in the loop's config,
    Ray Datasets to Ray Train, which splits them across the workers). ``callbacks``: Ray Train
    callbacks (``lvm_ray.tune`` passes Ray Tune's report callback).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    storage_path, storage_fs = _storage(cfg.run)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    ray_datasets = {k: v for k, v in datasets.items() if k != CACHED}
    return _interruptible_trainer()(
        train_func,
        train_loop_config={"config": cfg, "cached": datasets.get(CACHED)},
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
            callbacks=list(callbacks) or None,
        ),
        datasets=ray_datasets or None,
    )


def _interruptible_trainer() -> type:
    """TorchTrainer whose Ctrl-C (and SIGTERM, under the CLI) aborts the run as Ray Train's own
    handler does, then raises KeyboardInterrupt, so the CLI says one line and exits 130 (143).
    Ray's handler ends the driver with SystemExit(1) and says nothing (and stays installed after
    the fit)."""
    import ray
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback  # Ray is pinned (2.60)

    from lvm_ray.ray_utils import interrupting_on_sigterm, stop_on_sigterm

    class InterruptibleTorchTrainer(TorchTrainer):
        def _register_sigint_handler(self, controller: Any) -> None:
            def on_signal(signum: int, frame: Any) -> None:
                signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once
                with contextlib.suppress(Exception):  # the workers stop; the checkpoints stay for a resume
                    ray.get(controller.abort.remote(), timeout=60)
                if signum == signal.SIGTERM:
                    stop_on_sigterm(signum, frame)
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_signal)
            # SIGTERM too (kill, a scheduler's time limit) when the CLI asked for it (ray_utils.sigterm_interrupts).
            if interrupting_on_sigterm():
                signal.signal(signal.SIGTERM, on_signal)

        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            # Cached inputs, no Ray Datasets: Ray Train would still start a DatasetManager actor for
            # none (one more process per fit, ~2 s of a core while the workers start).
            return [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return InterruptibleTorchTrainer


# --- the driver -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _ray_train_env() -> Iterator[None]:
    """Ray Train V2 settings for one fit (the controller reads them from the driver's environment at its start).

    The health-check interval (:data:`HEALTH_CHECK_INTERVAL_S`); on a one-node cluster also no preemption
    watcher (an actor process started with every worker group, watching for nodes being drained: one node
    drained takes the whole run with it anyway). A value the user set is kept.
    """
    import ray

    wanted = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": HEALTH_CHECK_INTERVAL_S}
    if len([n for n in ray.nodes() if n.get("Alive")]) == 1:
        wanted["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    added = [k for k in wanted if k not in os.environ]
    os.environ.update({k: wanted[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _room_beside_workers(cfg: TrainConfig) -> bool:
    """Whether the cluster has a CPU free besides the Train workers' (for reads running alongside them)."""
    import ray

    return ray.available_resources().get("CPU", 0) >= cfg.num_workers * cfg.cpus_per_worker + 1


def train(
    data: str,
    run: str,
    preset: str = DEFAULT_PRESET,
    target: str | None = None,
    num_workers: int = 2,
    use_gpu: bool | None = None,
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
    cache_inputs: bool | None = None,
    evaluate_test: bool = True,
    overwrite: bool = False,
    placement_strategy: str = "PACK",
    fault: FaultInjection | None = None,
    verbose: bool = False,
    datasets_from: Callable[[TrainConfig, pd.DataFrame], Mapping[str, Any]] | None = None,
) -> TrainResult:
    """Train (or resume) a model on DATA into RUN with Ray Train; return the run's result.

    ``preset``: a name from :mod:`lvm_ray.presets`; ``target``: any numeric column (regression on
    its z-score) or 0/1 column (binary classification), default the preset's (lv_mass_g).
    ``split_column`` + ``val_values`` (+ ``test_values``) split by a column such as strat_fold;
    otherwise patients are hashed into test / val / train by the fractions. ``use_gpu``: the one
    GPU policy of :func:`lvm_ray.ray_utils.resolve_gpu` (None: GPUs when the cluster has or can
    add them). Re-running the same command resumes the run; ``overwrite`` starts RUN over
    (removing only what a run writes).
    """
    from lvm_ray.ray_utils import ensure_connected, interrupting_on_sigterm, resolve_gpu

    started = time.time()
    # Everything that can be checked without Ray is checked first.
    try:
        split = SplitSpec(
            column=split_column,
            val_values=tuple(str(v) for v in val_values),
            test_values=tuple(str(v) for v in test_values),
            test_fraction=0.0 if split_column else test_fraction,
            val_fraction=val_fraction,
        )
        base = get_preset(preset)
    except (SplitError, KeyError, ValueError) as exc:
        raise TrainError(str(exc).strip("'\"")) from exc
    check_run_folder(run)
    if target is None:
        target = base.target.column
    index = index_pass(data, target, split)
    cfg = make_config(
        data,
        run,
        base,
        target=target,
        task=task,
        num_workers=num_workers,
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
    known = index["labelled"].to_numpy(dtype=bool)
    counts = {name: int(((index["split"] == code).to_numpy() & known).sum()) for name, code in SPLIT_CODES.items()}
    if counts["train"] == 0 or counts["val"] == 0:
        raise TrainError(f"need labelled rows in train and val splits, got {counts}")

    # Resume or start: run.json pins what the run is.
    record = load_run_record(run)
    if record is not None and overwrite:
        remove_run_outputs(run)
        record = None
    if record is not None:
        if record.get("identity") != json.loads(json.dumps(store.jsonable(cfg.identity()), default=str)):
            raise TrainError(
                f"{run} holds another run (different data, preset, target, optimiser, global batch or split); "
                "pass --overwrite to replace it or choose another --run"
            )
        done = record.get("status") == "finished" and record.get("result")
        if done and record["config"]["preset"]["optim"]["max_epochs"] >= cfg.max_epochs:
            log.info("run %s is already finished; returning its result", run)
            return TrainResult(**record["result"])

    ensure_connected(address, verbose=verbose)
    cfg = dataclasses.replace(cfg, use_gpu=resolve_gpu(use_gpu, cfg.num_workers, stage="train"))
    split_table = index[["ecg_id", *[c for c in ("patient_id",) if c in index]]].copy()
    split_table["split"] = split_names(index["split"].to_numpy())
    split_table["labelled"] = known
    store.write_table(_url(run, SPLIT_FILE), split_table)
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

    # An ensemble's members share one build (lvm_ray.ensemble): they differ only by seed. Our own
    # build reads while the Train workers start, when the cluster has a CPU for the reads besides them.
    if datasets_from is not None:
        datasets = datasets_from(cfg, split_table)
    else:
        datasets = build_datasets(cfg, split_table, wait=not _room_beside_workers(cfg))
    # The trainer installs its own for the fit (see _interruptible_trainer).
    sigint = signal.getsignal(signal.SIGINT)
    sigterm = signal.getsignal(signal.SIGTERM) if interrupting_on_sigterm() else None  # else not ours to touch
    try:
        with _ray_train_env(), EpochPrinter(_url(run, METRICS_FILE), cfg.max_epochs, cfg.preset.target.task, run):
            result = build_trainer(cfg, datasets).fit()
        error = result.error
    except Exception as exc:  # ray.train.TrainingFailedError: workers failed more than max_failures
        error = exc
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in ((signal.SIGINT, sigint), (signal.SIGTERM, sigterm)):
                if handler is not None:
                    signal.signal(signum, handler)
    if error is not None and isinstance(datasets.get(CACHED), CachedInputs):
        try:  # a shard that could not be read is the cause to name, not the workers' retries
            datasets[CACHED].wait()
        except Exception as read_error:  # noqa: BLE001 - reported as the run's error below
            error = read_error
    if error is not None:
        store.write_json(_url(run, RUN_FILE), {**run_record, "status": "failed", "error": str(error)[-4000:]})
        raise TrainError(f"training failed (re-run the same command to resume): {str(error)[-2000:]}") from error
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
    store.write_text(_url(run, METRICS_FILE), history_text(state["history"]))
    # Prediction intervals and P(LVH), calibrated on the validation split (lvm_ray.calibrate), and
    # the test split's metrics: both from one read of DATA through the best model.
    from lvm_ray.calibrate import calibrate_after_training, calibrates

    wanted = [name for name, needed in (("val", calibrates(cfg.preset)), ("test", evaluate_test)) if needed]
    evaluated = evaluate_splits(run, data, [w for w in wanted if counts[w] > 0], address)
    calibration = None
    if "val" in evaluated:
        calibration = calibrate_after_training(run, data, address, predictions=evaluated["val"].predictions)
    test_metrics = evaluated["test"].metrics if "test" in evaluated else None
    if test_metrics is not None:
        store.write_json(_url(run, TEST_METRICS_FILE), test_metrics)
    rates = [h["train_samples_per_s"] for h in state["history"] if "train_samples_per_s" in h]
    first_batch = [h["first_batch_time"] for h in state["history"] if "first_batch_time" in h]
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
        train_samples_per_s=float(np.median(rates)) if rates else None,  # all workers' ECGs per second
        startup_s=first_batch[-1] - started if first_batch and not state["resumed_from"] else None,
    )
    store.write_json(
        _url(run, RUN_FILE),
        {
            **run_record,
            "status": "finished",
            "finished_unix": time.time(),
            "result": train_result.to_dict(),
            "calibration": calibration,
        },
    )
    from lvm_ray.modelcard import write_model_card

    write_model_card(run)  # RUN/model_card.md, from the checkpoint and run record just written
    return train_result


# --- evaluation of a run on one of its splits -------------------------------------------------------


#: Datasets of up to this many ECGs are predicted in the driver, one shard at a time: reading them
#: takes seconds, where starting a Ray Data actor pool (a process, torch, the model) takes more.
IN_PROCESS_ROWS = 5000
#: What :func:`split_predictions` returns, per ECG.
PREDICTION_KEYS = ("ecg_id", "pred", "true", "lvh_prob", "lvh", "sex", "bsa_m2")


def _split_rows(predictor: Any, ids: frozenset[str] | None, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The Predictor (the one prediction path) on the rows of ``batch`` whose ecg_id is in ``ids`` (None: all)."""
    ecg_ids = batch["ecg_id"]
    keep = np.ones(len(ecg_ids), dtype=bool) if ids is None else np.array([str(i) in ids for i in ecg_ids], dtype=bool)
    rows = {k: np.asarray(v)[keep] for k, v in batch.items()}
    n = int(keep.sum())
    preset = predictor.preset
    pred, lvh_prob = predictor.model_outputs(rows["ecg"], rows)
    true = pd.to_numeric(pd.Series(rows[preset.target.column], dtype=object), errors="coerce").to_numpy(float)
    return {
        "ecg_id": np.array([str(i) for i in rows["ecg_id"]], dtype=object),
        "pred": np.asarray(pred, dtype=float),
        "true": true,
        "lvh_prob": np.asarray(lvh_prob, dtype=float) if lvh_prob is not None else np.full(n, np.nan),
        "lvh": lvh_labels(rows, n) if preset.lvh_head else np.full(n, -1, dtype=np.int64),
        # What a conformal calibration needs besides pred and true (lvm_ray.calibrate).
        "sex": np.array([normalise_sex(v) or "" for v in rows.get("sex", [None] * n)], dtype=object),
        "bsa_m2": derive(rows, mass_column=preset.target.column, n=n)["bsa_m2"].to_numpy(dtype=float),
    }


class _SplitEvaluator:
    """Ray Data actor: :func:`_split_rows` with the run's Predictor."""

    def __init__(self, loader: Callable[[], Any], ids: frozenset[str] | None) -> None:
        torch.set_num_threads(1)
        self.predictor = loader()
        self.ids = ids

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _split_rows(self.predictor, self.ids, batch)


def _concat(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in PREDICTION_KEYS}


def _predict_in_process(
    loader: Callable[[], Any], data: str, ids: frozenset[str] | None, columns: Sequence[str]
) -> dict[str, np.ndarray]:
    """:func:`split_predictions` in this process: a thread per core, each reading a shard and
    predicting its wanted rows (parquet decoding, numpy and torch release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    predictor = loader()

    def shard_rows(path: str) -> dict[str, np.ndarray] | None:
        table = store.read_shard(data, path, columns)
        if ids is not None:
            wanted = [str(i) in ids for i in table.column("ecg_id").to_pylist()]
            table = table.filter(pa.array(wanted, type=pa.bool_()))
        if not table.num_rows:
            return None
        batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names if c != "ecg"}
        batch["ecg"] = store.ecg_array(table)
        return _split_rows(predictor, None, batch)

    paths = [shard["path"] for shard in store.read_manifest(data)["shards"]]
    with ThreadPoolExecutor(max(1, min(len(paths), local_cores()))) as pool:  # in order, a shard per thread
        parts = [part for part in pool.map(shard_rows, paths) if part is not None]
    return _concat(parts)


def split_predictions(
    checkpoint: str,
    data: str,
    ids: frozenset[str] | None,
    address: str | None = None,
    loader: Callable[[], Any] | None = None,
) -> dict[str, np.ndarray]:
    """The model at ``checkpoint`` on the rows of ``data`` whose ecg_id is in ``ids`` (None: all rows).

    Arrays ecg_id, pred, true (the preset's target), lvh_prob, lvh, sex ('M'/'F'/''), bsa_m2; read with Ray
    Data through the Predictor, as the test evaluation and ``lvm-ray calibrate`` need them (in this
    process for datasets of up to :data:`IN_PROCESS_ROWS` ECGs: the same Predictor, no actor start-up).
    """
    from functools import partial

    import ray.data

    from lvm_ray.predict import Predictor
    from lvm_ray.ray_utils import ensure_connected, read_ecg_dataset

    loader = loader or partial(Predictor.from_checkpoint, checkpoint, False)
    preset = Preset.from_dict(read_payload(checkpoint)["preset"])
    present = set(columns_present(data))
    columns = [c for c in input_columns(preset) if c in present]
    if int(store.read_manifest(data).get("n_rows", IN_PROCESS_ROWS + 1)) <= IN_PROCESS_ROWS:
        return _predict_in_process(loader, data, ids, columns)
    ensure_connected(address)
    ds = read_ecg_dataset(data, columns=columns).map_batches(
        _SplitEvaluator,
        fn_constructor_args=(loader, ids),
        batch_format="numpy",
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
    )
    return _concat(list(ds.iter_batches(batch_size=4096, batch_format="numpy")))


def rows_of(predictions: Mapping[str, np.ndarray], ids: frozenset[str] | None) -> dict[str, np.ndarray]:
    """The rows of :func:`split_predictions` output whose ecg_id is in ``ids`` (None: all of them)."""
    keep = np.array([ids is None or str(i) in ids for i in predictions["ecg_id"]], dtype=bool)
    return {k: np.asarray(v)[keep] for k, v in predictions.items()}


@dataclasses.dataclass
class SplitEvaluation:
    """RUN's best model on one of its splits: per-ECG predictions (:data:`PREDICTION_KEYS`) and metrics."""

    split: str
    predictions: dict[str, np.ndarray]
    metrics: dict[str, Any]  # {"split": ..., **lvm_ray.fitting.target_metrics}


def evaluate_splits(
    run: str,
    data: str,
    splits: Sequence[str],
    address: str | None = None,
    loader: Callable[[], Any] | None = None,
) -> dict[str, SplitEvaluation]:
    """RUN's best model on several of its splits (as RUN/split.parquet assigned them), in one read of DATA."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise TrainError(f"unknown split {unknown[0]!r}; one of {', '.join(SPLITS)}")
    if not splits:
        return {}
    split_url = _url(run, SPLIT_FILE)
    if not store.exists(split_url):
        raise TrainError(f"no run at {run} (no {SPLIT_FILE})")
    split_table = store.read_parquet(split_url)
    ids = {name: ids_in_split(split_table, name) for name in splits}
    preset = Preset.from_dict(read_payload(_url(run, MODEL_FILE))["preset"])
    arrays = split_predictions(_url(run, MODEL_FILE), data, frozenset().union(*ids.values()), address, loader)
    out = {}
    for name, wanted in ids.items():
        part = rows_of(arrays, wanted)
        lvh_prob = part["lvh_prob"] if preset.lvh_head else None
        metrics = target_metrics(preset, part["pred"], part["true"], lvh_prob, part["lvh"])
        out[name] = SplitEvaluation(name, part, {"split": name, **metrics})
    return out


def evaluate_run(
    run: str,
    data: str,
    which: str = "test",
    address: str | None = None,
    loader: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Metrics of RUN's best model on one of its splits (as RUN/split.parquet assigned them)."""
    return evaluate_splits(run, data, [which], address, loader)[which].metrics


__all__ = [
    "RUN_OUTPUTS",
    "CheckpointError",
    "FaultInjection",
    "SplitEvaluation",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "build_datasets",
    "build_trainer",
    "evaluate_run",
    "evaluate_splits",
    "make_config",
    "rows_of",
    "split_predictions",
    "train",
    "train_func",
]
