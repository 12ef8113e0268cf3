"""Stage benchmarks: each measures a stage against its baseline in the same run and writes JSON.

    python jobs/benchmark.py train --data DATA --out bench_train.json [--preset lvm-cpu] [--num-workers 2]

Subcommands register themselves in ``SUBCOMMANDS`` (name -> (add_arguments, run)); add others
(ingest, rules, score, serve) beside ``train``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

# --- train ------------------------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--cache-inputs", action="store_true", help="Ray run keeps preprocessed inputs in memory")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))


def _baseline_inputs(data: str, preset: Any, rows: int) -> dict[str, np.ndarray]:
    """The first ``rows`` labelled training-split rows, preprocessed, as in-memory arrays."""
    from lvm_ray import store
    from lvm_ray.train import SplitSpec, featurize, keep_mask

    split = SplitSpec()
    columns = [c for c in ("ecg_id", "patient_id", "ecg", preset.target.column)]
    parts: list[dict[str, np.ndarray]] = []
    have = 0
    for table in store.iter_shards(data, columns=columns):
        batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns if c != "ecg"}
        batch["ecg"] = store.ecg_array(table)
        keep = keep_mask(batch, split, preset.target.column, "train")
        parts.append(featurize({k: v[keep] for k, v in batch.items()}, preset))
        have += int(keep.sum())
        if have >= rows:
            break
    return {k: np.concatenate([p[k] for p in parts])[:rows] for k in parts[0]}


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """Ray Train (streamed shards, DDP) vs a bare single-process loop over in-memory tensors."""
    import torch

    from lvm_ray.model import build_model
    from lvm_ray.presets import get_preset
    from lvm_ray.train import train, train_epoch

    preset = get_preset(args.preset)
    batch_size = args.batch_size or preset.optim.batch_size
    threads = max(1, int(args.num_workers * args.cpus_per_worker))
    device = torch.device("cuda" if args.use_gpu and torch.cuda.is_available() else "cpu")

    # Baseline: same model, global batch size and total threads; data already in memory.
    arrays = _baseline_inputs(args.data, preset, args.baseline_rows)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(preset).to(device)
    optimizer = torch.optim.RAdam(model.parameters(), lr=preset.optim.lr)
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    n = len(arrays["y"])

    def batches():
        order = torch.randperm(n)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield {k: v[idx] for k, v in tensors.items()}

    baseline_epochs = []
    for _ in range(args.epochs):
        stats = train_epoch(model, batches(), optimizer, preset, device)
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
            batch_size=batch_size,
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
            "what": f"TorchTrainer, {args.num_workers} workers, Ray Data streaming the shards"
            + (" (preprocessed inputs cached after the first pass)" if args.cache_inputs else ""),
            "train_rows": result.split_counts["train"],
            "samples_per_s_end_to_end": best(end_to_end),
            "samples_per_s_train_loop": best(loop),
            "per_epoch_end_to_end": end_to_end,
            "fit_wall_s": fit_s,
        },
        "ratio_end_to_end": best(end_to_end) / best(baseline_epochs),
        "ratio_train_loop": best(loop) / best(baseline_epochs),
    }


# --- registry -----------------------------------------------------------------------------------------

SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], dict]]] = {
    "train": (add_train_arguments, run_train),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, (add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=f"benchmark the {name} stage"))
    args = parser.parse_args(argv)
    report = SUBCOMMANDS[args.stage][1](args)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
