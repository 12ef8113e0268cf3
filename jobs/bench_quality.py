"""Benchmark `train-quality`: Ray Train's validation metric against a plain PyTorch loop, same recipe.

Run through jobs/benchmark.py (`python jobs/benchmark.py train-quality --help`)."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import numpy as np
from bench_train import batches, split_arrays


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset URL")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--preset", default="lvm-cpu", help="today's recipe (the baseline)")
    parser.add_argument("--target", default=None, help="column to learn (default: the preset's)")
    parser.add_argument("--split-column", default=None)
    parser.add_argument("--val-values", nargs="*", default=[])
    parser.add_argument("--epochs", type=int, default=12, help="epochs of today's recipe (and the plain loop)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--skip-plain", action="store_true", help="skip the single-process PyTorch loop")
    parser.add_argument(
        "--new-preset", default=None, help="a recipe to compare in the same run: a preset name or a preset file"
    )
    parser.add_argument("--ensemble", type=int, default=1, help="members of the new recipe (lvm-ray train --ensemble)")
    parser.add_argument("--new-epochs", type=int, default=None, help="epochs of the new recipe (default: its own)")
    parser.add_argument("--new-num-workers", type=int, default=None, help="workers per member (default: --num-workers)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))


def _val_scores(run: str, data: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ecg_id, label, model output) of RUN's model on RUN's validation split, through the Predictor."""
    from functools import partial

    from lvm_ray import store
    from lvm_ray.predict import Predictor
    from lvm_ray.splits import ids_in_split
    from lvm_ray.train import split_predictions

    ids = ids_in_split(store.read_parquet(os.path.join(run, "split.parquet")), "val")
    model = os.path.join(run, "model.pt")
    arrays = split_predictions(model, data, ids, loader=partial(Predictor.from_checkpoint, model, False))
    order = np.argsort(arrays["ecg_id"].astype(str))  # the same ECG order for both recipes
    return arrays["ecg_id"][order].astype(str), arrays["true"][order], arrays["pred"][order]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Model quality on one validation split, in one run.

    Today's recipe (``--preset``, ``--epochs``) trained by Ray Train, against a plain single-process
    PyTorch loop with the same preset, split, optimiser (global batch and learning rate), schedule
    and epochs, each keeping its best epoch by the preset's selection metric; and, with
    ``--new-preset`` (``--ensemble K``), a new recipe trained by ``lvm-ray train`` on the same split,
    compared with today's on the same validation ECGs (AUROC or r, DeLong test for AUROCs).
    """
    import torch

    from lvm_ray.fitting import (
        epoch_metrics,
        make_optimizer,
        make_scheduler,
        selection_score,
        step_scheduler,
        train_epoch,
        validate_epoch,
    )
    from lvm_ray.model import build_model, read_payload
    from lvm_ray.presets import Preset, get_preset, load_preset_file
    from lvm_ray.splits import SplitSpec
    from lvm_ray.stats import auc_ci, delong_paired_test
    from lvm_ray.train import train

    split = SplitSpec(column=args.split_column, val_values=tuple(args.val_values), test_fraction=0.0)
    common = dict(
        target=args.target,
        num_workers=args.num_workers,
        address=args.address,
        split_column=args.split_column,
        val_values=tuple(args.val_values),
        test_fraction=0.0,
        evaluate_test=False,
        cache_inputs=True,
    )
    report: dict[str, Any] = {"epochs": args.epochs, "split": {"column": args.split_column, "val": args.val_values}}
    with tempfile.TemporaryDirectory() as tmp:
        today_run = os.path.join(tmp, "today")
        started = time.perf_counter()
        result = train(args.data, today_run, preset=args.preset, max_epochs=args.epochs, **common)
        ray_s = time.perf_counter() - started
        preset = Preset.from_dict(read_payload(os.path.join(today_run, "model.pt"))["preset"])
        ids, labels, today_scores = _val_scores(today_run, args.data)
        report.update(preset=preset.name, target=preset.target.column, task=preset.target.task)
        report["ray_train"] = {"best_epoch": result.best_epoch, **result.val_metrics, "wall_s": ray_s}

        if args.new_preset:
            new = (
                load_preset_file(args.new_preset)
                if args.new_preset.endswith((".json", ".yaml", ".yml"))
                else get_preset(args.new_preset)
            )
            new_run = os.path.join(tmp, "new")
            new_common = {**common, "num_workers": args.new_num_workers or args.num_workers}
            started = time.perf_counter()
            if args.ensemble > 1:
                from lvm_ray.ensemble import train_ensemble

                new_result = train_ensemble(
                    args.data, new_run, args.ensemble, preset=new, max_epochs=args.new_epochs, **new_common
                )
            else:
                new_result = train(args.data, new_run, preset=new, max_epochs=args.new_epochs, **new_common)
            new_s = time.perf_counter() - started
            new_ids, new_labels, new_scores = _val_scores(new_run, args.data)
            if not (np.array_equal(ids, new_ids) and np.array_equal(labels, new_labels, equal_nan=True)):
                raise RuntimeError("the two recipes were validated on different ECGs")
            trained = Preset.from_dict(read_payload(os.path.join(new_run, "model.pt"))["preset"])
            report["new_recipe"] = {
                "preset": trained.name,
                "ensemble": args.ensemble,
                "num_workers": new_common["num_workers"],
                "epochs": trained.optim.max_epochs,
                "best_epoch": new_result.best_epoch,
                **new_result.val_metrics,
                "members": getattr(new_result, "members", None),
                "wall_s": new_s,
            }
            if preset.target.task == "binary":
                report["ray_train"]["auroc_ci"] = auc_ci(labels, today_scores)["ci"]
                report["new_recipe"]["auroc_ci"] = auc_ci(labels, new_scores)["ci"]
                report["comparison"] = {
                    "what": "new recipe vs today's on the same validation ECGs (DeLong, paired)",
                    **delong_paired_test(labels, new_scores, today_scores),
                }

    if args.skip_plain:
        return report
    train_arrays = {k: torch.from_numpy(v) for k, v in split_arrays(args.data, preset, split, "train").items()}
    val_arrays = {k: torch.from_numpy(v) for k, v in split_arrays(args.data, preset, split, "val").items()}
    torch.manual_seed(0)
    torch.set_num_threads(args.num_workers)
    model = build_model(preset)
    # The checkpoint's batch is per worker: the plain loop takes the same global batch in one step.
    global_batch = preset.optim.batch_size * args.num_workers
    optimizer = make_optimizer(preset, model.parameters())
    scheduler = make_scheduler(preset, optimizer)
    n, device = len(train_arrays["y"]), torch.device("cpu")

    best: dict[str, Any] = {"val_loss": float("inf")}
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        train_epoch(model, batches(train_arrays, global_batch, True), optimizer, preset, device)
        preds = validate_epoch(model, batches(val_arrays, global_batch, False), preset, device)
        val_loss = preds.loss_sum / preds.n
        metrics = epoch_metrics(preset, **preds.arrays())
        step_scheduler(scheduler, val_loss)
        if selection_score(preset, val_loss, metrics) < selection_score(preset, best["val_loss"], best):
            best = {"val_loss": val_loss, "epoch": epoch, **metrics}
    plain_s = time.perf_counter() - started
    report.update(train_rows=n, val_rows=len(val_arrays["y"]))
    report["plain_pytorch"] = {**best, "global_batch": global_batch, "train_wall_s": plain_s}
    return report
