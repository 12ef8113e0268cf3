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
    parser.add_argument("--batch-size", type=int, default=None, help="global batch; default: the preset's")
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
    from lvm_ray.fitting import featurize
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
    """Mini-batches of in-memory tensors (the baselines' data loader)."""
    import torch

    n = len(tensors["y"])
    order = torch.randperm(n) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        yield {k: v[order[i : i + batch_size]] for k, v in tensors.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Ray Train (streamed shards, DDP) vs a bare single-process loop over in-memory tensors."""
    import torch

    from lvm_ray.fitting import make_optimizer, train_epoch
    from lvm_ray.model import build_model
    from lvm_ray.presets import get_preset
    from lvm_ray.train import train

    preset = get_preset(args.preset)
    batch_size = args.batch_size or preset.optim.batch_size
    threads = max(1, int(args.num_workers * args.cpus_per_worker))
    device = torch.device("cuda" if args.use_gpu and torch.cuda.is_available() else "cpu")

    # Baseline: same model, global batch size and total threads; data already in memory.
    from lvm_ray.splits import SplitSpec

    arrays = split_arrays(args.data, preset, SplitSpec(), "train", max_rows=args.baseline_rows)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(preset).to(device)
    optimizer = make_optimizer(preset, model.parameters())
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    n = len(arrays["y"])

    baseline_epochs = []
    for _ in range(args.epochs):
        stats = train_epoch(model, batches(tensors, batch_size, True), optimizer, preset, device)
        baseline_epochs.append(stats.n / stats.seconds)

    # Ray Train on the whole training split, streamed from the shards.
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
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
        fit_s = time.perf_counter() - started
        with open(os.path.join(tmp, "run", "metrics.jsonl")) as f:
            history = [json.loads(line) for line in f]
    # End-to-end epoch rate (streaming reads, preprocessing, validation, checkpoint) and the
    # training-loop rate (batches arriving from Ray Data, summed over workers).
    end_to_end = [h["train_samples"] / h["epoch_s"] for h in history]
    loop = [h["train_samples_per_s"] * args.num_workers for h in history]
    best = lambda xs: float(max(xs))  # noqa: E731 - best epoch: the first one pays for start-up
    return {
        "stage": "train",
        "preset": preset.name,
        "device": device.type,
        "batch_size": batch_size,
        "threads": threads,
        "epochs": args.epochs,
        "baseline": {
            "what": "single process, in-memory tensors, same model/batch/threads",
            "train_rows": n,
            "samples_per_s": best(baseline_epochs),
            "per_epoch": baseline_epochs,
        },
        "ray_train": {
            "what": f"TorchTrainer, {args.num_workers} workers, Ray Data reading the shards"
            + {True: " (inputs cached)", False: " (streamed every epoch)", None: " (cached when they fit)"}[
                args.cache_inputs
            ],
            "train_rows": result.split_counts["train"],
            "samples_per_s_end_to_end": best(end_to_end),
            "samples_per_s_train_loop": best(loop),
            "per_epoch_end_to_end": end_to_end,
            "fit_wall_s": fit_s,
        },
        "ratio_end_to_end": best(end_to_end) / best(baseline_epochs),
        "ratio_train_loop": best(loop) / best(baseline_epochs),
    }
