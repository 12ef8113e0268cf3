"""The canonical ECG store: sharded parquet with a manifest, on any fsspec URL.

Layout of a dataset at ``ROOT`` (a local path, file://, memory://, s3://, gs://, ...)::

    ROOT/manifest.json          shards, row counts, checksums, schema version, summary
    ROOT/shards/*.parquet       one row per ECG, waveform as fixed-shape int16 [12, 5000] tensor
    ROOT/quarantine.parquet     rejected records with their reason (always present, maybe empty)

Only shards listed in the manifest belong to the dataset, so a crashed writer that left a
partial shard behind never leaks it into readers. No Ray here: workers and the driver call
these functions alike.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lvm_ray.schema import (
    QUARANTINE_SCHEMA,
    SCHEMA_VERSION,
    WAVEFORM_SHAPE,
    WAVEFORM_TYPE,
    shard_schema,
)
from lvm_ray.signals import Rejection

MANIFEST = "manifest.json"
QUARANTINE = "quarantine.parquet"
SHARD_DIR = "shards"


class StoreError(RuntimeError):
    """A dataset is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset root
    rows: int
    bytes: int
    sha256: str


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a URL or path, and the path within it."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/") or path


def join_url(root: str, *parts: str) -> str:
    """Join path parts onto a URL or path without losing its protocol."""
    return posixpath.join(root.rstrip("/"), *parts)


def write_bytes(url: str, payload: bytes) -> None:
    fs, path = filesystem(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(payload)


def write_atomic(url: str, payload: bytes) -> None:
    """Write a file under a temporary name beside it, then rename: readers see all of it or none."""
    head, name = posixpath.split(url.rstrip("/"))
    tmp = posixpath.join(head, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    write_bytes(tmp, payload)
    fs, tmp_path = filesystem(tmp)
    fs.mv(tmp_path, filesystem(url)[1])


def write_text(url: str, text: str) -> None:
    """Write a small text file (UTF-8) to any URL, creating its folder."""
    write_bytes(url, text.encode())


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def waveform_array(ecg: np.ndarray) -> pa.ExtensionArray:
    """int16 [n, 12, 5000] -> Arrow fixed-shape tensor array (checks shape and dtype)."""
    ecg = np.asarray(ecg)
    if ecg.ndim != 3 or ecg.shape[1:] != WAVEFORM_SHAPE:
        raise ValueError(f"waveforms must be [n, {WAVEFORM_SHAPE[0]}, {WAVEFORM_SHAPE[1]}], got {ecg.shape}")
    if ecg.dtype != np.int16:
        raise ValueError(f"waveforms must be int16 microvolts, got {ecg.dtype}")
    return pa.ExtensionArray.from_storage(
        WAVEFORM_TYPE, pa.FixedSizeListArray.from_arrays(pa.array(ecg.reshape(-1)), int(np.prod(WAVEFORM_SHAPE)))
    )


def ecg_array(column: pa.ChunkedArray | pa.Array | pa.Table) -> np.ndarray:
    """The waveform column of a shard table (or the table itself) -> int16 [n, 12, 5000]."""
    if isinstance(column, pa.Table):
        column = column.column("ecg")
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            return np.zeros((0, *WAVEFORM_SHAPE), dtype=np.int16)
        column = column.combine_chunks()
    return np.asarray(column.storage.flatten().to_numpy(zero_copy_only=False), dtype=np.int16).reshape(
        (len(column), *WAVEFORM_SHAPE)
    )


def build_shard_table(metadata: pd.DataFrame | pa.Table, ecg: np.ndarray, schema: pa.Schema) -> pa.Table:
    """Combine per-ECG metadata and waveforms into a table of exactly ``schema`` (missing -> null)."""
    if isinstance(metadata, pd.DataFrame):
        metadata = pa.Table.from_pandas(metadata.reset_index(drop=True), preserve_index=False)
    n = len(ecg)
    if metadata.num_rows != n:
        raise ValueError(f"{metadata.num_rows} metadata rows for {n} waveforms")
    columns = []
    for field in schema:
        if field.name == "ecg":
            columns.append(waveform_array(ecg))
        elif field.name in metadata.column_names:
            try:
                columns.append(metadata.column(field.name).cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(f"column {field.name!r} cannot be stored as {field.type}: {exc}") from exc
        else:
            columns.append(pa.nulls(n, field.type))
    table = pa.Table.from_arrays(columns, schema=schema)
    ids = table.column("ecg_id")
    if ids.null_count:
        raise ValueError("every ECG needs an ecg_id")
    return table


def write_shard(root: str, table: pa.Table, prefix: str = "part") -> ShardInfo:
    """Write one shard under ROOT/shards/ with a unique name; return what the manifest needs."""
    buffer = io.BytesIO()
    # Waveforms barely compress; zstd level 1 keeps writes fast and metadata small.
    pq.write_table(table, buffer, compression="zstd", compression_level=1, row_group_size=256)
    payload = buffer.getvalue()
    relative = posixpath.join(SHARD_DIR, f"{prefix}-{uuid.uuid4().hex[:12]}.parquet")
    write_bytes(join_url(root, relative), payload)
    return ShardInfo(relative, table.num_rows, len(payload), hashlib.sha256(payload).hexdigest())


def rejections_table(rejections: Iterable[Rejection | dict[str, Any]]) -> pa.Table:
    rows = [asdict(r) if isinstance(r, Rejection) else dict(r) for r in rejections]
    return pa.Table.from_pylist(
        [{name: row.get(name) for name in QUARANTINE_SCHEMA.names} for row in rows], schema=QUARANTINE_SCHEMA
    )


def dataset_exists(root: str) -> bool:
    fs, path = filesystem(root)
    return fs.exists(posixpath.join(path, MANIFEST))


def prepare_output(root: str, overwrite: bool, inputs: Sequence[str] = ()) -> None:
    """Refuse to mix two datasets in one place unless asked to overwrite (then clear only the old one).

    A folder of anything else (user files, another stage's output) is refused even with
    ``overwrite``: only a dataset's own files (shards/, manifest, quarantine) are ever removed.
    """
    fs, path = filesystem(root)
    kind = check_output(root, "dataset", inputs=inputs)
    if kind == "dataset" or fs.exists(posixpath.join(path, SHARD_DIR)):
        if not overwrite:
            raise StoreError(f"{root} already holds a dataset; pass --overwrite to replace it")
        for name in (MANIFEST, SHARD_DIR, QUARANTINE):  # the manifest first: a half-removed dataset is no dataset
            target = posixpath.join(path, name)
            if fs.exists(target):
                fs.rm(target, recursive=True)


def finalize(
    root: str,
    schema: pa.Schema,
    shards: Sequence[ShardInfo],
    rejections: Iterable[Rejection | dict[str, Any]] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the quarantine table and the manifest: the dataset becomes readable."""
    quarantine = rejections_table(rejections)
    buffer = io.BytesIO()
    pq.write_table(quarantine, buffer)
    write_bytes(join_url(root, QUARANTINE), buffer.getvalue())
    reasons = pd.Series(quarantine.column("reason").to_pylist(), dtype=object)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_unix": time.time(),
        "n_rows": int(sum(s.rows for s in shards)),
        "n_quarantined": quarantine.num_rows,
        "quarantine_by_reason": {str(k): int(v) for k, v in reasons.map(reason_category).value_counts().items()},
        "columns": [{"name": f.name, "type": str(f.type)} for f in schema],
        "shards": [asdict(s) for s in sorted(shards, key=lambda s: s.path)],
        **(extra or {}),
    }
    write_bytes(join_url(root, MANIFEST), json.dumps(manifest, indent=2, default=str).encode())
    return manifest


_REASON_CATEGORIES = (
    ("too short", "too short"),
    ("wrong shape", "wrong length"),
    ("different lengths", "wrong length"),
    ("missing lead", "missing leads"),
    ("non-finite", "NaN samples"),
    ("flat lead", "flat lead"),
    ("saturation", "saturation"),
    ("implausible", "implausible amplitude"),
    ("duplicate recording", "duplicate recording"),
    ("duplicate", "duplicate ecg_id"),
    ("amplitude-normalised", "amplitude-normalised"),
    ("sample rate", "invalid sample rate"),
)


def reason_category(reason: str) -> str:
    """Group a specific rejection reason into a short category for summaries."""
    lowered = reason.lower()
    for needle, category in _REASON_CATEGORIES:
        if needle in lowered:
            return category
    return "unreadable file"


class DatasetWriter:
    """Write a dataset from one process: ``write`` each chunk (one shard), then ``close``."""

    def __init__(
        self, root: str, extra_fields: Sequence[pa.Field] = (), overwrite: bool = False, prefix: str = "part"
    ) -> None:
        prepare_output(root, overwrite=overwrite)
        self.root = root
        self.schema = shard_schema(extra_fields)
        self.prefix = prefix
        self.shards: list[ShardInfo] = []
        self.rejections: list[Rejection | dict[str, Any]] = []

    def write(self, metadata: pd.DataFrame | pa.Table, ecg: np.ndarray) -> ShardInfo:
        info = write_shard(self.root, build_shard_table(metadata, ecg, self.schema), prefix=self.prefix)
        self.shards.append(info)
        return info

    def quarantine(self, rejections: Iterable[Rejection | dict[str, Any]]) -> None:
        self.rejections.extend(rejections)

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return finalize(self.root, self.schema, self.shards, self.rejections, extra)


def read_manifest(root: str) -> dict[str, Any]:
    if not dataset_exists(root):
        raise StoreError(f"no dataset at {root} (no {MANIFEST}); create one with `lvm-ray ingest` or `lvm-ray synth`")
    manifest = json.loads(read_bytes(join_url(root, MANIFEST)))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{root} has schema version {manifest.get('schema_version')}, this lvm-ray reads {SCHEMA_VERSION}"
        )
    return manifest


def shard_urls(root: str) -> list[str]:
    """The dataset's shard URLs, as listed in its manifest."""
    return [join_url(root, s["path"]) for s in read_manifest(root)["shards"]]


def read_shard(root: str, relative_path: str, columns: Sequence[str] | None = None) -> pa.Table:
    fs, path = filesystem(join_url(root, relative_path))
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=list(columns) if columns else None)


#: The column of a dataset of shard paths (``ray_utils.shard_paths_dataset``): relative to the root.
SHARD_PATH_COLUMN = "shard"


def iter_row_groups(root: str, relative_path: str, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """One shard a row group (256 ECGs) at a time, decoded on the calling thread: a consumer with
    one core holds ~30 MB of waveforms instead of the whole shard and its decode buffers."""
    fs, path = filesystem(join_url(root, relative_path))
    try:
        with fs.open(path, "rb") as f:
            shard = pq.ParquetFile(f)
            for index in range(shard.num_row_groups):
                yield shard.read_row_group(index, columns=list(columns) if columns else None, use_threads=False)
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable_shard(join_url(root, relative_path), exc) from None


def remove(root: str, relative_path: str) -> None:
    fs, path = filesystem(join_url(root, relative_path))
    fs.rm(path)


def iter_shards(root: str, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """Yield the dataset one shard at a time (bounded memory)."""
    for shard in read_manifest(root)["shards"]:
        yield read_shard(root, shard["path"], columns)


def read_table(root: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Read the whole dataset (or some columns of it) as one table. For small data and tests."""
    tables = list(iter_shards(root, columns))
    if not tables:
        schema = shard_schema()
        return schema.empty_table() if columns is None else schema.empty_table().select(list(columns))
    return pa.concat_tables(tables, promote_options="default")


def dataset_schema(root: str) -> pa.Schema:
    """The shard schema of a dataset (read from its first shard's footer)."""
    urls = shard_urls(root)
    if not urls:
        raise StoreError(f"{root} has no shards")
    fs, path = filesystem(urls[0])
    try:
        with fs.open(path, "rb") as f:
            return pq.read_schema(f)
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable_shard(urls[0], exc) from None


def _unreadable_shard(url: str, exc: BaseException) -> StoreError:
    """One line for a shard that is gone, truncated or replaced since its manifest was written."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return StoreError(f"shard {url} cannot be read ({reason}); the dataset changed after it was written: re-create it")


def read_quarantine(root: str) -> pd.DataFrame:
    url = join_url(root, QUARANTINE)
    fs, path = filesystem(url)
    if not fs.exists(path):
        return QUARANTINE_SCHEMA.empty_table().to_pandas()
    with fs.open(path, "rb") as f:
        return pq.read_table(f).to_pandas()


def verify(root: str) -> None:
    """Check every shard against the manifest's size and checksum; raise StoreError naming the first bad one."""
    for shard in read_manifest(root)["shards"]:
        payload = read_bytes(join_url(root, shard["path"]))
        if len(payload) != shard["bytes"] or hashlib.sha256(payload).hexdigest() != shard["sha256"]:
            raise StoreError(f"shard {shard['path']} of {root} does not match its manifest checksum")


def write_table(url: str, table: pd.DataFrame | pa.Table) -> None:
    """Write a small side table (follow-up, predictions summary) as parquet to any URL."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(url, buffer.getvalue())


def read_parquet(url: str) -> pd.DataFrame:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f).to_pandas()


def read_any_table(source: str | pd.DataFrame, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A DataFrame, a parquet/CSV file, or a folder of parquet files (any fsspec URL) -> DataFrame.

    A folder is read file by file and concatenated with permissive type promotion, because
    writers such as Ray Data may give a column null type in one file and a real type in another.
    Files whose name starts with '_' or '.' (e.g. _SUCCESS) are ignored, and so is a store's
    quarantine.parquet. ``columns``: read only those that exist (others are simply absent).
    """
    if isinstance(source, pd.DataFrame):
        frame = source.copy()
        return frame[[c for c in columns if c in frame.columns]] if columns is not None else frame
    fs, path = filesystem(str(source))
    if not fs.exists(path):
        raise FileNotFoundError(f"table not found: {source}")
    if fs.isdir(path):
        files = sorted(
            p
            for p in fs.find(path)
            if p.endswith(".parquet")
            and not posixpath.basename(p).startswith(("_", "."))
            and posixpath.basename(p) != "quarantine.parquet"
        )
        if not files:
            raise FileNotFoundError(f"no parquet files under {source}")
    else:
        files = [path]
    tables = []
    for file in files:
        if file.endswith((".csv", ".csv.gz", ".tsv")):
            with fs.open(file, "rb") as f:
                # Ids stay text: a recording named 00042.xml must join on '00042', not 42.
                frame = pd.read_csv(
                    f,
                    sep="\t" if file.endswith(".tsv") else ",",
                    compression="infer",
                    dtype={"ecg_id": str, "patient_id": str},
                )
            tables.append(pa.Table.from_pandas(frame, preserve_index=False))
            continue
        with fs.open(file, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            wanted = [c for c in columns if c in names] if columns is not None else None
            tables.append(pf.read(columns=wanted))
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    frame = table.to_pandas()
    if columns is not None:
        frame = frame[[c for c in columns if c in frame.columns]]
    return frame


def same_location(a: str, b: str) -> bool:
    """True when two URLs/paths name the same place, or one lies inside the other."""
    fs_a, path_a = filesystem(a)
    fs_b, path_b = filesystem(b)
    if type(fs_a) is not type(fs_b):
        return False
    if "file" in (fs_a.protocol if isinstance(fs_a.protocol, tuple) else (fs_a.protocol,)):
        import os

        path_a, path_b = os.path.realpath(path_a), os.path.realpath(path_b)
    path_a, path_b = path_a.rstrip("/"), path_b.rstrip("/")
    return path_a == path_b or path_a.startswith(path_b + "/") or path_b.startswith(path_a + "/")


#: How each stage's output folder is recognised (a file only that stage writes), so that a stage
#: replaces only its own kind of output and never a user's folder or another stage's output.
OUTPUT_MARKERS: dict[str, str] = {
    "dataset": MANIFEST,
    "rules": "_rules.json",
    "predictions": "_scoring.json",
    "run": "run.json",
    "evaluation": "metrics.json",
    "outcomes": "outcomes.json",
    "validation": "_validation.json",
    "explanations": "_explanations.json",
}


def output_kind(url: str) -> str | None:
    """'missing', 'empty', 'file', a kind of OUTPUT_MARKERS, or 'foreign' (a folder of something else)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return "missing"
    if not fs.isdir(path):
        return "file"
    names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    for kind, marker in OUTPUT_MARKERS.items():
        if marker in names:
            return kind
    if SHARD_DIR in names:  # a dataset whose writer was interrupted before its manifest
        return "dataset"
    if "parts" in names and names <= {"parts", "_SUCCESS"}:  # predictions of an older lvm-ray
        return "predictions"
    return "empty" if not {n for n in names if not n.startswith(".")} else "foreign"


def check_output(url: str, kind: str, inputs: Sequence[str] = (), flag: str = "--out") -> str:
    """Refuse an output location that is an input, a file, or a folder of anything but ``kind``.

    Returns the location's current kind ('missing', 'empty' or ``kind``). Raises StoreError with
    a one-line reason otherwise: nothing a user put there is ever replaced.
    """
    for source in inputs:
        if source and same_location(url, source):
            raise StoreError(f"{flag} {url} is (or is inside) the input {source}; choose another folder")
    current = output_kind(url)
    if current == "file":
        raise StoreError(f"{flag} {url} is an existing file, not a folder")
    if current in ("missing", "empty", kind):
        return current
    what = f"an lvm-ray {current} output" if current in OUTPUT_MARKERS else "files that are not lvm-ray's"
    raise StoreError(f"{flag} {url} already holds {what}; choose another folder (nothing was written)")


def commit_folder(tmp: str, final: str) -> None:
    """Move a finished output folder into place, replacing an earlier output of the same stage.

    The new output is complete before it appears under its name, so an interrupted run never
    leaves a half output that looks finished.
    """
    fs, tmp_path = filesystem(tmp)
    _, final_path = filesystem(final)
    old = f"{final_path}.old-{uuid.uuid4().hex[:8]}"
    if fs.exists(final_path):
        fs.mv(final_path, old, recursive=True)
    fs.mv(tmp_path, final_path, recursive=True)
    if fs.exists(old):
        fs.rm(old, recursive=True)


def temporary_sibling(url: str) -> str:
    """A fresh name beside ``url`` for writing an output before :func:`commit_folder`."""
    return f"{url.rstrip('/')}.partial-{uuid.uuid4().hex[:8]}"


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return bool(fs.exists(path))


def jsonable(value: Any) -> Any:
    """numpy scalars -> Python, NaN/inf -> None (strict JSON), tuples -> lists, recursively."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if np.isfinite(value) else None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def write_json(url: str, payload: dict[str, Any]) -> None:
    """Strict JSON (NaN -> null) that any reader can open."""
    write_bytes(url, json.dumps(jsonable(payload), indent=2, allow_nan=False, default=str).encode())


def read_json(url: str) -> dict[str, Any]:
    return json.loads(read_bytes(url))


def frame_to_arrow(frame: pd.DataFrame, known_types: pa.Schema | None = None) -> pa.Table:
    """A DataFrame -> Arrow with types fixed by ``known_types`` or the dtype, never by content.

    Batches written separately (one per Ray task) must agree on their schema even when a column
    happens to be all-null in one of them: booleans stay bool, objects become strings.
    """
    arrays, fields = [], []
    hints = {f.name: f.type for f in known_types} if known_types is not None else {}
    for name in frame.columns:
        column = frame[name]
        kind = column.dtype
        if name in hints:
            values = [None if v is pd.NA or v is pd.NaT else v for v in column.astype(object)]
            arr, typ = pa.array(values, type=hints[name], from_pandas=True), hints[name]
        elif pd.api.types.is_bool_dtype(kind):
            arr, typ = pa.array(column.astype("boolean"), type=pa.bool_(), from_pandas=True), pa.bool_()
        elif pd.api.types.is_float_dtype(kind):
            arr, typ = pa.array(column.astype("float64"), type=pa.float64(), from_pandas=True), pa.float64()
        elif pd.api.types.is_integer_dtype(kind):
            arr, typ = pa.array(column.astype("Int64"), type=pa.int64(), from_pandas=True), pa.int64()
        elif pd.api.types.is_datetime64_any_dtype(kind):
            arr, typ = pa.array(column, type=pa.timestamp("us"), from_pandas=True), pa.timestamp("us")
        else:
            values = [
                None if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)) else str(v) for v in column
            ]
            arr, typ = pa.array(values, type=pa.string()), pa.string()
        arrays.append(arr)
        fields.append(pa.field(str(name), typ))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))
