"""The `lvm-ray` command line: one command per stage.

Stage modules are imported inside each command so that `lvm-ray --help` stays instant and a
command that needs no Ray never starts one.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="lvm-ray",
    help="LVM-AI on Ray: predict cardiac-MRI LV mass and LVH from 12-lead ECGs, from laptop to cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

AddressOption = Annotated[
    str | None,
    typer.Option(help="Ray cluster to join ('auto', 'ray://host:10001'); default: start an embedded local Ray."),
]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _progress(label: str):
    def report(done: int, total: int) -> None:
        typer.echo(f"\r{label}: {done}/{total} ({done / max(total, 1):.0%})", nl=done >= total, err=True)

    return report


@app.command()
def synth(
    out: Annotated[str, typer.Option(help="Dataset URL or path to write (ECG shards, followup.parquet, truth.json).")],
    n: Annotated[int, typer.Option(min=1, help="Number of participants (one ECG each).")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same cohort.")] = 0,
    chunk_size: Annotated[int, typer.Option(min=16, help="ECGs per shard (memory is bounded by this).")] = 1000,
) -> None:
    """Generate a synthetic UK-Biobank-like cohort whose truth is known (heart-vector ECG model)."""
    from lvm_ray.summary import dataset_summary, format_dataset_summary
    from lvm_ray.synth import write_cohort

    info = write_cohort(n, seed, out, chunk_size=chunk_size, progress=_progress("synth"))
    typer.echo(format_dataset_summary(dataset_summary(out)))
    typer.echo(f"  generated in {info.get('seconds', float('nan')):.1f} s; truth: {out.rstrip('/')}/truth.json")


@app.command()
def ingest(
    sources: Annotated[list[str], typer.Argument(help="Files, folders, globs or a PTB-XL root; any fsspec URL.")],
    out: Annotated[str, typer.Option(help="Dataset URL or path to write.")],
    labels: Annotated[
        str | None, typer.Option(help="CSV/parquet of covariates and labels, keyed by ecg_id (or patient_id).")
    ] = None,
    strict: Annotated[bool, typer.Option(help="Exit non-zero if any record was quarantined.")] = False,
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
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
    )
    if address:
        from lvm_ray.ray_utils import connect

        connect(address)
    try:
        result = run_ingest(
            sources,
            out,
            labels=labels,
            options=options,
            overwrite=overwrite,
            use_ray=True if address else None,
            progress=_progress("ingest"),
        )
    except (FileNotFoundError, StoreError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(format_summary(result))
    typer.echo(f"  quarantine table: {out.rstrip('/')}/quarantine.parquet")
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
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its data and outputs.")] = Path("demo_output"),
    n: Annotated[int, typer.Option(min=100, help="Synthetic cohort size.")] = 2000,
    seed: Annotated[int, typer.Option()] = 7,
) -> None:
    """Run the whole study end to end on a generated cohort and the bundled real sample ECGs."""
    from lvm_ray.demo import run_demo

    _setup_logging(False)
    run_demo(workdir=workdir, n=n, seed=seed)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
