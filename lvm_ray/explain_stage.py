"""Stage `explain`: per-ECG attributions for a dataset, with a Ray Data actor pool.

Each actor loads the checkpoint once (the loader is injected, as in ``lvm_ray.score``), predicts
with :class:`lvm_ray.predict.Predictor` (the one prediction path) and attributes the prediction
with :func:`lvm_ray.explain.explain` (integrated gradients; the method and its baseline are
described there). Output folder::

    OUT/_explanations.json       marker and summary: data, checkpoint, model_version, method, n, time
    OUT/attributions/*.parquet   ecg_id, attribution (float32 [12, 5000] tensor), lead_share (12),
                                 lv_mass_pred_g, lvmi_pred, baseline_pred, ..., ecg (the waveform)
    OUT/figures/*.png            with --figures: one printed-ECG figure per ECG

The folder is written under a temporary name and moved into place when complete.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

from lvm_ray import store
from lvm_ray.explain import (
    ATTRIBUTIONS_DIR,
    BASELINE,
    DEFAULT_STEPS,
    FIGURES_DIR,
    METHOD,
    SUMMARY_FILE,
    ecg_figure,
    explain,
    explanation_table,
    figure_file_name,
    save_png,
)
from lvm_ray.predict import COVARIATE_INPUTS, Predictor
from lvm_ray.progress import Progress

log = logging.getLogger(__name__)

ModelLoader = Callable[[], Predictor]
OUTPUT_KIND = "explanations"
_FIGURE_COLUMN = "figure_png"


class ExplainStageError(ValueError):
    """The explanations cannot be made as asked (bad selection, output folder, checkpoint)."""


@dataclass
class ExplainResult:
    out: str
    n: int
    seconds: float
    model_version: str
    n_figures: int

    @property
    def seconds_per_ecg(self) -> float:
        return self.seconds / self.n if self.n else float("nan")


class ExplainBatch:
    """Ray Data actor: one Predictor; a batch of shard rows -> explanation rows (and figures)."""

    def __init__(self, loader: ModelLoader, n_steps: int, figures: bool, ids: frozenset[str] | None = None) -> None:
        import torch

        torch.set_num_threads(1)  # one CPU per actor: several actors share the node's cores
        self.predictor = loader()
        self.n_steps = n_steps
        self.figures = figures
        self.ids = ids

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = np.asarray(batch["ecg_id"], dtype=object)
        keep = np.ones(len(ids), dtype=bool) if self.ids is None else np.array([i in self.ids for i in ids])
        metadata = {name: np.asarray(values)[keep] for name, values in batch.items() if name != "ecg"}
        ecg = np.asarray(batch["ecg"])[keep]
        predictions = self.predictor.predict(ecg, metadata)
        explanation = explain(self.predictor, ecg, metadata, n_steps=self.n_steps)
        table = explanation_table(predictions, explanation, ecg=ecg, n_steps=self.n_steps)
        if self.figures:
            pngs = []
            for k in range(len(explanation)):
                title = (
                    f"{predictions['ecg_id'].iloc[k]}: predicted LV mass {predictions['lv_mass_pred_g'].iloc[k]:.0f} g"
                )
                fig = ecg_figure(ecg[k], explanation.attribution[k], title=title, lead_share=explanation.lead_share[k])
                pngs.append(save_png(fig))
            table = table.append_column(_FIGURE_COLUMN, pa.array(pngs, type=pa.binary()))
        return table


def _selected_ids(data: str, ids: Sequence[str]) -> frozenset[str]:
    """The requested ids, all of which must be in the dataset (one line naming the missing)."""
    wanted = list(dict.fromkeys(str(i) for i in ids))
    present: set[str] = set()
    for table in store.iter_shards(data, columns=["ecg_id"]):
        present.update(str(i) for i in table.column("ecg_id").to_pylist())
    missing = [i for i in wanted if i not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ExplainStageError(f"{len(missing)} --ids not in {data}: {shown}")
    return frozenset(wanted)


def _write_batch(tmp: str, table: pa.Table) -> int:
    """One part (and its figures) into the temporary folder; returns the figures written."""
    figures = 0
    if _FIGURE_COLUMN in table.column_names:
        for ecg_id, png in zip(
            table.column("ecg_id").to_pylist(), table.column(_FIGURE_COLUMN).to_pylist(), strict=True
        ):
            store.write_bytes(store.join_url(tmp, FIGURES_DIR, figure_file_name(ecg_id)), png)
            figures += 1
        table = table.drop_columns([_FIGURE_COLUMN])
    store.write_table(store.join_url(tmp, ATTRIBUTIONS_DIR, f"part-{uuid.uuid4().hex[:16]}.parquet"), table)
    return figures


def explain_dataset(
    data: str,
    checkpoint: str,
    out: str,
    *,
    ids: Sequence[str] | None = None,
    limit: int | None = None,
    figures: bool = False,
    loader: ModelLoader | None = None,
    n_steps: int = DEFAULT_STEPS,
    batch_size: int = 8,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    overwrite: bool = False,
    address: str | None = None,
    verbose: bool = False,
) -> ExplainResult:
    """Explain the ECGs of ``data`` (all, the given ``ids``, or the first ``limit``) into ``out``.

    ``overwrite`` replaces earlier explanations in ``out`` (nothing else is ever replaced).
    """
    from ray.data import ActorPoolStrategy

    from lvm_ray.model import CheckpointError
    from lvm_ray.ray_utils import ensure_connected, read_ecg_dataset, resolve_gpu

    started = time.time()
    if ids and limit is not None:
        raise ExplainStageError("give either --ids or --limit, not both")
    if limit is not None and limit < 1:
        raise ExplainStageError(f"--limit must be at least 1, got {limit}")
    if n_steps < 2:
        raise ExplainStageError(f"--steps must be at least 2, got {n_steps}")
    try:
        manifest = store.read_manifest(data)
        current = store.check_output(out, OUTPUT_KIND, inputs=[data])
    except store.StoreError as exc:
        raise ExplainStageError(str(exc)) from exc
    if current == OUTPUT_KIND and not overwrite:
        raise ExplainStageError(f"--out {out} already holds explanations; pass --overwrite or choose another folder")
    selected = _selected_ids(data, ids) if ids else None
    try:
        version = Predictor.checkpoint_version(checkpoint) if loader is None else loader().version
    except CheckpointError as exc:
        raise ExplainStageError(str(exc)) from exc
    n_rows = int(manifest["n_rows"])
    n_total = len(selected) if selected is not None else min(limit or n_rows, n_rows)

    ensure_connected(address, verbose=verbose)
    import ray

    use_gpu = resolve_gpu(use_gpu, workers=max(1, num_actors or 1), stage="explain")
    loader = loader or partial(Predictor.from_checkpoint, checkpoint, use_gpu)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = num_actors or (max(1, gpus) if use_gpu else max(1, min(4, cpus // 2)))
    actors = max(1, min(actors, n_total))
    present = {c["name"] for c in manifest["columns"]}
    columns = [c for c in ("ecg_id", "ecg", *COVARIATE_INPUTS) if c in present]
    dataset = read_ecg_dataset(data, columns=columns, read_concurrency=max(1, actors // 2))
    if limit is not None:
        dataset = dataset.limit(limit)
    explained = dataset.map_batches(
        ExplainBatch,
        fn_constructor_kwargs={"loader": loader, "n_steps": n_steps, "figures": figures, "ids": selected},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=1, max_size=actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 1,
    )
    tmp = store.temporary_sibling(out)
    n_done = n_figures = 0
    try:
        with Progress(n_total, "explain") as progress:
            for table in explained.iter_batches(batch_size=None, batch_format="pyarrow"):
                if table.num_rows == 0:
                    continue
                n_figures += _write_batch(tmp, table)
                n_done += table.num_rows
                progress.update(table.num_rows)
        seconds = time.time() - started
        summary: dict[str, Any] = {
            "status": "finished",
            "data": data,
            "checkpoint": checkpoint,
            "model_version": version,
            "method": METHOD,
            "n_steps": n_steps,
            "baseline": BASELINE,
            "grid": "canonical 12 leads x 5000 samples at 500 Hz",
            "n": n_done,
            "n_figures": n_figures,
            "seconds": round(seconds, 2),
        }
        if n_done != n_total:
            raise ExplainStageError(f"{n_done} of {n_total} ECGs were explained (nothing was written); re-run")
        store.write_json(store.join_url(tmp, SUMMARY_FILE), summary)
        store.commit_folder(tmp, out)
    except BaseException:
        if store.exists(tmp):
            fs, path = store.filesystem(tmp)
            fs.rm(path, recursive=True)
        raise
    return ExplainResult(out=out, n=n_done, seconds=seconds, model_version=version, n_figures=n_figures)


def format_summary(result: ExplainResult) -> str:
    return (
        f"explain -> {result.out}\n"
        f"  model        : {result.model_version}\n"
        f"  ECGs         : {result.n} ({result.n_figures} figures)\n"
        f"  time         : {result.seconds:.1f} s ({result.seconds_per_ecg:.2f} s per ECG)\n"
        f"  attributions : {store.join_url(result.out, ATTRIBUTIONS_DIR)}"
    )
