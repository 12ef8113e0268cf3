"""Ray job entrypoint: evaluate, outcomes and the report in one job (no Ray needed, but it runs
where the predictions are: submit it to the same cluster).

    ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/analyze.py \
        --predictions s3://bucket/preds --followup s3://bucket/followup.parquet --out s3://bucket/analysis
"""

from typing import Annotated

import typer

from lvm_ray.store import join_url

cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@cli.command()
def main(
    predictions: Annotated[str, typer.Option(help="Predictions folder written by `lvm-ray score`.")],
    out: Annotated[str, typer.Option(help="Folder for evaluation/, outcomes/ and report.html.")],
    followup: Annotated[str | None, typer.Option(help="Follow-up table; without it, no outcome analysis.")] = None,
) -> None:
    """Evaluate predictions against CMR labels and the voltage rules, run the outcome models, render the report."""
    from lvm_ray.evaluate import evaluate
    from lvm_ray.outcomes import outcomes
    from lvm_ray.report import render_report

    eval_dir = join_url(out, "evaluation")
    metrics = evaluate(predictions, eval_dir)
    typer.echo(f"evaluation -> {eval_dir} (n = {metrics['n']}, r = {metrics['pearson_r']:.3f})")
    outcomes_dir = None
    if followup:
        outcomes_dir = join_url(out, "outcomes")
        outcomes(predictions, followup, outcomes_dir)
        typer.echo(f"outcomes -> {outcomes_dir}")
    typer.echo(f"report -> {render_report(eval_dir, outcomes_dir, join_url(out, 'report.html'))}")


if __name__ == "__main__":
    cli(prog_name="jobs/analyze.py")
