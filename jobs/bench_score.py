"""Benchmark `score`: cohort scoring on Ray Data against one process of the same Predictor.

Run through jobs/benchmark.py (`python jobs/benchmark.py score --help`):

    python jobs/benchmark.py score --data /work/bench/cohort30k --small-data /work/bench/cohort3k \
        --checkpoint /work/bench/run --out bench_score.json
    python jobs/benchmark.py score --data DATA --preset lvm-ai-2021 --use-gpu --batch-size 1024 --out gpu.json

The baseline is measured first, in a subprocess (one torch thread, one BLAS thread through
threadpoolctl, the same batch size, on the first ECGs of --data), so the driver of the Ray phase
stays light and its memory sampling sees only the cluster. Each score run starts its own
embedded Ray (its time and memory count, nothing left from an earlier run does). Each mode ("computed": score measures
the voltage rules; "table": score joins a `lvm-ray rules` table, made first in the same run and
timed apart, the biobank scenario) scores --small-data and then --data.
parallel_efficiency = (Ray ECGs/s after startup) / (units x baseline ECGs/s), units = CPU cores,
or GPUs with --use-gpu.
Where the rest goes, measured in the same run: ``hardware_parallel_ceiling`` (``units`` baseline
processes at once, against ``units`` times one alone: what the cores lose to each other),
``read_ceiling`` (the shard read and decode an actor does beside the prediction, from
``read_ecgs_per_s``) and ``efficiency_vs_concurrent_baseline`` (the run against the baselines
measured at once: Ray's own share).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

# --- score ------------------------------------------------------------------------------------------


class _ClusterMemory:
    """Peak memory of this driver and every process it started (the embedded Ray), sampled.

    Summed as PSS (proportional set size): pages shared between processes (Ray's object store
    is shared memory mapped by every worker that reads a block) count once, split among them.
    With --address (a cluster started elsewhere) every process that looks like Ray is counted.
    """

    def __init__(self, interval_s: float = 0.5, tree_only: bool = True) -> None:
        import threading

        self.peak_bytes = 0
        self.peak_rss_bytes = 0
        self.tree_only = tree_only
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _processes(self) -> list[Any]:
        import psutil

        me = psutil.Process()
        if self.tree_only:  # not the Ray clusters of other programs on the same machine
            return [me, *me.children(recursive=True)]
        procs = [me]
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if proc.pid != me.pid and ("ray" in (proc.info["name"] or "") or "ray/" in cmd or "ray::" in cmd):
                procs.append(proc)
        return procs

    def _run(self, interval_s: float) -> None:
        import psutil

        while not self._stop.is_set():
            pss = rss = 0
            for proc in self._processes():
                try:
                    info = proc.memory_full_info()
                    pss += info.pss
                    rss += info.rss
                except (psutil.Error, TypeError):
                    continue
            self.peak_bytes = max(self.peak_bytes, pss)
            self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
            self._stop.wait(interval_s)

    def __enter__(self) -> _ClusterMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset URL (e.g. a 30,000-ECG `lvm-ray synth` cohort)")
    parser.add_argument("--small-data", default=None, help="a 10x smaller cohort, scored too (scale_ratio)")
    parser.add_argument("--checkpoint", default=None, help="run folder or checkpoint")
    parser.add_argument("--preset", default=None, help="no checkpoint: score a randomly initialised model of it")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-actors", type=int, default=None)
    parser.add_argument("--use-gpu", action="store_true", help="score on GPUs (bf16 autocast), baseline on one GPU")
    parser.add_argument("--modes", default="computed,table", help="computed (rules measured), table (--rules reused)")
    parser.add_argument("--rules-table", default=None, help="`lvm-ray rules` table of --data (else made here)")
    parser.add_argument("--small-rules-table", default=None, help="`lvm-ray rules` table of --small-data")
    parser.add_argument("--baseline-n", type=int, default=1024, help="ECGs of --data for the single-process baseline")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))


def _baseline(
    data: str, checkpoint: str, batch_size: int, n: int, use_gpu: bool, start_at: float | None = None
) -> dict[str, Any]:
    """Single-process rates (run in a subprocess: one torch and one BLAS thread on CPU).

    ``start_at`` (time.time()): wait until then before measuring, so that copies started
    together measure at the same time (the hardware's own parallel ceiling).
    """
    import pyarrow as pa
    import torch
    from threadpoolctl import threadpool_limits

    from lvm_ray import store
    from lvm_ray.predict import COVARIATE_INPUTS, Predictor
    from lvm_ray.presets import prepare_covariates, prepare_input

    if not use_gpu:
        torch.set_num_threads(1)
        threadpool_limits(1)
    predictor = Predictor.from_checkpoint(checkpoint, use_gpu=use_gpu)
    tables = []
    for table in store.iter_shards(data):
        tables.append(table)
        if sum(t.num_rows for t in tables) >= n:
            break
    table = pa.concat_tables(tables).slice(0, n)
    ecg = store.ecg_array(table)
    if start_at is not None:
        predictor.predict(
            ecg[:batch_size],
            {c: table.column(c).to_numpy(zero_copy_only=False)[:batch_size] for c in ("ecg_id", *COVARIATE_INPUTS)},
        )
        time.sleep(max(0.0, start_at - time.time()))
    meta = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("ecg_id", *COVARIATE_INPUTS)}
    batches = [
        (ecg[i : i + batch_size], {k: v[i : i + batch_size] for k, v in meta.items()}) for i in range(0, n, batch_size)
    ]

    def rate(fn: Any, items: list[Any]) -> float:
        fn(*items[0])  # warm-up (and CUDA kernels)
        if use_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for item in items:
            fn(*item)
        if use_gpu:
            torch.cuda.synchronize()
        return len(ecg) / (time.perf_counter() - started)

    device = predictor.device
    inputs = [  # the forward alone, on inputs already prepared and on the device (the model's limit)
        (
            torch.from_numpy(prepare_input(e, predictor.preset)).to(device),
            torch.from_numpy(prepare_covariates(m, len(e), predictor.preset)).to(device),
        )
        for e, m in batches
    ]

    if start_at is not None:  # predict only: the hardware's parallel ceiling
        return {
            "predict_ecgs_per_s": {
                "computed": rate(predictor.predict, batches),
                "table": rate(lambda e, m: predictor.predict(e, m, rules=False), batches),
            }
        }
    shards = store.read_manifest(data)["shards"]
    read_started, read_rows = time.perf_counter(), 0
    for shard in shards:  # what a scoring actor does before it predicts
        for rows in store.iter_row_groups(data, shard["path"]):
            store.ecg_array(rows)
            read_rows += rows.num_rows
        if read_rows >= n:
            break
    read_ecgs_per_s = read_rows / (time.perf_counter() - read_started)

    @torch.inference_mode()
    def forward(x: Any, cov: Any) -> None:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            predictor.model(x, cov if cov.shape[1] else None)

    return {
        "n": int(len(ecg)),
        "batch_size": batch_size,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "predict_ecgs_per_s": {
            "computed": rate(predictor.predict, batches),
            "table": rate(lambda e, m: predictor.predict(e, m, rules=False), batches),
        },
        "raw_forward_ecgs_per_s": rate(forward, inputs),
        # Reading and decoding shards (one thread, a row group at a time), as a scoring actor does.
        "read_ecgs_per_s": read_ecgs_per_s,
        "model_version": predictor.version,
    }


def _run_baseline(args: argparse.Namespace, checkpoint: str, copies: int = 1) -> list[dict[str, Any]]:
    """The baseline in one subprocess, or (copies > 1) its predict rates in that many at once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    if args.use_gpu:
        env = dict(os.environ)
    start_at = time.time() + 15.0 if copies > 1 else None  # after every copy has loaded
    spec = json.dumps([args.data, checkpoint, args.batch_size, args.baseline_n, args.use_gpu, start_at])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--baseline", spec],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(copies)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"baseline failed: {stderr.strip().splitlines()[-1:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Baseline (subprocess), then per mode: the small cohort, then the large one, on one Ray."""
    from lvm_ray.measure import measure_rules
    from lvm_ray.ray_utils import ensure_connected
    from lvm_ray.score import score

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.checkpoint and not args.preset:
        raise SystemExit("give --checkpoint or --preset")
    units = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench_score_") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:  # speed only: the published architecture, untrained
            from lvm_ray.model import build_model, save_checkpoint
            from lvm_ray.presets import get_preset

            checkpoint = os.path.join(tmp, "model.pt")
            save_checkpoint(checkpoint, build_model(args.preset).eval(), get_preset(args.preset), epoch=0)
        report: dict[str, Any] = {"load_before": _load()}
        started = time.perf_counter()
        (baseline,) = _run_baseline(args, checkpoint)
        report["baseline"] = {**baseline, "seconds": time.perf_counter() - started}
        if not args.use_gpu and units > 1:  # `units` copies at once: what the hardware itself loses
            copies = _run_baseline(args, checkpoint, copies=units)
            report["concurrent_baseline"] = {
                "processes": units,
                "predict_ecgs_per_s": {
                    m: sum(c["predict_ecgs_per_s"][m] for c in copies) for m in ("computed", "table")
                },
            }
        ensure_connected(args.address)
        if args.use_gpu:
            import ray

            units = int(ray.cluster_resources().get("GPU", 0)) or 1
        report.update({"units": units, "unit": "GPU" if args.use_gpu else "CPU core", "batch_size": args.batch_size})
        datasets = {"small": args.small_data, "large": args.data}
        tables = {"small": args.small_rules_table, "large": args.rules_table}
        if "table" in modes:
            for size, data in datasets.items():
                if data and not tables[size]:  # the `lvm-ray rules` stage, timed apart
                    tables[size] = os.path.join(tmp, f"rules_{size}")
                    t0 = time.perf_counter()
                    measure_rules(data, tables[size])
                    report[f"rules_table_{size}_s"] = time.perf_counter() - t0
        for mode in modes:
            runs: dict[str, Any] = {}
            for size, data in datasets.items():
                if not data:
                    continue
                if not args.address:  # each run on a fresh embedded Ray, as `lvm-ray score` gets it:
                    import ray  # no idle workers or actors of an earlier stage in its memory or its time

                    ray.shutdown()
                load = _load()
                with _ClusterMemory(tree_only=not args.address) as memory:
                    result = score(
                        data,
                        checkpoint,
                        os.path.join(tmp, f"preds_{mode}_{size}"),
                        batch_size=args.batch_size,
                        num_actors=args.num_actors,
                        use_gpu=True if args.use_gpu else False,
                        rules=True if mode == "computed" else tables[size],
                    )
                steady_s = result.seconds - (result.startup_s or 0.0)
                runs[size] = {
                    "n": result.n_total,
                    "score_s": result.seconds,
                    "startup_s": result.startup_s,
                    "first_part_s": result.first_part_s,
                    "score_ecgs_per_s": result.n_total / result.seconds,
                    "steady_ecgs_per_s": result.n_total / steady_s,
                    "peak_cluster_pss_gb": memory.peak_bytes / 1e9,
                    "peak_cluster_rss_sum_gb": memory.peak_rss_bytes / 1e9,
                    "load_before": load,
                    "load_after": _load(),
                }
            base = baseline["predict_ecgs_per_s"][mode]
            large = runs.get("large", {})
            entry: dict[str, Any] = {
                **large,
                "baseline_predict_ecgs_per_s": base,
                # Ray ECGs/s after startup (reported apart) over what `units` baseline processes do.
                "parallel_efficiency": large["steady_ecgs_per_s"] / (units * base),
                "parallel_efficiency_end_to_end": large["score_ecgs_per_s"] / (units * base),
                "ratio_score_to_raw_forward": large["score_ecgs_per_s"] / (units * baseline["raw_forward_ecgs_per_s"]),
                # Where the rest goes. The read: a pipeline that reads and predicts on each core,
                # with nothing else, reaches read / (read + predict) of the predict-only rate.
                "read_ceiling": baseline["read_ecgs_per_s"] / (baseline["read_ecgs_per_s"] + base),
            }
            if "concurrent_baseline" in report:
                together = report["concurrent_baseline"]["predict_ecgs_per_s"][mode]
                # The hardware: `units` baseline processes at once against `units` times one alone.
                entry["hardware_parallel_ceiling"] = together / (units * base)
                # Ray's own share: the run against `units` baseline processes measured at once.
                entry["efficiency_vs_concurrent_baseline"] = large["steady_ecgs_per_s"] / together
            if "small" in runs:
                small = runs["small"]
                entry["small"] = small
                entry["scale_ratio"] = large["score_s"] / small["score_s"]
                entry["scale_ratio_after_startup"] = (large["score_s"] - (large["startup_s"] or 0)) / (
                    small["score_s"] - (small["startup_s"] or 0)
                )
                entry["scale_n_ratio"] = large["n"] / small["n"]
            report[mode] = entry
    first = report[modes[0]]
    # The headline keys (the first mode: rules computed by score unless --modes says otherwise).
    report.update(
        {
            "mode": modes[0],
            "n": first["n"],
            "parallel_efficiency": first["parallel_efficiency"],
            "hardware_parallel_ceiling": first.get("hardware_parallel_ceiling"),
            "read_ceiling": first["read_ceiling"],
            "peak_cluster_pss_gb": max(report[m]["peak_cluster_pss_gb"] for m in modes),
            "scale_ratio": first.get("scale_ratio"),
            "startup_s": first["startup_s"],
            "raw_forward_ecgs_per_s": baseline["raw_forward_ecgs_per_s"],
            "model": baseline["model_version"],
            "load_after": _load(),
        }
    )
    return report


if __name__ == "__main__" and sys.argv[1:2] == ["--baseline"]:
    print(json.dumps(_baseline(*json.loads(sys.argv[2]))))
