"""Why the model said what it said: integrated gradients of the predicted LV mass over the ECG.

Method: integrated gradients (IG; Sundararajan, Taly & Yan, "Axiomatic attribution for deep
networks", ICML 2017), computed with captum. IG satisfies *completeness*: the attributions of
one ECG sum to prediction(ECG) - prediction(baseline), so every sample's value is a share, in
grams, of how far this ECG's prediction lies from the baseline's.

Baseline: the flat ECG at 0 uV. The canonical ECG is referenced to its isoelectric line (0 uV
is "no cardiac activity"), and the model's normalisation (``uV / scale_uv``, no offset, see
:func:`lvm_ray.presets.prepare_input`) maps 0 uV to 0, so the baseline is the isoelectric line
both in microvolts and in model units: attributions then answer "what in this waveform, as
opposed to no waveform at all, drove the prediction". Covariates (age, sex, BMI for presets that
use them) are held at the ECG's own values and not attributed.

Attributions are computed with respect to the *canonical* input (12 leads x 5000 samples at
500 Hz, in uV), not the preset's model input: :func:`canonical_input_module` is
``prepare_input`` written in torch (the anti-aliased polyphase decimation is a strided FIR
convolution, checked against scipy's on first use), so the gradient flows through the
decimation and a 100 Hz preset's attribution lands on the 500 Hz samples each input sample was
made from, with completeness intact.

The explained output is the main head in target units: grams for LV mass (z-score x sd + mean),
the logit for a binary target. ``lead_share`` is each lead's share of sum |attribution|.

Explanations are waveform-shaped data: like waveforms, they never go to a log. No Ray here.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lvm_ray.presets import Preset, get_preset, prepare_covariates, prepare_input
from lvm_ray.schema import LEADS, N_LEADS, N_SAMPLES, SAMPLE_RATE_HZ
from lvm_ray.signals import decimation_taps

if TYPE_CHECKING:  # matplotlib only for figures; the predictor for its type
    from matplotlib.figure import Figure

    from lvm_ray.predict import Predictor

METHOD = "integrated_gradients"
BASELINE = "flat ECG at 0 uV (the isoelectric line; 0 in model units)"
#: Gauss-Legendre steps of the path integral. On the lvm-cpu demo model the attributions then
#: sum to the prediction's distance from the baseline within about 3% (median 0.5 g); 64 steps
#: halve that at twice the cost. Each explanation reports its own error (``delta``).
DEFAULT_STEPS = 32
#: Rows (ECGs x steps) per forward/backward pass inside captum: bounds memory, not results.
DEFAULT_INTERNAL_BATCH = 64
#: Parquet of an explanations folder, and its marker (lvm_ray.store.OUTPUT_MARKERS).
ATTRIBUTIONS_DIR = "attributions"
FIGURES_DIR = "figures"
SUMMARY_FILE = "_explanations.json"
ATTRIBUTION_TYPE = pa.fixed_shape_tensor(pa.float32(), [N_LEADS, N_SAMPLES])
#: The endpoint returns at most this many points per lead (bins of whole samples, summed).
MAX_POINTS_PER_LEAD = 500


class ExplainError(ValueError):
    """An explanation cannot be made (bad input, a model output that is not explainable)."""


# --------------------------------------------------------------------------------------------
# prepare_input in torch
# --------------------------------------------------------------------------------------------


class CanonicalInput(nn.Module):
    """``presets.prepare_input`` in torch: canonical uV float [n, 12, 5000] -> the preset's model input."""

    def __init__(self, preset: Preset | str) -> None:
        super().__init__()
        spec = get_preset(preset).input
        self.decimation = spec.decimation
        self.n_samples = spec.n_samples
        self.scale = float(spec.scale_uv)
        if self.decimation > 1:
            taps, left = decimation_taps(self.decimation)
            self.left = left
            self.right = max(0, len(taps) - 1 - left)
            self.register_buffer("taps", torch.from_numpy(taps).view(1, 1, -1).repeat(N_LEADS, 1, 1))

    def forward(self, uv: torch.Tensor) -> torch.Tensor:
        x = uv
        if self.decimation > 1:
            x = F.conv1d(F.pad(x, (self.left, self.right)), self.taps, stride=self.decimation, groups=N_LEADS)
        return x[..., : self.n_samples] / self.scale


@functools.lru_cache(maxsize=8)
def _checked(preset_input: Any) -> None:
    """Once per input spec: the torch path must reproduce prepare_input (a scipy change would show here)."""
    preset = Preset(name="check", description="", input=preset_input)
    rng = np.random.default_rng(0)
    probe = rng.integers(-3000, 3000, size=(2, N_LEADS, N_SAMPLES)).astype(np.int16)
    expected = prepare_input(probe, preset)
    got = CanonicalInput(preset)(torch.from_numpy(probe.astype(np.float32))).numpy()
    error = float(np.abs(got - expected).max())
    if not error <= 1e-4 * max(1.0, float(np.abs(expected).max())):
        raise ExplainError(f"the torch input path differs from prepare_input by {error:.3g}; explanations are off")


def canonical_input_module(preset: Preset | str) -> CanonicalInput:
    """The checked torch version of :func:`lvm_ray.presets.prepare_input` for ``preset``."""
    p = get_preset(preset)
    _checked(p.input)
    return CanonicalInput(p)


class _ExplainedOutput(nn.Module):
    """Canonical ECG (uV) -> the main head in target units: what the attributions explain."""

    def __init__(self, model: nn.Module, preset: Preset) -> None:
        super().__init__()
        self.prepare = canonical_input_module(preset)
        self.model = model
        regression = preset.target.task == "regression"
        self.scale = float(preset.target.sd) if regression else 1.0
        self.offset = float(preset.target.mean) if regression else 0.0

    def forward(self, uv: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        # captum expands the covariates over the integration steps as it does the ECG.
        out = self.model(self.prepare(uv), covariates)
        return out.main.float() * self.scale + self.offset


# --------------------------------------------------------------------------------------------
# Attributions
# --------------------------------------------------------------------------------------------


@dataclass
class Explanation:
    """Attributions of n ECGs on the canonical grid, in the explained output's units."""

    attribution: np.ndarray  # float32 [n, 12, 5000]
    lead_share: np.ndarray  # float64 [n, 12], each row sums to 1
    output: np.ndarray  # float64 [n]: the explained output for the ECG (float32 path)
    baseline_output: np.ndarray  # float64 [n]: the same for the flat (0 uV) ECG, same covariates
    delta: np.ndarray  # float64 [n]: sum(attribution) - (output - baseline_output), captum's error
    units: str  # 'g' (LV mass) or the target's unit / 'logit'
    n_steps: int = DEFAULT_STEPS

    def __len__(self) -> int:
        return len(self.output)


def lead_shares(attribution: np.ndarray) -> np.ndarray:
    """Each lead's share of sum |attribution| ([n, 12] rows summing to 1; equal shares if all zero)."""
    a = np.abs(np.asarray(attribution, dtype=np.float64))
    per_lead = a.sum(axis=-1)
    total = per_lead.sum(axis=-1, keepdims=True)
    equal = np.full_like(per_lead, 1.0 / per_lead.shape[-1])
    return np.where(total > 0, per_lead / np.where(total > 0, total, 1.0), equal)


def _units(preset: Preset) -> str:
    if preset.target.task != "regression":
        return "logit"
    return "g" if preset.target.column.endswith("_g") else preset.target.column


def attribute(
    model: nn.Module,
    preset: Preset | str,
    ecg: np.ndarray,
    metadata: Mapping[str, Any] | None = None,
    *,
    n_steps: int = DEFAULT_STEPS,
    internal_batch_size: int = DEFAULT_INTERNAL_BATCH,
    device: torch.device | str = "cpu",
) -> Explanation:
    """Integrated gradients of ``model``'s main output for canonical int16 ECGs [n, 12, 5000] (or one [12, 5000]).

    ``metadata`` holds the covariate columns the preset uses (held fixed). Runs in float32 (no
    autocast: gradients need the precision) with the model in eval mode.
    """
    from captum.attr import IntegratedGradients

    p = get_preset(preset)
    x = np.asarray(ecg)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1:] != (N_LEADS, N_SAMPLES):
        raise ExplainError(f"expected canonical waveforms [n, {N_LEADS}, {N_SAMPLES}], got {tuple(np.shape(ecg))}")
    if n_steps < 2:
        raise ExplainError(f"n_steps must be at least 2, got {n_steps}")
    n = len(x)
    if n == 0:
        empty = np.zeros(0)
        return Explanation(
            np.zeros((0, N_LEADS, N_SAMPLES), np.float32),
            np.zeros((0, N_LEADS)),
            empty,
            empty,
            empty,
            _units(p),
            n_steps,
        )
    was_training = model.training
    model.eval()
    explained = _ExplainedOutput(model, p).to(device)
    uv = torch.from_numpy(x.astype(np.float32)).to(device)
    cov = prepare_covariates(metadata or {}, n, p)
    cov_t = torch.from_numpy(cov).to(device) if cov.shape[1] else None
    try:
        ig = IntegratedGradients(explained)
        # internal_batch_size counts expanded rows (ECGs x steps); captum needs at least one step
        # of every ECG per pass.
        attributions, delta = ig.attribute(
            uv,
            baselines=0.0,
            additional_forward_args=(cov_t,),
            n_steps=n_steps,
            method="gausslegendre",
            internal_batch_size=max(internal_batch_size, n),
            return_convergence_delta=True,
        )
        with torch.no_grad():
            output = explained(uv, cov_t).double().cpu().numpy()
            baseline = explained(torch.zeros_like(uv), cov_t).double().cpu().numpy()
    finally:
        model.train(was_training)
    attribution = attributions.detach().float().cpu().numpy()
    return Explanation(
        attribution=attribution,
        lead_share=lead_shares(attribution),
        output=output,
        baseline_output=baseline,
        delta=delta.detach().double().cpu().numpy(),
        units=_units(p),
        n_steps=n_steps,
    )


def explain(
    predictor: Predictor,
    ecg: np.ndarray,
    metadata: Mapping[str, Any] | None = None,
    *,
    n_steps: int = DEFAULT_STEPS,
    internal_batch_size: int = DEFAULT_INTERNAL_BATCH,
) -> Explanation:
    """:func:`attribute` for a loaded :class:`lvm_ray.predict.Predictor` (its model, preset and device)."""
    # ``network``: the model, or an ensemble's members averaged (what the ensemble predicts).
    network = getattr(predictor, "network", predictor.model)
    return attribute(
        network,
        predictor.preset,
        ecg,
        metadata,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        device=predictor.device,
    )


def downsample(attribution: np.ndarray, max_points: int = MAX_POINTS_PER_LEAD) -> tuple[np.ndarray, int]:
    """[12, 5000] -> ([12, m] sums over bins of whole samples, samples per bin), m <= max_points.

    Sums, not means: the points still add up to the ECG's total attribution (completeness).
    """
    a = np.asarray(attribution, dtype=np.float64)
    if max_points < 1:
        raise ExplainError(f"max_points must be positive, got {max_points}")
    step = max(1, math.ceil(a.shape[-1] / max_points))
    pad = (-a.shape[-1]) % step
    if pad:
        a = np.concatenate([a, np.zeros((*a.shape[:-1], pad))], axis=-1)
    return a.reshape(*a.shape[:-1], -1, step).sum(axis=-1), step


# --------------------------------------------------------------------------------------------
# Truth checks (used by the tests on synthetic cohorts, and usable on any model)
# --------------------------------------------------------------------------------------------


def window_mask(onsets: Sequence[int], width_samples: int, n_samples: int = N_SAMPLES) -> np.ndarray:
    """Boolean [n_samples]: True inside [onset, onset + width) of every onset."""
    mask = np.zeros(n_samples, dtype=bool)
    for onset in onsets:
        lo = max(0, int(onset))
        hi = min(n_samples, int(onset) + int(width_samples))
        if hi > lo:
            mask[lo:hi] = True
    return mask


def share_inside(attribution: np.ndarray, mask: np.ndarray) -> float:
    """Share of sum |attribution| ([12, T]) at the time samples where ``mask`` ([T]) is True."""
    a = np.abs(np.asarray(attribution, dtype=np.float64)).sum(axis=0)
    total = a.sum()
    return float(a[mask].sum() / total) if total > 0 else float("nan")


def top_fraction_mask(attribution: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean like ``attribution``: the ``fraction`` of samples with the largest |attribution|."""
    a = np.abs(np.asarray(attribution)).reshape(-1)
    k = max(1, int(round(fraction * a.size)))
    mask = np.zeros(a.size, dtype=bool)
    mask[np.argpartition(-a, k - 1)[:k]] = True
    return mask.reshape(np.shape(attribution))


# --------------------------------------------------------------------------------------------
# Arrow: the explanations table
# --------------------------------------------------------------------------------------------


def attribution_array(attribution: np.ndarray) -> pa.ExtensionArray:
    """float32 [n, 12, 5000] -> Arrow fixed-shape tensor array."""
    a = np.ascontiguousarray(attribution, dtype=np.float32)
    if a.ndim != 3 or a.shape[1:] != (N_LEADS, N_SAMPLES):
        raise ExplainError(f"attributions must be [n, {N_LEADS}, {N_SAMPLES}], got {a.shape}")
    storage = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), N_LEADS * N_SAMPLES)
    return pa.ExtensionArray.from_storage(ATTRIBUTION_TYPE, storage)


def attribution_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The attribution column -> float32 [n, 12, 5000]."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            return np.zeros((0, N_LEADS, N_SAMPLES), dtype=np.float32)
        column = column.combine_chunks()
    flat = column.storage.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(len(column), N_LEADS, N_SAMPLES)


#: Prediction columns carried into an explanations table, with fixed types (batches must agree).
CARRIED_PREDICTIONS = pa.schema(
    [
        pa.field("lv_mass_pred_g", pa.float64()),
        pa.field("lvmi_pred", pa.float64()),
        pa.field("lvh_pred", pa.bool_()),
        pa.field("model_version", pa.string()),
    ]
)


def explanation_table(
    predictions: pd.DataFrame,
    explanation: Explanation,
    ecg: np.ndarray | None = None,
    n_steps: int = DEFAULT_STEPS,
) -> pa.Table:
    """One row per ECG: ecg_id, attribution, lead_share, the prediction (:data:`CARRIED_PREDICTIONS`
    of ``predictions``, rows of Predictor.predict), the baseline's output, the completeness error
    and (when given) the waveform explained, so that figures can be drawn from the table alone."""
    from lvm_ray import store

    n = len(explanation)
    if len(predictions) != n:
        raise ExplainError(f"{len(predictions)} prediction rows for {n} explanations")
    columns: dict[str, pa.Array] = {
        "ecg_id": pa.array([str(i) for i in predictions["ecg_id"]], type=pa.string()),
        "attribution": attribution_array(explanation.attribution),
        "lead_share": pa.array(list(explanation.lead_share), type=pa.list_(pa.float64(), N_LEADS)),
    }
    for field in CARRIED_PREDICTIONS:
        if field.name in predictions:
            frame = predictions[[field.name]].reset_index(drop=True)
            columns[field.name] = store.frame_to_arrow(frame, known_types=CARRIED_PREDICTIONS).column(0)
        else:
            columns[field.name] = pa.nulls(n, field.type)
    columns["baseline_pred"] = pa.array(explanation.baseline_output, type=pa.float64())
    columns["explained_output"] = pa.array(explanation.output, type=pa.float64())
    columns["completeness_error"] = pa.array(explanation.delta, type=pa.float64())
    columns["units"] = pa.array([explanation.units] * n, type=pa.string())
    columns["n_steps"] = pa.array([n_steps] * n, type=pa.int32())
    if ecg is not None:
        columns["ecg"] = store.waveform_array(np.asarray(ecg, dtype=np.int16))
    return pa.table(columns)


def read_explanations(out: str, with_arrays: bool = True) -> tuple[pd.DataFrame, np.ndarray | None, np.ndarray | None]:
    """An explanations folder -> (scalar columns, attributions [n, 12, 5000], waveforms [n, 12, 5000] or None)."""
    import posixpath

    import pyarrow.parquet as pq

    from lvm_ray import store

    fs, root = store.filesystem(store.join_url(out, ATTRIBUTIONS_DIR))
    paths = sorted(fs.glob(posixpath.join(root, "*.parquet"))) if fs.exists(root) else []
    if not paths:
        raise store.StoreError(f"no explanations in {out}; run `lvm-ray explain` first")
    tables = []
    for path in paths:
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    table = pa.concat_tables(tables)
    scalar = [n for n in table.column_names if n not in ("attribution", "ecg", "lead_share")]
    frame = table.select(scalar).to_pandas()
    frame["lead_share"] = [np.asarray(v, dtype=float) for v in table.column("lead_share").to_pylist()]
    if not with_arrays:
        return frame, None, None
    attributions = attribution_numpy(table.column("attribution"))
    ecg = store.ecg_array(table.column("ecg")) if "ecg" in table.column_names else None
    return frame, attributions, ecg


def figure_file_name(ecg_id: str) -> str:
    """A safe, unique PNG name for an ECG (ecg_ids of ingested data are paths)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(ecg_id)).strip("._")[:80] or "ecg"
    return f"{stem}-{hashlib.sha256(str(ecg_id).encode()).hexdigest()[:8]}.png"


# --------------------------------------------------------------------------------------------
# Figures: a printed 12-lead ECG with the attribution as a colour band
# --------------------------------------------------------------------------------------------

_GRID_MINOR = "#fbe1e1"
_GRID_MAJOR = "#f0b0b0"


def _paper(ax: Any, seconds: float, half: float) -> None:
    """ECG paper: 40 ms x 0.1 mV small squares, 200 ms x 0.5 mV large ones (two line collections:
    thousands of separate grid lines would make each figure take seconds)."""
    from matplotlib.collections import LineCollection

    small_x = np.arange(0.0, seconds + 1e-9, 0.04)
    small_y = np.arange(-half, half + 1e-9, 0.1)
    for xs, ys, colour, width in (
        (small_x, small_y, _GRID_MINOR, 0.25),
        (small_x[::5], np.arange(-half, half + 1e-9, 0.5), _GRID_MAJOR, 0.6),
    ):
        segments = [((x, -half), (x, half)) for x in xs] + [((0.0, y), (seconds, y)) for y in ys]
        ax.add_collection(LineCollection(segments, colors=colour, linewidths=width, zorder=1))


def _smooth(a: np.ndarray, samples: int) -> np.ndarray:
    """Moving average over ``samples`` (about 20 ms): a band readable at print resolution."""
    kernel = np.ones(samples) / samples
    return np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="same"), -1, a)


def ecg_figure(
    ecg: np.ndarray,
    attribution: np.ndarray,
    *,
    title: str = "",
    lead_share: np.ndarray | None = None,
    units: str = "g",
) -> Figure:
    """The 12 leads, 10 s each, on ECG paper (1 mm = 40 ms and 0.1 mV; 25 mm/s, 10 mm/mV), with the
    attribution behind each trace: red where the sample pushed the prediction up, blue down."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    wave = np.asarray(ecg, dtype=np.float64) / 1000.0  # mV
    wave = wave - np.median(wave, axis=-1, keepdims=True)  # centre each lead on its isoelectric level
    band = _smooth(np.asarray(attribution, dtype=np.float64), max(1, SAMPLE_RATE_HZ // 50))
    limit = float(np.quantile(np.abs(band), 0.999)) or 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
    half = max(1.0, float(np.ceil(2 * np.quantile(np.abs(wave), 0.999))) / 2)  # mV, in 0.5 mV steps
    seconds = wave.shape[-1] / SAMPLE_RATE_HZ
    t = np.arange(wave.shape[-1]) / SAMPLE_RATE_HZ
    fig = Figure(figsize=(11.0, 0.62 * N_LEADS * half + 1.2))
    axes = fig.subplots(N_LEADS, 1, sharex=True)
    image = None
    for j, ax in enumerate(axes):
        image = ax.imshow(
            band[j][None, :],
            aspect="auto",
            cmap="RdBu_r",
            norm=norm,
            extent=(0.0, seconds, -half, half),
            alpha=0.75,
            interpolation="nearest",
            zorder=0,
        )
        _paper(ax, seconds, half)
        ax.plot(t, wave[j], color="black", lw=0.6, zorder=3)
        ax.set_xlim(0, seconds)
        ax.set_ylim(-half, half)
        ax.tick_params(which="both", length=0, labelleft=False, labelbottom=False)
        label = LEADS[j] + (f"  {100 * lead_share[j]:.0f}%" if lead_share is not None else "")
        ax.text(0.004, 0.88, label, transform=ax.transAxes, fontsize=8, va="top", weight="bold", zorder=4)
        for side in ax.spines.values():
            side.set_visible(False)
    axes[-1].tick_params(labelbottom=True)
    axes[-1].set_xticks(np.arange(0, seconds + 1e-9, 1.0))
    axes[-1].set_xlabel("Time (s); paper 25 mm/s, 10 mm/mV (small squares 40 ms x 0.1 mV)")
    fig.subplots_adjust(left=0.02, right=0.9, top=0.95 if title else 0.98, bottom=0.06, hspace=0.0)
    if title:
        fig.suptitle(title, fontsize=10)
    cax = fig.add_axes((0.915, 0.3, 0.012, 0.4))
    bar = fig.colorbar(image, cax=cax)
    bar.set_label(f"attribution ({units} per sample, 20 ms mean)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return fig


def save_png(fig: Figure, dpi: int = 110) -> bytes:
    """A Figure rendered with the Agg canvas (no pyplot, safe in any thread) as PNG bytes."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# The report's examples
# --------------------------------------------------------------------------------------------

EXAMPLE_LABELS = ("highest", "median", "lowest")


def example_ids(predictions: pd.DataFrame) -> list[str]:
    """ecg_ids of the highest, median and lowest predicted LVMI (LV mass where LVMI is unknown)."""
    column = "lvmi_pred" if "lvmi_pred" in predictions and predictions["lvmi_pred"].notna().any() else "lv_mass_pred_g"
    values = pd.to_numeric(predictions[column], errors="coerce")
    frame = predictions.assign(_v=values).dropna(subset=["_v"]).sort_values(["_v", "ecg_id"], ascending=[False, True])
    if frame.empty:
        return []
    ordered = frame["ecg_id"].astype(str).tolist()
    picks = [ordered[0], ordered[(len(ordered) - 1) // 2], ordered[-1]]
    return list(dict.fromkeys(picks))  # fewer than three ECGs: no repeats


def example_figures(out: str) -> list[tuple[str, str, Figure, str]]:
    """(figure id, alt text, Figure, caption) of the highest, median and lowest predicted LVMI in an
    explanations folder (what the report shows)."""
    frame, attributions, ecg = read_explanations(out)
    if ecg is None:
        raise ExplainError(f"the explanations in {out} carry no waveforms to draw")
    column = "lvmi_pred" if "lvmi_pred" in frame and frame["lvmi_pred"].notna().any() else "lv_mass_pred_g"
    chosen = example_ids(frame)
    position = {i: k for k, i in enumerate(frame["ecg_id"].astype(str))}
    figures = []
    for label, ecg_id in zip(EXAMPLE_LABELS, chosen, strict=False):
        k = position[ecg_id]
        row = frame.iloc[k]
        units = str(row.get("units", "g"))
        lvmi = row.get("lvmi_pred")
        lvmi_text = f", LVMI {lvmi:.1f} g/m\u00b2" if lvmi is not None and np.isfinite(lvmi) else ""
        title = f"{label.capitalize()} predicted {'LVMI' if column == 'lvmi_pred' else 'LV mass'}: {ecg_id}"
        fig = ecg_figure(ecg[k], attributions[k], title=title, lead_share=row["lead_share"], units=units)
        top = np.argsort(row["lead_share"])[::-1][:3]
        leads = ", ".join(f"{LEADS[j]} {100 * row['lead_share'][j]:.0f}%" for j in top)
        caption = (
            f"{title}. Predicted LV mass {row['lv_mass_pred_g']:.0f} g{lvmi_text}; baseline (flat ECG) "
            f"{row['baseline_pred']:.0f} {units}. Red: samples that raised the prediction, blue: lowered it "
            f"(integrated gradients, {int(row.get('n_steps', DEFAULT_STEPS))} steps). Leads with the largest "
            f"share of |attribution|: {leads}."
        )
        figures.append(
            (f"fig-explain-{label}", f"12-lead ECG of the {label} predicted LVMI with attributions", fig, caption)
        )
    return figures


__all__ = [
    "ATTRIBUTIONS_DIR",
    "BASELINE",
    "DEFAULT_STEPS",
    "FIGURES_DIR",
    "MAX_POINTS_PER_LEAD",
    "METHOD",
    "SUMMARY_FILE",
    "CanonicalInput",
    "ExplainError",
    "Explanation",
    "attribute",
    "attribution_array",
    "attribution_numpy",
    "canonical_input_module",
    "downsample",
    "ecg_figure",
    "example_figures",
    "example_ids",
    "explain",
    "explanation_table",
    "figure_file_name",
    "lead_shares",
    "read_explanations",
    "save_png",
    "share_inside",
    "top_fraction_mask",
    "window_mask",
]
