"""`lvm-ray validate`: external validation of a trained or imported model in one command, on Ray.

ECG exports -> ingest (bad records quarantined) -> score -> evaluate against the labels (CMR LV
mass, or an LVH column where there is none) and the voltage rules -> report. Everything goes
under one folder ``DIR``::

    DIR/_validation.json   the inputs and state of this validation (recognises DIR as one)
    DIR/data/              the ingested dataset; DIR/data/quarantine.parquet: records refused, with reasons
    DIR/predictions/       LV mass, LVMI, LVH and the voltage rules per ECG (parquet parts)
    DIR/evaluation/        metrics.json, table.md, pairs/roc parquet (lvm_ray.evaluate)
    DIR/report.html        the self-contained report (lvm_ray.report)
    DIR/outputs.json       where each output is, and the counts (stored, quarantined, labelled, evaluated)

Every argument is checked before Ray starts. A re-run with the same inputs resumes: a finished
ingest is reused, scoring completes what is missing (lvm_ray.score), evaluation and report are
redone. ``overwrite`` replaces only these outputs (each stage removes only its own files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import pandas as pd

from lvm_ray import store
from lvm_ray.evaluate import METRICS_JSON, TABLE_MD, reference_lvh
from lvm_ray.ingest import IngestOptions, discover_sources, read_labels
from lvm_ray.lvh import LVHConfig
from lvm_ray.model import check_payload, read_payload
from lvm_ray.predict import model_version

log = logging.getLogger(__name__)

STATE_JSON = store.OUTPUT_MARKERS["validation"]
OUTPUTS_JSON = "outputs.json"
DATA_DIR = "data"
PREDICTIONS_DIR = "predictions"
EVALUATION_DIR = "evaluation"
REPORT_HTML = "report.html"


class ValidationError(ValueError):
    """A validation cannot run with these arguments, or found nothing to evaluate (one-line message)."""


def _table_digest(table: pd.DataFrame) -> str:
    """A digest of a labels table's content: a changed table is not resumed on."""
    digest = hashlib.sha256(json.dumps([str(c) for c in table.columns]).encode())
    digest.update(pd.util.hash_pandas_object(table.astype(str), index=False).to_numpy().tobytes())
    return digest.hexdigest()


def _check_reference(
    user_labels: pd.DataFrame, found_labels: pd.DataFrame | None, lvh_column: str | None, name: str
) -> None:
    """The labels must give something to evaluate against: CMR lv_mass_g, or a binary LVH column."""
    tables = [t for t in (user_labels, found_labels) if t is not None]
    columns = {str(c) for t in tables for c in t.columns}
    shown = ", ".join(repr(str(c)[:40]) for c in list(user_labels.columns)[:10])
    if lvh_column is not None:
        if lvh_column not in columns:
            raise ValidationError(
                f"--lvh-column {lvh_column!r} is not a column of labels table {name} (nor of the exports' "
                f"metadata); the table has {shown}"
            )
        for table in tables:
            if lvh_column in table.columns:
                reference_lvh(table[lvh_column], lvh_column)  # a non-binary column fails here, before Ray
    elif "lv_mass_g" not in columns:
        hint = " (it has an lvh column: pass --lvh-column lvh)" if "lvh" in columns else ""
        raise ValidationError(
            f"labels table {name} has no lv_mass_g column (CMR LV mass) and no --lvh-column was given{hint}; "
            f"it has {shown}"
        )


def _roundtrip(value: Any) -> Any:
    """``value`` as it reads back from JSON, so that recorded and current inputs compare equal."""
    return json.loads(json.dumps(store.jsonable(value), default=str))


def validate(
    exports: Sequence[str],
    labels: str | pd.DataFrame,
    checkpoint: str,
    out: str,
    *,
    lvh_column: str | None = None,
    address: str | None = None,
    overwrite: bool = False,
    options: IngestOptions = IngestOptions(),
    lvh_config: LVHConfig = LVHConfig(),
    batch_size: int = 64,
    num_actors: int | None = None,
    use_gpu: bool | None = None,
    verbose: bool = False,
    progress: Callable[[int, int], None] | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Validate the model at ``checkpoint`` on ECG ``exports`` against ``labels``; write everything to ``out``.

    ``labels``: a CSV/parquet (any URL) or DataFrame keyed by ecg_id (the file's path under the
    exports' common folder, without suffix; PTB-XL: record_id) or patient_id, with CMR lv_mass_g
    (and sex, height_cm/weight_kg or bsa_m2) and/or the LVH column named by ``lvh_column``, which
    is the reference where there is no CMR mass (e.g. PTB-XL's cardiologist ``lvh``).
    ``echo`` receives each stage's summary (default: the log). Returns what DIR/outputs.json holds.
    Raises ValidationError, StoreError, FileNotFoundError, CheckpointError or ValueError with a
    one-line message; the first three kinds before Ray is started.
    """
    from lvm_ray.evaluate import evaluate
    from lvm_ray.ingest import format_summary as format_ingest
    from lvm_ray.ingest import ingest
    from lvm_ray.report import render_report
    from lvm_ray.score import check_output_folder, score
    from lvm_ray.score import format_summary as format_score

    say = echo or log.info
    started = time.time()
    exports = [str(e) for e in exports]
    if not exports:
        raise ValidationError("give at least one ECG export (file, folder, glob or PTB-XL root)")
    name = labels if isinstance(labels, str) else "(DataFrame)"
    urls = {
        "data": store.join_url(out, DATA_DIR),
        "predictions": store.join_url(out, PREDICTIONS_DIR),
        "evaluation": store.join_url(out, EVALUATION_DIR),
        "report": store.join_url(out, REPORT_HTML),
    }

    # --- every argument, before Ray ----------------------------------------------------------
    inputs = [*exports, checkpoint, *([labels] if isinstance(labels, str) else [])]
    kind = store.check_output(out, "validation", inputs=inputs)
    payload = read_payload(checkpoint)
    preset = check_payload(payload)
    if preset.target.task != "regression" or preset.target.column != "lv_mass_g":
        raise ValidationError(
            f"--checkpoint {checkpoint} predicts {preset.target.column} ({preset.target.task}); validate needs "
            "an LV mass model (a run trained on lv_mass_g, or one from `lvm-ray import-keras`)"
        )
    version = model_version(payload)
    user_labels = read_labels(labels)
    entries, found_labels = discover_sources(exports, options)
    if not entries:
        raise FileNotFoundError(f"no ECG files found in {', '.join(exports)}")
    _check_reference(user_labels, found_labels, lvh_column, name)
    fingerprint = _roundtrip(
        {"exports": exports, "labels": name, "labels_sha256": _table_digest(user_labels), "options": asdict(options)}
    )
    state: dict[str, Any] = {}
    if kind == "validation":
        try:
            state = store.read_json(store.join_url(out, STATE_JSON))
        except (OSError, ValueError):
            state = {}
    # Only an earlier validation that got past ingest has results to protect (and to resume from).
    if "ingest" in state and not overwrite:
        if state.get("inputs") != fingerprint:
            raise ValidationError(
                f"--out {out} holds a validation of other exports, labels or ingest options; pass --overwrite "
                "to replace it, or choose another folder"
            )
        if state.get("model_version") != version:
            raise ValidationError(
                f"--out {out} holds a validation of another model ({state.get('model_version')}); pass "
                "--overwrite to replace it, or choose another folder"
            )
    store.check_output(urls["data"], "dataset", inputs=exports)
    check_output_folder(urls["predictions"], urls["data"])
    store.check_output(urls["evaluation"], "evaluation")
    if store.output_kind(urls["report"]) not in ("missing", "file"):
        raise ValidationError(f"{urls['report']} is a folder; validate writes its report there")
    reuse_data = "ingest" in state and not overwrite and store.dataset_exists(urls["data"])

    # The marker first: an interrupted validation is recognised as one, and resumed.
    state = {
        **({k: v for k, v in state.items() if k == "ingest"} if reuse_data else {}),
        "status": "running",
        "inputs": fingerprint,
        "checkpoint": checkpoint,
        "model_version": version,
        "lvh_column": lvh_column,
    }
    store.write_json(store.join_url(out, STATE_JSON), state)

    from lvm_ray.ray_utils import ensure_connected

    ensure_connected(address, verbose=verbose)

    # --- ingest --------------------------------------------------------------------------------
    if reuse_data:
        counts = state["ingest"]
        say(f"ingest -> {urls['data']}: reused ({counts['stored']} stored, {counts['quarantined']} quarantined)")
    else:
        result = ingest(
            exports,
            urls["data"],
            labels=labels,
            options=options,
            use_ray=True if address else None,
            overwrite=True,  # this validation's own dataset (prepare_output removes nothing else)
            progress=progress,
            address=address,
        )
        say(format_ingest(result))
        if result.n_stored == 0:
            raise ValidationError(
                f"no ECG was stored: all {result.n_sources} source(s) were quarantined "
                f"(reasons in {urls['data']}/quarantine.parquet)"
            )
        if result.labels_matched == 0:
            raise ValidationError(
                next((w for w in result.warnings if "matched none" in w), f"labels table {name} matched no ECG")
            )
        counts = {
            "sources": result.n_sources,
            "stored": result.n_stored,
            "quarantined": result.n_quarantined,
            "quarantine_by_reason": result.quarantine_by_reason,
            "flagged": result.n_flagged,
            "flagged_by_reason": result.flagged_by_reason,
            "labels_key": result.labels_key,
            "labelled": result.labels_matched,
            "warnings": result.warnings,
        }
        state["ingest"] = counts
        store.write_json(store.join_url(out, STATE_JSON), state)

    # --- score (resumes by itself; predictions of an earlier dataset are not kept) ----------------
    scored = score(
        urls["data"],
        checkpoint,
        urls["predictions"],
        batch_size=batch_size,
        num_actors=num_actors,
        use_gpu=use_gpu,
        overwrite=overwrite or not reuse_data,
        address=address,
        verbose=verbose,
    )
    say(format_score(scored))

    # --- evaluate and report -------------------------------------------------------------------------
    metrics = evaluate(urls["predictions"], urls["evaluation"], lvh_config=lvh_config, lvh_column=lvh_column)
    if not metrics["n"]:
        excluded = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in (metrics.get("exclusions") or {}).items())
        raise ValidationError(
            f"none of the {metrics.get('n_input')} scored ECGs could be evaluated ({excluded or 'no labels'}); "
            f"see {urls['evaluation']}/{METRICS_JSON}"
        )
    render_report(urls["evaluation"], None, urls["report"])

    outputs: dict[str, Any] = {
        "paths": {
            "data": urls["data"],
            "quarantine": store.join_url(urls["data"], store.QUARANTINE),
            "predictions": urls["predictions"],
            "evaluation": urls["evaluation"],
            "metrics": store.join_url(urls["evaluation"], METRICS_JSON),
            "table": store.join_url(urls["evaluation"], TABLE_MD),
            "report": urls["report"],
        },
        "inputs": {"exports": exports, "labels": name, "checkpoint": checkpoint, "lvh_column": lvh_column},
        "model_version": version,
        "model_provenance": payload.get("provenance") or {},
        "ingest": counts,
        "score": {"n": scored.n_total, "n_scored_now": scored.n_scored, "n_flagged": scored.n_flagged},
        "evaluation": {
            "n": metrics["n"],
            "n_lvh": metrics.get("n_lvh"),
            "n_input": metrics.get("n_input"),
            "n_excluded": metrics.get("n_excluded"),
            "exclusions": metrics.get("exclusions"),
            "reference": metrics.get("reference"),
            "continuous_score": metrics.get("continuous_score"),
            "pearson_r": metrics.get("pearson_r"),
            "mae_g": metrics.get("mae_g"),
            "c_statistics": {k: (v or {}).get("auc") for k, v in (metrics.get("c_statistics") or {}).items()},
            "notes": metrics.get("notes") or [],
        },
        "seconds": time.time() - started,
    }
    store.write_json(store.join_url(out, OUTPUTS_JSON), outputs)
    store.write_json(store.join_url(out, STATE_JSON), {**state, "status": "finished"})
    return store.jsonable(outputs)


def format_summary(outputs: dict[str, Any], out: str) -> str:
    """What the command prints at the end: the counts that matter and where everything is."""
    counts, evaluation = outputs["ingest"], outputs["evaluation"]
    reference = (
        "CMR LVH" if evaluation.get("reference") == "cmr_lvmi" else f"LVH column {outputs['inputs']['lvh_column']}"
    )
    lines = [
        f"validate -> {out}",
        f"  ECGs         : {counts['sources']} read, {counts['stored']} stored, {counts['quarantined']} quarantined, "
        f"{counts['labelled']} labelled",
        f"  evaluated    : {evaluation['n']} ({evaluation['n_lvh']} with {reference}; "
        f"{evaluation['n_excluded']} excluded)",
    ]
    if evaluation.get("pearson_r") is not None:
        lines.append(f"  Pearson r    : {evaluation['pearson_r']:.3f}, MAE {evaluation['mae_g']:.1f} g")
    by_mass = evaluation.get("continuous_score") == "lv_mass_pred_g"
    for key, auc in evaluation["c_statistics"].items():
        shown = "-" if auc is None else f"{auc:.3f}"
        lines.append(
            f"  c {key:<14s}{shown}" + (" (predicted LV mass: no BSA)" if by_mass and key == "lvm_ai_lvmi" else "")
        )
    lines += [f"  note: {note}" for note in evaluation.get("notes") or []]
    lines += [f"  {key:<13s}: {path}" for key, path in outputs["paths"].items()]
    lines.append(f"  {'index':<13s}: {store.join_url(out, OUTPUTS_JSON)}")
    return "\n".join(lines)
