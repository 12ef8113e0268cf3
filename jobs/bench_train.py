"""Benchmark `train`: Ray Train (streamed or cached shards, DDP) against a bare single-process loop.

Run through jobs/benchmark.py (`python jobs/benchmark.py train --help`)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import numpy as np

# --- train ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lvm_ray.presets import DEFAULT_PRESET, preset_names

    parser.add_argument("--data", required=True, help="dataset URL")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=preset_names())
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="global batch; default: the preset's per-worker batch x --num-workers, as train runs it",
    )
    parser.add_argument("--baseline-rows", type=int, default=4000, help="training rows the baseline holds in memory")
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument(
        "--cache-inputs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Ray run keeps preprocessed inputs in the object store (default: when they fit in a quarter of it)",
    )
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))


def split_arrays(data: str, preset: Any, split: Any, which: str, max_rows: int | None = None) -> dict[str, np.ndarray]:
    """One split's labelled rows (up to ``max_rows``), preprocessed, as in-memory arrays."""
    from lvm_ray import store
    from lvm_ray.inputs import featurize
    from lvm_ray.splits import keep_mask

    parts: list[dict[str, np.ndarray]] = []
    have = 0
    for table in store.iter_shards(data):
        batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names if c != "ecg"}
        batch["ecg"] = store.ecg_array(table)
        keep = keep_mask(batch, split, preset.target.column, which)
        parts.append(featurize({k: v[keep] for k, v in batch.items()}, preset))
        have += int(keep.sum())
        if max_rows is not None and have >= max_rows:
            break
    return {k: np.concatenate([p[k] for p in parts])[:max_rows] for k in parts[0]}


def batches(tensors: dict[str, Any], batch_size: int, shuffle: bool) -> Any:
    """Mini-batches of in-memory tensors (the baselines' data loader; Ray Train's cached path batches the same way)."""
    import torch

    from lvm_ray.fitting import memory_batches

    n = len(tensors["y"])
    return memory_batches(tensors, batch_size, torch.randperm(n) if shuffle else None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Ray Train (2 workers, DDP, inputs cached or streamed) vs a bare single-process loop over in-memory tensors.

    Keys: ``startup_s`` (from calling train, the cluster not yet started, to the first training
    batch: cluster, index pass, reads and preprocessing, Train workers); ``ratio_end_to_end`` (the
    best epoch's ECGs/s over the whole epoch cycle: training loop, validation, metrics,
    checkpoint and report, data wait; against the baseline's best epoch); ``ratio_train_loop``
    (the training loop alone). ``profile`` splits each epoch's cycle into its parts.
    """
    import torch

    from lvm_ray.fitting import make_optimizer, memory_batches, shuffled_order, train_epoch
    from lvm_ray.model import build_model
    from lvm_ray.presets import get_preset
    from lvm_ray.ray_utils import ensure_connected
    from lvm_ray.splits import SplitSpec
    from lvm_ray.train import train

    preset = get_preset(args.preset)
    batch_size = args.batch_size or preset.optim.batch_size * args.num_workers  # global: the preset's is per worker
    threads = max(1, int(args.num_workers * args.cpus_per_worker))
    device = torch.device("cuda" if args.use_gpu and torch.cuda.is_available() else "cpu")

    # Baseline: same model, global batch and total threads; data already in memory, batched the same way.
    arrays = split_arrays(args.data, preset, SplitSpec(), "train", max_rows=args.baseline_rows)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(preset).to(device)
    optimizer = make_optimizer(preset, model.parameters())
    tensors = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
    n = len(arrays["y"])
    baseline_epochs = []
    for epoch in range(args.epochs):
        order = shuffled_order(n, n, (0, epoch))
        stats = train_epoch(model, memory_batches(tensors, batch_size, order), optimizer, preset, device)
        baseline_epochs.append(stats.n / stats.seconds)
    load = {"baseline_loadavg": list(os.getloadavg())}

    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        ensure_connected(args.address)
        cluster_s = time.time() - started
        result = train(
            args.data,
            os.path.join(tmp, "run"),
            preset=args.preset,
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            max_epochs=args.epochs,
            address=args.address,
            batch_size=max(1, batch_size // args.num_workers),  # per worker: the baseline's global batch
            cpus_per_worker=args.cpus_per_worker,
            evaluate_test=False,
            cache_inputs=args.cache_inputs,
        )
        fit_s = time.time() - started
        with open(os.path.join(tmp, "run", "metrics.jsonl")) as f:
            history = [json.loads(line) for line in f]
    load["ray_loadavg"] = list(os.getloadavg())
    first = history[0]
    # End to end: an epoch's whole cycle (its training and validation, the metrics, and the previous
    # epoch's checkpoint and report; the first epoch's from the moment the inputs were ready).
    end_to_end = [h["train_samples"] / h["cycle_s"] for h in history]
    loop = [h["train_samples_per_s"] for h in history]  # all workers' ECGs per second of the loop
    best = lambda xs: float(max(xs))  # noqa: E731 - best epoch: the first one pays for warming up
    profile = [
        {
            "epoch": h["epoch"],
            "cycle_s": h["cycle_s"],
            "train_loop_s": h["train_s"],
            "validation_s": h["val_s"],
            "metrics_s": h["epoch_s"] - h["train_s"] - h["val_s"],  # gather, metrics, scheduler, best state
            "checkpoint_report_s": h["cycle_s"] - h["epoch_s"],  # the previous epoch's (none before the first)
            "train_loop_cpu_s": h.get("train_cpu_s"),
        }
        for h in history
    ]
    return {
        "stage": "train",
        "preset": preset.name,
        "device": device.type,
        "batch_size": batch_size,
        "threads": threads,
        "epochs": args.epochs,
        "baseline": {
            "what": "single process, in-memory tensors, same model/global batch/total threads",
            "train_rows": n,
            "samples_per_s": best(baseline_epochs),
            "per_epoch": baseline_epochs,
        },
        "ray_train": {
            "what": f"TorchTrainer, {args.num_workers} workers x {args.cpus_per_worker:g} CPU"
            + {True: ", inputs cached", False: ", streamed every epoch", None: ", inputs cached when they fit"}[
                args.cache_inputs
            ],
            "train_rows": result.split_counts["train"],
            "samples_per_s_end_to_end": best(end_to_end),
            "samples_per_s_train_loop": best(loop),
            "per_epoch_end_to_end": end_to_end,
            "fit_wall_s": fit_s,
            "startup": {
                "cluster_s": cluster_s,
                "to_train_workers_s": first["worker_start_time"] - started - cluster_s,
                "worker_inputs_s": first["inputs_ready_time"] - first["worker_start_time"],
                "to_first_batch_s": first["first_batch_time"] - first["inputs_ready_time"],
            },
            "profile": profile,
        },
        "startup_s": first["first_batch_time"] - started,
        "ratio_end_to_end": best(end_to_end) / best(baseline_epochs),
        "ratio_train_loop": best(loop) / best(baseline_epochs),
        **load,
    }
