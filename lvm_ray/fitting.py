"""Pure training helpers (no Ray): model inputs, one epoch of training or validation, metrics.

Ray Train's worker loop (``lvm_ray.train``) and the single-process baselines in
``jobs/benchmark.py`` call the same functions, so the two can only differ in the plumbing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lvm_ray.model import total_loss
from lvm_ray.presets import (
    SELECTION_METRICS,
    AugmentSpec,
    Preset,
    lvh_labels,
    model_to_target,
    prepare_covariates,
    prepare_input,
    target_to_model,
)
from lvm_ray.schema import WAVEFORM_SHAPE
from lvm_ray.stats import auroc

#: Columns the model inputs, labels and covariates may draw on (those present are read).
LABEL_SOURCES = ("lv_mass_g", "bsa_m2", "sex", "height_cm", "weight_kg", "age", "bmi")


def input_columns(preset: Preset, extra: Iterable[str | None] = ()) -> list[str]:
    """The shard columns a preset's inputs, target and labels need (before checking presence)."""
    wanted = ["ecg_id", "patient_id", "ecg", preset.target.column, *extra, *LABEL_SOURCES]
    wanted += [c.name for c in preset.covariates]
    return [c for c in dict.fromkeys(wanted) if c]


def featurize(batch: Mapping[str, Any], preset: Preset) -> dict[str, np.ndarray]:
    """A batch of shard rows (numpy columns) -> model inputs: x, cov (if any), y, lvh."""
    n = len(batch["ecg"])
    ecg = np.asarray(batch["ecg"]).reshape(n, *WAVEFORM_SHAPE)
    x = np.zeros((0, *preset.input.shape), dtype=np.float32) if n == 0 else prepare_input(ecg, preset)
    out: dict[str, np.ndarray] = {"x": x}
    if preset.covariates:
        out["cov"] = prepare_covariates(batch, n, preset)
    out["y"] = target_to_model(np.asarray(batch[preset.target.column]), preset)
    out["lvh"] = lvh_labels(batch, n) if preset.lvh_head else np.full(n, -1, dtype=np.int64)
    return out


def make_optimizer(preset: Preset, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The preset's optimiser (RAdam, as published) with its learning rate and weight decay."""
    return torch.optim.RAdam(params, lr=preset.optim.lr, weight_decay=preset.optim.weight_decay)


def make_scheduler(preset: Preset, optimizer: torch.optim.Optimizer) -> Any:
    """The preset's schedule, stepped once per epoch by :func:`step_scheduler`.

    'plateau': reduce the learning rate on a validation-loss plateau (the preset's patience and
    factor); 'cosine': cosine decay from lr to lr/100 over max_epochs.
    """
    if preset.optim.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, preset.optim.max_epochs), eta_min=preset.optim.lr / 100
        )
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=preset.optim.plateau_factor, patience=preset.optim.plateau_patience
    )


def step_scheduler(scheduler: Any, val_loss: float) -> None:
    """End of an epoch: a plateau schedule looks at the validation loss, a fixed one just advances."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    else:
        scheduler.step()


def selection_score(preset: Preset, val_loss: float, metrics: Mapping[str, Any]) -> float:
    """The preset's selection metric as a score where lower is better (an undefined metric: +inf).

    'loss' is the validation loss itself, so loss-selected runs choose exactly as before.
    """
    name = preset.optim.selection_metric
    value = float(val_loss if name == "loss" else metrics.get(name, float("nan")))
    if not np.isfinite(value):
        return float("inf")
    return value if SELECTION_METRICS[name] == "min" else -value


def augment(x: torch.Tensor, spec: AugmentSpec, sample_rate_hz: int) -> torch.Tensor:
    """Training augmentation of model inputs [n, leads, samples] (see :class:`lvm_ray.presets.AugmentSpec`).

    Each ECG is shifted by its own random whole number of samples (0 uV shifted in) and, with
    ``lead_dropout``, loses random leads; amplitudes are never rescaled. Uses torch's global RNG
    (seeded per worker), so a run is reproducible.
    """
    if not spec.enabled or x.shape[0] == 0:
        return x
    n, leads, samples = x.shape
    max_shift = int(round(spec.max_shift_s * sample_rate_hz))
    if max_shift > 0:
        shift = torch.randint(-max_shift, max_shift + 1, (n, 1), device=x.device)
        source = torch.arange(samples, device=x.device).unsqueeze(0) - shift  # [n, samples]
        valid = (source >= 0) & (source < samples)
        index = source.clamp(0, samples - 1).unsqueeze(1).expand(n, leads, samples)
        x = torch.gather(x, 2, index) * valid.unsqueeze(1).to(x.dtype)
    if spec.lead_dropout > 0:
        keep = torch.rand(n, leads, 1, device=x.device) >= spec.lead_dropout
        x = x * keep.to(x.dtype)
    return x


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)).to(device) for k, v in batch.items()}


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA, a no-op elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    n: int = 0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.n if self.n else float("nan")


def train_epoch(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer,
    preset: Preset,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> EpochStats:
    """One pass over the training batches (dicts with x, y, lvh and maybe cov)."""
    model.train()
    stats = EpochStats()
    start = time.perf_counter()
    for i, raw in enumerate(batches):
        batch = to_device(raw, device)
        optimizer.zero_grad(set_to_none=True)
        x = augment(batch["x"], preset.augment, preset.input.sample_rate_hz)  # training only
        with autocast(device):
            output = model(x, batch.get("cov"))
            loss = total_loss(preset, output, batch["y"], batch.get("lvh"))
        loss.backward()
        optimizer.step()
        n = int(batch["y"].shape[0])
        stats.loss_sum += float(loss.detach()) * n
        stats.n += n
        if on_batch is not None:
            on_batch(i)
    stats.seconds = time.perf_counter() - start
    return stats


@dataclass
class Predictions:
    """Validation outputs of one process: summed loss and per-row model outputs and labels."""

    loss_sum: float = 0.0
    n: int = 0
    main: list[np.ndarray] = field(default_factory=list)
    y: list[np.ndarray] = field(default_factory=list)
    lvh_prob: list[np.ndarray] = field(default_factory=list)
    lvh: list[np.ndarray] = field(default_factory=list)

    def arrays(self) -> dict[str, np.ndarray]:
        def cat(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0)

        return {"main": cat(self.main), "y": cat(self.y), "lvh_prob": cat(self.lvh_prob), "lvh": cat(self.lvh)}


@torch.no_grad()
def validate_epoch(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], preset: Preset, device: torch.device
) -> Predictions:
    """Loss and outputs over validation batches (no gradient, eval mode)."""
    model.eval()
    out = Predictions()
    for raw in batches:
        batch = to_device(raw, device)
        with autocast(device):
            output = model(batch["x"], batch.get("cov"))
            loss = total_loss(preset, output, batch["y"], batch.get("lvh"))
        n = int(batch["y"].shape[0])
        out.loss_sum += float(loss) * n
        out.n += n
        out.main.append(output.main.float().cpu().numpy())
        out.y.append(batch["y"].float().cpu().numpy())
        if output.lvh_logits is not None:
            out.lvh_prob.append(torch.softmax(output.lvh_logits.float(), dim=1)[:, 1].cpu().numpy())
            out.lvh.append(batch["lvh"].cpu().numpy())
    return out


def target_metrics(
    preset: Preset,
    pred: np.ndarray,
    true: np.ndarray,
    lvh_prob: np.ndarray | None = None,
    lvh: np.ndarray | None = None,
) -> dict[str, float]:
    """Readable metrics of predictions against labels, both in target units (probability for binary)."""
    pred, true = np.asarray(pred, dtype=float), np.asarray(true, dtype=float)
    metrics: dict[str, float] = {"n": int(len(true))}
    if not len(true):
        return metrics
    if preset.target.task == "binary":
        metrics["auroc"] = auroc(true > 0.5, pred)
        metrics["accuracy"] = float(((pred > 0.5) == (true > 0.5)).mean())
    else:
        metrics["mae"] = float(np.abs(pred - true).mean())
        spread = len(true) > 2 and np.std(pred) > 0
        metrics["pearson_r"] = float(np.corrcoef(pred, true)[0, 1]) if spread else float("nan")
    if lvh_prob is not None and lvh is not None and len(lvh_prob):
        known = np.asarray(lvh) >= 0
        metrics["lvh_auroc"] = auroc(np.asarray(lvh)[known] == 1, np.asarray(lvh_prob)[known])
    return metrics


def epoch_metrics(preset: Preset, main: np.ndarray, y: np.ndarray, lvh_prob: np.ndarray, lvh: np.ndarray) -> dict:
    """:func:`target_metrics` of model-space outputs and labels (z-scores or logits)."""
    pred = model_to_target(np.asarray(main), preset)
    true = np.asarray(y, dtype=float) if preset.target.task == "binary" else model_to_target(np.asarray(y), preset)
    return target_metrics(preset, pred, true, lvh_prob, lvh)
