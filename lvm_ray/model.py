"""The LVM-AI network, its losses and its checkpoints. Pure torch: no Ray.

:class:`LVMNet` is the dense-block 1-D CNN of Khurshid et al. 2021 (see docs/method.md "The model"),
parameterised by :class:`lvm_ray.presets.ArchSpec` so that the lighter CPU preset is the same
code. :func:`build_model` makes one from a preset; :func:`save_checkpoint` and
:func:`load_checkpoint` write and read checkpoints that carry their preset, so scoring and
serving always prepare the input the network was trained on.
"""

from __future__ import annotations

import io
import math
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import fsspec
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lvm_ray import __version__
from lvm_ray.presets import ArchSpec, Preset, get_preset
from lvm_ray.schema import SCHEMA_VERSION

CHECKPOINT_FORMAT = "lvm-ray-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
#: File name of a model inside a run directory or a Ray checkpoint directory.
MODEL_FILE = "model.pt"


class CheckpointError(ValueError):
    """A checkpoint is unreadable, or does not match the preset or schema it is asked for."""


class ModelOutput(NamedTuple):
    """Main head (z-score or logit, shape [n]) and the optional LVH head's logits ([n, 2] or None)."""

    main: torch.Tensor
    lvh_logits: torch.Tensor | None


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class DenseBlock(nn.Module):
    """``n_convs`` convolutions; each sees the block input concatenated with all earlier outputs.

    The block outputs the last convolution's output (``filters`` channels), as in LVM-AI.
    """

    def __init__(self, in_channels: int, filters: int, n_convs: int, kernel_size: int, batch_norm: bool) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        channels = in_channels
        for _ in range(n_convs):
            layers: list[nn.Module] = [nn.Conv1d(channels, filters, kernel_size, padding="same", bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm1d(filters))
            layers.append(nn.ReLU(inplace=True))
            self.convs.append(nn.Sequential(*layers))
            channels += filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        out = x
        for conv in self.convs:
            out = conv(torch.cat(features, dim=1) if len(features) > 1 else features[0])
            features.append(out)
        return out


class LVMNet(nn.Module):
    """LVM-AI's dense-block CNN: stem conv -> [pool -> dense block] x B -> flatten/pool -> MLP.

    Published configuration (``ArchSpec()`` defaults, 12 x 5000 input): Conv(32, k71) -> pool ->
    block(32) -> pool -> block(24) -> pool -> block(16) -> flatten 625 x 16 = 10000 ->
    Dense 16 -> Dense 64 -> Dense 1; ReLU, "same" padding, no batch norm: about 1.05 M parameters.
    Each covariate (already standardised) passes through its own Dense(covariate_units, or its
    entry of covariate_widths) + ReLU and is concatenated to the ECG features. With ``lvh_head``
    a Dense(2) on the last hidden layer gives LVH logits.
    """

    def __init__(
        self,
        arch: ArchSpec | None = None,
        n_leads: int = 12,
        n_samples: int = 5000,
        n_covariates: int = 0,
        lvh_head: bool = False,
    ) -> None:
        super().__init__()
        arch = arch or ArchSpec()
        _positive_int("n_leads", n_leads)
        _positive_int("n_samples", n_samples)
        kernel = _positive_int("kernel_size", arch.kernel_size)
        if kernel % 2 == 0:
            raise ValueError(f"kernel_size must be odd so that 'same' padding is symmetric, got {kernel}")
        if kernel > n_samples:
            raise ValueError(f"kernel_size {kernel} is longer than the input ({n_samples} samples)")
        stem = _positive_int("stem_filters", arch.stem_filters)
        if not arch.block_filters:
            raise ValueError("block_filters must name at least one dense block")
        blocks = [_positive_int("block_filters[]", f) for f in arch.block_filters]
        n_convs = _positive_int("convs_per_block", arch.convs_per_block)
        pool = _positive_int("pool_size", arch.pool_size)
        dense = [_positive_int("dense_units[]", u) for u in arch.dense_units]
        if n_covariates < 0:
            raise ValueError(f"n_covariates must be >= 0, got {n_covariates}")
        if arch.head not in ("flatten", "global_pool"):
            raise ValueError(f"head must be 'flatten' or 'global_pool', got {arch.head!r}")
        if not 0.0 <= arch.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {arch.dropout}")
        length = n_samples
        for _ in blocks:
            length //= pool
        if length < 1:
            raise ValueError(
                f"input of {n_samples} samples is too short for {len(blocks)} poolings of {pool}; "
                f"need at least {pool ** len(blocks)}"
            )

        self.arch = arch
        self.n_leads, self.n_samples, self.n_covariates = n_leads, n_samples, n_covariates
        stem_layers: list[nn.Module] = [nn.Conv1d(n_leads, stem, kernel, padding="same", bias=not arch.batch_norm)]
        if arch.batch_norm:
            stem_layers.append(nn.BatchNorm1d(stem))
        stem_layers.append(nn.ReLU(inplace=True))
        self.stem = nn.Sequential(*stem_layers)
        self.pool = nn.MaxPool1d(pool)
        self.blocks = nn.ModuleList()
        channels = stem
        for filters in blocks:
            self.blocks.append(DenseBlock(channels, filters, n_convs, kernel, arch.batch_norm))
            channels = filters
        features = channels * length if arch.head == "flatten" else 2 * channels
        widths = tuple(arch.covariate_widths) or (arch.covariate_units,) * n_covariates
        if len(widths) != n_covariates:
            raise ValueError(f"covariate_widths gives {len(widths)} widths for {n_covariates} covariates")
        widths = tuple(_positive_int("covariate width", w) for w in widths)
        self.covariate_layers = nn.ModuleList(
            nn.Sequential(nn.Linear(1, width), nn.ReLU(inplace=True)) for width in widths
        )
        features += sum(widths)
        self.dropout = nn.Dropout(arch.dropout) if arch.dropout > 0 else nn.Identity()
        hidden: list[nn.Module] = []
        for units in dense:
            hidden += [nn.Linear(features, units), nn.ReLU(inplace=True)]
            features = units
        self.hidden = nn.Sequential(*hidden)
        self.out = nn.Linear(features, 1)
        self.lvh = nn.Linear(features, 2) if lvh_head else None

    def forward(self, ecg: torch.Tensor, covariates: torch.Tensor | None = None) -> ModelOutput:
        """ecg [n, leads, samples] float; covariates [n, k] standardised (required when k > 0)."""
        if ecg.ndim != 3 or ecg.shape[1] != self.n_leads or ecg.shape[2] != self.n_samples:
            raise ValueError(f"expected input [n, {self.n_leads}, {self.n_samples}], got {tuple(ecg.shape)}")
        x = self.stem(ecg)
        for block in self.blocks:
            x = block(self.pool(x))
        if self.arch.head == "flatten":
            x = torch.flatten(x, 1)
        else:
            x = torch.cat([x.mean(dim=2), x.amax(dim=2)], dim=1)
        if self.n_covariates:
            if covariates is None or covariates.shape != (ecg.shape[0], self.n_covariates):
                got = None if covariates is None else tuple(covariates.shape)
                raise ValueError(f"this model needs covariates [n, {self.n_covariates}], got {got}")
            covariates = covariates.to(x.dtype)
            x = torch.cat([x, *(layer(covariates[:, j : j + 1]) for j, layer in enumerate(self.covariate_layers))], 1)
        h = self.hidden(self.dropout(x))
        return ModelOutput(self.out(h).squeeze(1), self.lvh(h) if self.lvh is not None else None)


def build_model(preset: Preset | str) -> LVMNet:
    """The network a preset describes (inputs from :func:`lvm_ray.presets.prepare_input`)."""
    p = get_preset(preset)
    return LVMNet(
        p.arch,
        n_leads=p.input.n_leads,
        n_samples=p.input.n_samples,
        n_covariates=len(p.covariates),
        lvh_head=p.lvh_head,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- losses ---------------------------------------------------------------------------------------


def logcosh(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    """Per-sample log(cosh(y_pred - y_true)), computed stably as |d| + softplus(-2|d|) - log 2."""
    d = (y_pred - y_true).abs()
    return d + F.softplus(-2.0 * d) - math.log(2.0)


def asymmetric_outlier(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    """LVM-AI's loss per sample, on z-scores: punishes under-predicting large hearts.

    logcosh + (y - yhat)^2 * [40 (y-2)+ (y-yhat)+ + 20 (y-1)+ (y-yhat)+ + 5 (y-1)+ (yhat-y)+].
    (The Keras original broadcasts a [n, 1] weight against an [n] MSE; this is its per-sample intent.)
    """
    under = (y_true - y_pred).clamp_min(0)
    over = (y_pred - y_true).clamp_min(0)
    weight = (
        40.0 * (y_true - 2.0).clamp_min(0) * under
        + 20.0 * (y_true - 1.0).clamp_min(0) * under
        + 5.0 * (y_true - 1.0).clamp_min(0) * over
    )
    return logcosh(y_true, y_pred) + (y_true - y_pred).square() * weight


def main_loss(preset: Preset, y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    """Per-sample loss of the main head for the preset's target (z-scores or 0/1 labels)."""
    name = preset.target.loss
    y_true = y_true.to(y_pred.dtype)
    if name == "asymmetric_outlier":
        return asymmetric_outlier(y_true, y_pred)
    if name == "logcosh":
        return logcosh(y_true, y_pred)
    if name == "mse":
        return (y_pred - y_true).square()
    if name == "bce":
        pos_weight = torch.tensor(preset.target.pos_weight, dtype=y_pred.dtype, device=y_pred.device)
        return F.binary_cross_entropy_with_logits(y_pred, y_true, pos_weight=pos_weight, reduction="none")
    raise ValueError(f"unknown loss {name!r}")


def total_loss(
    preset: Preset,
    output: ModelOutput,
    y_true: torch.Tensor,
    lvh_true: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean main loss plus (with an LVH head) the class-weighted LVH cross-entropy; label -1 = unknown."""
    loss = main_loss(preset, y_true, output.main.float()).mean()
    if output.lvh_logits is not None and lvh_true is not None:
        weight = torch.tensor(preset.lvh_class_weights, dtype=torch.float32, device=output.lvh_logits.device)
        labels = lvh_true.long()
        if (labels >= 0).any():
            loss = loss + F.cross_entropy(output.lvh_logits.float(), labels, weight=weight, ignore_index=-1)
    return loss


# --- checkpoints ---------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / prepare_model wrappers."""
    return model.module if hasattr(model, "module") else model


def normalisation_record(preset: Preset) -> dict[str, Any]:
    """What a consumer needs to build inputs and read outputs (also inside the preset)."""
    return {
        "input_sample_rate_hz": preset.input.sample_rate_hz,
        "input_n_samples": preset.input.n_samples,
        "input_divide_uv_by": preset.input.scale_uv,
        "target": preset.target.column,
        "task": preset.target.task,
        "target_mean": preset.target.mean,
        "target_sd": preset.target.sd,
        "covariates": [{"name": c.name, "mean": c.mean, "sd": c.sd} for c in preset.covariates],
    }


def checkpoint_payload(
    model: nn.Module,
    preset: Preset,
    *,
    epoch: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    split: Mapping[str, Any] | None = None,
    training_state: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The dict a checkpoint holds (tensors, plain containers and scalars only: loadable with weights_only).

    ``provenance`` says where weights not trained by lvm-ray came from (e.g. an imported Keras file).
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "schema_version": SCHEMA_VERSION,
        "package_version": __version__,
        "preset_name": preset.name,
        "preset": preset.to_dict(),
        "normalisation": normalisation_record(preset),
        "model_state": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "epoch": epoch,
        "metrics": dict(metrics or {}),
        "split": dict(split or {}),
        "training_state": dict(training_state or {}),
        "provenance": dict(provenance or {}),
    }


def _model_url(url: str) -> str:
    """A run directory or checkpoint directory -> its model file; a file URL passes through."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.isdir(path):
        return posixpath.join(url.rstrip("/"), MODEL_FILE)
    return url


def write_payload(url: str, payload: Mapping[str, Any]) -> None:
    """torch.save a payload to any fsspec URL (a local directory gets MODEL_FILE inside)."""
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    fs, path = fsspec.core.url_to_fs(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(buffer.getvalue())


def write_calibration(url: str, calibration: Mapping[str, Any] | None) -> str:
    """Rewrite the checkpoint at ``url`` with ``calibration`` (``lvm_ray.conformal`` payload; None removes it).

    Weights, preset and all other entries are kept, so its model_version does not change; the file
    is replaced atomically (readers see the old or the new checkpoint). Returns the file's URL.
    """
    from lvm_ray.store import write_atomic

    target = _model_url(url)
    payload = read_payload(target)
    payload["calibration"] = dict(calibration) if calibration else None
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(target, buffer.getvalue())
    return target


def save_checkpoint(url: str, model: nn.Module, preset: Preset, **extra: Any) -> None:
    """Write a checkpoint file (model weights + preset + normalisation + version + extras)."""
    write_payload(url, checkpoint_payload(model, preset, **extra))


def read_payload(url: str) -> dict[str, Any]:
    """The raw checkpoint dict, loaded with torch.load(weights_only=True) (no pickled code runs)."""
    target = _model_url(url)
    fs, path = fsspec.core.url_to_fs(target)
    if not fs.exists(path):
        raise CheckpointError(f"no checkpoint at {url} (looked for {target})")
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means 'not our checkpoint'
        raise CheckpointError(f"{target} is not a readable lvm-ray checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{target} is not an lvm-ray checkpoint")
    return payload


@dataclass
class LoadedCheckpoint:
    model: LVMNet
    preset: Preset
    payload: dict[str, Any]
    #: An ensemble checkpoint's networks, in member order (``model`` is the first); empty: one model.
    members: list[LVMNet] = field(default_factory=list)

    @property
    def package_version(self) -> str:
        return str(self.payload.get("package_version"))


def check_payload(payload: Mapping[str, Any], expected_preset: Preset | str | None = None) -> Preset:
    """Validate schema and preset of a checkpoint dict; return the preset it was trained with."""
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"checkpoint was written for ECG schema version {payload.get('schema_version')}, "
            f"this lvm-ray uses {SCHEMA_VERSION}"
        )
    if payload.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"unsupported checkpoint format version {payload.get('format_version')}")
    try:
        preset = Preset.from_dict(payload["preset"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint carries an unreadable preset: {exc}") from exc
    if expected_preset is not None:
        expected = get_preset(expected_preset)
        if preset.name != expected.name:
            raise CheckpointError(f"checkpoint was trained with preset {preset.name!r}, not {expected.name!r}")
        if not preset.input_compatible(expected):
            raise CheckpointError(
                f"checkpoint's preset {preset.name!r} differs from this lvm-ray's definition of it "
                "(input, network or covariates changed)"
            )
    return preset


def load_checkpoint(
    url: str,
    expected_preset: Preset | str | None = None,
    map_location: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Load a checkpoint file, checkpoint directory or run directory into an eval-mode model.

    Refuses (CheckpointError) a checkpoint of another schema version or, when ``expected_preset``
    is given, of another preset or of a preset whose input/network definition changed.
    """
    payload = read_payload(url)
    preset = check_payload(payload, expected_preset)
    model = build_model(preset)
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit preset {preset.name!r}: {exc}") from exc
    model.to(map_location).eval()
    members = [model]
    for i, state in enumerate(member_states(payload)[1:], start=1):
        member = build_model(preset)
        try:
            member.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"ensemble member {i}'s weights do not fit preset {preset.name!r}: {exc}") from exc
        members.append(member.to(map_location).eval())
    return LoadedCheckpoint(model, preset, payload, members if ENSEMBLE_KEY in payload else [])


# --- ensembles -------------------------------------------------------------------------------------

#: Checkpoint entry of an ensemble (RUN/model.pt of ``lvm-ray train --ensemble K``): its members.
ENSEMBLE_KEY = "ensemble"


class MeanOfMembers(nn.Module):
    """An ensemble as one network: the mean of its members' main outputs (and LVH logits).

    For gradient-based explanations of an ensemble (attributions are linear in the output, so
    these are the mean of the members' attributions). For a regression target the mean z-score
    is the mean in target units; predictions themselves are averaged by ``Predictor`` (in
    probabilities for a binary target).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, ecg: torch.Tensor, covariates: torch.Tensor | None = None) -> ModelOutput:
        outputs = [member(ecg, covariates) for member in self.members]
        main = torch.stack([o.main for o in outputs]).mean(dim=0)
        logits = [o.lvh_logits for o in outputs if o.lvh_logits is not None]
        return ModelOutput(main, torch.stack(logits).mean(dim=0) if logits else None)


def member_states(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The state dicts of a checkpoint's networks: every ensemble member's, or the one model's."""
    ensemble = payload.get(ENSEMBLE_KEY)
    if not ensemble:
        return [payload["model_state"]]
    try:
        return [dict(m["model_state"]) for m in ensemble["members"]]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint's ensemble entry is malformed: {exc}") from exc


def ensemble_payload(
    members: Sequence[Mapping[str, Any]],
    *,
    runs: Sequence[str] = (),
    metrics: Mapping[str, Any] | None = None,
    split: Mapping[str, Any] | None = None,
    kind: str = "seeds",
) -> dict[str, Any]:
    """One checkpoint for K members of one preset, each a checkpoint payload (their RUN/model.pt).

    The top-level entries are the first member's (preset, normalisation, weights), so every
    reader of a checkpoint works unchanged; ``payload['ensemble']['members']`` holds each member's
    weights, epoch and metrics, and :class:`lvm_ray.predict.Predictor` averages them. A member's
    calibration is not carried over: an ensemble is calibrated on its own averaged outputs.
    """
    if not members:
        raise CheckpointError("an ensemble needs at least one member")
    presets = [m.get("preset") for m in members]
    if any(p != presets[0] for p in presets[1:]):
        raise CheckpointError("ensemble members were trained with different presets")
    first = dict(members[0])
    payload = {k: v for k, v in first.items() if k not in ("calibration", "training_state", "provenance")}
    payload.update(
        epoch=None,
        metrics=dict(metrics or {}),
        split=dict(split if split is not None else first.get("split", {})),
        training_state={},
        provenance={},
    )
    payload[ENSEMBLE_KEY] = {
        "kind": kind,
        "size": len(members),
        "members": [
            {
                "model_state": dict(m["model_state"]),
                "epoch": m.get("epoch"),
                "metrics": dict(m.get("metrics") or {}),
                "run": runs[i] if i < len(runs) else None,
            }
            for i, m in enumerate(members)
        ],
    }
    return payload


def to_cpu(value: Any) -> Any:
    """Deep copy of a nested structure (state dicts, optimizer state) with tensors on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, Mapping):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value
