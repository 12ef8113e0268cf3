"""Console progress for long steps: one line per training epoch, progress bars with ECGs/s and ETA.

Ray's own output stays in its log files (``lvm_ray.ray_utils.ensure_connected``); what a user
sees comes from the driver, through these helpers, once.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from lvm_ray import store


class EpochPrinter:
    """Print one line per epoch, once, from RUN/metrics.jsonl (the workers' output stays in Ray's logs)."""

    def __init__(self, url: str, max_epochs: int, task: str, run: str = "") -> None:
        self.url, self.max_epochs, self.task = url, max_epochs, task
        self.shown = len(self._records())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        if self.shown:
            print(f"[lvm-ray train] resuming {run} after epoch {self.shown}", flush=True)

    def _records(self) -> list[dict[str, Any]]:
        try:
            return [json.loads(line) for line in store.read_bytes(self.url).decode().splitlines() if line.strip()]
        except (FileNotFoundError, ValueError):
            return []

    def _emit(self) -> None:
        for r in self._records()[self.shown :]:
            label = "r" if self.task == "regression" else "auroc"
            shown = r.get("val_pearson_r", r.get("val_auroc", float("nan")))
            print(
                f"[lvm-ray train] epoch {r['epoch']}/{self.max_epochs} train_loss={r['train_loss']:.4f} "
                f"val_loss={r['val_loss']:.4f} val_{label}={shown:.3f} lr={r['lr']:.2g} "
                f"{'*' if r.get('improved') else ' '} {r['epoch_s']:.1f}s "
                f"({r['train_samples'] / max(r['epoch_s'], 1e-9):.0f} ECGs/s)",
                flush=True,
            )
            self.shown = max(self.shown, int(r["epoch"]))

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self._emit()

    def __enter__(self) -> EpochPrinter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._emit()


class Progress:
    """A progress bar on stderr (ECGs/s and ETA): tqdm on a terminal, a few plain lines otherwise.

    Non-terminal output (CI logs, files) gets one line per ~10% instead of carriage returns.
    """

    def __init__(self, total: int, label: str, unit: str = "ECG", initial: int = 0) -> None:
        self.total, self.label, self.unit, self.done = max(int(total), 0), label, unit, int(initial)
        self._bar = None
        self._next_line = 0.1
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                initial=self.done,
                desc=label,
                unit=unit,
                unit_scale=False,
                mininterval=0.5,
                dynamic_ncols=True,
                file=sys.stderr,
                leave=True,
            )
        self._started = _now()
        self._start_done = self.done

    def update(self, n: int) -> None:
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(int(n))
            return
        share = self.done / self.total if self.total else 1.0
        if share >= self._next_line or self.done >= self.total:
            elapsed = _now() - self._started
            rate = (self.done - self._start_done) / elapsed if elapsed > 0.5 else float("nan")
            pace = f", {_pace(rate, self.unit)}, ETA {(self.total - self.done) / rate:.0f} s" if rate > 0 else ""
            print(
                f"{self.label}: {self.done}/{self.total} {self.unit}s ({share:.0%}{pace})", file=sys.stderr, flush=True
            )
            while self._next_line <= share:
                self._next_line += 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pace(rate: float, unit: str) -> str:
    """"296 ECGs/s", "2.5 ECGs/s", or for slow steps (explanations: seconds each) "3.9 s/ECG"."""
    if rate >= 10:
        return f"{rate:.0f} {unit}s/s"
    if rate >= 1:
        return f"{rate:.1f} {unit}s/s"
    return f"{1 / rate:.1f} s/{unit}"


def _now() -> float:
    return time.monotonic()
