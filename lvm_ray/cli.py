"""The `lvm-ray` command line: one command per stage.

Stage modules are imported inside each command so that `lvm-ray --help` stays instant and a
command that needs no Ray never starts one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from lvm_ray.presets import preset_names

app = typer.Typer(
    name="lvm-ray",
    help="LVM-AI on Ray: predict cardiac-MRI LV mass and LVH from 12-lead ECGs, from laptop to cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain Click help: wraps cleanly in 80 columns (rich panels truncate long words).
    rich_markup_mode=None,
)

AddressOption = Annotated[
    str | None,
    typer.Option(help="Ray cluster to join ('auto', 'ray://host:10001'); default: start an embedded local Ray."),
]


VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Show Ray's own logs and progress on the console.")
]
GpuOption = Annotated[
    bool | None,
    typer.Option(
        "--use-gpu/--no-gpu",
        help="--use-gpu requires GPUs (waits for the autoscaler to add them); --no-gpu uses CPUs; "
        "default: GPUs when the cluster has or can add them.",
    ),
]


def _version(value: bool) -> None:
    if value:
        from lvm_ray import __version__

        typer.echo(f"lvm-ray {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """LVM-AI on Ray: predict cardiac-MRI LV mass and LVH from 12-lead ECGs, from laptop to cluster."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _ci_text(ci: Any) -> str:
    """'(0.612-0.701)', or '(no CI)' where the interval is undefined (null)."""
    return f"({ci[0]:.3f}-{ci[1]:.3f})" if ci and None not in ci else "(no CI)"


def _one_line(exc: BaseException) -> str:
    """An exception as one line (KeyError's repr quotes dropped; only the first line kept)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0]


@contextlib.contextmanager
def _interrupts_end_in_one_line(message: str) -> Iterator[None]:
    """Ctrl-C or SIGTERM (``kill``, a scheduler's time limit) ends the block with one line,
    ``interrupted: <message>``; exit 130 for Ctrl-C, 143 for SIGTERM, as shells count."""
    from lvm_ray.ray_utils import sigterm_interrupts, sigterm_received

    try:
        with sigterm_interrupts():
            yield
    except KeyboardInterrupt:
        typer.secho(f"interrupted: {message}", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(143 if sigterm_received() else 130) from None


def _interruptible(command: Callable[..., None]) -> Callable[..., None]:
    """A long stage that Ctrl-C or SIGTERM ends with one line; what it finished is kept, and a re-run resumes."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        with _interrupts_end_in_one_line("re-run the same command to resume"):
            command(*args, **kwargs)

    return wrapper


def _progress(label: str) -> Callable[[int, int], None]:
    """A (done, total) callback drawing a progress bar with ECGs/s and ETA (lvm_ray.progress)."""
    from lvm_ray.progress import Progress

    bar: list[Progress] = []

    def report(done: int, total: int) -> None:
        if not bar:  # the rate counts from the first report on
            bar.append(Progress(total, label, initial=done))
        else:
            bar[0].update(done - bar[0].done)
        if done >= total:
            bar[0].close()

    return report


@app.command()
def synth(
    out: Annotated[str, typer.Option(help="Dataset URL or path to write (ECG shards, followup.parquet, truth.json).")],
    n: Annotated[int, typer.Option(min=1, help="Number of participants (one ECG each).")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same cohort.")] = 0,
    chunk_size: Annotated[int, typer.Option(min=16, help="ECGs per shard (memory is bounded by this).")] = 1000,
    overwrite: Annotated[bool, typer.Option(help="Replace a dataset already at --out (only its own files).")] = False,
) -> None:
    """Generate a synthetic UK-Biobank-like cohort whose truth is known (heart-vector ECG model)."""
    from lvm_ray.store import StoreError
    from lvm_ray.summary import dataset_summary, format_dataset_summary
    from lvm_ray.synth import write_cohort

    try:
        info = write_cohort(n, seed, out, chunk_size=chunk_size, progress=_progress("synth"), overwrite=overwrite)
    except StoreError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:  # a cohort is not resumed: the shards written so far are replaced
        message = f"interrupted: {out} is incomplete; re-run with --overwrite to write it again"
        typer.secho(message, err=True, fg="yellow")
        raise typer.Exit(130) from None
    typer.echo(format_dataset_summary(dataset_summary(out)))
    typer.echo(f"  generated in {info.get('seconds', float('nan')):.1f} s; truth: {out.rstrip('/')}/truth.json")


@app.command()
@_interruptible
def ingest(
    sources: Annotated[list[str], typer.Argument(help="Files, folders, globs or a PTB-XL root; any fsspec URL.")],
    out: Annotated[str, typer.Option(help="Dataset URL or path to write.")],
    labels: Annotated[
        str | None, typer.Option(help="CSV/parquet of covariates and labels, keyed by ecg_id (or patient_id).")
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(help="Quarantine amplitude-normalised records and exit non-zero if any record was quarantined."),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a dataset already at --out.")] = False,
    sample_rate: Annotated[
        float | None, typer.Option(help="Sample rate (Hz) of .npy sources, which carry none.")
    ] = None,
    ptbxl_rate: Annotated[str, typer.Option(help="PTB-XL records to take: 500, 100, or auto.")] = "auto",
    ptbxl_records: Annotated[
        str | None, typer.Option(help="Folder holding PTB-XL's records100/records500 (default: beside metadata.csv).")
    ] = None,
    max_rows_per_shard: Annotated[int, typer.Option(min=1, help="Upper bound of ECGs per shard.")] = 1000,
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Read ECG exports (WFDB, GE MUSE, GE CardioSoft, HL7 aECG, DICOM, NumPy) into canonical shards.

    Bad records are quarantined with their reason (DATA/quarantine.parquet), never dropped silently.
    """
    from lvm_ray.ingest import IngestOptions, format_summary
    from lvm_ray.ingest import ingest as run_ingest
    from lvm_ray.store import StoreError

    _setup_logging(verbose)
    if ptbxl_rate not in ("500", "100", "auto"):
        _fail(f"--ptbxl-rate must be 500, 100 or auto, not {ptbxl_rate!r}")
    options = IngestOptions(
        max_rows_per_shard=max_rows_per_shard,
        numpy_sample_rate_hz=sample_rate,
        ptbxl_rate=ptbxl_rate,
        ptbxl_records=ptbxl_records,
        reject_flagged=strict,
    )
    from lvm_ray.ray_utils import ClusterError

    try:
        result = run_ingest(
            sources,
            out,
            labels=labels,
            options=options,
            overwrite=overwrite,
            use_ray=True if address else None,
            progress=_progress("ingest"),
            address=address,
        )
    except (FileNotFoundError, StoreError, ValueError, ClusterError) as exc:
        _fail(str(exc))
    typer.echo(format_summary(result))
    typer.echo(f"  quarantine table: {out.rstrip('/')}/quarantine.parquet")
    if result.n_stored == 0:
        _fail(f"no ECG was stored; the reasons are in {out.rstrip('/')}/quarantine.parquet", code=1)
    if strict and result.n_quarantined:
        _fail(f"{result.n_quarantined} record(s) quarantined (--strict)", code=1)


@app.command()
def summary(data: Annotated[str, typer.Option(help="Dataset URL or path.")]) -> None:
    """Print a dataset's counts, quarantine reasons, LV mass distribution and LVH prevalence."""
    from lvm_ray.store import StoreError
    from lvm_ray.summary import dataset_summary, format_dataset_summary

    try:
        typer.echo(format_dataset_summary(dataset_summary(data)))
    except StoreError as exc:
        _fail(str(exc))


@app.command()
@_interruptible
def rules(
    data: Annotated[str, typer.Option(help="Dataset URL or path.")],
    out: Annotated[
        str, typer.Option(help="Folder (any URL) for the rules table (parquet); an earlier rules table is replaced.")
    ],
    comparison: Annotated[str, typer.Option(help="'strict' (>, as published) or 'inclusive' (>=).")] = "strict",
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Measure R/S amplitudes on the median beat and apply Sokolow-Lyon, Cornell, aVL and more."""
    from lvm_ray.measure import measure_rules
    from lvm_ray.ray_utils import ClusterError
    from lvm_ray.rules import RulesConfig
    from lvm_ray.store import StoreError

    if comparison not in ("strict", "inclusive"):
        _fail(f"--comparison must be strict or inclusive, not {comparison!r}")
    try:
        result = measure_rules(data, out, RulesConfig(comparison=comparison), address=address, verbose=verbose)
    except (StoreError, ClusterError) as exc:
        _fail(_one_line(exc))
    typer.echo(f"rules -> {result.out}\n  ECGs         : {result.n} ({result.n_measurable} measurable)")
    for flag, share in result.prevalence.items():
        typer.echo(f"  {flag:<26s}{share:6.1%}")
    typer.echo(f"  time         : {result.seconds:.1f} s ({result.n / max(result.seconds, 1e-9):.0f} ECGs/s)")


@app.command()
@_interruptible
def train(
    data: Annotated[str, typer.Option(help="Dataset URL or path (ECG shards with the target column).")],
    run: Annotated[str, typer.Option(help="Run folder (any URL): checkpoints, metrics, split. Re-running resumes.")],
    preset: Annotated[
        str, typer.Option(help=f"Model preset, one of: {', '.join(preset_names())} (lvm-cpu: CPU/demo).")
    ] = "lvm-cpu",
    target: Annotated[
        str | None, typer.Option(help="Column to learn (default: the preset's, lv_mass_g). Binary columns classify.")
    ] = None,
    num_workers: Annotated[int, typer.Option(min=1, help="Ray Train workers (one GPU each with GPUs).")] = 2,
    use_gpu: GpuOption = None,
    max_epochs: Annotated[
        int | None, typer.Option(min=1, help="Upper bound on epochs (default: the preset's).")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="Batch per worker (default: the preset's); one step = batch x --num-workers ECGs."),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Learning rate, used as given (default: the preset's x sqrt(global batch / preset batch))."),
    ] = None,
    task: Annotated[
        str | None, typer.Option(help="'regression' or 'binary' for --target (default: inferred from the column).")
    ] = None,
    split_column: Annotated[
        str | None,
        typer.Option(help="Column holding an explicit split (e.g. strat_fold); default: hash of patient_id."),
    ] = None,
    val_values: Annotated[list[str] | None, typer.Option(help="Values of --split-column for validation.")] = None,
    test_values: Annotated[list[str] | None, typer.Option(help="Values of --split-column for the test split.")] = None,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs reserved per worker (fractions allowed).")] = 1.0,
    cache_inputs: Annotated[
        bool | None,
        typer.Option(
            "--cache-inputs/--stream-inputs",
            help="Keep the preprocessed inputs in the object store for all epochs, or stream the shards "
            "every epoch; default: cache when they take under a quarter of the object store.",
        ),
    ] = None,
    max_failures: Annotated[
        int, typer.Option(min=0, help="Worker failures survived (restart from the last checkpoint).")
    ] = 3,
    overwrite: Annotated[bool, typer.Option(help="Start over instead of resuming a run in RUN.")] = False,
    smoke_test: Annotated[bool, typer.Option(help="Two epochs, to check the plumbing.")] = False,
    preset_file: Annotated[
        str | None,
        typer.Option(help="A preset file (JSON/YAML, e.g. from `lvm-ray tune`) to train instead of --preset."),
    ] = None,
    ensemble: Annotated[
        int,
        typer.Option(
            min=1,
            help="Train K members (seeds seed..seed+K-1) into one RUN (RUN/members/<i>); score and serve "
            "average them and report their spread. 1: a plain run.",
        ),
    ] = 1,
    concurrent_members: Annotated[
        int | None,
        typer.Option(min=1, help="Ensemble members trained at once (default: as many as the cluster fits)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed (of the first member of an ensemble).")] = 0,
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Train a preset on Ray Train (DDP), streaming the shards with Ray Data; resumes when re-run."""
    from lvm_ray.model import CheckpointError
    from lvm_ray.presets import load_preset_file
    from lvm_ray.ray_utils import ClusterError
    from lvm_ray.store import StoreError
    from lvm_ray.train import TrainError
    from lvm_ray.train import train as run_train

    _setup_logging(verbose)
    try:
        chosen = load_preset_file(preset_file) if preset_file else preset
        if ensemble > 1:
            from lvm_ray.ensemble import result_lines, train_ensemble

            members = train_ensemble(
                data,
                run,
                ensemble,
                seed=seed,
                max_concurrent=concurrent_members,
                overwrite=overwrite,
                address=address,
                verbose=verbose,
                preset=chosen,
                target=target,
                num_workers=num_workers,
                use_gpu=use_gpu,
                max_epochs=2 if smoke_test else max_epochs,
                batch_size=batch_size,
                split_column=split_column,
                val_values=tuple(val_values or ()),
                test_values=tuple(test_values or ()),
                cpus_per_worker=cpus_per_worker,
                lr=lr,
                task=task,
                cache_inputs=cache_inputs,
                max_failures=max_failures,
            )
            typer.echo("\n".join(result_lines(members)))
            return
        result = run_train(
            data,
            run,
            preset=chosen,
            seed=seed,
            target=target,
            num_workers=num_workers,
            use_gpu=use_gpu,
            max_epochs=2 if smoke_test else max_epochs,
            address=address,
            batch_size=batch_size,
            split_column=split_column,
            val_values=tuple(val_values or ()),
            test_values=tuple(test_values or ()),
            cpus_per_worker=cpus_per_worker,
            overwrite=overwrite,
            lr=lr,
            task=task,
            cache_inputs=cache_inputs,
            max_failures=max_failures,
            verbose=verbose,
        )
    except (TrainError, ValueError, StoreError, ClusterError, CheckpointError) as exc:
        _fail(str(exc))
    typer.echo(f"train -> {result.run}")
    typer.echo(f"  preset {result.preset}, target {result.target} ({result.task}); best epoch {result.best_epoch}")
    typer.echo(f"  validation: {result.val_metrics}")
    if result.test_metrics:
        typer.echo(f"  test      : {result.test_metrics}")
    typer.echo(f"  checkpoint: {result.model_path}  ({result.wall_s:.0f} s)")


@app.command()
@_interruptible
def score(
    data: Annotated[str, typer.Option(help="Dataset URL or path.")],
    checkpoint: Annotated[str, typer.Option(help="Run folder or checkpoint file (any URL).")],
    out: Annotated[str, typer.Option(help="Predictions folder (any URL); a re-run completes it without duplicates.")],
    batch_size: Annotated[
        int, typer.Option(min=1, help="ECGs per model call (memory grows with it; e.g. 1024 on a GPU).")
    ] = 64,
    num_actors: Annotated[
        int | None, typer.Option(min=1, help="Model replicas (default: one per GPU, or one per CPU core).")
    ] = None,
    use_gpu: GpuOption = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace earlier predictions in --out (only lvm-ray's prediction files).")
    ] = False,
    interval_level: Annotated[
        float | None,
        typer.Option(help="Level of the LV mass prediction intervals, e.g. 0.8 (default: the calibration's, 0.9)."),
    ] = None,
    rules: Annotated[
        str | None,
        typer.Option(
            "--rules",
            help="Reuse this `lvm-ray rules` table (joined on ecg_id; it must hold every ECG) instead of measuring.",
        ),
    ] = None,
    no_rules: Annotated[
        bool, typer.Option("--no-rules", help="Leave the voltage-rule columns out (evaluate then lacks the rules).")
    ] = False,
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Predict LV mass, LVMI, LVH and the voltage rules for every ECG, with a Ray Data actor pool."""
    from lvm_ray.model import CheckpointError
    from lvm_ray.ray_utils import ClusterError
    from lvm_ray.score import ScoringError, format_summary
    from lvm_ray.score import score as run_score
    from lvm_ray.store import StoreError

    _setup_logging(verbose)
    if rules is not None and no_rules:
        _fail("--rules and --no-rules exclude each other")
    try:
        result = run_score(
            data,
            checkpoint,
            out,
            batch_size=batch_size,
            num_actors=num_actors,
            use_gpu=use_gpu,
            overwrite=overwrite,
            address=address,
            verbose=verbose,
            interval_level=interval_level,
            rules=False if no_rules else rules if rules is not None else True,
        )
    except (ScoringError, StoreError, CheckpointError, ClusterError) as exc:
        _fail(_one_line(exc))  # a worker's error arrives with Ray Data's retry advice appended
    typer.echo(format_summary(result))


@app.command()
def evaluate(
    predictions: Annotated[str, typer.Option(help="Predictions folder written by `lvm-ray score`.")],
    out: Annotated[str, typer.Option(help="Folder for metrics.json, table.md and the report's data.")],
    lvh_column: Annotated[
        str | None,
        typer.Option(help="Column holding a reference LVH (0/1), used when there is no CMR LV mass (PTB-XL: lvh)."),
    ] = None,
) -> None:
    """Pearson r, MAE, Bland-Altman, c-statistics with DeLong CIs and tests against the voltage rules."""
    from lvm_ray.evaluate import evaluate as run_evaluate
    from lvm_ray.store import StoreError, join_url

    try:
        metrics = run_evaluate(predictions, out, lvh_column=lvh_column)
    except (ValueError, FileNotFoundError, StoreError) as exc:
        _fail(_one_line(exc))
    typer.echo(f"evaluate -> {out}  (n = {metrics['n']})")
    if metrics["pearson_r"] is not None:  # None without CMR LV mass (--lvh-column)
        r_text = f"{metrics['pearson_r']:.3f} {_ci_text(metrics['pearson_r_ci'])}"
        typer.echo(f"  Pearson r {r_text}, MAE {metrics['mae_g']:.1f} g")
    for name, c in metrics["c_statistics"].items():
        if c.get("auc") is not None:
            p = metrics["delong_p"].get(name)
            typer.echo(f"  c {name:<14s}{c['auc']:.3f} {_ci_text(c.get('ci'))}" + (f"  P={p:.3g}" if p else ""))
    interval = metrics.get("interval") or {}
    if interval.get("coverage") is not None:
        sexes = interval.get("by_sex") or {}
        by_sex = ", ".join(f"{s} {100 * v['coverage']:.1f}%" for s, v in sexes.items() if v.get("coverage") is not None)
        level = f"{100 * interval['level']:g}%" if interval.get("level") else "mixed-level"
        lo, hi = interval["coverage_ci"]
        typer.echo(
            f"  {level} intervals cover {100 * interval['coverage']:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}; "
            f"{by_sex}); mean width {interval['mean_width_g']:.1f} g"
        )
    probability = (metrics.get("calibration") or {}).get("lvh_prob_calibrated") or {}
    if probability.get("brier") is not None:
        slope = probability.get("slope")
        typer.echo(
            f"  lvh_prob_calibrated: Brier {probability['brier']:.4f} (prevalence only "
            f"{probability['brier_prevalence_only']:.4f}), calibration slope "
            + ("-" if slope is None else f"{slope:.2f}")
        )
    for note in metrics.get("notes") or []:
        typer.echo(f"  note: {note}")
    typer.echo(f"  table: {join_url(out, 'table.md')}")


@app.command()
def outcomes(
    predictions: Annotated[str, typer.Option(help="Predictions folder written by `lvm-ray score`.")],
    followup: Annotated[
        str, typer.Option(help="Follow-up table (parquet/CSV): <outcome>_prevalent/_event/_time_years.")
    ],
    out: Annotated[str, typer.Option(help="Folder for outcomes.json, cumulative incidence and tables.")],
) -> None:
    """Age- and sex-adjusted Cox models of incident AF, MI, HF, VA (and death) by predicted LVH."""
    from lvm_ray.outcomes import format_hr, format_p
    from lvm_ray.outcomes import outcomes as run_outcomes
    from lvm_ray.store import StoreError

    try:
        results = run_outcomes(predictions, followup, out)
    except (ValueError, StoreError, FileNotFoundError, KeyError) as exc:
        _fail(_one_line(exc))
    typer.echo(f"outcomes -> {out}")
    for name, r in results.items():
        if r.get("hr") is None:
            typer.echo(f"  {name:<6s} n={r.get('n')} events={r.get('events')}: {r.get('note', 'not estimable')}")
        else:
            typer.echo(
                f"  {name:<6s} n={r['n']} events={r['events']}: "
                f"HR LVH {format_hr(r['hr'], r['ci'])} P={format_p(r['p'])}; "
                f"per SD {format_hr(r['hr_per_sd'], r['ci_per_sd'])}"
            )


@app.command()
def report(
    eval_dir: Annotated[str, typer.Option("--eval", help="Folder written by `lvm-ray evaluate`.")],
    out: Annotated[str, typer.Option(help="HTML file to write (self-contained: opens from disk).")],
    outcomes_dir: Annotated[
        str | None, typer.Option("--outcomes", help="Folder written by `lvm-ray outcomes`.")
    ] = None,
    explanations: Annotated[
        str | None, typer.Option(help="Folder written by `lvm-ray explain`: shows three example ECGs.")
    ] = None,
    run: Annotated[str | None, typer.Option(help="The model's run folder: shows its model card.")] = None,
) -> None:
    """Render one self-contained HTML report: figures and tables of the evaluation and outcomes."""
    from lvm_ray.report import ReportError, render_report

    try:
        typer.echo(f"report -> {render_report(eval_dir, outcomes_dir, out, explanations=explanations, run=run)}")
    except (ReportError, FileNotFoundError, ValueError) as exc:
        _fail(_one_line(exc))


@app.command()
def serve(
    checkpoint: Annotated[str, typer.Option(help="Run folder or checkpoint file (any URL).")],
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps it local.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    replicas: Annotated[
        int | None, typer.Option(min=1, help="Model replicas (one process each; one per core serves most).")
    ] = None,
    proxy: Annotated[
        str,
        typer.Option(
            help="HTTP front end of an embedded Ray: 'serve' (Serve's proxy) or 'haproxy' (faster; "
            "replicas then also listen on ports 30000-31000)."
        ),
    ] = "serve",
    use_gpu: GpuOption = None,
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Serve the model on Ray Serve: POST /v1/predict, /v1/explain (+/file); GET /healthz, /readyz, /v1/model, /docs."""
    from lvm_ray.model import CheckpointError, read_payload
    from lvm_ray.ray_utils import ClusterError, ensure_connected, resolve_gpu
    from lvm_ray.serve import ServeStartError, run_server, use_proxy

    _setup_logging(verbose)
    try:
        read_payload(checkpoint)  # a missing or foreign checkpoint is reported before Ray starts
        if not use_proxy(proxy):
            typer.echo(f"note: --proxy {proxy} applies to an embedded Ray only; the cluster's front end is used")
        ensure_connected(address, verbose=verbose)
        gpu = resolve_gpu(use_gpu, stage="serve")
    except (CheckpointError, ClusterError, ValueError) as exc:
        _fail(str(exc))
    settings = {"num_replicas": replicas} if replicas else None
    try:
        run_server(checkpoint, host=host, port=port, use_gpu=gpu, address=address, verbose=verbose, settings=settings)
    except ServeStartError as exc:
        _fail(str(exc))


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its data and outputs.")] = Path("demo_output"),
    n: Annotated[int, typer.Option(min=200, help="Size of the synthetic CMR (training) cohort.")] = 4000,
    n_outpatient: Annotated[
        int, typer.Option(min=200, help="Size of the outpatient cohort scored for outcomes.")
    ] = 3000,
    max_epochs: Annotated[int, typer.Option(min=1, help="Upper bound on training epochs.")] = 12,
    seed: Annotated[int, typer.Option(help="Random seed of the CMR cohort (the outpatient cohort uses seed + 1).")] = 7,
) -> None:
    """Run the whole study end to end on a generated cohort and the bundled real sample ECGs."""
    from lvm_ray.demo import run_demo

    _setup_logging(False)
    with _interrupts_end_in_one_line(f"the demo's outputs in {workdir} are incomplete; run it again to redo them"):
        run_demo(workdir=workdir, n=n, seed=seed, n_outpatient=n_outpatient, max_epochs=max_epochs)


@app.command("import-keras")
def import_keras_command(
    model_file: Annotated[str, typer.Argument(help="Keras .h5 file of the published LVM-AI (ML4H), any URL.")],
    run: Annotated[str, typer.Option(help="Run folder to write: RUN/model.pt and RUN/run.json.")],
    ecg_input: Annotated[
        str | None, typer.Option(help="The ECG input layer's name (default: the input of the convolutions).")
    ] = None,
    covariate: Annotated[
        list[str] | None,
        typer.Option(help="Map a Keras input to a covariate, NAME=age|sex|bmi (repeatable; default: by its name)."),
    ] = None,
    lvm_output: Annotated[
        str | None, typer.Option(help="The LV mass output layer (default: the 1-unit linear output).")
    ] = None,
    lvh_output: Annotated[
        str | None, typer.Option(help="The LVH output layer (default: the 2-unit softmax output, if any).")
    ] = None,
    lead_order: Annotated[
        str | None, typer.Option(help="The file's ECG channel order, comma-separated (default: ML4H's).")
    ] = None,
    scale_uv: Annotated[
        float | None, typer.Option(help="The file's ECG input is microvolts / this (ML4H: 2000).")
    ] = None,
    lvm_mean: Annotated[float | None, typer.Option(help="Grams = z x lvm-sd + lvm-mean (ML4H: 89.7).")] = None,
    lvm_sd: Annotated[float | None, typer.Option(help="LV mass z-score SD in grams (ML4H: 24.8).")] = None,
    age_mean: Annotated[float | None, typer.Option(help="Age z-score mean (default: ML4H's age_2).")] = None,
    age_sd: Annotated[float | None, typer.Option(help="Age z-score SD (default: ML4H's age_2).")] = None,
    bmi_mean: Annotated[float | None, typer.Option(help="BMI z-score mean (default: ML4H's bmi_21).")] = None,
    bmi_sd: Annotated[float | None, typer.Option(help="BMI z-score SD (default: ML4H's bmi_21).")] = None,
    sex_one_hot: Annotated[
        str | None, typer.Option(help="Order of the sex input's one-hot units (default F,M).")
    ] = None,
    lvh_positive_class: Annotated[
        int | None, typer.Option(help="The LVH output unit that means LVH (default 1).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a model already in RUN.")] = False,
) -> None:
    """Import the authors' Keras LVM-AI (.h5, no TensorFlow needed) as a run that score/serve/evaluate use."""

    from lvm_ray.keras_import import ImportOptions, KerasImportError, import_keras

    given = {
        "ecg_input": ecg_input,
        "lvm_output": lvm_output,
        "lvh_output": lvh_output,
        "scale_uv": scale_uv,
        "lvm_mean": lvm_mean,
        "lvm_sd": lvm_sd,
        "age_mean": age_mean,
        "age_sd": age_sd,
        "bmi_mean": bmi_mean,
        "bmi_sd": bmi_sd,
        "lvh_positive_class": lvh_positive_class,
    }
    # Unset flags keep ImportOptions' defaults (ML4H's constants, declared once there).
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if lead_order is not None:
        options["lead_order"] = tuple(s.strip() for s in lead_order.split(",") if s.strip())
    if sex_one_hot is not None:
        options["sex_one_hot"] = tuple(s.strip().upper() for s in sex_one_hot.split(","))
    mapping: dict[str, str] = {}
    for item in covariate or []:
        name, sep, cov = item.rpartition("=")
        if not sep or not name:
            _fail(f"--covariate takes NAME=age|sex|bmi, got {item!r}")
        mapping[name] = cov.strip().lower()
    try:
        result = import_keras(model_file, run, ImportOptions(covariate_inputs=mapping, **options), overwrite=overwrite)
    except KerasImportError as exc:
        _fail(str(exc))
    typer.echo(result.summary())


@app.command()
@_interruptible
def validate(
    exports: Annotated[
        list[str], typer.Argument(help="ECG exports: files, folders, globs or a PTB-XL root; any fsspec URL.")
    ],
    labels: Annotated[
        str,
        typer.Option(
            help="CSV/parquet keyed by ecg_id (or patient_id): CMR lv_mass_g with sex and height_cm/weight_kg "
            "(or bsa_m2), and/or an LVH column (--lvh-column)."
        ),
    ],
    checkpoint: Annotated[str, typer.Option(help="Run folder or checkpoint (e.g. from `lvm-ray import-keras`).")],
    out: Annotated[
        str,
        typer.Option(help="Folder for data/, predictions/, evaluation/, report.html, outputs.json; re-runs resume."),
    ],
    lvh_column: Annotated[
        str | None,
        typer.Option(help="Labels column holding a reference LVH (0/1), used when there is no CMR LV mass."),
    ] = None,
    strict: Annotated[bool, typer.Option(help="Quarantine amplitude-normalised records too.")] = False,
    sample_rate: Annotated[
        float | None, typer.Option(help="Sample rate (Hz) of .npy sources, which carry none.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="ECGs per model call.")] = 64,
    num_actors: Annotated[
        int | None, typer.Option(min=1, help="Model replicas (default: one per GPU, or CPUs/2).")
    ] = None,
    use_gpu: GpuOption = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an earlier validation in --out (only its own outputs).")
    ] = False,
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """External validation in one command: ingest, score, evaluate against the labels and the rules, report."""
    from lvm_ray.ingest import IngestOptions
    from lvm_ray.model import CheckpointError
    from lvm_ray.ray_utils import ClusterError
    from lvm_ray.score import ScoringError
    from lvm_ray.store import StoreError
    from lvm_ray.validate import format_summary
    from lvm_ray.validate import validate as run_validate

    _setup_logging(verbose)
    options = IngestOptions(numpy_sample_rate_hz=sample_rate, reject_flagged=strict)
    try:
        outputs = run_validate(
            exports,
            labels,
            checkpoint,
            out,
            lvh_column=lvh_column,
            address=address,
            overwrite=overwrite,
            options=options,
            batch_size=batch_size,
            num_actors=num_actors,
            use_gpu=use_gpu,
            verbose=verbose,
            progress=_progress("ingest"),
            echo=typer.echo,
        )
    except (FileNotFoundError, ValueError, StoreError, ScoringError, CheckpointError, ClusterError) as exc:
        _fail(_one_line(exc))
    typer.echo(format_summary(outputs, out))


@app.command()
@_interruptible
def calibrate(
    run: Annotated[str, typer.Option(help="Run folder (from `lvm-ray train` or `lvm-ray import-keras`).")],
    data: Annotated[str, typer.Option(help="Dataset with CMR labels (lv_mass_g, sex, height/weight or bsa_m2).")],
    split: Annotated[
        str | None,
        typer.Option(help="Use only this split of RUN/split.parquet (val or test); default: all labelled rows."),
    ] = None,
    interval_level: Annotated[
        float, typer.Option(help="Default level of the prediction intervals (score can choose another).")
    ] = 0.9,
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Calibrate a run's LV mass prediction intervals and LVH probability on labelled ECGs (rewrites RUN/model.pt)."""
    from lvm_ray.calibrate import CalibrateError
    from lvm_ray.calibrate import calibrate as run_calibrate
    from lvm_ray.conformal import CalibrationError
    from lvm_ray.model import CheckpointError
    from lvm_ray.ray_utils import ClusterError
    from lvm_ray.store import StoreError

    _setup_logging(verbose)
    try:
        result = run_calibrate(run, data, split=split, level=interval_level, address=address, verbose=verbose)
    except (CalibrateError, CalibrationError, CheckpointError, StoreError, ClusterError) as exc:
        _fail(_one_line(exc))
    typer.echo(result.summary())


@app.command()
@_interruptible
def explain(
    data: Annotated[str, typer.Option(help="Dataset URL or path.")],
    checkpoint: Annotated[str, typer.Option(help="Run folder or checkpoint file (any URL).")],
    out: Annotated[str, typer.Option(help="Folder for attributions/*.parquet (and figures/*.png).")],
    ids: Annotated[
        list[str] | None, typer.Option("--ids", help="ecg_ids to explain (repeatable, or comma-separated).")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Explain the first N ECGs only.")] = None,
    figures: Annotated[bool, typer.Option("--figures", help="Also draw one printed-ECG PNG per ECG.")] = False,
    steps: Annotated[
        int | None, typer.Option(min=2, help="Integration steps of integrated gradients (default 32).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="ECGs per model call (memory grows with it).")] = 8,
    num_actors: Annotated[
        int | None, typer.Option(min=1, help="Model replicas (default: one per GPU, or CPUs/2).")
    ] = None,
    use_gpu: GpuOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace earlier explanations in --out (only those).")] = False,
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Attribute each prediction to the 12 leads over time (integrated gradients) with a Ray Data actor pool."""
    from lvm_ray.explain_stage import ExplainStageError, explain_dataset, format_summary
    from lvm_ray.model import CheckpointError
    from lvm_ray.ray_utils import ClusterError
    from lvm_ray.store import StoreError

    _setup_logging(verbose)
    selected = [i.strip() for item in ids or [] for i in item.split(",") if i.strip()]
    try:
        result = explain_dataset(
            data,
            checkpoint,
            out,
            ids=selected or None,
            limit=limit,
            figures=figures,
            **({"n_steps": steps} if steps is not None else {}),
            batch_size=batch_size,
            num_actors=num_actors,
            use_gpu=use_gpu,
            overwrite=overwrite,
            address=address,
            verbose=verbose,
        )
    except (ExplainStageError, StoreError, CheckpointError, ClusterError) as exc:
        _fail(_one_line(exc))
    typer.echo(format_summary(result))


@app.command()
@_interruptible
def tune(
    data: Annotated[str, typer.Option(help="Dataset URL or path (ECG shards with the target column).")],
    run: Annotated[
        str, typer.Option(help="Folder for the search: trials/, tune.json and best_preset.json (for --preset-file).")
    ],
    target: Annotated[
        str | None, typer.Option(help="Column to learn (default: the preset's). Binary columns are tuned on AUROC.")
    ] = None,
    preset: Annotated[
        str, typer.Option(help=f"Preset to start from, one of: {', '.join(preset_names())}.")
    ] = "ptbxl-lvh",
    num_samples: Annotated[int, typer.Option(min=1, help="Configurations to try.")] = 8,
    max_epochs: Annotated[
        int | None, typer.Option(min=1, help="Epochs of the longest trial (default: the preset's).")
    ] = None,
    split_column: Annotated[
        str | None,
        typer.Option(help="Column holding an explicit split (e.g. strat_fold); default: hash of patient_id."),
    ] = None,
    val_values: Annotated[list[str] | None, typer.Option(help="Values of --split-column for validation.")] = None,
    task: Annotated[
        str | None, typer.Option(help="'regression' or 'binary' for --target (default: inferred from the column).")
    ] = None,
    num_workers: Annotated[int, typer.Option(min=1, help="Ray Train workers per trial.")] = 1,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs reserved per worker (fractions allowed).")] = 1.0,
    concurrent_trials: Annotated[
        int | None, typer.Option(min=1, help="Trials at once (default: as many as the cluster fits).")
    ] = None,
    grace_period: Annotated[int, typer.Option(min=1, help="ASHA's first rung: epochs every trial gets.")] = 2,
    time_budget_min: Annotated[
        float | None, typer.Option(min=0.1, help="Stop the search after this many minutes (finished trials count).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the search and of every trial's network.")] = 0,
    use_gpu: GpuOption = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier tuning in --run.")] = False,
    address: AddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Search learning rate, width, kernel, dropout and epochs with Ray Tune (ASHA) on the validation split."""
    from lvm_ray.ray_utils import ClusterError
    from lvm_ray.store import StoreError
    from lvm_ray.train import TrainError
    from lvm_ray.tune import TuneError
    from lvm_ray.tune import tune as run_tune

    _setup_logging(verbose)
    try:
        result = run_tune(
            data,
            run,
            target=target,
            preset=preset,
            num_samples=num_samples,
            max_epochs=max_epochs,
            split_column=split_column,
            val_values=tuple(val_values or ()),
            task=task,
            num_workers=num_workers,
            cpus_per_worker=cpus_per_worker,
            use_gpu=use_gpu,
            max_concurrent=concurrent_trials,
            grace_period=grace_period,
            time_budget_s=None if time_budget_min is None else 60 * time_budget_min,
            seed=seed,
            overwrite=overwrite,
            address=address,
            verbose=verbose,
        )
    except (TuneError, TrainError, ValueError, StoreError, ClusterError) as exc:
        _fail(_one_line(exc))
    typer.echo(result.summary())


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
