"""The model card, written from the checkpoint and the run record only (never by hand).

A card kept by hand drifts from the weights it describes; this one is generated from what the
run folder holds, so it says exactly what those weights are:

- ``RUN/model.pt``: preset (architecture, input rate, normalisation, target, covariates), epoch,
  validation metrics, split counts, provenance (an imported file), calibration (when fitted);
- ``RUN/run.json``: the training configuration and the dataset it read;
- ``RUN/test_metrics.json``: the held-out test split's metrics;
- the dataset's manifest and metadata columns, when the dataset is still reachable (counts,
  formats, quarantine; sex, age and LV mass of the training split by ``RUN/split.parquet``).

:func:`write_model_card` writes ``RUN/model_card.md`` (and ``RUN/model_card.json``, the same
card as data, which ``/v1/model`` serves). ``train``, ``import-keras`` and ``calibrate`` call it
so that the card is rewritten whenever the model or its calibration changes. No Ray here.
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import posixpath
from collections.abc import Mapping
from typing import Any

import pandas as pd

from lvm_ray import __version__, store
from lvm_ray.lvh import LVHConfig, derive
from lvm_ray.model import MODEL_FILE, build_model, count_parameters, read_payload
from lvm_ray.predict import model_version
from lvm_ray.presets import Preset
from lvm_ray.stats import fisher_z_ci

CARD_MARKDOWN = "model_card.md"
CARD_JSON = "model_card.json"
_RUN_FILE = "run.json"  # lvm_ray.runs.RUN_FILE (not imported: runs pulls in the split machinery)
_SPLIT_FILE = "split.parquet"
_TEST_METRICS_FILE = "test_metrics.json"

INTENDED_USE = (
    "Research use: estimating cardiac-MRI left ventricular (LV) mass, LV mass index and LV hypertrophy "
    "(LVMI over the sex-specific threshold) from a resting 10-s 12-lead ECG of an adult, in populations "
    "like the one it was trained on, for cohort studies and method comparisons (LVM-AI; Khurshid et al., "
    "Circ Cardiovasc Imaging 2021).",
    "Not a medical device: it must not be used to diagnose, treat or triage a patient, and its LVH call is "
    "not a substitute for imaging.",
)

GENERAL_LIMITATIONS = (
    "Trained for 10-s resting 12-lead ECGs at 500 Hz (other rates are resampled); ECGs that were "
    "amplitude-normalised by their export give meaningless voltages and predictions (ingest flags them).",
    "LVMI and the LVH call need height and weight (Mosteller BSA) and sex; without them only LV mass is given.",
    "Accuracy outside the training population (age, ancestry, disease, devices, paced or very irregular "
    "rhythms) is unknown until it is evaluated there (`lvm-ray evaluate` on labelled data).",
)


# --------------------------------------------------------------------------------------------
# Locating the run
# --------------------------------------------------------------------------------------------


def _locate(source: str) -> tuple[str, str | None]:
    """(checkpoint file URL, run folder URL or None) for a run folder or a checkpoint file."""
    fs, path = store.filesystem(source)
    if fs.exists(path) and fs.isdir(path):
        return store.join_url(source, MODEL_FILE), source.rstrip("/")
    parent = posixpath.dirname(source.rstrip("/"))
    if parent and store.exists(store.join_url(parent, _RUN_FILE)):
        return source, parent
    return source, None


def _read_json(url: str | None) -> dict[str, Any] | None:
    if url is None or not store.exists(url):
        return None
    try:
        return store.read_json(url)
    except (ValueError, OSError):
        return None


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _model_section(preset: Preset, parameters: int) -> dict[str, Any]:
    spec = preset.input
    return {
        "preset": preset.name,
        "description": preset.description,
        "network": "LVMNet (dense-block 1-D CNN of LVM-AI)",
        "parameters": parameters,
        "architecture": {
            "kernel_size": preset.arch.kernel_size,
            "stem_filters": preset.arch.stem_filters,
            "block_filters": list(preset.arch.block_filters),
            "convs_per_block": preset.arch.convs_per_block,
            "pool_size": preset.arch.pool_size,
            "batch_norm": preset.arch.batch_norm,
            "head": preset.arch.head,
            "dense_units": list(preset.arch.dense_units),
            "dropout": preset.arch.dropout,
        },
        "input": {
            "leads": spec.n_leads,
            "sample_rate_hz": spec.sample_rate_hz,
            "n_samples": spec.n_samples,
            "seconds": spec.n_samples / spec.sample_rate_hz,
            "normalisation": f"microvolts / {spec.scale_uv:g}"
            + (
                f", anti-aliased decimation of the canonical 500 Hz by {spec.decimation}" if spec.decimation > 1 else ""
            ),
        },
        "target": {
            "column": preset.target.column,
            "task": preset.target.task,
            "z_score_mean": preset.target.mean,
            "z_score_sd": preset.target.sd,
            "loss": preset.target.loss,
        },
        "covariates": [{"name": c.name, "mean": c.mean, "sd": c.sd} for c in preset.covariates],
        "lvh_head": preset.lvh_head,
        "optimiser": {
            "lr": preset.optim.lr,
            "batch_size": preset.optim.batch_size,
            "weight_decay": preset.optim.weight_decay,
            "max_epochs": preset.optim.max_epochs,
        },
    }


def _provenance(
    payload: Mapping[str, Any], record: Mapping[str, Any] | None, manifest: Mapping[str, Any] | None
) -> dict:
    """Where the weights came from, said plainly: imported, trained on synthetic data, or trained on data."""
    given = dict(payload.get("provenance") or {})
    if given.get("source") == "keras-hdf5" or (record or {}).get("kind") == "keras-import":
        return {
            "kind": "imported",
            "source_file": given.get("source_file"),
            "source_sha256": given.get("source_sha256"),
            "statement": (
                f"Weights imported from the Keras file {given.get('source_file', '?')} "
                f"(sha256 {str(given.get('source_sha256', '?'))[:16]}...) by {given.get('imported_by', 'lvm-ray')}. "
                "lvm-ray did not train these weights and has no record of their training data; the metrics "
                "below are absent unless the run was evaluated here."
            ),
        }
    if record is None:
        return {
            "kind": "unknown",
            "statement": "No run record beside the checkpoint: its training data and provenance are not recorded.",
        }
    data = (record.get("config") or {}).get("data")
    if manifest is not None and manifest.get("kind") == "synthetic":
        return {
            "kind": "trained-synthetic",
            "data": data,
            "seed": manifest.get("seed"),
            "generator_version": manifest.get("generator_version"),
            "statement": (
                f"Trained by lvm-ray on a SYNTHETIC cohort (lvm_ray.synth {manifest.get('generator_version')}, "
                f"seed {manifest.get('seed')}): generated ECGs of simulated people, not patients. Its metrics "
                "describe the simulation only and say nothing about accuracy on real ECGs."
            ),
        }
    if manifest is None:
        statement = f"Trained by lvm-ray on {data}, which is not reachable now: its provenance cannot be shown."
    else:
        statement = f"Trained by lvm-ray on {data} ({manifest.get('kind', 'dataset')} of real ECG exports)."
    return {"kind": "trained", "data": data, "statement": statement}


def _distribution(values: pd.Series) -> dict[str, Any] | None:
    v = pd.to_numeric(values, errors="coerce").dropna().astype(float)
    if v.empty:
        return None
    return {
        "n": int(len(v)),
        "mean": float(v.mean()),
        "sd": float(v.std()) if len(v) > 1 else None,
        "min": float(v.min()),
        "p5": float(v.quantile(0.05)),
        "p50": float(v.median()),
        "p95": float(v.quantile(0.95)),
        "max": float(v.max()),
    }


def _training_data(data: str | None, run: str | None, manifest: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"data": data, "reachable": manifest is not None}
    if manifest is None:
        return out
    out.update(
        {
            "kind": manifest.get("kind"),
            "n_stored": manifest.get("n_rows"),
            "n_quarantined": manifest.get("n_quarantined"),
            "quarantine_by_reason": dict(manifest.get("quarantine_by_reason") or {}),
            "n_flagged": manifest.get("n_flagged"),
        }
    )
    present = {c["name"] for c in manifest.get("columns", [])}
    wanted = ("ecg_id", "sex", "age", "lv_mass_g", "bsa_m2", "height_cm", "weight_kg", "source_format")
    try:
        frame = store.read_table(data, columns=[c for c in wanted if c in present]).to_pandas()
    except Exception:  # noqa: BLE001 - an unreadable dataset leaves the manifest's counts only
        out["note"] = "the dataset's metadata columns could not be read"
        return out
    if "source_format" in frame:
        out["source_formats"] = {str(k): int(v) for k, v in frame["source_format"].value_counts().items()}
    split_url = store.join_url(run, _SPLIT_FILE) if run else None
    if split_url and store.exists(split_url):
        split = store.read_parquet(split_url)
        train_ids = set(split.loc[split["split"] == "train", "ecg_id"].astype(str))
        frame = frame[frame["ecg_id"].astype(str).isin(train_ids)]
        out["described"] = "the training split (RUN/split.parquet)"
    else:
        out["described"] = "the whole dataset (no split table)"
    out["n"] = int(len(frame))
    if "sex" in frame:
        out["sex"] = {str(k): int(v) for k, v in frame["sex"].value_counts(dropna=False).items()}
    if "age" in frame:
        out["age"] = _distribution(frame["age"])
    if "lv_mass_g" in frame:
        out["lv_mass_g"] = _distribution(frame["lv_mass_g"])
        lvh = derive(frame.reset_index(drop=True), LVHConfig())["lvh"]
        if lvh.notna().any():
            out["cmr_lvh_prevalence"] = float(lvh.dropna().astype(bool).mean())
    return out


def _metrics_with_ci(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Metrics as recorded, with a Fisher-z 95% CI for Pearson r (the only CI a summary allows)."""
    if not metrics:
        return None
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
    r, n = _finite(out.get("pearson_r")), out.get("n")
    if r is not None and isinstance(n, (int, float)) and n > 3:
        lo, hi = fisher_z_ci(r, int(n))
        out["pearson_r_ci"] = [lo, hi]
    return out


def _calibration(payload: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's calibration (``payload["calibration"]``, by ``lvm_ray.calibrate``) summarised, or None."""
    raw = payload.get("calibration")
    if not raw:
        return None
    try:
        from lvm_ray.conformal import Calibration

        return Calibration.from_payload(raw).summary()
    except Exception:  # noqa: BLE001 - a calibration of another version: show what it says about itself
        if isinstance(raw, Mapping):
            return {k: v for k, v in raw.items() if k != "groups"}
        return {"value": str(raw)}


def _limitations(provenance: Mapping[str, Any], training: Mapping[str, Any], calibration: Any) -> list[str]:
    items = []
    if provenance["kind"] == "trained-synthetic":
        items.append(
            "PROVENANCE: trained on synthetic ECGs only. Do not use it on patients: its accuracy on real "
            "recordings is unknown."
        )
    elif provenance["kind"] == "imported":
        items.append(
            "PROVENANCE: imported weights. Their training population, labels and preprocessing are those of "
            "the original authors, not recorded here; lvm-ray checked only that the conversion reproduces "
            "the Keras model's outputs."
        )
    elif provenance["kind"] == "unknown":
        items.append("PROVENANCE: not recorded (a checkpoint without its run record).")
    if training.get("reachable") is False and provenance["kind"] != "imported":
        items.append("The training data is not reachable: the training population cannot be described.")
    if not calibration:
        items.append("Not calibrated: predictions come without intervals (`lvm-ray calibrate` fits them).")
    return [*items, *GENERAL_LIMITATIONS]


# --------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------


def model_card(source: str) -> dict[str, Any]:
    """The model card of a run folder or checkpoint file, as a dict (with its markdown under 'markdown')."""
    model_url, run = _locate(source)
    payload = read_payload(model_url)
    preset = Preset.from_dict(payload["preset"])
    record = _read_json(store.join_url(run, _RUN_FILE)) if run else None
    data = ((record or {}).get("config") or {}).get("data")
    manifest = None
    if data:
        try:
            manifest = store.read_manifest(data)
        except Exception:  # noqa: BLE001 - moved, deleted or offline: the card says so
            manifest = None
    provenance = _provenance(payload, record, manifest)
    training = _training_data(data, run, manifest) if data else {"data": None, "reachable": None}
    split = dict(payload.get("split") or {})
    counts = split.pop("counts", None) or (record or {}).get("split_counts")
    method = (
        f"by the column {split['column']!r}"
        if split.get("column")
        else (
            f"by a hash of patient_id (test {split.get('test_fraction')}, validation {split.get('val_fraction')} "
            "of the rest)"
            if split
            else None
        )
    )
    test = _read_json(store.join_url(run, _TEST_METRICS_FILE)) if run else None
    calibration = _calibration(payload)
    card: dict[str, Any] = {
        "model_version": model_version(payload),
        "generated_by": f"lvm-ray {__version__}",
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "source": {"checkpoint": model_url, "run": run, "run_record": record is not None},
        "epoch": payload.get("epoch"),
        "package_version": payload.get("package_version"),
        "model": _model_section(preset, count_parameters(build_model(preset))),
        "provenance": provenance,
        "training_data": training,
        "splits": {"counts": counts, "method": method},
        "metrics": {
            "validation": _metrics_with_ci(payload.get("metrics")),
            "test": _metrics_with_ci({k: v for k, v in (test or {}).items() if k != "split"} or None),
        },
        "calibration": calibration,
        "lvh_thresholds_g_m2": dict(LVHConfig().thresholds_g_m2),
        "intended_use": list(INTENDED_USE),
    }
    card["limitations"] = _limitations(provenance, training, calibration)
    card["markdown"] = render_markdown(card)
    return card


def write_model_card(run: str) -> dict[str, Any]:
    """Write RUN/model_card.md and RUN/model_card.json from RUN's checkpoint and records; return the card."""
    card = model_card(run)
    folder = card["source"]["run"] or posixpath.dirname(card["source"]["checkpoint"])
    store.write_atomic(store.join_url(folder, CARD_MARKDOWN), card["markdown"].encode("utf-8"))
    store.write_json(store.join_url(folder, CARD_JSON), card)
    return card


def load_or_build(source: str) -> dict[str, Any]:
    """The card written beside the checkpoint when it describes these weights, else one built now."""
    model_url, run = _locate(source)
    folder = run or posixpath.dirname(model_url)
    written = _read_json(store.join_url(folder, CARD_JSON)) if folder else None
    if written:
        payload = read_payload(model_url)
        calibration = _calibration(payload)
        # Recalibration keeps the weights (and model_version): the calibration id tells it apart.
        same_calibration = (written.get("calibration") or {}).get("id") == (calibration or {}).get("id")
        if written.get("model_version") == model_version(payload) and same_calibration:
            return written
    return model_card(source)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _dist_text(d: Mapping[str, Any] | None, unit: str, digits: int = 1) -> str:
    if not d:
        return "-"
    sd = f" (SD {_fmt(d.get('sd'), digits)})" if d.get("sd") is not None else ""
    return (
        f"mean {_fmt(d['mean'], digits)}{sd} {unit}; median {_fmt(d['p50'], digits)}, "
        f"5th-95th percentile {_fmt(d['p5'], digits)}-{_fmt(d['p95'], digits)}, range {_fmt(d['min'], digits)}-"
        f"{_fmt(d['max'], digits)}; n {d['n']}"
    )


def _counts_text(counts: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) if counts else "-"


def _metric_rows(metrics: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    if not metrics:
        return []
    rows = []
    for key, value in metrics.items():
        if key == "pearson_r_ci":
            continue
        text = _fmt(value)
        if key == "pearson_r" and metrics.get("pearson_r_ci"):
            lo, hi = metrics["pearson_r_ci"]
            text += f" (95% CI {_fmt(lo)}-{_fmt(hi)}, Fisher z)"
        elif key == "mae":
            text += " g (no CI: the record keeps the mean error only)"
        rows.append((key, text))
    return rows


def _sections(card: Mapping[str, Any]) -> list[tuple[str, list[tuple[str, str]] | list[str] | str]]:
    """The card as (title, rows | bullet list | paragraph) sections: one layout for markdown and HTML."""
    m = card["model"]
    arch = m["architecture"]
    cov = (
        ", ".join(f"{c['name']} (z = (x - {c['mean']:g}) / {c['sd']:g})" for c in m["covariates"]) or "none (ECG only)"
    )
    model_rows = [
        ("model_version", card["model_version"]),
        ("preset", f"{m['preset']}: {m['description']}"),
        ("network", f"{m['network']}, {m['parameters']:,} parameters"),
        (
            "architecture",
            f"kernel {arch['kernel_size']}, stem {arch['stem_filters']}, dense blocks "
            f"{'/'.join(map(str, arch['block_filters']))} x {arch['convs_per_block']} convolutions, pool "
            f"{arch['pool_size']}, batch norm {_fmt(arch['batch_norm'])}, head {arch['head']}, dense "
            f"{'-'.join(map(str, arch['dense_units']))}, dropout {arch['dropout']:g}",
        ),
        (
            "input",
            f"{m['input']['leads']} leads x {m['input']['n_samples']} samples at {m['input']['sample_rate_hz']} Hz "
            f"({m['input']['seconds']:g} s)",
        ),
        ("normalisation", m["input"]["normalisation"]),
        (
            "output",
            f"{m['target']['column']} ({m['target']['task']}), learned as z = (y - {m['target']['z_score_mean']:g}) / "
            f"{m['target']['z_score_sd']:g}, loss {m['target']['loss']}"
            + ("; second head: LVH probability" if m["lvh_head"] else ""),
        ),
        ("covariates", cov),
        (
            "LVH call",
            "predicted LV mass / BSA (Mosteller) over "
            + ", ".join(f"{k} {v:g} g/m2" for k, v in card["lvh_thresholds_g_m2"].items()),
        ),
        ("epoch", _fmt(card.get("epoch"))),
    ]
    t = card["training_data"]
    if t.get("reachable"):
        quarantine = ", ".join(f"{k} {v}" for k, v in (t.get("quarantine_by_reason") or {}).items()) or "none"
        data_rows = [
            ("dataset", f"{t['data']} ({_fmt(t.get('kind'))})"),
            ("ECGs stored", _fmt(t.get("n_stored"))),
            ("quarantined", f"{_fmt(t.get('n_quarantined'))} ({quarantine})"),
            ("source formats", _counts_text(t.get("source_formats"))),
            ("described", _fmt(t.get("described"))),
            ("n", _fmt(t.get("n"))),
            ("sex", _counts_text(t.get("sex"))),
            ("age", _dist_text(t.get("age"), "years")),
            ("CMR LV mass", _dist_text(t.get("lv_mass_g"), "g")),
            (
                "CMR LVH prevalence",
                f"{100 * t['cmr_lvh_prevalence']:.1f}%" if t.get("cmr_lvh_prevalence") is not None else "-",
            ),
        ]
    elif t.get("data"):
        data_rows = [("dataset", f"{t['data']}: not reachable now (only the counts below are known)")]
    else:
        data_rows = [("dataset", "not recorded (no run record, or imported weights)")]
    splits = card["splits"]
    split_rows = [("counts", _counts_text(splits.get("counts"))), ("method", _fmt(splits.get("method")))]
    metrics = card["metrics"]
    metric_rows = [(f"validation {k}", v) for k, v in _metric_rows(metrics.get("validation"))]
    metric_rows += [(f"test {k}", v) for k, v in _metric_rows(metrics.get("test"))]
    calibration = card.get("calibration")
    if calibration:
        provenance = calibration.get("provenance") or {}
        level = _finite(calibration.get("level"))
        measured = {
            k: v for k, v in (metrics.get("test") or {}).items() if "coverage" in k and not isinstance(v, (dict, list))
        }
        cal: list[tuple[str, str]] | str = [
            ("method", _fmt(calibration.get("method"))),
            ("calibration id", _fmt(calibration.get("id"))),
            (
                "nominal coverage",
                f"{100 * level:g}% (conformal: at least this on data exchangeable with the calibration set)"
                if level is not None
                else "-",
            ),
            (
                "calibration ECGs",
                _counts_text(calibration.get("n") if isinstance(calibration.get("n"), dict) else None),
            ),
            (
                "calibrated on",
                f"{_fmt(provenance.get('data'))} ({_fmt(provenance.get('split'))}; by {_fmt(provenance.get('stage'))})",
            ),
            (
                "measured coverage",
                ", ".join(f"{k} {_fmt(v)}" for k, v in measured.items())
                or "not measured with the checkpoint (`lvm-ray evaluate` reports it on labelled data)",
            ),
        ]
    else:
        cal = "Not calibrated: no prediction intervals and no interval coverage."
    return [
        ("Model", model_rows),
        ("Provenance", card["provenance"]["statement"]),
        ("Training data", data_rows),
        ("Splits (by patient)", split_rows),
        ("Metrics", metric_rows or "No metrics recorded with this checkpoint."),
        ("Prediction intervals (calibration)", cal),
        ("Intended use", list(card["intended_use"])),
        ("Limitations", list(card["limitations"])),
    ]


def render_markdown(card: Mapping[str, Any]) -> str:
    """The card as markdown (what RUN/model_card.md holds)."""
    lines = [
        f"# Model card: {card['model']['preset']} ({card['model_version']})",
        "",
        f"Generated by {card['generated_by']} on {card['generated']} from `{card['source']['checkpoint']}`"
        + (f" and the run record in `{card['source']['run']}`" if card["source"].get("run_record") else "")
        + ". Do not edit: `train`, `import-keras` and `calibrate` rewrite it.",
    ]
    for title, body in _sections(card):
        lines += ["", f"## {title}", ""]
        if isinstance(body, str):
            lines.append(body)
        elif body and isinstance(body[0], tuple):
            lines += ["| | |", "|---|---|"]
            lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in body]
        else:
            lines += [f"- {item}" for item in body]
    return "\n".join(lines) + "\n"


def card_html(card: Mapping[str, Any]) -> str:
    """The card as an HTML fragment (the report's "Model card" section); everything escaped."""

    def esc(value: Any) -> str:
        return html.escape(str(value))

    parts = [
        '<h2 id="model-card">Model card</h2>',
        f'<p class="small">{esc(card["model"]["preset"])} <b>{esc(card["model_version"])}</b>, generated by '
        f"{esc(card['generated_by'])} from the checkpoint and run record ({esc(card['generated'])}).</p>",
    ]
    for title, body in _sections(card):
        parts.append(f"<h3>{esc(title)}</h3>")
        if isinstance(body, str):
            cls = ' class="note"' if title in ("Provenance",) and card["provenance"]["kind"] != "trained" else ""
            parts.append(f"<p{cls}>{esc(body)}</p>")
        elif body and isinstance(body[0], tuple):
            rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in body)
            parts.append(f"<table><tbody>{rows}</tbody></table>")
        else:
            parts.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in body) + "</ul>")
    return "\n".join(parts)


__all__ = [
    "CARD_JSON",
    "CARD_MARKDOWN",
    "card_html",
    "load_or_build",
    "model_card",
    "render_markdown",
    "write_model_card",
]
