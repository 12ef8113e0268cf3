"""Stage benchmarks: each measures a stage against its baseline in the same run and writes JSON.

    python jobs/benchmark.py synth  --n 10000 --out bench_synth.json
    python jobs/benchmark.py ingest ../shared/data/ptbxl --out bench_ingest.json
    python jobs/benchmark.py rules  --data DATA --out bench_rules.json
    python jobs/benchmark.py train  --data DATA --out bench_train.json [--preset lvm-cpu] [--num-workers 2] [--use-gpu]
    python jobs/benchmark.py score  --data DATA --checkpoint RUN --out bench_score.json
    python jobs/benchmark.py serve  --checkpoint RUN --out bench_serve.json

Each reports its stage next to a baseline measured in the same run (a plain loop, the raw model
forward, a bare FastAPI app). synth and ingest are measured here, the others in
jobs/bench_<stage>.py (``STAGE_MODULES``), each with ``add_arguments`` and ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

# --- synth ------------------------------------------------------------------------------------------


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--seed", type=int, default=1)


def run_synth(args: argparse.Namespace) -> dict[str, Any]:
    """`lvm-ray synth` wall time, against generating the same ECGs without writing them."""
    from lvm_ray.synth import generate_batch, write_cohort

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        write_cohort(args.n, args.seed, os.path.join(tmp, "cohort"))
        total_s = time.perf_counter() - started
    sample = min(args.n, 1000)
    started = time.perf_counter()
    generate_batch(sample, args.seed)
    generate_s = (time.perf_counter() - started) * args.n / sample
    return {
        "n": args.n,
        "synth_s": total_s,
        "ecgs_per_s": args.n / total_s,
        "baseline_generate_only_s": generate_s,
        "ratio_to_generate_only": total_s / generate_s,
    }


# --- ingest -----------------------------------------------------------------------------------------


def add_ingest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", help="files / folders / PTB-XL root to ingest")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--ptbxl-rate", default="auto", choices=["500", "100", "auto"])
    parser.add_argument("--ptbxl-records", default=None, help="folder holding PTB-XL's records100/records500")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))


def run_ingest(args: argparse.Namespace) -> dict[str, Any]:
    """Ray Data ingest against the same ingest run in-process (read, canonicalise, write), same files."""
    from lvm_ray.ingest import IngestOptions, ingest
    from lvm_ray.ray_utils import ensure_connected

    options = IngestOptions(ptbxl_rate=args.ptbxl_rate, ptbxl_records=args.ptbxl_records)
    ensure_connected(args.address)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        baseline = ingest(args.sources, os.path.join(tmp, "plain"), options=options, use_ray=False)
        baseline_s = time.perf_counter() - started
        started = time.perf_counter()
        result = ingest(args.sources, os.path.join(tmp, "ray"), options=options, use_ray=True)
        ray_s = time.perf_counter() - started
    assert (result.n_stored, result.n_quarantined) == (baseline.n_stored, baseline.n_quarantined)
    n = result.n_sources
    return {
        "n_sources": n,
        "stored": result.n_stored,
        "quarantined": result.quarantine_by_reason,
        "ray_data_s": ray_s,
        "ray_data_ecgs_per_s": n / ray_s,
        "baseline_in_process_s": baseline_s,
        "baseline_ecgs_per_s": n / baseline_s,
        "speedup_vs_in_process": baseline_s / ray_s,
        "cpus": os.cpu_count(),
    }


# --- registry -----------------------------------------------------------------------------------------

#: Stage name -> module (jobs/bench_<stage>.py: add_arguments and run), imported when chosen.
STAGE_MODULES = {
    "rules": "bench_rules",
    "train": "bench_train",
    "train-quality": "bench_quality",
    "score": "bench_score",
    "serve": "bench_serve",
}
#: Stages measured in this file.
SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], dict]]] = {
    "synth": (add_synth_arguments, run_synth),
    "ingest": (add_ingest_arguments, run_ingest),
}


def stage(name: str) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], dict]]:
    """(add_arguments, run) of one stage's benchmark."""
    if name in SUBCOMMANDS:
        return SUBCOMMANDS[name]
    module = importlib.import_module(STAGE_MODULES[name])  # jobs/ is on sys.path: this script's folder
    return module.add_arguments, module.run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    for name in [*SUBCOMMANDS, *STAGE_MODULES]:
        stage(name)[0](sub.add_parser(name, help=f"benchmark the {name} stage"))
    args = parser.parse_args(argv)
    report = stage(args.stage)[1](args)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
