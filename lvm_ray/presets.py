"""Model presets: the one place that declares what a model eats and what it learns.

A :class:`Preset` fixes the input (sample rate, length, normalisation), the network, the
target (column, task, z-score constants, loss), the covariates, the optional LVH head and the
optimiser schedule. Training, scoring and serving all build model inputs through
:func:`prepare_input` and :func:`prepare_covariates` here, so a checkpoint (which carries its
preset) can never be fed the wrong input.

Presets:

- ``lvm-ai-2021``: the published LVM-AI network (Khurshid et al. 2021), ECG only.
- ``lvm-ai-2021-covariates``: the same network with age, sex and BMI (the published model).
- ``lvm-ai-2021-lvh``: ECG only, with the second LVH-probability head (class weights 1:25).
- ``lvm-cpu``: ours, for CPUs and the demo: 100 Hz x 10 s (anti-aliased decimation of the
  canonical 500 Hz), small kernels and channels, batch norm and global pooling; trains in
  minutes on a laptop.

No Ray, no torch here: numpy only, so any process can prepare inputs cheaply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lvm_ray.lvh import LVHConfig, derive
from lvm_ray.schema import N_LEADS, N_SAMPLES, SAMPLE_RATE_HZ
from lvm_ray.signals import decimate

Task = Literal["regression", "binary"]
LossName = Literal["asymmetric_outlier", "logcosh", "mse", "bce"]
REGRESSION_LOSSES: tuple[str, ...] = ("asymmetric_outlier", "logcosh", "mse")
BINARY_LOSSES: tuple[str, ...] = ("bce",)
Schedule = Literal["plateau", "cosine"]
#: Validation metrics that can choose the best epoch (and drive early stopping): name -> 'min' or 'max'.
#: 'loss' is the validation loss; the others are keys of ``lvm_ray.fitting.target_metrics``.
SELECTION_METRICS: dict[str, str] = {"loss": "min", "auroc": "max", "pearson_r": "max", "mae": "min"}
SELECTION_BY_TASK: dict[str, tuple[str, ...]] = {
    "regression": ("loss", "pearson_r", "mae"),
    "binary": ("loss", "auroc"),
}


@dataclass(frozen=True)
class InputSpec:
    """What the network sees: ``leads x n_samples`` float32 = microvolts / ``scale_uv`` at ``sample_rate_hz``."""

    sample_rate_hz: int = SAMPLE_RATE_HZ
    n_samples: int = N_SAMPLES
    scale_uv: float = 2000.0
    n_leads: int = N_LEADS

    def __post_init__(self) -> None:
        if self.sample_rate_hz <= 0 or SAMPLE_RATE_HZ % self.sample_rate_hz:
            raise ValueError(
                f"input sample rate must divide the canonical {SAMPLE_RATE_HZ} Hz, got {self.sample_rate_hz}"
            )
        max_samples = N_SAMPLES // (SAMPLE_RATE_HZ // self.sample_rate_hz)
        if not 0 < self.n_samples <= max_samples:
            raise ValueError(f"n_samples must be in 1..{max_samples} at {self.sample_rate_hz} Hz, got {self.n_samples}")
        if self.scale_uv <= 0:
            raise ValueError(f"scale_uv must be positive, got {self.scale_uv}")
        if self.n_leads != N_LEADS:
            raise ValueError(f"the canonical ECG has {N_LEADS} leads, got n_leads={self.n_leads}")

    @property
    def decimation(self) -> int:
        return SAMPLE_RATE_HZ // self.sample_rate_hz

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_leads, self.n_samples)


@dataclass(frozen=True)
class ArchSpec:
    """The dense-block CNN (see :class:`lvm_ray.model.LVMNet`)."""

    kernel_size: int = 71
    stem_filters: int = 32
    block_filters: tuple[int, ...] = (32, 24, 16)
    convs_per_block: int = 3
    pool_size: int = 2
    batch_norm: bool = False
    #: 'flatten' (published: keeps time position) or 'global_pool' (mean and max over time).
    head: Literal["flatten", "global_pool"] = "flatten"
    dense_units: tuple[int, ...] = (16, 64)
    #: Units of the small Dense+ReLU each covariate passes through before the concatenation.
    covariate_units: int = 8
    #: Per-covariate units, in covariate order, when they differ (ML4H: age 32, sex 2, BMI 32);
    #: empty = ``covariate_units`` for every covariate.
    covariate_widths: tuple[int, ...] = ()
    dropout: float = 0.0


@dataclass(frozen=True)
class TargetSpec:
    """What the main head learns. Regression targets are learned as z-scores ``(y - mean) / sd``."""

    column: str = "lv_mass_g"
    task: Task = "regression"
    mean: float = 89.7
    sd: float = 24.8
    loss: LossName = "asymmetric_outlier"
    #: Weight of the positive class for a binary target (BCE pos_weight); 1 = unweighted.
    pos_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.task not in ("regression", "binary"):
            raise ValueError(f"task must be 'regression' or 'binary', got {self.task!r}")
        allowed = REGRESSION_LOSSES if self.task == "regression" else BINARY_LOSSES
        if self.loss not in allowed:
            raise ValueError(f"loss {self.loss!r} does not fit a {self.task} target; choose one of {allowed}")
        if self.task == "regression" and not self.sd > 0:
            raise ValueError(f"target sd must be positive, got {self.sd}")


@dataclass(frozen=True)
class CovariateSpec:
    """A scalar covariate fed beside the ECG, standardised as ``(x - mean) / sd``; missing -> 0 (the mean).

    ``name`` is 'age', 'sex' (M = 1, F = 0) or 'bmi' (from a bmi column, else weight / height^2),
    or any numeric column.
    """

    name: str
    mean: float
    sd: float


@dataclass(frozen=True)
class OptimSpec:
    """Optimiser and schedule (published: RAdam 1e-4, batch 32, plateau 16 x0.5, early stop 32)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 32
    plateau_patience: int = 16
    plateau_factor: float = 0.5
    early_stopping_patience: int = 32
    max_epochs: int = 200
    #: 'plateau': learning rate x plateau_factor after plateau_patience epochs without a lower
    #: validation loss (published); 'cosine': cosine decay from lr to lr/100 over max_epochs
    #: (for a fixed epoch budget: the rate is low when the budget ends).
    schedule: Schedule = "plateau"
    #: The validation metric that picks the best epoch and drives early stopping (SELECTION_METRICS).
    selection_metric: str = "loss"
    #: After each epoch, batch-norm layers take the statistics of the worker's last this-many
    #: training ECGs under the final weights (0: keep the running averages). The running averages
    #: lag weights that moved all epoch, which made the validation loss jump (0.09 to 0.7 between
    #: epochs), picked the best epoch by chance and left the checkpoint's outputs offset.
    batch_norm_refresh_rows: int = 512

    def __post_init__(self) -> None:
        if self.schedule not in ("plateau", "cosine"):
            raise ValueError(f"schedule must be 'plateau' or 'cosine', got {self.schedule!r}")
        if self.batch_norm_refresh_rows < 0:
            raise ValueError(f"batch_norm_refresh_rows must be >= 0, got {self.batch_norm_refresh_rows}")
        if self.selection_metric not in SELECTION_METRICS:
            raise ValueError(
                f"selection_metric must be one of {', '.join(SELECTION_METRICS)}, got {self.selection_metric!r}"
            )


@dataclass(frozen=True)
class AugmentSpec:
    """Training-only augmentation (``lvm_ray.fitting.augment``); validation, scoring and serving never see it.

    Nothing here rescales a waveform: LVH is read from absolute voltages (Sokolow-Lyon, Cornell),
    so amplitude scaling would corrupt the very signal the label depends on. Defaults: off.
    """

    #: Shift each training ECG by a uniform random offset of up to this many seconds, either way;
    #: the samples shifted in are 0 uV (the network's 'same' padding already shows it 0 uV at the
    #: record's edges), so this is a random crop of the record placed in a zero background.
    max_shift_s: float = 0.0
    #: Probability that each lead of a training ECG is zeroed (0 = never). Off in the presets:
    #: the voltage criteria read specific leads (V1, V5, V6, aVL, V3), so dropping one removes
    #: the evidence for the label rather than a nuisance.
    lead_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_shift_s < 10.0:
            raise ValueError(f"max_shift_s must be in [0, 10) seconds, got {self.max_shift_s}")
        if not 0.0 <= self.lead_dropout < 1.0:
            raise ValueError(f"lead_dropout must be in [0, 1), got {self.lead_dropout}")

    @property
    def enabled(self) -> bool:
        return self.max_shift_s > 0 or self.lead_dropout > 0


@dataclass(frozen=True)
class Preset:
    """Everything that defines a model: input, network, target, covariates, LVH head, optimiser."""

    name: str
    description: str
    input: InputSpec = field(default_factory=InputSpec)
    arch: ArchSpec = field(default_factory=ArchSpec)
    target: TargetSpec = field(default_factory=TargetSpec)
    covariates: tuple[CovariateSpec, ...] = ()
    #: Second head: LVH probability (2 classes, CMR LVH by LVMI thresholds), class weights 1:lvh_pos_weight.
    lvh_head: bool = False
    lvh_class_weights: tuple[float, float] = (1.0, 25.0)
    optim: OptimSpec = field(default_factory=OptimSpec)
    augment: AugmentSpec = field(default_factory=AugmentSpec)

    def __post_init__(self) -> None:
        allowed = SELECTION_BY_TASK[self.target.task]
        if self.optim.selection_metric not in allowed:
            raise ValueError(
                f"selection_metric {self.optim.selection_metric!r} does not fit a {self.target.task} target; "
                f"choose one of {', '.join(allowed)}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (what checkpoints and run records store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> Preset:
        """Inverse of :meth:`to_dict` (tuples restored)."""
        p = dict(payload)
        arch = dict(p.get("arch", {}))
        for key in ("block_filters", "dense_units", "covariate_widths"):
            if key in arch:
                arch[key] = tuple(arch[key])
        return cls(
            name=p["name"],
            description=p.get("description", ""),
            input=InputSpec(**p.get("input", {})),
            arch=ArchSpec(**arch),
            target=TargetSpec(**p.get("target", {})),
            covariates=tuple(CovariateSpec(**c) for c in p.get("covariates", ())),
            lvh_head=bool(p.get("lvh_head", False)),
            lvh_class_weights=tuple(p.get("lvh_class_weights", (1.0, 25.0))),  # type: ignore[arg-type]
            optim=OptimSpec(**p.get("optim", {})),
            augment=AugmentSpec(**p.get("augment", {})),
        )

    @property
    def covariate_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.covariates)

    def with_target(
        self,
        column: str,
        task: Task = "regression",
        mean: float = 0.0,
        sd: float = 1.0,
        loss: LossName | None = None,
        pos_weight: float = 1.0,
    ) -> Preset:
        """The same model learning another column (z-scored regression or binary classification).

        A binary target replaces the LVH head (the main head then is the classifier).
        """
        if column == self.target.column and task == self.target.task:
            return self
        if loss is None:
            if task == "binary":
                loss = "bce"
            else:
                # LVM-AI's loss is defined on LV mass z-scores; a binary preset's BCE fits no regression.
                loss = "logcosh" if self.target.loss in ("asymmetric_outlier", *BINARY_LOSSES) else self.target.loss
        target = TargetSpec(column=column, task=task, mean=mean, sd=sd, loss=loss, pos_weight=pos_weight)
        optim = self.optim
        if optim.selection_metric not in SELECTION_BY_TASK[task]:  # e.g. AUROC for a regression target
            optim = dataclasses.replace(optim, selection_metric="loss")
        return dataclasses.replace(self, target=target, lvh_head=self.lvh_head and task == "regression", optim=optim)

    def input_compatible(self, other: Preset) -> bool:
        """True when both presets feed a network the same input and build the same network."""
        return (
            self.input == other.input
            and self.arch == other.arch
            and self.covariates == other.covariates
            and self.lvh_head == other.lvh_head
        )


# --- the registry --------------------------------------------------------------------------------

_COVARIATES = (
    CovariateSpec("age", mean=60.0, sd=10.0),
    CovariateSpec("sex", mean=0.5, sd=0.5),
    CovariateSpec("bmi", mean=27.0, sd=4.5),
)

#: The small 100 Hz network of the CPU presets (lvm-cpu, ptbxl-lvh): about 1/100 of the published FLOPs.
_SMALL_100HZ = ArchSpec(
    kernel_size=9,
    stem_filters=16,
    block_filters=(16, 24, 32, 32),
    convs_per_block=2,
    pool_size=2,
    batch_norm=True,
    head="global_pool",
    dense_units=(32,),
    dropout=0.1,
)
_LVM_AI = Preset(
    name="lvm-ai-2021",
    description="LVM-AI as published (Khurshid et al. 2021): 500 Hz x 10 s, uV/2000, kernel 71, "
    "dense blocks 32/24/16, flatten 10000, Dense 16-64-1, asymmetric outlier loss; ECG only. GPU-sized.",
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _LVM_AI,
        dataclasses.replace(
            _LVM_AI,
            name="lvm-ai-2021-covariates",
            description="LVM-AI as published with age, sex and BMI beside the ECG (the published model).",
            covariates=_COVARIATES,
        ),
        dataclasses.replace(
            _LVM_AI,
            name="lvm-ai-2021-lvh",
            description="LVM-AI (ECG only) with the second LVH-probability head (class weights 1:25).",
            lvh_head=True,
        ),
        Preset(
            name="lvm-cpu",
            description="CPU/demo preset: 100 Hz x 10 s (anti-aliased decimation of 500 Hz), uV/1000, "
            "kernel 9, stem 16, dense blocks 16/24/32/32 with batch norm, global mean+max pooling, "
            "Dense 32-1, logcosh; about 1/100 of the published FLOPs.",
            input=InputSpec(sample_rate_hz=100, n_samples=1000, scale_uv=1000.0),
            arch=_SMALL_100HZ,
            target=TargetSpec(loss="logcosh"),
            # 32 per worker: on the default 2 workers the global batch is 64 and the rate
            # 2.12e-3 x sqrt(2) = 3e-3, the schedule this preset was tuned at.
            optim=OptimSpec(
                lr=2.12e-3,
                weight_decay=1e-4,
                batch_size=32,
                plateau_patience=3,
                plateau_factor=0.5,
                early_stopping_patience=6,
                max_epochs=30,
            ),
        ),
        Preset(
            name="ptbxl-lvh",
            description="Real 12-lead ECGs (PTB-XL-like), 100 Hz x 10 s, binary LVH statement: uV/1000 "
            "(absolute voltage, no per-record scaling), kernel 9, stem 16, dense blocks 16/24/32/32 with batch "
            "norm, global mean+max pooling, dropout 0.2, age and sex beside the ECG, BCE; random time shifts "
            "of up to 1 s in training (amplitudes untouched); cosine schedule over 10 epochs; best epoch by "
            "validation AUROC. Meant for ensembles (train --ensemble K): small members, several seeds.",
            input=InputSpec(sample_rate_hz=100, n_samples=1000, scale_uv=1000.0),
            arch=dataclasses.replace(_SMALL_100HZ, covariate_units=8, dropout=0.2),
            target=TargetSpec(column="lvh", task="binary", mean=0.0, sd=1.0, loss="bce"),
            covariates=(CovariateSpec("age", mean=60.0, sd=17.0), CovariateSpec("sex", mean=0.5, sd=0.5)),
            optim=OptimSpec(
                lr=3e-3,
                weight_decay=1e-4,
                batch_size=64,
                plateau_patience=3,
                plateau_factor=0.5,
                early_stopping_patience=8,
                max_epochs=10,
                schedule="cosine",
                selection_metric="auroc",
            ),
            augment=AugmentSpec(max_shift_s=1.0),
        ),
    )
}
DEFAULT_PRESET = "lvm-cpu"
#: The recipe for real ECGs with a binary LVH label (PTB-XL): ``lvm-ray train --preset ptbxl-lvh``.
REAL_DATA_PRESET = "ptbxl-lvh"


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str | Preset) -> Preset:
    """The registered preset called ``name`` (a Preset passes through); a ValueError lists the names."""
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}") from None


class PresetFileError(ValueError):
    """A preset file is missing, unreadable, or does not describe a preset (the message names it)."""


def load_preset_file(path: str) -> Preset:
    """A preset from a JSON or YAML file of :meth:`Preset.to_dict` (what ``lvm-ray tune`` writes)."""
    import json

    from lvm_ray import store

    try:
        text = store.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise PresetFileError(f"preset file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetFileError(f"preset file {path} is unreadable: {exc}") from exc
    if path.lower().endswith((".yaml", ".yml")):
        import yaml

        try:
            payload = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PresetFileError(f"preset file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    else:
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PresetFileError(f"preset file {path} is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict) or "name" not in payload:
        raise PresetFileError(f"preset file {path} does not hold a preset (a mapping with 'name', 'arch', ...)")
    try:
        return Preset.from_dict(payload)
    except (TypeError, ValueError) as exc:
        raise PresetFileError(f"preset file {path}: {str(exc).splitlines()[0]}") from exc


def preset_file_text(preset: Preset, yaml_format: bool = False) -> str:
    """The text of a preset file (JSON, or YAML) that :func:`load_preset_file` reads back."""
    import json

    if yaml_format:
        import yaml

        return yaml.safe_dump(json.loads(json.dumps(preset.to_dict())), sort_keys=False)
    return json.dumps(preset.to_dict(), indent=2) + "\n"


# --- the single preprocessing path ---------------------------------------------------------------


def prepare_input(ecg_int16: np.ndarray, preset: Preset | str) -> np.ndarray:
    """Canonical int16 microvolt waveforms [n, 12, 5000] (or one [12, 5000]) -> float32 model input.

    Anti-aliased decimation to the preset's rate (:func:`lvm_ray.signals.decimate`), the first ``n_samples``, then
    division by ``scale_uv``. Used by training, scoring and serving alike.
    """
    spec = get_preset(preset).input
    x = np.asarray(ecg_int16)
    single = x.ndim == 2
    if single:
        x = x[None]
    if x.ndim != 3 or x.shape[1:] != (N_LEADS, N_SAMPLES):
        raise ValueError(f"expected canonical waveforms [n, {N_LEADS}, {N_SAMPLES}], got {tuple(np.shape(ecg_int16))}")
    out = decimate(x, spec.decimation)[..., : spec.n_samples]
    out = np.ascontiguousarray(out / np.float32(spec.scale_uv), dtype=np.float32)
    return out[0] if single else out


def _column(table: Mapping[str, Any], name: str, n: int) -> np.ndarray | None:
    if name not in table:
        return None
    values = table[name]
    if values is None:
        return None
    arr = np.asarray(values)
    if arr.shape[:1] != (n,):
        raise ValueError(f"covariate column {name!r} has {arr.shape[:1]} rows, expected {n}")
    return arr


def _as_float(values: np.ndarray) -> np.ndarray:
    """Numeric (possibly object with None) -> float64 with NaN for missing."""
    if values.dtype.kind in "fiub":
        return values.astype(np.float64)
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def covariate_values(table: Mapping[str, Any], name: str, n: int) -> np.ndarray:
    """Raw (unstandardised) covariate ``name`` for n rows as float64, NaN where unknown."""
    if name == "sex":
        sex = _column(table, "sex", n)
        if sex is None:
            return np.full(n, np.nan)
        if sex.dtype.kind in "fiub":
            return sex.astype(np.float64)
        return np.array([1.0 if s == "M" else 0.0 if s == "F" else np.nan for s in sex], dtype=np.float64)
    if name == "bmi":
        # The given BMI where known, else from height and weight (lvm_ray.lvh, row by row).
        sizes = {c: _column(table, c, n) for c in ("bmi", "height_cm", "weight_kg")}
        return derive(sizes, n=n)["bmi"].to_numpy(dtype=np.float64)
    values = _column(table, name, n)
    return np.full(n, np.nan) if values is None else _as_float(values)


def prepare_covariates(table: Mapping[str, Any], n: int, preset: Preset | str) -> np.ndarray:
    """Covariates as float32 [n, k] z-scores (k = 0 for ECG-only presets); unknown values -> 0."""
    spec = get_preset(preset)
    out = np.zeros((n, len(spec.covariates)), dtype=np.float32)
    for j, cov in enumerate(spec.covariates):
        z = (covariate_values(table, cov.name, n) - cov.mean) / cov.sd
        out[:, j] = np.where(np.isfinite(z), z, 0.0)
    return out


def lvh_labels(table: Mapping[str, Any], n: int, config: LVHConfig = LVHConfig()) -> np.ndarray:
    """CMR LVH (lvm_ray.lvh) from LV mass, BSA (or Mosteller from height/weight) and sex: 1/0, or -1 where unknown."""
    columns: dict[str, Any] = {
        c: covariate_values(table, c, n) for c in ("lv_mass_g", "bsa_m2", "height_cm", "weight_kg")
    }
    columns["sex"] = np.array([{1.0: "M", 0.0: "F"}.get(v) for v in covariate_values(table, "sex", n)], dtype=object)
    lvh = derive(columns, config, n=n)["lvh"]
    return lvh.astype("Int64").fillna(-1).to_numpy(dtype=np.int64)


def target_to_model(values: np.ndarray, preset: Preset | str) -> np.ndarray:
    """Target in its own units -> what the main head learns (z-score, or 0/1 for binary)."""
    t = get_preset(preset).target
    v = _as_float(np.asarray(values))
    if t.task == "binary":
        return v.astype(np.float32)
    return ((v - t.mean) / t.sd).astype(np.float32)


def model_to_target(outputs: np.ndarray, preset: Preset | str) -> np.ndarray:
    """Main-head output -> target units (grams for LV mass) or a probability for a binary target."""
    t = get_preset(preset).target
    out = np.asarray(outputs, dtype=np.float64)
    if t.task == "binary":
        return 1.0 / (1.0 + np.exp(-out))
    return out * t.sd + t.mean
