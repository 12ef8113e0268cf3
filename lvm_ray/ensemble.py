"""Stage `train --ensemble K`: K members, each a Ray Train run of its own, into one run folder.

Layout of an ensemble run at ``RUN``::

    RUN/run.json          kind 'ensemble': the members' configuration, seeds, status, result
    RUN/split.parquet     the split, the same for every member (it depends on data and split only)
    RUN/model.pt          one checkpoint holding every member (``lvm_ray.model.ensemble_payload``):
                          what ``score``, ``serve``, ``calibrate`` and ``explain`` load
    RUN/test_metrics.json the ensemble on the test split (when there is one)
    RUN/members/<i>/      member i: a normal run folder (``lvm_ray.runs``), trained with seed + i

Members differ by seed (initialisation, shuffling, dropout, augmentation), not by data: every
member trains on the whole training split and chooses its best epoch on the same validation
split, so the ensemble's validation metrics are measured on the split the user chose, comparable
with a single model's, and no training ECG is left out of any member. (K cross-fitting folds
would give each member 1/K less training data and a different validation split, and then the
ensemble has no held-out rows of its own to be scored and calibrated on.)

Members run concurrently when the cluster has room for more than one (each is one
``lvm_ray.train.train`` call, in its own thread), else one after another; the shards are read
and preprocessed once for all of them (:class:`SharedInputs`). The ensemble's
outputs are the members' mean (``lvm_ray.predict.Predictor``); it is evaluated and calibrated
on the validation split like any run. Re-running the same command resumes each member.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from lvm_ray import __version__, store
from lvm_ray.model import MODEL_FILE, ensemble_payload, read_payload, write_payload
from lvm_ray.runs import (
    MEMBERS_DIR,
    RUN_FILE,
    SPLIT_FILE,
    TEST_METRICS_FILE,
    TrainConfig,
    TrainError,
    TrainResult,
    check_run_folder,
    load_run_record,
    remove_run_outputs,
)

log = logging.getLogger(__name__)

#: run.json ``kind`` of an ensemble run.
ENSEMBLE_KIND = "ensemble"
#: How the members differ (recorded in run.json and the checkpoint).
MEMBER_KIND = "seeds"


@dataclass
class EnsembleResult(TrainResult):
    """A finished ensemble: the ensemble's own validation (and test) metrics, and each member's."""

    size: int = 0
    members: list[dict[str, Any]] = field(default_factory=list)


def member_run(run: str, index: int) -> str:
    """RUN/members/<index>: member ``index``'s run folder."""
    return store.join_url(run, MEMBERS_DIR, str(index))


def is_ensemble_run(run: str) -> bool:
    record = load_run_record(run)
    return bool(record) and record.get("kind") == ENSEMBLE_KIND


class SharedInputs:
    """The members' Ray Datasets, built once: members differ only by seed, so their inputs are the same.

    Passed to :func:`lvm_ray.train.train` as ``datasets_from``; one preprocessing (and, cached,
    one copy in the object store) serves every member, also when members run concurrently.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._built: dict[str, Mapping[str, Any]] = {}

    def __call__(self, cfg: TrainConfig, split_table: pd.DataFrame) -> Mapping[str, Any]:
        from lvm_ray.train import build_datasets

        identity = {k: v for k, v in cfg.identity().items() if k != "seed"}
        splits = pd.util.hash_pandas_object(split_table[["ecg_id", "split"]], index=False).sum()
        key = json.dumps([store.jsonable(identity), cfg.cache_inputs, int(splits)], sort_keys=True, default=str)
        with self._lock:  # concurrent members wait for the first build rather than repeat it
            if key not in self._built:
                self._built[key] = build_datasets(cfg, split_table)
            return self._built[key]


def concurrent_members(size: int, num_workers: int, cpus_per_worker: float, use_gpu: bool | None) -> int:
    """How many members the connected cluster can train at once (at least 1, at most ``size``).

    A member holds ``num_workers`` Train workers and needs about one more CPU for its Ray Data
    reads; with GPUs, each worker holds one.
    """
    import ray

    resources = ray.cluster_resources()
    fit = int(resources.get("CPU", 0) // (num_workers * cpus_per_worker + 1))
    if use_gpu and resources.get("GPU", 0) >= num_workers:
        fit = min(fit, int(resources["GPU"] // num_workers))
    return max(1, min(size, fit))


def train_ensemble(
    data: str,
    run: str,
    size: int,
    *,
    seed: int = 0,
    max_concurrent: int | None = None,
    evaluate_test: bool = True,
    overwrite: bool = False,
    address: str | None = None,
    verbose: bool = False,
    **train_kwargs: Any,
) -> EnsembleResult:
    """Train ``size`` members (seeds ``seed .. seed + size - 1``) of one configuration into RUN.

    ``train_kwargs`` are :func:`lvm_ray.train.train`'s (preset, target, split, epochs, workers,
    ...), the same for every member. ``max_concurrent``: members trained at once (default: as
    many as the cluster's CPUs, or GPUs, allow). Returns the ensemble's result (also in RUN/run.json).
    """
    from lvm_ray.ray_utils import ensure_connected
    from lvm_ray.train import evaluate_splits, train

    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise TrainError(f"an ensemble needs at least 2 members, got {size!r} (one member is a plain run)")
    if max_concurrent is not None and max_concurrent < 1:
        raise TrainError(f"max_concurrent must be at least 1, got {max_concurrent}")
    started = time.time()
    check_run_folder(run)
    record = load_run_record(run)
    if record is not None and overwrite:
        remove_run_outputs(run)
        record = None
    wanted = {"size": size, "seed": seed, "kind": MEMBER_KIND}
    if record is not None:
        if record.get("kind") != ENSEMBLE_KIND:
            raise TrainError(f"{run} holds a single-model run; pass --overwrite to replace it or choose another --run")
        have = {k: record.get("ensemble", {}).get(k) for k in wanted}
        if have != wanted:
            raise TrainError(
                f"{run} holds another ensemble ({have['size']} members from seed {have['seed']}); "
                "pass --overwrite to replace it or choose another --run"
            )
    ensure_connected(address, verbose=verbose)
    workers = int(train_kwargs.get("num_workers", 2))
    cpus = float(train_kwargs.get("cpus_per_worker", 1.0))
    parallel = max_concurrent or concurrent_members(size, workers, cpus, train_kwargs.get("use_gpu"))
    parallel = min(parallel, size)
    run_record: dict[str, Any] = {
        "kind": ENSEMBLE_KIND,
        "package_version": __version__,
        "status": "running",
        "started_unix": started,
        "ensemble": {**wanted, "seeds": [seed + i for i in range(size)], "members": [], "concurrent": parallel},
    }
    store.write_json(store.join_url(run, RUN_FILE), run_record)

    shared = SharedInputs()

    def one(i: int) -> TrainResult:
        print(f"[lvm-ray train] ensemble member {i + 1}/{size} (seed {seed + i}) -> {member_run(run, i)}", flush=True)
        return train(
            data,
            member_run(run, i),
            seed=seed + i,
            evaluate_test=False,
            address=address,
            verbose=verbose,
            datasets_from=shared,
            **train_kwargs,
        )

    try:
        if parallel == 1:  # in the main thread: nothing is gained from threads, and Ctrl-C stays simple
            results = [one(i) for i in range(size)]
        else:
            with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="lvm-ray-member") as pool:
                results = list(pool.map(one, range(size)))
    except TrainError as exc:
        store.write_json(store.join_url(run, RUN_FILE), {**run_record, "status": "failed", "error": str(exc)[-4000:]})
        raise TrainError(f"an ensemble member failed (re-run the same command to resume): {exc}") from exc

    # Assemble: one checkpoint of all members; the split is the members' (identical by construction).
    payloads = [read_payload(store.join_url(member_run(run, i), MODEL_FILE)) for i in range(size)]
    split_table = store.read_parquet(store.join_url(member_run(run, 0), SPLIT_FILE))
    for i in range(1, size):
        other = store.read_parquet(store.join_url(member_run(run, i), SPLIT_FILE))
        if not split_table[["ecg_id", "split"]].equals(other[["ecg_id", "split"]]):
            raise TrainError(f"ensemble member {i} was trained on another split than member 0")
    store.write_table(store.join_url(run, SPLIT_FILE), split_table)
    model_url = store.join_url(run, MODEL_FILE)
    runs = [f"{MEMBERS_DIR}/{i}" for i in range(size)]
    write_payload(model_url, ensemble_payload(payloads, runs=runs, kind=MEMBER_KIND))
    # The ensemble's own validation metrics (averaged outputs), stored in its checkpoint like a run's;
    # its calibration and test metrics come from the same read of DATA.
    first = results[0]
    with_test = evaluate_test and first.split_counts.get("test", 0) > 0
    evaluated = evaluate_splits(run, data, ["val", "test"] if with_test else ["val"], address=address)
    val_metrics = {k: v for k, v in evaluated["val"].metrics.items() if k != "split"}
    write_payload(model_url, ensemble_payload(payloads, runs=runs, metrics=val_metrics, kind=MEMBER_KIND))
    from lvm_ray.calibrate import calibrate_after_training

    calibration = calibrate_after_training(run, data, address=address, predictions=evaluated["val"].predictions)
    test_metrics = evaluated["test"].metrics if with_test else None
    if test_metrics is not None:
        store.write_json(store.join_url(run, TEST_METRICS_FILE), test_metrics)
    members = [
        {
            "run": runs[i],
            "seed": seed + i,
            "best_epoch": r.best_epoch,
            "epochs_run": r.epochs_run,
            "best_val_loss": r.best_val_loss,
            "val_metrics": r.val_metrics,
            "wall_s": r.wall_s,
        }
        for i, r in enumerate(results)
    ]
    result = EnsembleResult(
        run=run,
        model_path=model_url,
        preset=first.preset,
        target=first.target,
        task=first.task,
        epochs_run=max(r.epochs_run for r in results),
        best_epoch=int(np.median([r.best_epoch for r in results])),
        best_val_loss=float("nan"),  # the members' are in ``members``; the ensemble has no single loss
        val_metrics=val_metrics,
        test_metrics=test_metrics,
        split_counts=first.split_counts,
        resumed_from=sorted({e for r in results for e in r.resumed_from}),
        worker_nodes=sorted({n for r in results for n in r.worker_nodes}),
        wall_s=time.time() - started,
        train_samples_per_s=None,
        size=size,
        members=members,
    )
    member_record = load_run_record(member_run(run, 0)) or {}
    store.write_json(
        store.join_url(run, RUN_FILE),
        {
            **run_record,
            # The members' configuration (member 0's seed): what model cards and readers look up.
            "config": member_record.get("config"),
            "identity": {**(member_record.get("identity") or {}), "ensemble": wanted},
            "split_counts": first.split_counts,
            "split_file": SPLIT_FILE,
            "status": "finished",
            "finished_unix": time.time(),
            "ensemble": {**run_record["ensemble"], "members": members},
            "result": store.jsonable(dataclasses.asdict(result)),
            "calibration": calibration,
        },
    )
    from lvm_ray.modelcard import write_model_card

    write_model_card(run)
    return result


def result_lines(result: EnsembleResult) -> Sequence[str]:
    """What the CLI prints for a finished ensemble."""
    lines = [
        f"train -> {result.run}  (ensemble of {result.size}: {MEMBERS_DIR}/0..{result.size - 1})",
        f"  preset {result.preset}, target {result.target} ({result.task})",
        f"  validation (ensemble): {result.val_metrics}",
    ]
    for m in result.members:
        lines.append(f"    member {m['run']} seed {m['seed']}: best epoch {m['best_epoch']}, {m['val_metrics']}")
    if result.test_metrics:
        lines.append(f"  test (ensemble): {result.test_metrics}")
    lines.append(f"  checkpoint: {result.model_path}  ({result.wall_s:.0f} s)")
    return lines


__all__ = ["ENSEMBLE_KIND", "EnsembleResult", "is_ensemble_run", "member_run", "result_lines", "train_ensemble"]
