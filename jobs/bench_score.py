"""Benchmark `score`: cohort scoring on Ray Data against the in-process predictor and raw forward.

Run through jobs/benchmark.py (`python jobs/benchmark.py score --help`)."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import numpy as np

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset URL (e.g. a 30,000-ECG `lvm-ray synth` cohort)")
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-actors", type=int, default=None)
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))


def run(args: argparse.Namespace) -> dict[str, Any]:
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
