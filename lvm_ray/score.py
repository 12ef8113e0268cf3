"""Stage `score`: cohort-scale batch prediction with a Ray Data actor pool.

Each actor loads the checkpoint once (the loader is injected, so tests can hand in a tiny
model) and predicts LV mass, LVMI, LVH and the voltage rules in one pass over the streamed
shards (``lvm_ray.predict``: the same path the online endpoint uses). Output is a folder of
parquet parts keyed by ecg_id. Re-running completes what a crashed run left undone and never
duplicates an ecg_id: ids already present are skipped, and unreadable (half-written) parts
are removed first.
"""

from __future__ import annotations

import logging
import math
import posixpath
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lvm_ray import store
from lvm_ray.conformal import CalibrationError, check_level
from lvm_ray.model import read_payload
from lvm_ray.predict import Predictor, checkpoint_calibration, model_version
from lvm_ray.progress import Progress

log = logging.getLogger(__name__)

ModelLoader = Callable[[], Predictor]
#: Columns of the shards that never travel into predictions (the waveform, generator truth).
_NOT_CARRIED_PREFIXES = ("true_",)
SUMMARY_FILE = "_scoring.json"
PARTS_DIR = "parts"
#: Everything score writes into --out: the only names --overwrite removes.
SCORE_OUTPUTS = (PARTS_DIR, SUMMARY_FILE)


class ScoringError(RuntimeError):
    """The output folder cannot take these predictions (e.g. another model's are there)."""


@dataclass
class ScoreResult:
    out: str
    n_scored: int
    n_skipped: int
    n_total: int
    seconds: float
    model_version: str
    #: ECGs that ingest flagged (quality_flag, e.g. amplitude-normalised): scored, but meaningless.
    n_flagged: int = 0
    #: Level of the prediction intervals, and the id of the checkpoint's calibration (None: uncalibrated).
    interval_level: float | None = None
    calibration_id: str | None = None


def _parts_url(out: str) -> str:
    return store.join_url(out, PARTS_DIR)


def existing_predictions(out: str) -> tuple[set[str], set[str]]:
    """ecg_ids and model versions already in ``out``; removes parts that cannot be read."""
    fs, root = fsspec.core.url_to_fs(_parts_url(out))
    if not fs.exists(root):
        return set(), set()
    for stale in fs.glob(posixpath.join(root, ".*.tmp")):  # a part cut short before its rename
        fs.rm(stale)
    ids: set[str] = set()
    versions: set[str] = set()
    for path in sorted(fs.glob(posixpath.join(root, "*.parquet"))):
        try:
            with fs.open(path, "rb") as f:
                table = pq.read_table(f, columns=["ecg_id", "model_version"])
        except Exception as exc:  # a part cut short by a crash: its rows are scored again
            log.warning("removing unreadable prediction part %s (%s)", posixpath.basename(path), exc)
            fs.rm(path)
            continue
        ids.update(table.column("ecg_id").to_pylist())
        versions.update(table.column("model_version").unique().to_pylist())
    return ids, versions


def read_predictions(out: str, columns: list[str] | None = None) -> pd.DataFrame:
    """All prediction parts in ``out`` as one DataFrame."""
    fs, root = fsspec.core.url_to_fs(_parts_url(out))
    paths = sorted(fs.glob(posixpath.join(root, "*.parquet"))) if fs.exists(root) else []
    if not paths:
        raise store.StoreError(f"no predictions in {out}; run `lvm-ray score` first")
    tables = []
    for path in paths:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


class ScoreBatch:
    """Ray Data actor: holds one Predictor, turns a batch of shard rows into prediction rows."""

    def __init__(self, loader: ModelLoader, carried: pa.Schema, skip_ids: frozenset[str] = frozenset()) -> None:
        self.predictor = loader()
        self.carried = carried
        self.skip_ids = skip_ids

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = np.asarray(batch["ecg_id"], dtype=object)
        keep = np.array([i not in self.skip_ids for i in ids], dtype=bool)
        metadata = {name: np.asarray(values)[keep] for name, values in batch.items() if name != "ecg"}
        ecg = np.asarray(batch["ecg"])[keep]
        predictions = self.predictor.predict(ecg, metadata)
        carried = pd.DataFrame({name: metadata[name] for name in self.carried.names if name not in predictions})
        frame = pd.concat([predictions, carried.reset_index(drop=True)], axis=1)
        return store.frame_to_arrow(frame, known_types=self.carried)


def check_output_folder(out: str, data: str) -> None:
    """Refuse to write predictions into the input dataset, a file, or a folder of something else."""
    try:
        store.check_output(out, "predictions", inputs=[data])
    except store.StoreError as exc:
        raise ScoringError(str(exc)) from exc


def remove_predictions(out: str) -> None:
    """What --overwrite removes: the prediction parts and the scoring summary, nothing else."""
    fs, path = store.filesystem(out)
    for name in SCORE_OUTPUTS:
        target = posixpath.join(path, name)
        if fs.exists(target):
            fs.rm(target, recursive=True)


def _write_part(out: str, tables: list[pa.Table]) -> None:
    """One part file, written under a temporary name and renamed: a part is whole or absent."""
    if not tables:
        return
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    name = f"part-{uuid.uuid4().hex[:16]}.parquet"
    tmp = store.join_url(_parts_url(out), f".{name}.tmp")
    store.write_table(tmp, table)
    fs, path = store.filesystem(tmp)
    fs.mv(path, posixpath.join(posixpath.dirname(path), name))


def _write_parts(predictions: Any, out: str, rows_per_file: int, progress: Progress) -> None:
    """Stream prediction batches to parts of about ``rows_per_file`` rows as they finish.

    A killed or interrupted run keeps every part written so far (Ctrl-C also flushes what is
    buffered); re-running scores only the ECGs not in a part.
    """
    buffer: list[pa.Table] = []
    rows = 0
    with progress:
        try:
            for batch in predictions.iter_batches(batch_size=None, batch_format="pyarrow"):
                buffer.append(batch)
                rows += batch.num_rows
                progress.update(batch.num_rows)
                if rows >= rows_per_file:
                    _write_part(out, buffer)
                    buffer, rows = [], 0
        finally:
            _write_part(out, buffer)


def score(
    data: str,
    checkpoint: str,
    out: str,
    *,
    loader: ModelLoader | None = None,
    batch_size: int = 64,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    overwrite: bool = False,
    rows_per_file: int = 2048,
    address: str | None = None,
    verbose: bool = False,
    interval_level: float | None = None,
) -> ScoreResult:
    """Score every ECG of ``data`` with the model at ``checkpoint`` into ``out`` (a folder of parquet).

    Connects to Ray (``address``; default an embedded local Ray) after the arguments are checked;
    ``loader`` defaults to loading ``checkpoint``; ``use_gpu`` follows the one GPU policy
    (:func:`lvm_ray.ray_utils.resolve_gpu`); ``num_actors`` defaults to one per GPU or a CPU
    share. ``overwrite`` removes only earlier predictions (parts/ and the summary).
    ``interval_level``: level of the lv_mass_pred_lo_g/hi_g intervals (default: the calibration's,
    0.9); an uncalibrated checkpoint gives null intervals and lvh_prob_calibrated.
    """
    from ray.data import ActorPoolStrategy

    from lvm_ray.ray_utils import ensure_connected, read_ecg_dataset, resolve_gpu

    started = time.time()
    manifest = store.read_manifest(data)
    check_output_folder(out, data)
    version, intervals = _checkpoint_identity(checkpoint, interval_level) if checkpoint else (None, {})
    if overwrite:
        remove_predictions(out)
    done_ids, versions = existing_predictions(out)
    if version is not None and versions - {version}:
        raise ScoringError(
            f"{out} already holds predictions of model {sorted(versions - {version})}; "
            f"pass --overwrite or choose another --out (this checkpoint is {version})"
        )
    _check_same_intervals(out, intervals, bool(done_ids))
    ensure_connected(address, verbose=verbose)
    import ray

    # The marker first: an interrupted run's folder is recognised as predictions, and resumed.
    summary_url = store.join_url(out, SUMMARY_FILE)
    if not store.exists(summary_url):
        store.write_json(summary_url, {"status": "running", "data": data, "checkpoint": checkpoint, **intervals})

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = resolve_gpu(use_gpu, workers=max(1, num_actors or 1), stage="score")
    loader = loader or partial(Predictor.from_checkpoint, checkpoint, use_gpu, interval_level=interval_level)
    version = version or loader().version
    n_total = int(manifest["n_rows"])
    log.info("scoring %d ECGs (%d already scored) with %s", n_total, len(done_ids), version)
    if len(done_ids) < n_total:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = num_actors or (max(1, gpus) if use_gpu else max(1, min(4, cpus // 2)))
        dataset = read_ecg_dataset(data, read_concurrency=max(1, actors // 2))
        carried = pa.schema(
            [f for f in store.dataset_schema(data) if f.name != "ecg" and not f.name.startswith(_NOT_CARRIED_PREFIXES)]
        )
        predictions = dataset.map_batches(
            ScoreBatch,
            fn_constructor_kwargs={"loader": loader, "carried": carried, "skip_ids": frozenset(done_ids)},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(min_size=1, max_size=actors),
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else 1,
        )
        _write_parts(predictions, out, rows_per_file, Progress(n_total, "score", initial=len(done_ids)))
    scored_ids, _ = existing_predictions(out)
    result = ScoreResult(
        out=out,
        n_scored=len(scored_ids) - len(done_ids),
        n_skipped=len(done_ids),
        n_total=n_total,
        seconds=time.time() - started,
        model_version=version,
        n_flagged=int(manifest.get("n_flagged", 0) or 0),
        **intervals,
    )
    store.write_json(summary_url, {**result.__dict__, "status": "finished", "data": data, "checkpoint": checkpoint})
    if len(scored_ids) != n_total:
        raise ScoringError(f"{len(scored_ids)} of {n_total} ECGs have predictions in {out}; re-run to complete")
    return result


def _checkpoint_identity(checkpoint: str, interval_level: float | None) -> tuple[str, dict[str, Any]]:
    """(model_version, {"interval_level", "calibration_id"}) of a checkpoint, read once before Ray starts."""
    from lvm_ray.model import CheckpointError

    try:
        level = None if interval_level is None else check_level(interval_level)
    except CalibrationError as exc:
        raise ScoringError(str(exc)) from exc
    payload = read_payload(checkpoint)
    version = model_version(payload)
    try:
        calibration = checkpoint_calibration(payload, version)
    except CheckpointError as exc:
        raise ScoringError(str(exc)) from exc
    if calibration is None:
        return version, {"interval_level": None, "calibration_id": None}
    return version, {"interval_level": level or calibration.level, "calibration_id": calibration.identity}


def _check_same_intervals(out: str, intervals: dict[str, Any], resuming: bool) -> None:
    """A resumed run must not mix intervals of two levels or calibrations in one folder."""
    url = store.join_url(out, SUMMARY_FILE)
    if not resuming or not intervals or not store.exists(url):
        return
    before = store.read_json(url)  # a summary from before intervals existed has neither key: None
    for key, what in (("calibration_id", "calibration"), ("interval_level", "interval level")):
        if before.get(key) != intervals.get(key):
            then, now = (v if v is not None else "none" for v in (before.get(key), intervals.get(key)))
            raise ScoringError(
                f"{out} holds predictions with another {what} ({then}; now {now}); "
                "pass --overwrite or choose another --out"
            )


def format_summary(result: ScoreResult) -> str:
    rate = result.n_scored / result.seconds if result.seconds > 0 else math.nan
    return (
        f"score -> {result.out}\n"
        f"  model        : {result.model_version}\n"
        f"  ECGs         : {result.n_total} ({result.n_scored} scored now, {result.n_skipped} already there)\n"
        f"  time         : {result.seconds:.1f} s ({rate:.1f} ECGs/s)\n"
        + (
            f"  intervals    : {100 * result.interval_level:g}% prediction intervals, lvh_prob_calibrated "
            f"(calibration {result.calibration_id})"
            if result.interval_level
            else "  intervals    : none (uncalibrated checkpoint; `lvm-ray calibrate` adds them)"
        )
    ) + (
        f"\nwarning: {result.n_flagged} ECG(s) look amplitude-normalised (quality_flag column): "
        "voltage rules and LV mass predictions are meaningless on them"
        if result.n_flagged
        else ""
    )


def predictions_summary(out: str) -> dict[str, Any]:
    frame = read_predictions(out, columns=["lv_mass_pred_g", "lvh_pred", "lvh_any_rule"])
    return {
        "n": len(frame),
        "lv_mass_pred_mean_g": float(frame.lv_mass_pred_g.mean()),
        "lvh_pred_prevalence": float(frame.lvh_pred.dropna().astype(bool).mean()),
        "any_rule_prevalence": float(frame.lvh_any_rule.dropna().astype(bool).mean()),
    }
