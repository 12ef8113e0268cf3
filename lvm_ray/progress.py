"""Console progress for long steps: one line per training epoch, progress bars with ECGs/s and ETA.

Ray's own output stays in its log files (``lvm_ray.ray_utils.ensure_connected``); what a user
sees comes from the driver, through these helpers, once.
"""

from __future__ import annotations

import json
import threading
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
