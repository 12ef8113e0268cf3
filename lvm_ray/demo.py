"""`lvm-ray demo`: the study end to end on a generated cohort and the bundled real sample ECGs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from lvm_ray.ingest import format_summary, ingest
from lvm_ray.ray_utils import ensure_connected
from lvm_ray.summary import dataset_summary, format_dataset_summary

#: Real sample exports committed with the repository (PTB-XL records and vendor format samples).
BUNDLED_SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def _step(title: str) -> float:
    typer.secho(f"\n== {title}", bold=True)
    return time.time()


def run_demo(
    workdir: Path,
    n: int = 2000,
    seed: int = 7,
    samples: Path = BUNDLED_SAMPLES,
    n_outpatient: int | None = None,
    max_epochs: int = 12,
) -> dict[str, str]:
    """Run the whole study on a local embedded Ray; return the outputs' locations.

    A CMR cohort of ``n`` (training, validation and test by patient) trains the CPU preset; an
    independent outpatient cohort (another seed) is scored, evaluated against its CMR labels and
    the voltage rules, and followed up for incident AF, MI, HF, VA and death.
    """
    from lvm_ray.evaluate import evaluate
    from lvm_ray.explain import example_ids
    from lvm_ray.explain_stage import explain_dataset
    from lvm_ray.explain_stage import format_summary as format_explain
    from lvm_ray.outcomes import format_hr, outcomes
    from lvm_ray.report import render_report
    from lvm_ray.score import format_summary as format_score
    from lvm_ray.score import read_predictions, score
    from lvm_ray.synth import write_cohort
    from lvm_ray.train import train

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, str] = {}
    started = time.time()
    ensure_connected()

    t0 = _step(f"1. synthetic CMR cohort: {n} participants, seed {seed}")
    cohort = str(workdir / "cmr_cohort")
    write_cohort(n, seed, cohort, overwrite=True)  # the demo owns its workdir
    typer.echo(format_dataset_summary(dataset_summary(cohort)))
    typer.echo(f"   ({time.time() - t0:.1f} s)")
    outputs["cmr_cohort"] = cohort

    if samples.exists():
        _step(f"2. ingest the bundled real sample ECGs ({samples})")
        real = str(workdir / "real_samples")
        sources = [str(p) for p in (samples / "ptbxl", samples / "formats") if p.exists()]
        result = ingest(sources, real, overwrite=True, use_ray=True)
        typer.echo(format_summary(result))
        by_format = dataset_summary(real)["by_format"]  # the rest of the summary repeats the lines above
        typer.echo("  formats      : " + ", ".join(f"{k}: {v}" for k, v in by_format.items()))
        outputs["real_samples"] = real
        outputs["real_samples_quarantine"] = f"{real}/quarantine.parquet"
    else:
        typer.echo(f"(no bundled samples at {samples}; skipping the real-data step)")

    t0 = _step(f"3. train the lvm-cpu preset on the CMR cohort (2 Ray Train workers, <= {max_epochs} epochs)")
    run = str(workdir / "run")
    result = train(cohort, run, preset="lvm-cpu", num_workers=2, max_epochs=max_epochs, cpus_per_worker=1.0)
    typer.echo(f"   best epoch {result.best_epoch} of {result.epochs_run}; validation {_fmt(result.val_metrics)}")
    if result.test_metrics:
        typer.echo(f"   held-out test split: {_fmt(result.test_metrics)}")
    typer.echo(f"   ({time.time() - t0:.0f} s)")
    outputs["run"] = run
    outputs["checkpoint"] = result.model_path
    outputs["model_card"] = f"{run}/model_card.md"  # written by train from the checkpoint and run record

    n_out = n_outpatient or n
    t0 = _step(f"4. outpatient cohort ({n_out}, seed {seed + 1}): score with a Ray Data actor pool")
    outpatients = str(workdir / "outpatient_cohort")
    write_cohort(n_out, seed + 1, outpatients, overwrite=True)
    predictions = str(workdir / "predictions")
    typer.echo(format_score(score(outpatients, result.model_path, predictions, overwrite=True)))
    outputs["outpatient_cohort"] = outpatients
    outputs["predictions"] = predictions
    outputs["followup"] = f"{outpatients}/followup.parquet"
    outputs["truth"] = f"{outpatients}/truth.json"

    _step("5. evaluate against CMR LV mass and the voltage rules")
    eval_dir = str(workdir / "evaluation")
    metrics = evaluate(predictions, eval_dir)
    typer.echo(
        f"   Pearson r {metrics['pearson_r']:.3f} (95% CI {metrics['pearson_r_ci'][0]:.3f}-"
        f"{metrics['pearson_r_ci'][1]:.3f}), MAE {metrics['mae_g']:.1f} g, n {metrics['n']}"
    )
    for name, c in metrics["c_statistics"].items():
        if c.get("auc") is not None:
            ci = c.get("ci")
            shown = f"({ci[0]:.3f}-{ci[1]:.3f})" if ci and None not in ci else "(no CI)"
            typer.echo(f"   c-statistic {name:<14s}{c['auc']:.3f} {shown}")
    outputs["evaluation"] = eval_dir

    _step("6. outcomes: Cox models adjusted for age and sex")
    outcomes_dir = str(workdir / "outcomes")
    results = outcomes(predictions, outputs["followup"], outcomes_dir)
    for name, r in results.items():
        if r.get("hr") is not None:
            typer.echo(
                f"   {name:<6s} events {r['events']:>4d}  HR for predicted LVH {format_hr(r['hr'], r['ci'])}; "
                f"per SD of predicted LV mass {format_hr(r['hr_per_sd'], r['ci_per_sd'])}"
            )
    outputs["outcomes"] = outcomes_dir

    _step("7. explain the highest, median and lowest predicted LVMI (integrated gradients)")
    explanations = str(workdir / "explanations")
    examples = example_ids(read_predictions(predictions, columns=["ecg_id", "lvmi_pred", "lv_mass_pred_g"]))
    explained = explain_dataset(
        outpatients, result.model_path, explanations, ids=examples, figures=True, overwrite=True
    )
    typer.echo(format_explain(explained))
    outputs["explanations"] = explanations

    _step("8. report")
    outputs["report"] = render_report(
        eval_dir, outcomes_dir, str(workdir / "report.html"), explanations=explanations, run=run
    )

    (workdir / "outputs.json").write_text(json.dumps(outputs, indent=2))
    typer.secho(f"\nDemo finished in {time.time() - started:.0f} s. Outputs:", bold=True)
    for name, location in outputs.items():
        typer.echo(f"  {name:<26s}{location}")
    typer.echo(f"  {'index of outputs':<26s}{workdir / 'outputs.json'}")
    typer.secho(f"\nOpen the report: {outputs['report']}", bold=True)
    return outputs


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
