"""Benchmark `rules`: batched measurement in one process, the per-ECG reference, and Ray Data.

Run through jobs/benchmark.py (`python jobs/benchmark.py rules --help`)."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import numpy as np

# --- rules ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset URL")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--batch-size", type=int, default=64, help="ECGs per measure_batch call (as `lvm-ray rules`)")
    parser.add_argument(
        "--reference-ecgs",
        type=int,
        default=2000,
        help="ECGs also measured by the per-ECG reference (jobs/rules_reference.py), batch by batch; 0: none",
    )
    parser.add_argument("--skip-ray", action="store_true", help="only the one-process measurements")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))


def _rules_reference() -> Any:
    """jobs/rules_reference.py (the per-ECG measurement before batching), imported by path."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rules_reference.py")
    spec = importlib.util.spec_from_file_location("rules_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> dict[str, Any]:
    """measure_batch in one process (one core: BLAS limited to one thread) against the per-ECG
    reference on the same batches (interleaved, so both see the same machine load), then
    `lvm-ray rules` on Ray Data. Wall and CPU seconds are both reported: on a shared machine
    the CPU-time ratio is the steadier one."""
    from threadpoolctl import threadpool_limits

    from lvm_ray import store
    from lvm_ray.rules import AMPLITUDE_COLUMNS, RULE_FLAG_COLUMNS, measure_batch

    reference = _rules_reference() if args.reference_ecgs > 0 else None
    load_start = os.getloadavg()[0]
    n = n_ref = 0
    new_s = new_cpu = new_ref_s = new_ref_cpu = ref_s = ref_cpu = 0.0
    worst_median_diff = 0.0
    flags_identical = True
    with threadpool_limits(limits=1):
        for table in store.iter_shards(args.data, columns=["ecg", "sex"]):
            ecg_all = store.ecg_array(table)
            sex_all = table.column("sex").to_pylist()
            for i in range(0, len(ecg_all), args.batch_size):
                ecg, sex = ecg_all[i : i + args.batch_size], sex_all[i : i + args.batch_size]
                wall, cpu = time.perf_counter(), time.process_time()
                new = measure_batch(ecg, sex)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                n += len(ecg)
                new_s += wall
                new_cpu += cpu
                if reference is None or n_ref >= args.reference_ecgs:
                    continue
                started, started_cpu = time.perf_counter(), time.process_time()
                old = reference.measure_batch(ecg, sex)
                ref_s += time.perf_counter() - started
                ref_cpu += time.process_time() - started_cpu
                n_ref += len(ecg)
                new_ref_s += wall
                new_ref_cpu += cpu
                diffs = (new[list(AMPLITUDE_COLUMNS)] - old[list(AMPLITUDE_COLUMNS)]).abs().median()
                worst_median_diff = max(worst_median_diff, float(np.nan_to_num(diffs.max())))
                flags_identical &= all(new[c].equals(old[c]) for c in RULE_FLAG_COLUMNS)
                flags_identical &= new["rules_error"].equals(old["rules_error"])
    report: dict[str, Any] = {
        "n": n,
        "batch_size": args.batch_size,
        "baseline_one_process_s": new_s,
        "ecgs_per_s_per_core": n / new_s,
        "ecgs_per_cpu_s": n / new_cpu,
        # The machine's 1-minute load average around the one-process runs: wall-clock rates
        # are only comparable between runs at similar load (CPU-time rates are steadier).
        "load_average_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    if n_ref:
        report["reference"] = {
            "implementation": "jobs/rules_reference.py (per-ECG median beats, neurokit2 detector)",
            "n": n_ref,
            "ecgs_per_s_per_core": n_ref / ref_s,
            "ecgs_per_cpu_s": n_ref / ref_cpu,
            "new_ecgs_per_s_per_core_same_ecgs": n_ref / new_ref_s,
            "speedup_wall": ref_s / new_ref_s,
            "speedup_cpu": ref_cpu / new_ref_cpu,
            "max_per_batch_median_abs_diff_uv": worst_median_diff,
            "flags_and_reasons_identical": bool(flags_identical),
        }
    if not args.skip_ray:
        from lvm_ray.measure import measure_rules
        from lvm_ray.ray_utils import ensure_connected

        ensure_connected(args.address)
        with tempfile.TemporaryDirectory() as tmp:
            result = measure_rules(args.data, os.path.join(tmp, "rules"), batch_size=args.batch_size)
        report.update({"ray_data_s": result.seconds, "ray_data_ecgs_per_s": n / result.seconds})
    report["cpus"] = os.cpu_count()
    return report
