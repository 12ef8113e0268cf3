"""Stage `tune`: Ray Tune (ASHA) over a preset's main choices, chosen on the validation split only.

Each trial is one Ray Train run of the `train` worker loop (``lvm_ray.train.train_func``, the
epoch logic of ``lvm_ray.fitting``) with its own choice of learning rate, width, kernel,
dropout and epochs, in ``RUN/trials/<trial>/`` (its ``metrics.jsonl``, checkpoints in ``ray/``).
The shards are read and preprocessed once for all trials: what the search varies does not
change the inputs (rate, length, normalisation, covariates and target are the preset's).
ASHA stops trials that trail at its rungs; the trial with the best validation value of the
preset's selection metric (AUROC for a binary target, loss for regression) at any epoch wins.
The test split, if the split has one, is never read.

Layout of ``RUN``::

    RUN/tune.json          search space, every trial (choices, best epoch and metric, status), the best
    RUN/best_preset.json   the best trial's preset (``Preset.to_dict``): ``train --preset-file`` reads it
    RUN/split.parquet      the split every trial used
    RUN/trials/<trial>/    one trial: metrics.jsonl, ray/ (Ray Train's checkpoints)
    RUN/tune_ray/          Ray Tune's own experiment state
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import posixpath
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lvm_ray import __version__, store
from lvm_ray.presets import REAL_DATA_PRESET, SELECTION_METRICS, Preset, get_preset, preset_file_text
from lvm_ray.runs import SPLIT_FILE, TrainConfig, index_pass, make_config
from lvm_ray.splits import SPLIT_CODES, SplitError, SplitSpec, split_names

log = logging.getLogger(__name__)

TUNE_FILE = "tune.json"
BEST_PRESET_FILE = "best_preset.json"
TRIALS_DIR = "trials"
TUNE_RAY_DIR = "tune_ray"
#: Everything a tuning writes: the only names ``--overwrite`` removes from RUN.
TUNE_OUTPUTS = (TUNE_FILE, BEST_PRESET_FILE, SPLIT_FILE, TRIALS_DIR, TUNE_RAY_DIR)
#: Width multipliers of the network's channels (stem, dense blocks, dense layers) the search tries.
WIDTHS = (0.75, 1.0, 1.5)
#: Odd convolution kernels the search tries (samples at the preset's rate).
KERNELS = (5, 7, 9, 11, 15)


class TuneError(ValueError):
    """A tuning cannot start (bad arguments, an output folder holding something else)."""


@dataclass
class TuneResult:
    run: str
    preset_file: str
    metric: str
    best_value: float
    best_trial: str
    best_epoch: int
    best_choices: dict[str, Any]
    n_trials: int
    n_stopped_early: int
    wall_s: float

    def summary(self) -> str:
        choices = ", ".join(f"{k} {_fmt(v)}" for k, v in self.best_choices.items())
        return "\n".join(
            [
                f"tune -> {self.run}",
                f"  trials      : {self.n_trials} ({self.n_stopped_early} stopped early by ASHA)",
                f"  best        : {self.best_trial}: validation {self.metric} {self.best_value:.4f} "
                f"(epoch {self.best_epoch})",
                f"  choices     : {choices}",
                f"  preset file : {self.preset_file}  (lvm-ray train --preset-file {self.preset_file} ...)",
                f"  time        : {self.wall_s:.0f} s",
            ]
        )


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# --- the search space (pure) ----------------------------------------------------------------------


def epoch_choices(max_epochs: int) -> list[int]:
    """Epoch budgets the search tries: about half, three quarters and all of ``max_epochs``."""
    return sorted({max(1, round(max_epochs * f)) for f in (0.5, 0.75, 1.0)})


def apply_choices(preset: Preset, choices: Mapping[str, Any], name: str | None = None) -> Preset:
    """The preset with a trial's choices: lr, width (channel multiplier), kernel, dropout, max_epochs."""
    arch, optim = preset.arch, preset.optim
    width = float(choices.get("width", 1.0))

    def scaled(n: int) -> int:
        return max(4, int(round(n * width)))

    arch = dataclasses.replace(
        arch,
        kernel_size=int(choices.get("kernel_size", arch.kernel_size)),
        stem_filters=scaled(arch.stem_filters),
        block_filters=tuple(scaled(f) for f in arch.block_filters),
        dense_units=tuple(scaled(u) for u in arch.dense_units),
        dropout=round(float(choices.get("dropout", arch.dropout)), 3),
    )
    optim = dataclasses.replace(
        optim, lr=float(choices.get("lr", optim.lr)), max_epochs=int(choices.get("max_epochs", optim.max_epochs))
    )
    return dataclasses.replace(preset, name=name or preset.name, arch=arch, optim=optim)


def metric_key(preset: Preset) -> tuple[str, str]:
    """(the reported metric Tune compares, 'min'/'max') for the preset's selection metric."""
    name = preset.optim.selection_metric
    return ("val_loss" if name == "loss" else f"val_{name}"), SELECTION_METRICS[name]


def _space(preset: Preset, max_epochs: int) -> dict[str, Any]:
    from ray import tune

    lr = preset.optim.lr
    return {
        "lr": tune.loguniform(lr / 4, lr * 3),
        "width": tune.choice(list(WIDTHS)),
        "kernel_size": tune.choice(list(KERNELS)),
        "dropout": tune.quniform(0.0, 0.4, 0.05),
        "max_epochs": tune.choice(epoch_choices(max_epochs)),
    }


# --- the trial (runs in a Ray Tune trial actor) ----------------------------------------------------------


def _trial(config: dict[str, Any], base: TrainConfig, datasets: dict[str, Any]) -> None:
    """One trial: the preset with this trial's choices, one Ray Train run reporting each epoch to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lvm_ray.train import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    preset = apply_choices(base.preset, config)
    cfg = dataclasses.replace(base, run=store.join_url(base.run, TRIALS_DIR, trial_id), preset=preset)
    build_trainer(cfg, datasets, callbacks=[TuneReportCallback()]).fit()


def _printer(metric: str) -> Any:
    """A Tune callback printing one line per trial epoch and per finished trial (Tune's tables stay off)."""
    from ray.tune import Callback

    class Lines(Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            value = result.get(metric, float("nan"))
            print(
                f"[lvm-ray tune] {trial.trial_id} epoch {result.get('epoch', '?')}/{trial.config.get('max_epochs')} "
                f"{metric}={value:.4f} val_loss={result.get('val_loss', float('nan')):.4f}",
                flush=True,
            )

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            c = trial.config
            print(
                f"[lvm-ray tune] {trial.trial_id} done: lr {c['lr']:.2g}, width {c['width']}, kernel "
                f"{c['kernel_size']}, dropout {c['dropout']:.2f}, {c['max_epochs']} epochs",
                flush=True,
            )

    return Lines()


# --- the driver -----------------------------------------------------------------------------------


def check_tune_folder(run: str, overwrite: bool) -> None:
    """RUN must be new, empty, or an earlier tuning (replaced only with ``overwrite``)."""
    fs, path = store.filesystem(run)
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise TuneError(f"--run {run} is a file, not a folder")
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    names = [n for n in names if not n.startswith(".")]
    if not names:
        return
    if TUNE_FILE not in names and not (TRIALS_DIR in names and set(names) <= set(TUNE_OUTPUTS)):
        shown = ", ".join(sorted(names)[:3]) + (" ..." if len(names) > 3 else "")
        raise TuneError(f"--run {run} is a non-empty folder that is not an lvm-ray tuning ({shown}); choose another")
    if not overwrite:
        raise TuneError(f"--run {run} holds an earlier tuning; pass --overwrite to replace it or choose another --run")
    foreign = set(names) - set(TUNE_OUTPUTS)
    if foreign:
        raise TuneError(f"--run {run} holds files lvm-ray tune did not write ({', '.join(sorted(foreign))})")
    for name in TUNE_OUTPUTS:
        target = store.join_url(path, name)
        if fs.exists(target):
            fs.rm(target, recursive=True)


def concurrent_trials(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> int:
    """Trials the connected cluster runs at once: each holds its Train workers and one CPU for its driver."""
    import ray

    resources = ray.cluster_resources()
    fit = int(resources.get("CPU", 0) // (num_workers * cpus_per_worker + 1))
    if use_gpu:
        fit = min(fit, int(resources.get("GPU", 0) // num_workers))
    return max(1, fit)


def tune(
    data: str,
    run: str,
    target: str | None = None,
    preset: str | Preset = REAL_DATA_PRESET,
    *,
    num_samples: int = 8,
    max_epochs: int | None = None,
    split_column: str | None = None,
    val_values: Sequence[str] = (),
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    task: str | None = None,
    num_workers: int = 1,
    cpus_per_worker: float = 1.0,
    use_gpu: bool | None = False,
    max_concurrent: int | None = None,
    grace_period: int = 2,
    time_budget_s: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
    address: str | None = None,
    verbose: bool = False,
) -> TuneResult:
    """Search ``num_samples`` configurations of ``preset`` for ``target`` with ASHA; write RUN/best_preset.json.

    The split is the one `train` would make with the same arguments; trials see only its train and
    val rows, and the choice uses validation metrics only. ``max_epochs`` bounds every trial (the
    search tries about 1/2, 3/4 and all of it); ``grace_period`` is ASHA's first rung (epochs);
    ``time_budget_s`` stops the search (keeping what finished). ``num_workers`` per trial: 1 by
    default, so that trials, not workers, use the cluster's CPUs.
    """
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler

    from lvm_ray.ray_utils import ensure_connected, resolve_gpu
    from lvm_ray.train import _storage, build_datasets

    started = time.time()
    if num_samples < 1:
        raise TuneError(f"--num-samples must be at least 1, got {num_samples}")
    if grace_period < 1:
        raise TuneError(f"grace period must be at least 1 epoch, got {grace_period}")
    try:
        split = SplitSpec(
            column=split_column,
            val_values=tuple(str(v) for v in val_values),
            test_values=(),
            test_fraction=0.0 if split_column else test_fraction,
            val_fraction=val_fraction,
        )
        base = get_preset(preset)
    except (SplitError, ValueError) as exc:
        raise TuneError(str(exc).strip("'\"")) from exc
    check_tune_folder(run, overwrite)
    target = target or base.target.column
    index = index_pass(data, target, split)
    cfg = make_config(
        data,
        run,
        base,
        target=target,
        task=task,
        num_workers=num_workers,
        max_epochs=max_epochs,
        split=split,
        index=index,
        cpus_per_worker=cpus_per_worker,
        seed=seed,
        cache_inputs=True,
        max_failures=0,
    )
    known = index["labelled"].to_numpy(dtype=bool)
    counts = {name: int(((index["split"] == code).to_numpy() & known).sum()) for name, code in SPLIT_CODES.items()}
    if counts["train"] == 0 or counts["val"] == 0:
        raise TuneError(f"need labelled rows in train and val splits, got {counts}")
    budget = cfg.preset.optim.max_epochs
    metric, mode = metric_key(cfg.preset)

    ensure_connected(address, verbose=verbose)
    cfg = dataclasses.replace(cfg, use_gpu=resolve_gpu(use_gpu, num_workers, stage="tune"))
    split_table = index[["ecg_id", *[c for c in ("patient_id",) if c in index]]].copy()
    split_table["split"] = split_names(index["split"].to_numpy())
    split_table["labelled"] = known
    store.write_table(store.join_url(run, SPLIT_FILE), split_table)
    datasets = build_datasets(cfg, split_table)  # read and preprocessed once, for every trial
    parallel = max_concurrent or concurrent_trials(num_workers, cpus_per_worker, cfg.use_gpu)
    storage_path, storage_fs = _storage(run)
    trainable = ray_tune.with_parameters(_trial, base=cfg, datasets=datasets)
    tuner = ray_tune.Tuner(
        trainable,
        param_space=_space(cfg.preset, budget),
        tune_config=ray_tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=num_samples,
            scheduler=ASHAScheduler(max_t=budget, grace_period=min(grace_period, budget), reduction_factor=3),
            # The generator bounds concurrency itself (Tune ignores max_concurrent_trials with one):
            # a trial's driver holds a CPU while its Train workers need theirs, so too many at once would wait forever.
            search_alg=ray_tune.search.BasicVariantGenerator(random_state=seed, max_concurrent=parallel),
            time_budget_s=time_budget_s,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=ray_tune.RunConfig(
            name=TUNE_RAY_DIR,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            verbose=1 if verbose else 0,
            callbacks=[_printer(metric)],
        ),
    )
    if not verbose:  # Tune's own tables stay off the console (our callback prints one line per epoch)
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    grid = tuner.fit()

    trials = []
    for result in grid:
        frame = result.metrics_dataframe
        rows = [] if frame is None or metric not in getattr(frame, "columns", ()) else frame.to_dict("records")
        values = [float(r[metric]) for r in rows if r.get(metric) is not None and math.isfinite(float(r[metric]))]
        best_row = None
        if values:
            pick = np.argmax if mode == "max" else np.argmin
            usable = [r for r in rows if r.get(metric) is not None and math.isfinite(float(r[metric]))]
            best_row = usable[int(pick([float(r[metric]) for r in usable]))]
        choices = {k: result.config[k] for k in ("lr", "width", "kernel_size", "dropout", "max_epochs")}
        trials.append(
            {
                "trial": posixpath.basename(str(result.path).rstrip("/")),
                "choices": choices,
                "epochs_run": len(rows),
                "stopped_early": bool(rows) and len(rows) < int(choices["max_epochs"]),
                "best_epoch": int(best_row["epoch"]) if best_row else None,
                f"best_{metric}": float(best_row[metric]) if best_row else None,
                "val_loss_at_best": float(best_row["val_loss"]) if best_row and "val_loss" in best_row else None,
                "error": str(result.error)[-500:] if result.error else None,
            }
        )
    scored = [t for t in trials if t[f"best_{metric}"] is not None]
    if not scored:
        errors = "; ".join(t["error"] for t in trials if t["error"]) or "no trial reported a metric"
        raise TuneError(f"tuning produced no usable trial: {errors[-1000:]}")
    best = (max if mode == "max" else min)(scored, key=lambda t: t[f"best_{metric}"])
    tuned = apply_choices(cfg.preset, best["choices"], name=f"{cfg.preset.name}-tuned")
    tuned = dataclasses.replace(
        tuned,
        description=f"{base.name} tuned by lvm-ray tune on {data} (validation {metric} "
        f"{best[f'best_{metric}']:.4f}, trial {best['trial']}): lr {best['choices']['lr']:.3g}, width x"
        f"{best['choices']['width']}, kernel {best['choices']['kernel_size']}, dropout "
        f"{best['choices']['dropout']:.2f}, {best['choices']['max_epochs']} epochs; otherwise as {base.name}.",
    )
    preset_url = store.join_url(run, BEST_PRESET_FILE)
    store.write_text(preset_url, preset_file_text(tuned))
    result = TuneResult(
        run=run,
        preset_file=preset_url,
        metric=metric,
        best_value=float(best[f"best_{metric}"]),
        best_trial=best["trial"],
        best_epoch=int(best["best_epoch"]),
        best_choices=best["choices"],
        n_trials=len(trials),
        n_stopped_early=sum(bool(t["stopped_early"]) for t in trials),
        wall_s=time.time() - started,
    )
    store.write_json(
        store.join_url(run, TUNE_FILE),
        {
            "package_version": __version__,
            "data": data,
            "base_preset": base.name,
            "target": cfg.preset.target.column,
            "task": cfg.preset.target.task,
            "split": dataclasses.asdict(split),
            "split_counts": counts,
            "metric": metric,
            "mode": mode,
            "search_space": {
                "lr": ["loguniform", cfg.preset.optim.lr / 4, cfg.preset.optim.lr * 3],
                "width": list(WIDTHS),
                "kernel_size": list(KERNELS),
                "dropout": ["quniform", 0.0, 0.4, 0.05],
                "max_epochs": epoch_choices(budget),
            },
            "scheduler": {"name": "ASHA", "max_t": budget, "grace_period": grace_period, "reduction_factor": 3},
            "num_samples": num_samples,
            "concurrent_trials": parallel,
            "trials": trials,
            "best": best,
            "preset_file": BEST_PRESET_FILE,
            "result": dataclasses.asdict(result),
        },
    )
    log.info("tuning finished: %s", json.dumps(store.jsonable(best)))
    return result


__all__ = ["BEST_PRESET_FILE", "TUNE_OUTPUTS", "TuneError", "TuneResult", "apply_choices", "epoch_choices", "tune"]
