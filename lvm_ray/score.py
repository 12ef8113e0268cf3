"""Stage `score`: cohort-scale batch prediction with a Ray Data actor pool.

Each actor loads the checkpoint once (the loader is injected, so tests can hand in a tiny
model) and predicts LV mass, LVMI, LVH and the voltage rules in one pass over the streamed
shards (``lvm_ray.predict``: the same path the online endpoint uses). Output is a folder of
parquet parts keyed by ecg_id. Re-running completes what a crashed run left undone and never
duplicates an ecg_id: ids already present are skipped, and unreadable (half-written) parts
are removed first.

The voltage rules do not depend on the model: ``rules=TABLE`` joins a table written by
``lvm-ray rules`` (on ecg_id; every ECG must be in it) instead of measuring them again, and
``rules=False`` leaves the rule columns out.

Where the time goes: each actor takes one whole shard (~1000 ECGs) per call, runs the model on
it in slices of ``batch_size`` and writes its prediction parts itself (Arrow, no pandas round
trip of the carried columns), under a hidden temporary name; the driver only renames the parts
it is told about (so an actor of a killed run can never add a part behind a re-run) and moves no
predictions through the object store. On CPUs there is one actor per core and it reads the
shards it scores itself (the dataset it maps is the manifest's list of shards: no read tasks,
no waveforms in the object store, no Arrow decode threads beside the model); a GPU actor is fed
by Ray Data's parquet read on every CPU.
"""

from __future__ import annotations

import logging
import math
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvm_ray import store
from lvm_ray.conformal import CalibrationError, check_level
from lvm_ray.model import read_payload
from lvm_ray.predict import COVARIATE_INPUTS, Predictor, checkpoint_calibration, model_version
from lvm_ray.progress import Progress
from lvm_ray.rules import MEASURE_COLUMNS, RULE_FLAG_COLUMNS, RulesConfig

log = logging.getLogger(__name__)

ModelLoader = Callable[[], Predictor]
#: Columns of the shards that never travel into predictions (the waveform, generator truth).
_NOT_CARRIED_PREFIXES = ("true_",)
SUMMARY_FILE = "_scoring.json"
PARTS_DIR = "parts"
#: Everything score writes into --out: the only names --overwrite removes.
SCORE_OUTPUTS = (PARTS_DIR, SUMMARY_FILE)
#: The rule columns as score writes them (measured here, or joined from a rules table).
RULES_SCHEMA = pa.schema(
    [
        pa.field(
            name, pa.bool_() if name in RULE_FLAG_COLUMNS else pa.string() if name == "rules_error" else pa.float64()
        )
        for name in MEASURE_COLUMNS
    ]
)
#: How the rule columns of a predictions folder were made ("rules" in its _scoring.json).
RULES_COMPUTED, RULES_TABLE, RULES_NONE = "computed", "table", "none"


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
    #: "computed" (measured by score), "table" (joined from rules_table) or "none" (no rule columns).
    rules: str = RULES_COMPUTED
    rules_table: str | None = None
    #: The rules' comparison ('strict' or 'inclusive'; None: no rules, or a table that does not say).
    rules_comparison: str | None = None
    #: Seconds from the start until an actor began scoring (Ray, the actors loading the model), and
    #: until the first part was in place (that, plus reading and scoring one shard). None: nothing to do.
    startup_s: float | None = None
    first_part_s: float | None = None


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


@dataclass(frozen=True)
class RulesLookup:
    """A rules table sorted by ecg_id beside its ids as a NumPy array: one copy in the object
    store, read zero-copy by every actor (no per-actor index), looked up by binary search."""

    ids: np.ndarray
    table: pa.Table

    def rows(self, ecg_ids: Any) -> pa.Table:
        """The rule columns (RULES_SCHEMA) of these ECGs, in their order."""
        wanted = np.asarray(ecg_ids, dtype=str)
        pos = np.minimum(np.searchsorted(self.ids, wanted), max(len(self.ids) - 1, 0))
        found = self.ids[pos] == wanted if len(self.ids) else np.zeros(len(wanted), dtype=bool)
        if not found.all():  # the driver checked coverage: only a changed dataset gets here
            raise ScoringError(f"ecg_id {str(wanted[~found][0])!r} is not in the rules table")
        return self.table.take(pa.array(pos))


#: Metadata the predictor reads (the other carried columns go from the shard into the parts as they are).
_PREDICTOR_INPUTS = ("ecg_id", *COVARIATE_INPUTS)


class ScoreBatch:
    """Ray Data actor: holds one Predictor; turns one shard into prediction parts.

    Each call gets a whole shard, as its path (``store.SHARD_PATH_COLUMN``: the actor reads
    ``read_columns`` of it from ``data``) or as a block of its rows (Ray Data's read, for GPU
    actors), predicts it in slices of ``batch_size`` and writes parts of at most
    ``rows_per_file`` rows under hidden temporary names in ``out``; it returns their names and
    row counts, and the driver renames them. ``rules``: RULES_COMPUTED (measured here),
    RULES_TABLE (joined from ``rules_table``, a one-element list holding the ObjectRef of a
    :class:`RulesLookup`) or RULES_NONE.
    """

    def __init__(
        self,
        loader: ModelLoader,
        carried: pa.Schema,
        skip_ids: frozenset[str] = frozenset(),
        out: str = "",
        batch_size: int = 64,
        rows_per_file: int = 2048,
        rules: str = RULES_COMPUTED,
        rules_table: list[Any] | None = None,
        data: str = "",
        read_columns: list[str] | None = None,
    ) -> None:
        self.predictor = loader()
        self.data = data
        self.read_columns = read_columns
        self.carried = carried
        self.skip = pa.array(sorted(skip_ids), type=pa.string()) if skip_ids else None
        self.out = out
        self.batch_size = batch_size
        self.rows_per_file = rows_per_file
        self.rules = rules
        self.lookup: RulesLookup | None = None
        if rules == RULES_TABLE:
            import ray

            self.lookup = ray.get(rules_table[0])  # in a list: Ray hands the ref over unresolved

    def _rows(self, block: pa.Table) -> Iterator[pa.Table]:
        """The rows to score: the shards named in ``block``, a row group at a time, or the block itself."""
        if store.SHARD_PATH_COLUMN not in block.column_names:
            tables: Iterable[pa.Table] = [block]
        else:
            paths = block.column(store.SHARD_PATH_COLUMN).to_pylist()
            tables = (t for path in paths for t in store.iter_row_groups(self.data, path, self.read_columns))
        for table in tables:
            if self.skip is not None:
                table = table.filter(pc.invert(pc.is_in(table.column("ecg_id"), value_set=self.skip)))
            yield table

    def __call__(self, block: pa.Table) -> pa.Table:
        started = time.time()
        names, rows = [], []
        pending: list[pa.Table] = []  # predictions of the part being filled
        filled = 0
        for table in self._rows(block):
            start = 0
            while start < table.num_rows:
                take = min(self.batch_size, self.rows_per_file - filled, table.num_rows - start)
                pending.append(self.predict(table.slice(start, take)))
                start, filled = start + take, filled + take
                if filled == self.rows_per_file:
                    names.append(_write_temporary_part(self.out, pending))
                    rows.append(filled)
                    pending, filled = [], 0
        if filled:
            names.append(_write_temporary_part(self.out, pending))
            rows.append(filled)
        return pa.table(
            {
                "part": pa.array(names, pa.string()),
                "rows": pa.array(rows, pa.int64()),
                "started": pa.array([started] * len(names), pa.float64()),  # when this actor began the block
            }
        )

    def predict(self, rows: pa.Table) -> pa.Table:
        """Prediction rows (Arrow) for shard rows: predictions, rule columns, then the carried columns."""
        metadata = {
            c: rows.column(c).to_numpy(zero_copy_only=False) for c in _PREDICTOR_INPUTS if c in rows.column_names
        }
        frame = self.predictor.predict(store.ecg_array(rows), metadata, rules=self.rules == RULES_COMPUTED)
        table = store.frame_to_arrow(frame)
        if self.lookup is not None:  # the rule columns where measuring them would have put them
            rules = self.lookup.rows(metadata["ecg_id"])
            at = table.schema.get_field_index("model_preset")
            table = pa.Table.from_arrays(
                [*table.columns[:at], *rules.columns, *table.columns[at:]],
                schema=pa.schema([*list(table.schema)[:at], *rules.schema, *list(table.schema)[at:]]),
            )
        for field in self.carried:
            if field.name not in table.column_names:
                table = table.append_column(field, rows.column(field.name).cast(field.type))
        return table


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


def _temporary_name(name: str) -> str:
    return f".{name}.tmp"


def _write_temporary_part(out: str, tables: list[pa.Table]) -> str:
    """Write one part under a hidden temporary name (ignored by readers); returns its final name."""
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    name = f"part-{uuid.uuid4().hex[:16]}.parquet"
    store.write_table(store.join_url(_parts_url(out), _temporary_name(name)), table)
    return name


def _commit_part(out: str, name: str) -> bool:
    """Rename a finished part into place (a part is whole or absent); False when there is nothing to rename.

    When actors die (Ctrl-C, a lost node) Ray may hand a block's result over twice: the part is
    then already in place. A part with neither name has its ECGs scored again by the next run.
    """
    fs, root = store.filesystem(_parts_url(out))
    temporary = posixpath.join(root, _temporary_name(name))
    if not fs.exists(temporary):
        return False
    fs.mv(temporary, posixpath.join(root, name))
    return True


def _write_parts(results: Any, out: str, progress: Progress) -> tuple[float | None, float | None]:
    """Rename the parts the actors report as they finish.

    Returns (when an actor first began scoring, when the first part was in place), as time.time().
    A killed or interrupted run keeps every part renamed so far; a part an actor finished but
    did not report is a temporary file, removed by the next run, which scores its ECGs again.
    """
    began = first = None
    with progress:
        for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            for name, rows in zip(batch.column("part").to_pylist(), batch.column("rows").to_pylist(), strict=True):
                if not _commit_part(out, name):
                    continue
                first = first or time.time()
                progress.update(rows)
            if batch.num_rows:
                began = min(began or math.inf, pc.min(batch.column("started")).as_py())
    return began, first


def load_rules_table(url: str, data: str, needed_ids: Any) -> tuple[RulesLookup, str | None]:
    """A `lvm-ray rules` table (a parquet folder or file) for ``needed_ids``, and its comparison.

    ScoringError (one line) when it is not there, lacks rule columns, repeats an ecg_id, or does
    not cover every needed ECG (it may hold more: one biobank table serves every subset).
    """
    fs, path = store.filesystem(url)
    if not fs.exists(path):
        raise ScoringError(f"no rules table at {url}; make one with `lvm-ray rules --data {data} --out {url}`")
    if fs.isdir(path):
        files = sorted(
            p for p in fs.find(path) if p.endswith(".parquet") and not posixpath.basename(p).startswith(("_", "."))
        )
    else:
        files = [path]
    wanted = ["ecg_id", *RULES_SCHEMA.names]
    tables = []
    for file in files:
        with fs.open(file, "rb") as f:
            part = pq.ParquetFile(f)
            missing = [c for c in wanted if c not in part.schema_arrow.names]
            if missing:
                raise ScoringError(
                    f"{url} is not a rules table of this lvm-ray: it lacks {', '.join(missing[:3])}"
                    f"{' and more' if len(missing) > 3 else ''} (make one with `lvm-ray rules`)"
                )
            tables.append(part.read(columns=wanted))
    if not tables:
        raise ScoringError(f"no parquet files in the rules table {url}")
    table = pa.concat_tables(tables, promote_options="permissive")
    schema = pa.schema([pa.field("ecg_id", pa.string()), *RULES_SCHEMA])
    table = pa.Table.from_arrays([table.column(f.name).cast(f.type) for f in schema], schema=schema)
    table = table.take(pc.sort_indices(table, [("ecg_id", "ascending")]))
    ids = np.asarray(table.column("ecg_id").to_numpy(zero_copy_only=False), dtype=str)
    repeated = ids[1:][ids[1:] == ids[:-1]]
    if len(repeated):
        raise ScoringError(f"the rules table {url} has ecg_id {repeated[0]!r} more than once; make it again")
    lookup = RulesLookup(ids, table.drop(["ecg_id"]))
    needed = np.asarray(needed_ids, dtype=str)
    if len(needed):
        pos = np.minimum(np.searchsorted(ids, needed), max(len(ids) - 1, 0))
        absent = needed[ids[pos] != needed] if len(ids) else needed
        if len(absent):
            hint = "; is it another dataset's table?" if len(absent) == len(needed) else ""
            raise ScoringError(
                f"the rules table {url} lacks {len(absent)} of the {len(needed)} ECGs to score in {data} "
                f"(e.g. ecg_id {str(absent[0])!r}){hint}; make it with `lvm-ray rules --data {data} --out TABLE`, "
                "or score without --rules"
            )
    comparison = None
    marker = store.join_url(url, store.OUTPUT_MARKERS["rules"])
    if fs.isdir(path) and store.exists(marker):
        comparison = store.read_json(marker).get("comparison")
    return lookup, comparison


def _actor_plan(cpus: int, gpus: int, use_gpu: bool, num_actors: int | None, shards: int) -> int:
    """How many actors score: never more than shards (one shard is one call).

    On CPUs one actor per core (an embedded Ray advertises more logical CPUs than the machine has
    cores; a cluster's CPUs are its cores), each reading the shards it scores. One GPU actor per
    GPU, fed by parquet read tasks on every CPU.
    """
    if use_gpu:
        return max(1, min(num_actors or max(1, gpus), shards))
    from lvm_ray.ray_utils import cpu_cores

    return max(1, min(num_actors or cpu_cores(), cpus, shards))


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
    rules: bool | str = True,
) -> ScoreResult:
    """Score every ECG of ``data`` with the model at ``checkpoint`` into ``out`` (a folder of parquet).

    Connects to Ray (``address``; default an embedded local Ray) after the arguments are checked;
    ``loader`` defaults to loading ``checkpoint``; ``use_gpu`` follows the one GPU policy
    (:func:`lvm_ray.ray_utils.resolve_gpu`); ``num_actors`` defaults to one per GPU, or one per
    CPU core (:func:`_actor_plan`). ``overwrite`` removes only earlier predictions (parts/ and
    the summary). ``interval_level``: level of the lv_mass_pred_lo_g/hi_g intervals (default: the
    calibration's, 0.9); an uncalibrated checkpoint gives null intervals and lvh_prob_calibrated.
    ``rules``: True measures the voltage rules here; a URL joins that `lvm-ray rules` table on
    ecg_id instead (it must hold every ECG to score); False leaves the rule columns out. A folder
    holds one kind: resuming with rule columns where there were none (or the reverse) is refused.
    ``rows_per_file``: most rows in one part (each shard gives at least one part).
    """
    from ray.data import ActorPoolStrategy

    from lvm_ray.ray_utils import ensure_connected, read_ecg_dataset, resolve_gpu, shard_paths_dataset, worker_error

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
    n_total = int(manifest["n_rows"])
    lookup = None
    rules_info: dict[str, Any] = {
        "rules": RULES_COMPUTED,
        "rules_table": None,
        "rules_comparison": RulesConfig().comparison,  # what Predictor measures with
    }
    if rules is False:
        rules_info.update(rules=RULES_NONE, rules_comparison=None)
    elif isinstance(rules, str):
        todo = (
            [i for t in store.iter_shards(data, columns=["ecg_id"]) for i in t.column("ecg_id").to_pylist()]
            if len(done_ids) < n_total
            else []
        )
        lookup, comparison = load_rules_table(rules, data, [i for i in todo if i not in done_ids])
        rules_info.update(rules=RULES_TABLE, rules_table=rules, rules_comparison=comparison)
    _check_same_rules(out, rules_info, bool(done_ids))
    ensure_connected(address, verbose=verbose, dashboard=False)  # no State API here: 350 MB less
    import ray

    # The marker first: an interrupted run's folder is recognised as predictions, and resumed.
    summary_url = store.join_url(out, SUMMARY_FILE)
    if not store.exists(summary_url):
        store.write_json(
            summary_url, {"status": "running", "data": data, "checkpoint": checkpoint, **intervals, **rules_info}
        )

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = resolve_gpu(use_gpu, workers=max(1, num_actors or 1), stage="score")
    loader = loader or partial(Predictor.from_checkpoint, checkpoint, use_gpu, interval_level=interval_level)
    version = version or loader().version
    log.info("scoring %d ECGs (%d already scored) with %s", n_total, len(done_ids), version)
    began = first_part = None
    if len(done_ids) < n_total:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        actors = _actor_plan(cpus, gpus, use_gpu, num_actors, len(manifest["shards"]))
        carried = pa.schema(
            [f for f in store.dataset_schema(data) if f.name != "ecg" and not f.name.startswith(_NOT_CARRIED_PREFIXES)]
        )
        if use_gpu:
            dataset = read_ecg_dataset(data)
        else:  # the actors read their shards
            dataset = shard_paths_dataset(data)
        results = dataset.map_batches(
            ScoreBatch,
            fn_constructor_kwargs={
                "loader": loader,
                "carried": carried,
                "skip_ids": frozenset(done_ids),
                "out": out,
                "batch_size": batch_size,
                "rows_per_file": rows_per_file,
                "rules": rules_info["rules"],
                "rules_table": [ray.put(lookup)] if lookup is not None else None,
                "data": data,
                "read_columns": ["ecg", *carried.names],
            },
            # A whole shard per call (the actor slices it into model batches): one path, or a
            # block of rows; Ray Data wants a number when GPUs are requested: a shard's rows.
            batch_size=max([batch_size, *(int(s.get("rows", 0)) for s in manifest["shards"])]) if use_gpu else 1,
            batch_format="pyarrow",
            zero_copy_batch=True,
            compute=ActorPoolStrategy(min_size=1 if use_gpu else actors, max_size=actors),
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else 1,
        )
        try:
            began, first_part = _write_parts(results, out, Progress(n_total, "score", initial=len(done_ids)))
        except ray.exceptions.RayError as exc:  # e.g. an actor found a shard unreadable: its own line
            raise (worker_error(exc, (store.StoreError, ScoringError)) or exc) from None
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
        **rules_info,
        startup_s=None if began is None else began - started,
        first_part_s=None if first_part is None else first_part - started,
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


def _check_same_rules(out: str, rules_info: dict[str, Any], resuming: bool) -> None:
    """A resumed run must not give some rows rule columns and others none, or two rule definitions."""
    url = store.join_url(out, SUMMARY_FILE)
    if not resuming or not store.exists(url):
        return
    before = store.read_json(url)
    had = before.get("rules", RULES_COMPUTED) != RULES_NONE  # summaries from before --rules: measured
    has = rules_info["rules"] != RULES_NONE
    if had != has:
        raise ScoringError(
            f"{out} holds predictions {'with' if had else 'without'} the voltage-rule columns; "
            f"{'drop' if had else 'pass'} --no-rules to resume it, or pass --overwrite or choose another --out"
        )
    then, now = before.get("rules_comparison", RulesConfig().comparison), rules_info["rules_comparison"]
    if has and then and now and then != now:
        raise ScoringError(
            f"{out} holds voltage rules with the {then} comparison, the rules table has {now}; "
            "pass --overwrite or choose another --out"
        )


def format_summary(result: ScoreResult) -> str:
    rate = result.n_scored / result.seconds if result.seconds > 0 else math.nan
    return (
        f"score -> {result.out}\n"
        f"  model        : {result.model_version}\n"
        f"  ECGs         : {result.n_total} ({result.n_scored} scored now, {result.n_skipped} already there)\n"
        f"  time         : {result.seconds:.1f} s ({rate:.1f} ECGs/s)\n"
        f"  voltage rules: {_rules_text(result)}\n"
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


def _rules_text(result: ScoreResult) -> str:
    if result.rules == RULES_NONE:
        return "none (--no-rules: no rule columns; `evaluate` reports the rules as unavailable)"
    how = f"from {result.rules_table}" if result.rules == RULES_TABLE else "measured"
    return how + (f" ({result.rules_comparison} comparison)" if result.rules_comparison else "")


def predictions_summary(out: str) -> dict[str, Any]:
    """n, mean predicted LV mass, LVH prevalences (any_rule_prevalence None without rule columns)."""
    fs, root = fsspec.core.url_to_fs(_parts_url(out))
    paths = sorted(fs.glob(posixpath.join(root, "*.parquet"))) if fs.exists(root) else []
    with_rules = bool(paths) and "lvh_any_rule" in pq.read_schema(fs.open(paths[0], "rb")).names
    frame = read_predictions(out, columns=["lv_mass_pred_g", "lvh_pred", *(["lvh_any_rule"] if with_rules else [])])
    return {
        "n": len(frame),
        "lv_mass_pred_mean_g": float(frame.lv_mass_pred_g.mean()),
        "lvh_pred_prevalence": float(frame.lvh_pred.dropna().astype(bool).mean()),
        "any_rule_prevalence": float(frame.lvh_any_rule.dropna().astype(bool).mean()) if with_rules else None,
    }
