"""Pure training helpers (no Ray): batches from memory, one epoch of training or validation, metrics.

The model inputs themselves are built by ``lvm_ray.inputs`` (no torch there: a read task needs none).

Ray Train's worker loop (``lvm_ray.train``) and the single-process baselines in
``jobs/benchmark.py`` call the same functions, so the two can only differ in the plumbing.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lvm_ray.model import total_loss, unwrap
from lvm_ray.presets import SELECTION_METRICS, AugmentSpec, Preset, model_to_target
from lvm_ray.stats import auroc


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
    return {
        k: (v if isinstance(v, torch.Tensor) else torch.as_tensor(v)).to(device, non_blocking=True)
        for k, v in batch.items()
    }


def shuffled_order(n: int, take: int, seed: Sequence[int]) -> torch.Tensor:
    """The first ``take`` of a random permutation of ``n`` rows, from ``seed`` (e.g. run seed, rank, epoch).

    Its own generator, so an epoch's order is the same whether the run was resumed or not.
    """
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
    return torch.randperm(n, generator=generator)[:take]


def memory_batches(
    tensors: Mapping[str, torch.Tensor], batch_size: int, order: torch.Tensor | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Mini-batches of in-memory tensors: the rows ``order`` (default: all, in order) in slices of ``batch_size``."""
    n = len(next(iter(tensors.values()))) if order is None else len(order)
    if order is not None:
        order = order.to(next(iter(tensors.values())).device)
    for i in range(0, n, batch_size):
        if order is None:  # views, no copy
            yield {k: v[i : i + batch_size] for k, v in tensors.items()}
        else:
            rows = order[i : i + batch_size]
            yield {k: v.index_select(0, rows) for k, v in tensors.items()}


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA, a no-op elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    n: int = 0
    seconds: float = 0.0
    #: ECGs whose statistics the batch-norm layers took at the end (:func:`refresh_batch_norm`).
    batch_norm_rows: int = 0

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
    """One pass over the training batches (dicts with x, y, lvh and maybe cov).

    Then, with the preset's ``batch_norm_refresh_rows``, the batch-norm layers take the statistics
    of the epoch's last that-many training ECGs (un-augmented) under the final weights.
    """
    model.train()
    stats = EpochStats()
    keep_rows = preset.optim.batch_norm_refresh_rows if has_batch_norm(model) else 0
    kept: collections.deque[dict[str, torch.Tensor]] = collections.deque()
    kept_rows = 0
    # The loss is summed on the device: no host sync per step (a GPU keeps its queue full).
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
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
        loss_sum += loss.detach().double() * n
        stats.n += n
        if keep_rows > 0:
            kept.append(batch)
            kept_rows += n
            while kept_rows - len(kept[0]["y"]) >= keep_rows:
                kept_rows -= len(kept.popleft()["y"])
        if on_batch is not None:
            on_batch(i)
    with autocast(device):
        stats.batch_norm_rows = refresh_batch_norm(unwrap(model), kept)
    stats.loss_sum = float(loss_sum)
    stats.seconds = time.perf_counter() - start
    return stats


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` holds a batch-norm layer (whose running statistics :func:`refresh_batch_norm` sets)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def refresh_batch_norm(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> int:
    """Give every batch-norm layer the statistics of ``batches`` under the current weights.

    The running averages are reset and rebuilt as an equal-weight average over the batches
    (momentum None); only the batch-norm layers run in training mode (dropout stays off), and
    no weight changes. Returns the rows seen (0, and nothing changed, for a model without
    batch norm or no batches).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    batches = list(batches)
    if not norms or not batches:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    rows = 0
    try:
        for batch in batches:
            model(batch["x"], batch.get("cov"))
            rows += int(batch["x"].shape[0])
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return rows


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
    # Kept on the device until the end: one host transfer per epoch, not one per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    main: list[torch.Tensor] = []
    y: list[torch.Tensor] = []
    lvh_prob: list[torch.Tensor] = []
    lvh: list[torch.Tensor] = []
    for raw in batches:
        batch = to_device(raw, device)
        with autocast(device):
            output = model(batch["x"], batch.get("cov"))
            loss = total_loss(preset, output, batch["y"], batch.get("lvh"))
        n = int(batch["y"].shape[0])
        loss_sum += loss.double() * n
        out.n += n
        main.append(output.main.float())
        y.append(batch["y"].float())
        if output.lvh_logits is not None:
            lvh_prob.append(torch.softmax(output.lvh_logits.float(), dim=1)[:, 1])
            lvh.append(batch["lvh"])
    out.loss_sum = float(loss_sum)
    out.main, out.y = [t.cpu().numpy() for t in main], [t.cpu().numpy() for t in y]
    out.lvh_prob, out.lvh = [t.cpu().numpy() for t in lvh_prob], [t.cpu().numpy() for t in lvh]
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
