"""Stage benchmarks: each measures a stage against its baseline in the same run and writes JSON.

    python jobs/benchmark.py synth  --n 10000 --out bench_synth.json
    python jobs/benchmark.py ingest ../shared/data/ptbxl --out bench_ingest.json
    python jobs/benchmark.py rules  --data DATA --out bench_rules.json
    python jobs/benchmark.py train  --data DATA --out bench_train.json [--preset lvm-cpu] [--num-workers 2] [--use-gpu]
    python jobs/benchmark.py score  --data DATA --checkpoint RUN --out bench_score.json
    python jobs/benchmark.py serve  --checkpoint RUN --out bench_serve.json

Each reports its stage next to a baseline measured in the same run (a plain loop, the raw model
forward, a bare FastAPI app). Subcommands register in ``SUBCOMMANDS`` (name -> (add_arguments, run)).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

# --- train ------------------------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from lvm_ray.presets import DEFAULT_PRESET, preset_names

    parser.add_argument("--data", required=True, help="dataset URL")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=preset_names())
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="global batch; default: the preset's")
    parser.add_argument("--baseline-rows", type=int, default=4000, help="training rows the baseline holds in memory")
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument(
        "--cache-inputs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Ray run keeps preprocessed inputs in the object store (default: when they fit in a quarter of it)",
    )
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))


def _split_arrays(data: str, preset: Any, split: Any, which: str, max_rows: int | None = None) -> dict[str, np.ndarray]:
    """One split's labelled rows (up to ``max_rows``), preprocessed, as in-memory arrays."""
    from lvm_ray import store
    from lvm_ray.fitting import featurize
    from lvm_ray.splits import keep_mask

    parts: list[dict[str, np.ndarray]] = []
    have = 0
    for table in store.iter_shards(data):
        batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names if c != "ecg"}
        batch["ecg"] = store.ecg_array(table)
        keep = keep_mask(batch, split, preset.target.column, which)
        parts.append(featurize({k: v[keep] for k, v in batch.items()}, preset))
        have += int(keep.sum())
        if max_rows is not None and have >= max_rows:
            break
    return {k: np.concatenate([p[k] for p in parts])[:max_rows] for k in parts[0]}


def _batches(tensors: dict[str, Any], batch_size: int, shuffle: bool) -> Any:
    """Mini-batches of in-memory tensors (the baselines' data loader)."""
    import torch

    n = len(tensors["y"])
    order = torch.randperm(n) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        yield {k: v[order[i : i + batch_size]] for k, v in tensors.items()}


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """Ray Train (streamed shards, DDP) vs a bare single-process loop over in-memory tensors."""
    import torch

    from lvm_ray.fitting import make_optimizer, train_epoch
    from lvm_ray.model import build_model
    from lvm_ray.presets import get_preset
    from lvm_ray.train import train

    preset = get_preset(args.preset)
    batch_size = args.batch_size or preset.optim.batch_size
    threads = max(1, int(args.num_workers * args.cpus_per_worker))
    device = torch.device("cuda" if args.use_gpu and torch.cuda.is_available() else "cpu")

    # Baseline: same model, global batch size and total threads; data already in memory.
    from lvm_ray.splits import SplitSpec

    arrays = _split_arrays(args.data, preset, SplitSpec(), "train", max_rows=args.baseline_rows)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(preset).to(device)
    optimizer = make_optimizer(preset, model.parameters())
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    n = len(arrays["y"])

    baseline_epochs = []
    for _ in range(args.epochs):
        stats = train_epoch(model, _batches(tensors, batch_size, True), optimizer, preset, device)
        baseline_epochs.append(stats.n / stats.seconds)

    # Ray Train on the whole training split, streamed from the shards.
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = train(
            args.data,
            os.path.join(tmp, "run"),
            preset=args.preset,
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            max_epochs=args.epochs,
            address=args.address,
            batch_size=max(1, batch_size // args.num_workers),  # per worker: the baseline's global batch
            cpus_per_worker=args.cpus_per_worker,
            evaluate_test=False,
            cache_inputs=args.cache_inputs,
        )
        fit_s = time.perf_counter() - started
        with open(os.path.join(tmp, "run", "metrics.jsonl")) as f:
            history = [json.loads(line) for line in f]
    # End-to-end epoch rate (streaming reads, preprocessing, validation, checkpoint) and the
    # training-loop rate (batches arriving from Ray Data, summed over workers).
    end_to_end = [h["train_samples"] / h["epoch_s"] for h in history]
    loop = [h["train_samples_per_s"] * args.num_workers for h in history]
    best = lambda xs: float(max(xs))  # noqa: E731 - best epoch: the first one pays for start-up
    return {
        "stage": "train",
        "preset": preset.name,
        "device": device.type,
        "batch_size": batch_size,
        "threads": threads,
        "epochs": args.epochs,
        "baseline": {
            "what": "single process, in-memory tensors, same model/batch/threads",
            "train_rows": n,
            "samples_per_s": best(baseline_epochs),
            "per_epoch": baseline_epochs,
        },
        "ray_train": {
            "what": f"TorchTrainer, {args.num_workers} workers, Ray Data reading the shards"
            + {True: " (inputs cached)", False: " (streamed every epoch)", None: " (cached when they fit)"}[
                args.cache_inputs
            ],
            "train_rows": result.split_counts["train"],
            "samples_per_s_end_to_end": best(end_to_end),
            "samples_per_s_train_loop": best(loop),
            "per_epoch_end_to_end": end_to_end,
            "fit_wall_s": fit_s,
        },
        "ratio_end_to_end": best(end_to_end) / best(baseline_epochs),
        "ratio_train_loop": best(loop) / best(baseline_epochs),
    }


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


# --- rules ------------------------------------------------------------------------------------------


def add_rules_arguments(parser: argparse.ArgumentParser) -> None:
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


def run_rules(args: argparse.Namespace) -> dict[str, Any]:
    """measure_batch in one process (one core: BLAS limited to one thread) against the per-ECG
    reference on the same batches (interleaved, so both see the same machine load), then
    `lvm-ray rules` on Ray Data. Wall and CPU seconds are both reported: on a shared machine
    the CPU-time ratio is the steadier one."""
    from threadpoolctl import threadpool_limits

    from lvm_ray import store
    from lvm_ray.rules import AMPLITUDE_COLUMNS, RULE_FLAG_COLUMNS, measure_batch

    reference = _rules_reference() if args.reference_ecgs > 0 else None
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


# --- score ------------------------------------------------------------------------------------------


class _ClusterMemory:
    """Peak memory of every process of the local Ray cluster plus this driver, sampled.

    Summed as PSS (proportional set size): pages shared between processes (Ray's object store
    is shared memory mapped by every worker that reads a block) count once, split among them.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        import threading

        self.peak_bytes = 0
        self.peak_rss_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    @staticmethod
    def _ours(proc: Any, me: int) -> bool:
        cmd = " ".join(proc.info["cmdline"] or [])
        return proc.pid == me or "ray" in (proc.info["name"] or "") or "ray/" in cmd or "ray::" in cmd

    def _run(self, interval_s: float) -> None:
        import psutil

        me = os.getpid()
        while not self._stop.is_set():
            pss = rss = 0
            for proc in psutil.process_iter(["name", "cmdline"]):
                try:
                    if self._ours(proc, me):
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


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset URL (e.g. a 30,000-ECG `lvm-ray synth` cohort)")
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-actors", type=int, default=None)
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))


def run_score(args: argparse.Namespace) -> dict[str, Any]:
    """Cohort scoring (model + rules, Ray Data actor pool) against the raw model forward in-process."""
    import torch

    from lvm_ray import store
    from lvm_ray.predict import Predictor
    from lvm_ray.ray_utils import ensure_connected
    from lvm_ray.score import score

    predictor = Predictor.from_checkpoint(args.checkpoint)
    table = next(store.iter_shards(args.data, columns=["ecg"]))
    ecg = store.ecg_array(table)[: args.batch_size * 4]
    from lvm_ray.presets import prepare_input

    x = torch.from_numpy(prepare_input(ecg, predictor.preset))
    with torch.inference_mode():
        predictor.model(x[: args.batch_size])  # warm-up
        started = time.perf_counter()
        for i in range(0, len(x), args.batch_size):
            predictor.model(x[i : i + args.batch_size])
        forward_s = time.perf_counter() - started
    # The same predictions in one process: model forward + voltage rules (what each actor runs).
    started = time.perf_counter()
    for i in range(0, len(ecg), args.batch_size):
        predictor.predict(ecg[i : i + args.batch_size], {"sex": np.array(["F"] * len(ecg[i : i + args.batch_size]))})
    predict_s = time.perf_counter() - started
    ensure_connected(args.address)
    with tempfile.TemporaryDirectory() as tmp, _ClusterMemory() as memory:
        result = score(
            args.data,
            args.checkpoint,
            os.path.join(tmp, "preds"),
            batch_size=args.batch_size,
            num_actors=args.num_actors,
        )
    return {
        "n": result.n_total,
        "score_s": result.seconds,
        "score_ecgs_per_s": result.n_total / result.seconds,
        "raw_forward_ecgs_per_s": len(x) / forward_s,
        "ratio_score_to_raw_forward": (result.n_total / result.seconds) / (len(x) / forward_s),
        "in_process_predict_ecgs_per_s": len(x) / predict_s,
        "ratio_score_to_in_process_predict": (result.n_total / result.seconds) / (len(x) / predict_s),
        "peak_cluster_pss_gb": memory.peak_bytes / 1e9,
        "peak_cluster_rss_sum_gb": memory.peak_rss_bytes / 1e9,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "model": result.model_version,
    }


# --- serve ------------------------------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument(
        "--record", default="tests/fixtures/ptbxl/records500/00000/00001_hr", help="WFDB record to post"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level")


def _load(url: str, body: bytes, concurrency: int, n_requests: int) -> dict[str, float]:
    """Bounded closed-loop load: ``concurrency`` clients send ``n_requests`` in all; latency percentiles and rate."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def worker(count: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=120) as client:
            for _ in range(count):
                started = time.perf_counter()
                response = client.post(url, content=body, headers={"content-type": "application/json"})
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)
        return latencies

    shares = [n_requests // concurrency + (i < n_requests % concurrency) for i in range(concurrency)]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [x for part in pool.map(worker, shares) for x in part]
    wall = time.perf_counter() - started
    return {
        "p50_ms": float(np.percentile(latencies, 50) * 1000),
        "p99_ms": float(np.percentile(latencies, 99) * 1000),
        "rps": len(latencies) / wall,
    }


def _plain_fastapi(predictor: Any, port: int) -> Any:
    """The baseline: a bare FastAPI + uvicorn app calling the same predictor, no Ray, no batching.

    Built from ``lvm_ray.api`` (no Ray import): the same request model, conversion and guards
    (body limit, content type, error handling) as the Serve app, so only the serving differs.
    """
    import threading

    import uvicorn
    from fastapi import Depends

    from lvm_ray.api import (
        JSON_MEDIA_TYPES,
        PredictRequest,
        canonical_request,
        create_app,
        raw_from_request,
        require_media_type,
        response_from_row,
    )

    app = create_app()

    def predict(body: PredictRequest) -> dict[str, Any]:
        wave, metadata, warnings = canonical_request(raw_from_request(body))
        row = predictor.predict(wave[None], {k: np.array([v], dtype=object) for k, v in metadata.items()})
        return response_from_row(row.to_dict("records")[0], warnings)

    # This module uses postponed annotations; FastAPI needs the real request model to read the body.
    predict.__annotations__ = {"body": PredictRequest, "return": dict}
    app.post("/v1/predict", dependencies=[Depends(require_media_type(*JSON_MEDIA_TYPES))])(predict)

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server


def run_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Ray Serve app vs a plain FastAPI app vs the in-process call, at each concurrency, same run."""
    import socket

    import wfdb
    from ray import serve

    from lvm_ray.api import PredictRequest, canonical_request, raw_from_request
    from lvm_ray.predict import Predictor
    from lvm_ray.ray_utils import ensure_connected
    from lvm_ray.serve import build_app

    record = wfdb.rdrecord(args.record)
    payload = {
        "ecg": (record.p_signal.T * 1000).round(1).tolist(),
        "leads": record.sig_name,
        "sample_rate": record.fs,
        "sex": "M",
        "height_cm": 175,
        "weight_kg": 80,
    }
    body = json.dumps(payload).encode()
    predictor = Predictor.from_checkpoint(args.checkpoint)

    def in_process() -> None:
        wave, metadata, _ = canonical_request(raw_from_request(PredictRequest.model_validate_json(body)))
        predictor.predict(wave[None], {k: np.array([v], dtype=object) for k, v in metadata.items()})

    in_process()
    started = time.perf_counter()
    latencies = []
    for _ in range(args.requests):
        t0 = time.perf_counter()
        in_process()
        latencies.append(time.perf_counter() - t0)
    results: dict[str, Any] = {
        "in_process": {
            "p50_ms": float(np.percentile(latencies, 50) * 1000),
            "p99_ms": float(np.percentile(latencies, 99) * 1000),
            "rps": args.requests / (time.perf_counter() - started),
        }
    }

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port = free_port()
    server = _plain_fastapi(predictor, port)
    results["plain_fastapi"] = {
        str(c): _load(f"http://127.0.0.1:{port}/v1/predict", body, c, args.requests) for c in args.concurrency
    }
    server.should_exit = True
    ensure_connected()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"checkpoint": args.checkpoint}), name="bench", route_prefix="/")
    _load(f"http://127.0.0.1:{port}/v1/predict", body, 1, 4)  # warm-up
    results["ray_serve"] = {
        str(c): _load(f"http://127.0.0.1:{port}/v1/predict", body, c, args.requests) for c in args.concurrency
    }
    serve.shutdown()
    results["ratio_rps_serve_to_fastapi"] = {
        c: results["ray_serve"][c]["rps"] / results["plain_fastapi"][c]["rps"] for c in results["ray_serve"]
    }
    results["cpus"] = os.cpu_count()
    return results


# --- train-quality -----------------------------------------------------------------------------------


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset URL")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--preset", default="lvm-cpu", help="today's recipe (the baseline)")
    parser.add_argument("--target", default=None, help="column to learn (default: the preset's)")
    parser.add_argument("--split-column", default=None)
    parser.add_argument("--val-values", nargs="*", default=[])
    parser.add_argument("--epochs", type=int, default=12, help="epochs of today's recipe (and the plain loop)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--skip-plain", action="store_true", help="skip the single-process PyTorch loop")
    parser.add_argument(
        "--new-preset", default=None, help="a recipe to compare in the same run: a preset name or a preset file"
    )
    parser.add_argument("--ensemble", type=int, default=1, help="members of the new recipe (lvm-ray train --ensemble)")
    parser.add_argument("--new-epochs", type=int, default=None, help="epochs of the new recipe (default: its own)")
    parser.add_argument("--new-num-workers", type=int, default=None, help="workers per member (default: --num-workers)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))


def _val_scores(run: str, data: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ecg_id, label, model output) of RUN's model on RUN's validation split, through the Predictor."""
    from functools import partial

    from lvm_ray import store
    from lvm_ray.predict import Predictor
    from lvm_ray.splits import ids_in_split
    from lvm_ray.train import split_predictions

    ids = ids_in_split(store.read_parquet(os.path.join(run, "split.parquet")), "val")
    model = os.path.join(run, "model.pt")
    arrays = split_predictions(model, data, ids, loader=partial(Predictor.from_checkpoint, model, False))
    order = np.argsort(arrays["ecg_id"].astype(str))  # the same ECG order for both recipes
    return arrays["ecg_id"][order].astype(str), arrays["true"][order], arrays["pred"][order]


def run_quality(args: argparse.Namespace) -> dict[str, Any]:
    """Model quality on one validation split, in one run.

    Today's recipe (``--preset``, ``--epochs``) trained by Ray Train, against a plain single-process
    PyTorch loop with the same preset, split, optimiser (global batch and learning rate), schedule
    and epochs, each keeping its best epoch by the preset's selection metric; and, with
    ``--new-preset`` (``--ensemble K``), a new recipe trained by ``lvm-ray train`` on the same split,
    compared with today's on the same validation ECGs (AUROC or r, DeLong test for AUROCs).
    """
    import torch

    from lvm_ray.fitting import (
        epoch_metrics,
        make_optimizer,
        make_scheduler,
        selection_score,
        step_scheduler,
        train_epoch,
        validate_epoch,
    )
    from lvm_ray.model import build_model, read_payload
    from lvm_ray.presets import Preset, get_preset, load_preset_file
    from lvm_ray.splits import SplitSpec
    from lvm_ray.stats import auc_ci, delong_paired_test
    from lvm_ray.train import train

    split = SplitSpec(column=args.split_column, val_values=tuple(args.val_values), test_fraction=0.0)
    common = dict(
        target=args.target,
        num_workers=args.num_workers,
        address=args.address,
        split_column=args.split_column,
        val_values=tuple(args.val_values),
        test_fraction=0.0,
        evaluate_test=False,
        cache_inputs=True,
    )
    report: dict[str, Any] = {"epochs": args.epochs, "split": {"column": args.split_column, "val": args.val_values}}
    with tempfile.TemporaryDirectory() as tmp:
        today_run = os.path.join(tmp, "today")
        started = time.perf_counter()
        result = train(args.data, today_run, preset=args.preset, max_epochs=args.epochs, **common)
        ray_s = time.perf_counter() - started
        preset = Preset.from_dict(read_payload(os.path.join(today_run, "model.pt"))["preset"])
        ids, labels, today_scores = _val_scores(today_run, args.data)
        report.update(preset=preset.name, target=preset.target.column, task=preset.target.task)
        report["ray_train"] = {"best_epoch": result.best_epoch, **result.val_metrics, "wall_s": ray_s}

        if args.new_preset:
            new = (
                load_preset_file(args.new_preset)
                if args.new_preset.endswith((".json", ".yaml", ".yml"))
                else get_preset(args.new_preset)
            )
            new_run = os.path.join(tmp, "new")
            new_common = {**common, "num_workers": args.new_num_workers or args.num_workers}
            started = time.perf_counter()
            if args.ensemble > 1:
                from lvm_ray.ensemble import train_ensemble

                new_result = train_ensemble(
                    args.data, new_run, args.ensemble, preset=new, max_epochs=args.new_epochs, **new_common
                )
            else:
                new_result = train(args.data, new_run, preset=new, max_epochs=args.new_epochs, **new_common)
            new_s = time.perf_counter() - started
            new_ids, new_labels, new_scores = _val_scores(new_run, args.data)
            if not (np.array_equal(ids, new_ids) and np.array_equal(labels, new_labels, equal_nan=True)):
                raise RuntimeError("the two recipes were validated on different ECGs")
            trained = Preset.from_dict(read_payload(os.path.join(new_run, "model.pt"))["preset"])
            report["new_recipe"] = {
                "preset": trained.name,
                "ensemble": args.ensemble,
                "num_workers": new_common["num_workers"],
                "epochs": trained.optim.max_epochs,
                "best_epoch": new_result.best_epoch,
                **new_result.val_metrics,
                "members": getattr(new_result, "members", None),
                "wall_s": new_s,
            }
            if preset.target.task == "binary":
                report["ray_train"]["auroc_ci"] = auc_ci(labels, today_scores)["ci"]
                report["new_recipe"]["auroc_ci"] = auc_ci(labels, new_scores)["ci"]
                report["comparison"] = {
                    "what": "new recipe vs today's on the same validation ECGs (DeLong, paired)",
                    **delong_paired_test(labels, new_scores, today_scores),
                }

    if args.skip_plain:
        return report
    train_arrays = {k: torch.from_numpy(v) for k, v in _split_arrays(args.data, preset, split, "train").items()}
    val_arrays = {k: torch.from_numpy(v) for k, v in _split_arrays(args.data, preset, split, "val").items()}
    torch.manual_seed(0)
    torch.set_num_threads(args.num_workers)
    model = build_model(preset)
    # The checkpoint's batch is per worker: the plain loop takes the same global batch in one step.
    global_batch = preset.optim.batch_size * args.num_workers
    optimizer = make_optimizer(preset, model.parameters())
    scheduler = make_scheduler(preset, optimizer)
    n, device = len(train_arrays["y"]), torch.device("cpu")

    best: dict[str, Any] = {"val_loss": float("inf")}
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        train_epoch(model, _batches(train_arrays, global_batch, True), optimizer, preset, device)
        preds = validate_epoch(model, _batches(val_arrays, global_batch, False), preset, device)
        val_loss = preds.loss_sum / preds.n
        metrics = epoch_metrics(preset, **preds.arrays())
        step_scheduler(scheduler, val_loss)
        if selection_score(preset, val_loss, metrics) < selection_score(preset, best["val_loss"], best):
            best = {"val_loss": val_loss, "epoch": epoch, **metrics}
    plain_s = time.perf_counter() - started
    report.update(train_rows=n, val_rows=len(val_arrays["y"]))
    report["plain_pytorch"] = {**best, "global_batch": global_batch, "train_wall_s": plain_s}
    return report


# --- registry -----------------------------------------------------------------------------------------

SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], dict]]] = {
    "synth": (add_synth_arguments, run_synth),
    "ingest": (add_ingest_arguments, run_ingest),
    "rules": (add_rules_arguments, run_rules),
    "train": (add_train_arguments, run_train),
    "train-quality": (add_quality_arguments, run_quality),
    "score": (add_score_arguments, run_score),
    "serve": (add_serve_arguments, run_serve),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, (add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=f"benchmark the {name} stage"))
    args = parser.parse_args(argv)
    report = SUBCOMMANDS[args.stage][1](args)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
