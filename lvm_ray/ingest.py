"""Stage `ingest`: ECG exports -> canonical ECG shards + quarantine table.

Sources may be files, directories (searched recursively), globs, or a PTB-XL root (a folder
with PTB-XL's metadata.csv); any fsspec URL. A handful of files is read in-process; many are
read in parallel with Ray Data, each task writing its own shard straight to the store.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from lvm_ray import store
from lvm_ray.formats import detect_format, is_ecg_file, read_ecg
from lvm_ray.lvh import body_surface_area
from lvm_ray.schema import CART_FIELDS, CORE_FIELDS, shard_schema
from lvm_ray.signals import ECGReadError, QualityConfig, RawECG, Rejection, canonical_waveform, normalise_sex

log = logging.getLogger(__name__)

#: Columns a labels table may fill in the core schema; anything else becomes an extra column.
COVARIATE_COLUMNS = ("patient_id", "ecg_datetime", "age", "sex", "height_cm", "weight_kg", "lv_mass_g")
#: PTB-XL metadata columns carried into the shards as labels.
PTBXL_LABELS = ("lvh", "lvh_ge50", "lvh_likelihood", "norm", "strat_fold", "diagnostic_superclass")
#: Below this many sources, ingest reads in-process: a single file needs no cluster.
IN_PROCESS_MAX_SOURCES = 32


@dataclass(frozen=True)
class IngestOptions:
    quality: QualityConfig = field(default_factory=QualityConfig)
    #: Upper bound of ECGs per shard (~120 MB uncompressed at 1000).
    max_rows_per_shard: int = 1000
    #: Rate for .npy sources, which carry none.
    numpy_sample_rate_hz: float | None = None
    #: Which PTB-XL records to take: "500", "100", or "auto" (500 Hz where present).
    ptbxl_rate: str = "auto"
    #: Where PTB-XL record paths resolve (default: the metadata's folder).
    ptbxl_records: str | None = None


@dataclass
class IngestResult:
    out: str
    n_sources: int
    n_stored: int
    n_quarantined: int
    quarantine_by_reason: dict[str, int]
    seconds: float
    manifest: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Discovery


def _is_ptbxl_root(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    meta = posixpath.join(path, "metadata.csv")
    if not fs.isfile(meta):
        return False
    with fs.open(meta, "r") as f:
        header = f.readline()
    return "record_id" in header and ("path_500hz" in header or "path_100hz" in header)


def _ptbxl_sources(root_url: str, options: IngestOptions) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """PTB-XL layout: records from metadata.csv, ecg_id = record_id, covariates and labels attached."""
    fs, root = fsspec.core.url_to_fs(root_url)
    with fs.open(posixpath.join(root, "metadata.csv"), "r") as f:
        meta = pd.read_csv(f)
    records_root_url = options.ptbxl_records or root_url
    rfs, records_root = fsspec.core.url_to_fs(records_root_url)
    protocol_root = records_root_url.rstrip("/")
    entries = []
    for row in meta.itertuples(index=False):
        candidates = {"500": getattr(row, "path_500hz", None), "100": getattr(row, "path_100hz", None)}
        order = {"500": ["500"], "100": ["100"], "auto": ["500", "100"]}[options.ptbxl_rate]
        for rate in order:
            rel = candidates[rate]
            if isinstance(rel, str) and rel and rfs.exists(posixpath.join(records_root, rel + ".hea")):
                entries.append({"uri": f"{protocol_root}/{rel}.hea", "ecg_id": str(row.record_id)})
                break
    labels = pd.DataFrame(
        {
            "ecg_id": meta["record_id"].astype(str),
            "patient_id": meta["patient_id"].map(lambda v: None if pd.isna(v) else str(int(v))),
            "ecg_datetime": pd.to_datetime(meta.get("recording_date"), errors="coerce"),
            "age": meta.get("age"),
            "sex": meta.get("sex"),
            "height_cm": meta.get("height_cm"),
            "weight_kg": meta.get("weight_kg"),
            **{c: meta[c] for c in PTBXL_LABELS if c in meta.columns},
        }
    )
    log.info("PTB-XL: %d records listed, %d found under %s", len(meta), len(entries), records_root_url)
    return entries, labels


def discover_sources(
    sources: Sequence[str], options: IngestOptions = IngestOptions()
) -> tuple[list[dict], pd.DataFrame | None]:
    """Expand SOURCE arguments into one entry per recording, plus labels found on the way (PTB-XL)."""
    entries: list[dict[str, Any]] = []
    found_labels: list[pd.DataFrame] = []
    for source in sources:
        fs, path = fsspec.core.url_to_fs(source)
        # Keep the user's spelling: plain paths stay paths, URLs keep their protocol.
        url_of: Callable[[str], str] = fs.unstrip_protocol if "://" in source else (lambda p: p)

        if any(ch in source for ch in "*?["):
            matches = sorted(fs.glob(path))
            if not matches:
                raise FileNotFoundError(f"no files match {source}")
            entries += [{"uri": url_of(m), "ecg_id": None} for m in matches if fs.isfile(m) and is_ecg_file(m)]
        elif fs.isdir(path):
            if _is_ptbxl_root(fs, path):
                ptb_entries, ptb_labels = _ptbxl_sources(source, options)
                entries += ptb_entries
                found_labels.append(ptb_labels)
            else:
                files = sorted(f for f in fs.find(path) if is_ecg_file(f))
                entries += [{"uri": url_of(f), "ecg_id": None} for f in files]
        elif fs.exists(path) or fs.exists(path + ".hea"):
            entries.append({"uri": source, "ecg_id": None})
        else:
            raise FileNotFoundError(f"ECG source not found: {source}")
    labels = pd.concat(found_labels, ignore_index=True) if found_labels else None
    return entries, labels


# ---------------------------------------------------------------------------------------------
# Labels


def prepare_labels(user_labels: pd.DataFrame | None, found_labels: pd.DataFrame | None) -> pd.DataFrame | None:
    """Combine labels found with the sources and the user's table into one, indexed by ecg_id or patient_id."""
    tables = []
    for table in (found_labels, user_labels):
        if table is None:
            continue
        if "ecg_id" not in table.columns and "patient_id" not in table.columns:
            raise ValueError(f"a labels table needs an ecg_id or patient_id column; it has {list(table.columns)}")
        table = table.copy()
        for key in ("ecg_id", "patient_id"):
            if key in table.columns:
                table[key] = table[key].map(lambda v: None if pd.isna(v) else str(v))
        if "sex" in table.columns:
            table["sex"] = table["sex"].map(normalise_sex)
        if "ecg_datetime" in table.columns:
            table["ecg_datetime"] = pd.to_datetime(table["ecg_datetime"], errors="coerce")
        tables.append(table)
    if not tables:
        return None
    if len(tables) == 2 and "ecg_id" in tables[0].columns and "ecg_id" in tables[1].columns:
        base, user = tables
        merged = base.set_index("ecg_id")
        merged = user.set_index("ecg_id").combine_first(merged).reset_index()
        return merged
    return tables[-1] if len(tables) == 1 else pd.concat(tables, ignore_index=True)


def label_fields(labels: pd.DataFrame | None) -> list[pa.Field]:
    """Extra shard columns implied by a labels table (core columns excluded)."""
    if labels is None:
        return []
    core = {f.name for f in CORE_FIELDS} | {f.name for f in CART_FIELDS} | {"ecg"}
    extra = labels[[c for c in labels.columns if c not in core]]
    if extra.empty and not len(extra.columns):
        return []
    schema = pa.Schema.from_pandas(extra, preserve_index=False)
    return [pa.field(f.name, pa.string() if pa.types.is_null(f.type) else f.type) for f in schema]


def _apply_labels(meta: pd.DataFrame, labels: pd.DataFrame | None) -> pd.DataFrame:
    """Join labels onto per-ECG metadata; the labels table wins where it has a value."""
    if labels is None or meta.empty:
        return meta
    key = "ecg_id" if "ecg_id" in labels.columns else "patient_id"
    table = labels.drop_duplicates(subset=[key], keep="last").set_index(key)
    joined = table.reindex(meta[key].to_numpy())
    joined.index = meta.index
    out = meta.copy()
    for column in joined.columns:
        if column in out.columns:
            out[column] = joined[column].where(joined[column].notna(), out[column])
        else:
            out[column] = joined[column]
    return out


# ---------------------------------------------------------------------------------------------
# Reading one batch of sources (in-process or inside a Ray Data task)


def _localize(uri: str, workdir: str) -> str:
    """A local path for a source (remote files are copied; WFDB headers bring their signal files)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return path
    stem, _ = posixpath.splitext(path)
    siblings = fs.glob(stem + ".*") if path.endswith(".hea") else [path]
    for sibling in siblings:
        fs.get(sibling, os.path.join(workdir, posixpath.basename(sibling)))
    return os.path.join(workdir, posixpath.basename(path))


def _metadata_row(raw: RawECG, ecg_id: str, uri: str) -> dict[str, Any]:
    return {
        "ecg_id": ecg_id,
        "patient_id": raw.patient_id,
        "ecg_datetime": pd.Timestamp(raw.ecg_datetime) if raw.ecg_datetime is not None else pd.NaT,
        "source_format": raw.source_format,
        "source_uri": uri,
        "original_fs": float(raw.sample_rate_hz),
        "age": raw.age,
        "sex": normalise_sex(raw.sex),
        "height_cm": raw.height_cm,
        "weight_kg": raw.weight_kg,
        **raw.cart_measurements,
    }


def read_batch(
    entries: Sequence[dict[str, Any]], options: IngestOptions
) -> tuple[list[dict[str, Any]], list[np.ndarray], list[Rejection]]:
    """Read and canonicalise sources; every failure becomes a Rejection with its reason."""
    rows: list[dict[str, Any]] = []
    waves: list[np.ndarray] = []
    rejections: list[Rejection] = []
    with tempfile.TemporaryDirectory(prefix="lvm-ray-ingest-") as workdir:
        for entry in entries:
            uri, forced_id = entry["uri"], entry.get("ecg_id")
            stem = posixpath.splitext(posixpath.basename(uri.rstrip("/")))[0]
            try:
                source_format = detect_format(uri)
            except ECGReadError as exc:
                rejections.append(Rejection(forced_id or stem, uri, "unknown", str(exc)))
                continue
            try:
                raw = read_ecg(_localize(uri, workdir), sample_rate_hz=options.numpy_sample_rate_hz)
            except ECGReadError as exc:
                rejections.append(Rejection(forced_id or stem, uri, source_format, str(exc)))
                continue
            except Exception as exc:  # a reader bug must not lose the rest of the batch
                rejections.append(
                    Rejection(forced_id or stem, uri, source_format, f"unreadable: {type(exc).__name__}: {exc}")
                )
                continue
            ecg_id = forced_id or raw.ecg_id or stem
            wave, reason = canonical_waveform(raw, options.quality)
            if reason:
                rejections.append(Rejection(ecg_id, uri, raw.source_format, reason))
                continue
            rows.append(_metadata_row(raw, ecg_id, uri))
            waves.append(wave)
    return rows, waves, rejections


def ingest_batch(
    entries: Sequence[dict[str, Any]],
    out: str,
    schema: pa.Schema,
    labels: pd.DataFrame | None,
    options: IngestOptions,
) -> list[dict[str, Any]]:
    """Read a batch of sources and write them as one shard; return manifest rows and rejections."""
    rows, waves, rejections = read_batch(entries, options)
    results: list[dict[str, Any]] = [{"kind": "reject", **r.__dict__} for r in rejections]
    if rows:
        meta = pd.DataFrame(rows)
        duplicated = meta["ecg_id"].duplicated(keep="first").to_numpy()
        for i in np.flatnonzero(duplicated):
            results.append(
                {
                    "kind": "reject",
                    "ecg_id": meta.ecg_id[i],
                    "source_uri": meta.source_uri[i],
                    "source_format": meta.source_format[i],
                    "reason": f"duplicate ecg_id {meta.ecg_id[i]!r}",
                }
            )
        keep = ~duplicated
        meta = _apply_labels(meta[keep].reset_index(drop=True), labels)
        meta["bsa_m2"] = body_surface_area(meta["height_cm"], meta["weight_kg"])
        shard = store.write_shard(out, store.build_shard_table(meta, np.stack(waves)[keep], schema), prefix="ingest")
        results.append({"kind": "shard", **shard.__dict__, "ecg_ids": list(meta["ecg_id"])})
    return results


# ---------------------------------------------------------------------------------------------
# The stage


def _dedupe_across_shards(out: str, shard_rows: list[dict[str, Any]]) -> tuple[list[store.ShardInfo], list[dict]]:
    """Keep the first copy of an ecg_id seen in two shards; quarantine the others (rewriting those shards)."""
    seen: set[str] = set()
    shards: list[store.ShardInfo] = []
    rejections: list[dict[str, Any]] = []
    for row in sorted(shard_rows, key=lambda r: r["path"]):
        ids = row["ecg_ids"]
        dup = [i in seen for i in ids]
        seen.update(ids)
        info = store.ShardInfo(row["path"], row["rows"], row["bytes"], row["sha256"])
        if any(dup):
            table = store.read_shard(out, info.path)
            mask = pa.array([not d for d in dup])
            for removed in table.filter(pc.invert(mask)).select(["ecg_id", "source_uri", "source_format"]).to_pylist():
                rejections.append(
                    {**removed, "reason": f"duplicate ecg_id {removed['ecg_id']!r} (kept the first copy)"}
                )
            store.remove(out, info.path)
            kept = table.filter(mask)
            if kept.num_rows == 0:
                continue
            info = store.write_shard(out, kept, prefix="ingest")
        shards.append(info)
    return shards, rejections


def ingest(
    sources: Sequence[str],
    out: str,
    labels: str | pd.DataFrame | None = None,
    options: IngestOptions = IngestOptions(),
    use_ray: bool | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> IngestResult:
    """Ingest ECG exports into a canonical dataset at ``out``.

    ``use_ray`` None decides by size: more than IN_PROCESS_MAX_SOURCES sources go through Ray
    Data (the caller connects to a cluster first, or an embedded one starts).
    """
    started = time.time()
    entries, found_labels = discover_sources(sources, options)
    if not entries:
        raise FileNotFoundError(f"no ECG files found in {', '.join(sources)}")
    user_labels = store.read_any_table(labels) if isinstance(labels, str) else labels
    label_table = prepare_labels(user_labels, found_labels)
    schema = shard_schema(label_fields(label_table))
    store.prepare_output(out, overwrite=overwrite)
    if use_ray is None:
        use_ray = len(entries) > IN_PROCESS_MAX_SOURCES
    if use_ray:
        results = _ingest_with_ray(entries, out, schema, label_table, options)
    else:
        results = []
        chunk = options.max_rows_per_shard
        for start in range(0, len(entries), chunk):
            results += ingest_batch(entries[start : start + chunk], out, schema, label_table, options)
            if progress:
                progress(min(start + chunk, len(entries)), len(entries))
    shard_rows = [r for r in results if r["kind"] == "shard"]
    rejections = [
        {k: r.get(k) for k in ("ecg_id", "source_uri", "source_format", "reason")}
        for r in results
        if r["kind"] == "reject"
    ]
    shards, duplicate_rejections = _dedupe_across_shards(out, shard_rows)
    rejections += duplicate_rejections
    manifest = store.finalize(
        out,
        schema,
        shards,
        rejections,
        extra={"kind": "ingest", "sources": list(sources), "n_sources": len(entries)},
    )
    return IngestResult(
        out=out,
        n_sources=len(entries),
        n_stored=manifest["n_rows"],
        n_quarantined=manifest["n_quarantined"],
        quarantine_by_reason=manifest["quarantine_by_reason"],
        seconds=time.time() - started,
        manifest=manifest,
    )


def _ingest_with_ray(
    entries: list[dict[str, Any]], out: str, schema: pa.Schema, labels: pd.DataFrame | None, options: IngestOptions
) -> list[dict[str, Any]]:
    import ray

    from lvm_ray.ray_utils import connect

    connect()
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    # Enough tasks to keep every CPU busy, but never shards above the size bound.
    rows_per_shard = max(16, min(options.max_rows_per_shard, math.ceil(len(entries) / cpus)))
    n_blocks = math.ceil(len(entries) / rows_per_shard)
    labels_ref = ray.put(labels)

    def task(batch: pd.DataFrame) -> pd.DataFrame:
        records = batch.to_dict("records")
        for record in records:
            record["ecg_id"] = None if pd.isna(record["ecg_id"]) else record["ecg_id"]
        results = ingest_batch(records, out, schema, ray.get(labels_ref), options)
        return pd.DataFrame({"result": [json.dumps(r, default=str) for r in results]})

    frame = pd.DataFrame(entries, columns=["uri", "ecg_id"])
    dataset = ray.data.from_pandas(frame).repartition(n_blocks)
    outputs = dataset.map_batches(task, batch_size=rows_per_shard, batch_format="pandas").take_all()
    return [json.loads(row["result"]) for row in outputs]


def format_summary(result: IngestResult) -> str:
    lines = [
        f"ingest -> {result.out}",
        f"  sources read : {result.n_sources}",
        f"  stored       : {result.n_stored}",
        f"  quarantined  : {result.n_quarantined}",
    ]
    for reason, count in sorted(Counter(result.quarantine_by_reason).items(), key=lambda kv: -kv[1]):
        lines.append(f"    {count:6d}  {reason}")
    lines.append(f"  time         : {result.seconds:.1f} s")
    return "\n".join(lines)
