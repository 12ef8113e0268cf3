"""Stage `ingest`: ECG exports -> canonical ECG shards + quarantine table.

Sources may be files, directories (searched recursively), globs, or a PTB-XL root (a folder
with PTB-XL's metadata.csv); any fsspec URL. A handful of files is read in-process; many are
read in parallel with Ray Data, each task writing its own shard straight to the store.
"""

from __future__ import annotations

import hashlib
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

from lvm_ray import store
from lvm_ray.formats import SUPPORTED_SUFFIXES, detect_format, is_ecg_file, read_ecg
from lvm_ray.lvh import derive
from lvm_ray.schema import CART_FIELDS, CORE_FIELDS, QUALITY_FLAG, shard_schema
from lvm_ray.signals import (
    ECGReadError,
    QualityConfig,
    RawECG,
    Rejection,
    amplitude_normalisation,
    canonical_waveform,
    normalise_sex,
)

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
    #: Quarantine records with a quality flag (amplitude-normalised) instead of storing them
    #: flagged; ``ingest --strict`` sets it.
    reject_flagged: bool = False


@dataclass
class IngestResult:
    out: str
    n_sources: int
    n_stored: int
    n_quarantined: int
    quarantine_by_reason: dict[str, int]
    seconds: float
    manifest: dict[str, Any]
    #: Stored ECGs with a quality flag (amplitude-normalised), by the flag's kind.
    n_flagged: int = 0
    flagged_by_reason: dict[str, int] = field(default_factory=dict)
    #: With a user labels table: its join key and how many stored ECGs it has a row for.
    labels_key: str | None = None
    labels_matched: int | None = None
    #: One line each (printed by format_summary): nothing stored, labels matching nothing, flagged ECGs.
    warnings: list[str] = field(default_factory=list)


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


def _glob_root(path: str) -> str:
    """The folder a glob pattern searches: its path up to the first component with a wildcard."""
    parts = path.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    return "/".join(parts[:fixed]) or "/"


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol


def _strip_suffix(path: str) -> str:
    """The path without an ECG file suffix (other dots, as in 'ecg.2020-01-02.xml', stay)."""
    stem, ext = posixpath.splitext(path)
    return stem if ext.lower() in SUPPORTED_SUFFIXES else path


def _entry(uri: str, path: str, protocol: str) -> dict[str, Any]:
    return {"uri": uri, "ecg_id": None, "path": path, "protocol": protocol}


def assign_ecg_ids(entries: list[dict[str, Any]], roots: Sequence[tuple[str, str]]) -> None:
    """Give every entry without an ecg_id one that no other entry has, derived from its path.

    The id is the file's path relative to the deepest folder holding all ``roots`` (the
    source folders, and the folders of source files), without its suffix: ``ecg`` for
    ``export/ecg.xml`` when ``export`` is the only source, ``siteA/ecg`` and ``siteB/ecg`` for
    two sites' ``ecg.xml`` under a common folder. Entries that would still share an id (``x.hea``
    beside ``x.npz``, or a name equal to a PTB-XL record id) keep their suffix. Sources on
    different filesystems are told apart by their protocol (``s3/bucket/...``).
    """
    pending = [e for e in entries if not e.get("ecg_id")]
    if not pending:
        return
    mixed = len({proto for proto, _ in roots} | {e["protocol"] for e in pending}) > 1

    def key(protocol: str, path: str) -> str:
        return f"{protocol}/{path.lstrip('/')}" if mixed else path

    common = posixpath.commonpath([key(proto, path) for proto, path in roots])
    taken = Counter(e["ecg_id"] for e in entries if e.get("ecg_id"))
    # Every entry lies under one of the roots, hence under their common folder.
    relative = [key(e["protocol"], e["path"])[len(common) :].lstrip("/") for e in pending]
    stems = [_strip_suffix(rel) for rel in relative]
    clashes = Counter(stems) + taken
    for entry, rel, stem in zip(pending, relative, stems, strict=True):
        entry["ecg_id"] = stem if clashes[stem] == 1 else rel


def discover_sources(
    sources: Sequence[str], options: IngestOptions = IngestOptions()
) -> tuple[list[dict], pd.DataFrame | None]:
    """Expand SOURCE arguments into one entry per recording, plus labels found on the way (PTB-XL).

    Every entry gets its ecg_id here (see :func:`assign_ecg_ids`; PTB-XL records keep their
    metadata's record_id), so ids are unique before anything is read. A file listed by two
    overlapping sources is read once.
    """
    entries: list[dict[str, Any]] = []
    found_labels: list[pd.DataFrame] = []
    roots: list[tuple[str, str]] = []
    for source in sources:
        fs, path = fsspec.core.url_to_fs(source)
        protocol = _protocol(fs)
        # Keep the user's spelling: plain paths stay paths, URLs keep their protocol.
        url_of: Callable[[str], str] = fs.unstrip_protocol if "://" in source else (lambda p: p)

        if any(ch in source for ch in "*?["):
            matches = sorted(fs.glob(path))
            if not matches:
                raise FileNotFoundError(f"no files match {source}")
            entries += [_entry(url_of(m), m, protocol) for m in matches if fs.isfile(m) and is_ecg_file(m)]
            roots.append((protocol, _glob_root(path)))
        elif fs.isdir(path):
            if _is_ptbxl_root(fs, path):
                ptb_entries, ptb_labels = _ptbxl_sources(source, options)
                entries += ptb_entries
                found_labels.append(ptb_labels)
            else:
                files = sorted(f for f in fs.find(path) if is_ecg_file(f))
                entries += [_entry(url_of(f), f, protocol) for f in files]
                roots.append((protocol, path.rstrip("/") or "/"))
        elif fs.exists(path) or fs.exists(path + ".hea"):
            entries.append(_entry(source, path, protocol))
            roots.append((protocol, posixpath.dirname(path) or "/"))
        else:
            raise FileNotFoundError(f"ECG source not found: {source}")
    unique: dict[tuple[str | None, str], dict[str, Any]] = {}
    for e in entries:
        unique.setdefault((e.get("protocol"), e.get("path") or e["uri"]), e)
    if len(unique) < len(entries):
        log.info("%d file(s) listed by more than one source are read once", len(entries) - len(unique))
    entries = list(unique.values())
    assign_ecg_ids(entries, roots)
    for order, e in enumerate(entries):
        e.pop("path", None)
        e.pop("protocol", None)
        e["order"] = order
    labels = pd.concat(found_labels, ignore_index=True) if found_labels else None
    return entries, labels


# ---------------------------------------------------------------------------------------------
# Labels


def _id_text(value: object) -> str | None:
    """An id cell as text: None for missing; 42.0 (a number column with gaps) -> '42'."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def read_labels(source: str | pd.DataFrame) -> pd.DataFrame:
    """The user's labels table (CSV/parquet, any URL, or a DataFrame); errors name the file.

    Raises FileNotFoundError for a missing table and ValueError, naming it, for one that cannot be
    parsed or has no ecg_id / patient_id column.
    """
    name = source if isinstance(source, str) else "the labels table"
    try:
        table = store.read_any_table(source)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"labels table not found: {source}") from exc
    except (ValueError, OSError, pa.ArrowException) as exc:  # pandas/pyarrow parse errors, bad encodings
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read labels table {name}: {detail[:200]}") from exc
    if "ecg_id" not in table.columns and "patient_id" not in table.columns:
        shown = ", ".join(repr(str(c)[:40]) for c in list(table.columns)[:8])
        more = ", ..." if len(table.columns) > 8 else ""
        raise ValueError(f"labels table {name} needs an ecg_id or patient_id column; it has {shown}{more}")
    return table


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
                table[key] = table[key].map(_id_text)
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


def _normalisation_flag(raw: RawECG) -> str | None:
    """The amplitude-normalisation flag of a recording, judged on the leads its source stored."""
    stored = [np.asarray(v, dtype=np.float64) for v in raw.signals_uv.values()]
    if len({len(v) for v in stored}) != 1:
        return None
    return amplitude_normalisation(np.stack(stored))


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
            flag = _normalisation_flag(raw)
            if reason:
                # 'flat leads' on a z-scored export is clearer with the reason it is flat.
                rejections.append(Rejection(ecg_id, uri, raw.source_format, f"{reason}; {flag}" if flag else reason))
                continue
            if flag and options.reject_flagged:
                rejections.append(Rejection(ecg_id, uri, raw.source_format, flag))
                continue
            rows.append(
                {
                    **_metadata_row(raw, ecg_id, uri),
                    QUALITY_FLAG: flag,
                    "_order": entry.get("order", len(rows)),
                    "_digest": hashlib.sha256(wave.tobytes()).hexdigest(),
                }
            )
            waves.append(wave)
    return rows, waves, rejections


def ingest_batch(
    entries: Sequence[dict[str, Any]],
    out: str,
    schema: pa.Schema,
    labels: pd.DataFrame | None,
    options: IngestOptions,
) -> list[dict[str, Any]]:
    """Read a batch of sources and write them as one shard; return manifest rows and rejections.

    A shard row also lists, per ECG, its ecg_id, source order, waveform digest, quality flag and
    patient_id, for the duplicate check across shards and the summary.
    """
    rows, waves, rejections = read_batch(entries, options)
    results: list[dict[str, Any]] = [{"kind": "reject", **r.__dict__} for r in rejections]
    if rows:
        meta = _apply_labels(pd.DataFrame(rows), labels)
        # A BSA given in the labels wins; else Mosteller from height and weight (lvm_ray.lvh).
        meta["bsa_m2"] = derive(meta)["bsa_m2"].to_numpy()
        shard = store.write_shard(out, store.build_shard_table(meta, np.stack(waves), schema), prefix="ingest")
        results.append(
            {
                "kind": "shard",
                **shard.__dict__,
                "ecg_ids": list(meta["ecg_id"]),
                "orders": [int(o) for o in meta["_order"]],
                "digests": list(meta["_digest"]),
                "flags": [None if pd.isna(f) else str(f) for f in meta[QUALITY_FLAG]],
                "patient_ids": [None if pd.isna(p) else str(p) for p in meta["patient_id"]],
            }
        )
    return results


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass
class _Kept:
    """What the stage needs to know of every stored ECG after the duplicate check."""

    ecg_ids: list[str] = field(default_factory=list)
    patient_ids: list[str | None] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)


def _dedupe_across_shards(
    out: str, shard_rows: list[dict[str, Any]]
) -> tuple[list[store.ShardInfo], list[dict[str, Any]], _Kept]:
    """Keep the first recording (in source order) of each waveform and each ecg_id; quarantine the rest.

    A later copy of the same canonical waveform is a true duplicate and names the ECG it
    duplicates; a different recording under an id already taken (only possible with ids from
    metadata, e.g. a PTB-XL table listing one record_id twice) is an id clash. Shards that lose
    rows are rewritten.
    """
    by_digest: dict[str, str] = {}
    seen_ids: set[str] = set()
    dropped: list[dict[int, str]] = [{} for _ in shard_rows]
    positions = [(order, s, i) for s, row in enumerate(shard_rows) for i, order in enumerate(row["orders"])]
    for _, s, i in sorted(positions):
        ecg_id, digest = shard_rows[s]["ecg_ids"][i], shard_rows[s]["digests"][i]
        if digest in by_digest:
            dropped[s][i] = f"duplicate recording: same waveform as ecg_id {by_digest[digest]!r} (kept that one)"
        elif ecg_id in seen_ids:
            dropped[s][i] = f"duplicate ecg_id {ecg_id!r}: a different recording already has this id (kept the first)"
        else:
            by_digest[digest] = ecg_id
            seen_ids.add(ecg_id)
    shards: list[store.ShardInfo] = []
    rejections: list[dict[str, Any]] = []
    kept = _Kept()
    for row, drop in zip(shard_rows, dropped, strict=True):
        keep = [i for i in range(len(row["ecg_ids"])) if i not in drop]
        kept.ecg_ids += [row["ecg_ids"][i] for i in keep]
        kept.patient_ids += [row["patient_ids"][i] for i in keep]
        kept.flags += [row["flags"][i] for i in keep if row["flags"][i]]
        info = store.ShardInfo(row["path"], row["rows"], row["bytes"], row["sha256"])
        if drop:
            table = store.read_shard(out, info.path)
            removed = table.take(pa.array(sorted(drop))).select(["ecg_id", "source_uri", "source_format"])
            for i, record in zip(sorted(drop), removed.to_pylist(), strict=True):
                rejections.append({**record, "reason": drop[i]})
            store.remove(out, info.path)
            if not keep:
                continue
            info = store.write_shard(out, table.take(pa.array(keep)), prefix="ingest")
        shards.append(info)
    return shards, rejections, kept


def ingest(
    sources: Sequence[str],
    out: str,
    labels: str | pd.DataFrame | None = None,
    options: IngestOptions = IngestOptions(),
    use_ray: bool | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    address: str | None = None,
) -> IngestResult:
    """Ingest ECG exports into a canonical dataset at ``out``.

    ``use_ray`` None decides by size: more than IN_PROCESS_MAX_SOURCES sources go through Ray
    Data (the caller connects to a cluster first, or an embedded one starts).
    """
    started = time.time()
    # Before reading anything: an --out that is a file, an input, or someone else's folder is refused.
    store.check_output(out, "dataset", inputs=list(sources))
    entries, found_labels = discover_sources(sources, options)
    if not entries:
        raise FileNotFoundError(f"no ECG files found in {', '.join(sources)}")
    user_labels = read_labels(labels) if labels is not None else None
    label_table = prepare_labels(user_labels, found_labels)
    schema = shard_schema(label_fields(label_table))
    store.prepare_output(out, overwrite=overwrite, inputs=list(sources))
    if use_ray is None:
        use_ray = len(entries) > IN_PROCESS_MAX_SOURCES
    if use_ray:
        results = _ingest_with_ray(entries, out, schema, label_table, options, address)
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
    shards, duplicate_rejections, kept = _dedupe_across_shards(out, shard_rows)
    rejections += duplicate_rejections
    flagged_by_reason = dict(Counter(flag.split(":")[0] for flag in kept.flags))
    manifest = store.finalize(
        out,
        schema,
        shards,
        rejections,
        extra={
            "kind": "ingest",
            "sources": list(sources),
            "n_sources": len(entries),
            "n_flagged": len(kept.flags),
            "flagged_by_reason": flagged_by_reason,
        },
    )
    result = IngestResult(
        out=out,
        n_sources=len(entries),
        n_stored=manifest["n_rows"],
        n_quarantined=manifest["n_quarantined"],
        quarantine_by_reason=manifest["quarantine_by_reason"],
        seconds=time.time() - started,
        manifest=manifest,
        n_flagged=len(kept.flags),
        flagged_by_reason=flagged_by_reason,
    )
    if user_labels is not None:
        result.labels_key, result.labels_matched = _count_label_matches(user_labels, kept)
    result.warnings = _warnings(result, labels, user_labels, kept)
    for warning in result.warnings:  # the user sees them in format_summary; logged once, quietly
        log.debug("warning: %s", warning)
    return result


def _count_label_matches(user_labels: pd.DataFrame, kept: _Kept) -> tuple[str, int]:
    """(join key, how many stored ECGs the user's labels table has a row for)."""
    key = "ecg_id" if "ecg_id" in user_labels.columns else "patient_id"
    wanted = {_id_text(v) for v in user_labels[key]} - {None}
    stored = kept.ecg_ids if key == "ecg_id" else kept.patient_ids
    return key, sum(1 for v in stored if v in wanted)


def _warnings(
    result: IngestResult, labels: str | pd.DataFrame | None, user_labels: pd.DataFrame | None, kept: _Kept
) -> list[str]:
    """What a user must not miss: nothing stored, labels that match nothing, flagged recordings."""
    warnings = []
    if result.n_stored == 0:
        warnings.append(
            f"no ECG was stored: all {result.n_sources} source(s) were quarantined "
            f"(reasons in {result.out.rstrip('/')}/quarantine.parquet)"
        )
    elif result.labels_matched == 0 and user_labels is not None:
        name = f"labels table {labels}" if isinstance(labels, str) else "labels table"
        line = f"the {name} matched none of the {result.n_stored} stored ECGs by {result.labels_key}"
        if result.labels_key == "ecg_id":  # ecg_ids may be shown; patient ids never are
            theirs = next((t for v in user_labels["ecg_id"] if (t := _id_text(v)) is not None), None)
            line += (
                f" (the table has e.g. {theirs!r}, the ECGs e.g. {kept.ecg_ids[0]!r}: an ecg_id is the file's path "
                "under the sources' common folder, without suffix)"
            )
        warnings.append(line + "; its columns are empty in the dataset")
    if result.n_flagged:
        warnings.append(
            f"{result.n_flagged} stored ECG(s) look amplitude-normalised (column {QUALITY_FLAG}): voltage criteria "
            "and LV-mass predictions are meaningless on them; --strict quarantines them"
        )
    return warnings


def _ingest_with_ray(
    entries: list[dict[str, Any]],
    out: str,
    schema: pa.Schema,
    labels: pd.DataFrame | None,
    options: IngestOptions,
    address: str | None = None,
) -> list[dict[str, Any]]:
    import ray

    from lvm_ray.ray_utils import ensure_connected

    ensure_connected(address)
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

    frame = pd.DataFrame(entries, columns=["uri", "ecg_id", "order"])
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
    if result.n_flagged:
        lines.append(f"  flagged      : {result.n_flagged} (stored, column {QUALITY_FLAG})")
        for reason, count in sorted(result.flagged_by_reason.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {count:6d}  {reason}")
    if result.labels_matched is not None:
        matched = f"{result.labels_matched} of {result.n_stored} ECGs matched by {result.labels_key}"
        lines.append(f"  labels       : {matched}")
    lines.append(f"  time         : {result.seconds:.1f} s")
    lines += [f"warning: {warning}" for warning in result.warnings]
    return "\n".join(lines)
