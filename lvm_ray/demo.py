"""`lvm-ray demo`: the study end to end on a generated cohort and the bundled real sample ECGs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from lvm_ray.ingest import format_summary, ingest
from lvm_ray.ray_utils import connect
from lvm_ray.summary import dataset_summary, format_dataset_summary

#: Real sample exports committed with the repository (PTB-XL records and vendor format samples).
BUNDLED_SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def _step(title: str) -> float:
    typer.secho(f"\n== {title}", bold=True)
    return time.time()


def run_demo(workdir: Path, n: int = 2000, seed: int = 7, samples: Path = BUNDLED_SAMPLES) -> dict[str, str]:
    """Run every stage the project has on a local embedded Ray; return the outputs' locations."""
    from lvm_ray.synth import write_cohort

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, str] = {}
    started = time.time()
    connect()

    t0 = _step(f"1. synthetic cohort: {n} participants, seed {seed}")
    cohort = str(workdir / "cohort")
    write_cohort(n, seed, cohort)
    typer.echo(format_dataset_summary(dataset_summary(cohort)))
    typer.echo(f"   ({time.time() - t0:.1f} s)")
    outputs["cohort"] = cohort
    outputs["followup"] = f"{cohort}/followup.parquet"
    outputs["truth"] = f"{cohort}/truth.json"

    if samples.exists():
        _step(f"2. ingest the bundled real sample ECGs ({samples})")
        real = str(workdir / "real_samples")
        sources = [str(p) for p in (samples / "ptbxl", samples / "formats") if p.exists()]
        result = ingest(sources, real, overwrite=True, use_ray=True)
        typer.echo(format_summary(result))
        typer.echo(format_dataset_summary(dataset_summary(real)))
        outputs["real_samples"] = real
        outputs["real_samples_quarantine"] = f"{real}/quarantine.parquet"
    else:
        typer.echo(f"(no bundled samples at {samples}; skipping the real-data step)")

    (workdir / "outputs.json").write_text(json.dumps(outputs, indent=2))
    typer.secho(f"\nDemo finished in {time.time() - started:.0f} s. Outputs:", bold=True)
    for name, location in outputs.items():
        typer.echo(f"  {name:<26s}{location}")
    typer.echo(f"  {'index of outputs':<26s}{workdir / 'outputs.json'}")
    return outputs
