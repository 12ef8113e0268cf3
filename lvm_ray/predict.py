"""The one prediction path: canonical ECGs + covariates -> LV mass, LVMI, LVH, voltage rules.

Batch scoring (``lvm_ray.score``) and the online endpoint (``lvm_ray.serve``) both call
:meth:`Predictor.predict`, so the same ECG gets the same answer from either. No Ray here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from lvm_ray.conformal import Calibration, CalibrationError, check_level
from lvm_ray.lvh import LVHConfig, derive
from lvm_ray.model import (
    ENSEMBLE_KEY,
    CheckpointError,
    LoadedCheckpoint,
    LVMNet,
    MeanOfMembers,
    load_checkpoint,
    member_states,
    read_payload,
)
from lvm_ray.presets import Preset, model_to_target, prepare_covariates, prepare_input
from lvm_ray.rules import RulesConfig, measure_batch

#: Covariate columns the predictor reads from the metadata that travels with each ECG.
COVARIATE_INPUTS = ("age", "sex", "height_cm", "weight_kg", "bsa_m2", "bmi")
#: The columns a calibration adds (null for an uncalibrated checkpoint): the interval bounds, its
#: level and P(CMR LVH) from the conformal predictive distribution (lvm_ray.conformal).
INTERVAL_COLUMNS = ("lv_mass_pred_lo_g", "lv_mass_pred_hi_g", "interval_level", "lvh_prob_calibrated")


def select_device(use_gpu: bool | None = None) -> torch.device:
    """CUDA when available (or asked for), else the CPU."""
    if use_gpu or (use_gpu is None and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("a GPU was requested but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def model_version(payload: Mapping[str, Any]) -> str:
    """A stable identity for a checkpoint: package version, preset, epoch and a weights digest.

    An ensemble's is derived from all its members' weights, in order, and says ``ensemble<K>``.
    """
    digest = hashlib.sha256()
    for state in member_states(payload):
        for name, tensor in sorted(state.items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).numpy().tobytes())
    epoch = payload.get("epoch")
    label = f"ensemble{len(member_states(payload))}" if payload.get(ENSEMBLE_KEY) else f"epoch{epoch}"
    return f"{payload.get('package_version')}/{payload.get('preset_name')}/{label}/{digest.hexdigest()[:12]}"


def spread_column(preset: Preset) -> str:
    """The column of an ensemble's spread (SD over its members, per ECG) of the main output."""
    if preset.target.task == "regression" and preset.target.column == "lv_mass_g":
        return "lv_mass_pred_sd_g"
    return f"{preset.target.column}_{'pred' if preset.target.task == 'regression' else 'prob'}_sd"


@dataclass
class Predictor:
    """A loaded model plus everything needed to turn its output into the prediction columns."""

    model: LVMNet
    preset: Preset
    version: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    lvh_config: LVHConfig = field(default_factory=LVHConfig)
    rules_config: RulesConfig = field(default_factory=RulesConfig)
    training_summary: dict[str, Any] = field(default_factory=dict)
    #: The conformal calibration stored in the checkpoint (None: intervals and lvh_prob_calibrated are null).
    calibration: Calibration | None = None
    #: Interval level used when predicting (None: the calibration's own, 0.9 unless set otherwise).
    interval_level: float | None = None
    #: An ensemble's networks (``model`` is the first): outputs are their mean (probabilities for a
    #: binary target), with the members' SD per ECG in extra columns. Empty: ``model`` alone.
    members: list[LVMNet] = field(default_factory=list)

    @classmethod
    def from_checkpoint(
        cls,
        url: str,
        use_gpu: bool | None = None,
        expected_preset: str | None = None,
        interval_level: float | None = None,
    ) -> Predictor:
        if interval_level is not None:
            interval_level = check_level(interval_level)
        device = select_device(use_gpu)
        loaded: LoadedCheckpoint = load_checkpoint(url, expected_preset=expected_preset, map_location=device)
        payload = loaded.payload
        version = model_version(payload)
        calibration = checkpoint_calibration(payload, version)
        summary = {
            "epoch": payload.get("epoch"),
            "metrics": payload.get("metrics", {}),
            "split": {k: v for k, v in payload.get("split", {}).items() if not isinstance(v, (list, dict))},
            "package_version": payload.get("package_version"),
            # Where the weights came from (training run, or an imported Keras file and its sha256).
            "provenance": payload.get("provenance", {}),
            # Which data the intervals were calibrated on, how many ECGs (None: not calibrated).
            "calibration": calibration.summary() if calibration else None,
        }
        if loaded.members:  # an ensemble: its size and each member's best epoch and validation metrics
            ensemble = payload[ENSEMBLE_KEY]
            summary["ensemble"] = {
                "kind": ensemble.get("kind"),
                "size": len(loaded.members),
                "members": [{"epoch": m.get("epoch"), "metrics": m.get("metrics", {})} for m in ensemble["members"]],
            }
        return cls(
            loaded.model,
            loaded.preset,
            version,
            device,
            training_summary=summary,
            calibration=calibration,
            interval_level=interval_level,
            members=loaded.members,
        )

    @classmethod
    def checkpoint_version(cls, url: str) -> str:
        return model_version(read_payload(url))

    @property
    def target_column(self) -> str:
        return self.preset.target.column

    @property
    def network(self) -> torch.nn.Module:
        """The model as one network: ``model``, or for an ensemble the mean of its members (for explanations)."""
        return MeanOfMembers(self.members) if self.members else self.model

    @property
    def level(self) -> float | None:
        """The interval level of this predictor's intervals (None when the checkpoint is uncalibrated)."""
        if self.calibration is None:
            return None
        return self.interval_level if self.interval_level is not None else self.calibration.level

    @torch.inference_mode()
    def member_outputs(
        self, ecg: np.ndarray, covariates: Mapping[str, Any]
    ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Each network's (main output in target units or probability, LVH probability or None).

        One entry per ensemble member (one for a single model); the input is prepared once.
        """
        n = len(ecg)
        x = torch.from_numpy(prepare_input(ecg, self.preset)).to(self.device)
        cov = prepare_covariates(covariates, n, self.preset)
        cov_t = torch.from_numpy(cov).to(self.device) if cov.shape[1] else None
        mains: list[np.ndarray] = []
        lvh_probs: list[np.ndarray] = []
        for network in self.members or [self.model]:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                out = network(x, cov_t)
            mains.append(model_to_target(out.main.float().cpu().numpy(), self.preset))
            if out.lvh_logits is not None:
                lvh_probs.append(torch.softmax(out.lvh_logits.float(), dim=-1)[:, 1].cpu().numpy())
        return mains, lvh_probs or None

    def model_outputs(self, ecg: np.ndarray, covariates: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        """Forward pass: (main output in target units or probability, LVH probability or None).

        An ensemble gives its members' mean (of grams, or of probabilities); one model its own output.
        """
        return _mean_outputs(*self.member_outputs(ecg, covariates))

    def predict(self, ecg: np.ndarray, metadata: Mapping[str, Any], rules: bool = True) -> pd.DataFrame:
        """Predictions for canonical int16 ECGs [n, 12, 5000] with their metadata columns.

        ``metadata`` maps column names (ecg_id, age, sex, height_cm, weight_kg, bsa_m2, ...) to
        arrays of length n; missing covariates are allowed. Returns one row per ECG.
        ``rules=False`` leaves out the voltage-rule columns (:data:`lvm_ray.rules.MEASURE_COLUMNS`):
        batch scoring that reuses a rules table, or skips the rules, does not pay for measuring them.
        """
        n = len(ecg)
        member_main, member_lvh = self.member_outputs(ecg, metadata)
        main, lvh_prob = _mean_outputs(member_main, member_lvh)
        frame = pd.DataFrame({"ecg_id": np.asarray(metadata.get("ecg_id", np.arange(n).astype(str)), dtype=object)})
        sex = _column(metadata, "sex", n, object)
        if self.preset.target.task == "regression" and self.target_column == "lv_mass_g":
            sizes = {c: metadata.get(c) for c in ("height_cm", "weight_kg", "bsa_m2", "sex")}
            derived = derive({**sizes, "lv_mass_pred_g": main}, self.lvh_config, mass_column="lv_mass_pred_g", n=n)
            frame["lv_mass_pred_g"] = main
            frame["lvmi_pred"] = derived["lvmi"].to_numpy()
            frame["lvh_pred"] = derived["lvh"].to_numpy()
            for name, values in self._intervals(main, sex, derived["bsa_m2"].to_numpy(dtype=float)).items():
                frame[name] = values
        elif self.preset.target.task == "regression":
            frame[f"{self.target_column}_pred"] = main
        else:
            frame[f"{self.target_column}_prob"] = main
        if lvh_prob is not None:
            frame["lvh_prob"] = lvh_prob
        if len(member_main) > 1:  # an ensemble: how much its members disagree on each ECG (sample SD)
            frame[spread_column(self.preset)] = np.std(np.stack(member_main), axis=0, ddof=1)
            if member_lvh is not None:
                frame["lvh_prob_sd"] = np.std(np.stack(member_lvh), axis=0, ddof=1)
        if rules:
            measured = measure_batch(ecg, list(sex), self.rules_config)
            frame = pd.concat([frame, measured.reset_index(drop=True)], axis=1)
        frame["model_preset"] = self.preset.name
        frame["model_version"] = self.version
        return frame

    def _intervals(self, main: np.ndarray, sex: np.ndarray, bsa_m2: np.ndarray) -> dict[str, np.ndarray]:
        """The INTERVAL_COLUMNS: from the calibration when there is one, else NaN (null)."""
        n = len(main)
        if self.calibration is None:
            return {name: np.full(n, np.nan) for name in INTERVAL_COLUMNS}
        level = float(self.level)
        bands = self.calibration.predict(main, sex, bsa_m2, self.lvh_config.thresholds_g_m2, level)
        return {
            "lv_mass_pred_lo_g": bands["lo"],
            "lv_mass_pred_hi_g": bands["hi"],
            "interval_level": np.where(np.isfinite(bands["lo"]), level, np.nan),
            "lvh_prob_calibrated": bands["lvh_prob"],
        }


def checkpoint_calibration(payload: Mapping[str, Any], version: str | None = None) -> Calibration | None:
    """The calibration a checkpoint carries (None if it has none); CheckpointError if unusable.

    A calibration records the model_version it was fitted for: one moved onto other weights is refused.
    """
    stored = payload.get("calibration")
    if not stored:
        return None
    try:
        calibration = Calibration.from_payload(stored)
    except CalibrationError as exc:
        raise CheckpointError(str(exc)) from exc
    fitted_for = calibration.provenance.get("model_version")
    version = version or model_version(payload)
    if fitted_for is not None and fitted_for != version:
        raise CheckpointError(
            f"the checkpoint's calibration was fitted for model {fitted_for}, not these weights ({version}); "
            "run `lvm-ray calibrate` again"
        )
    return calibration


def _mean_outputs(mains: list[np.ndarray], lvh_probs: list[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The members' mean outputs; one member's outputs are returned as they are (bit for bit)."""
    if len(mains) == 1:
        return mains[0], lvh_probs[0] if lvh_probs else None
    return np.mean(np.stack(mains), axis=0), np.mean(np.stack(lvh_probs), axis=0) if lvh_probs else None


def _column(metadata: Mapping[str, Any], name: str, n: int, kind: type) -> np.ndarray:
    values = metadata.get(name)
    if values is None:
        return np.full(n, np.nan if kind is float else None, dtype=kind)
    arr = np.asarray(values, dtype=object)
    if kind is float:
        return np.array([np.nan if v is None or (isinstance(v, float) and np.isnan(v)) else float(v) for v in arr])
    return arr
