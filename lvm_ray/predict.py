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

from lvm_ray.lvh import LVHConfig, derive
from lvm_ray.model import LoadedCheckpoint, LVMNet, load_checkpoint, read_payload
from lvm_ray.presets import Preset, model_to_target, prepare_covariates, prepare_input
from lvm_ray.rules import RulesConfig, measure_batch

#: Covariate columns the predictor reads from the metadata that travels with each ECG.
COVARIATE_INPUTS = ("age", "sex", "height_cm", "weight_kg", "bsa_m2", "bmi")


def select_device(use_gpu: bool | None = None) -> torch.device:
    """CUDA when available (or asked for), else the CPU."""
    if use_gpu or (use_gpu is None and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("a GPU was requested but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def model_version(payload: Mapping[str, Any]) -> str:
    """A stable identity for a checkpoint: package version, preset, epoch and a weights digest."""
    digest = hashlib.sha256()
    for name, tensor in sorted(payload["model_state"].items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).numpy().tobytes())
    epoch = payload.get("epoch")
    return f"{payload.get('package_version')}/{payload.get('preset_name')}/epoch{epoch}/{digest.hexdigest()[:12]}"


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

    @classmethod
    def from_checkpoint(cls, url: str, use_gpu: bool | None = None, expected_preset: str | None = None) -> Predictor:
        device = select_device(use_gpu)
        loaded: LoadedCheckpoint = load_checkpoint(url, expected_preset=expected_preset, map_location=device)
        payload = loaded.payload
        summary = {
            "epoch": payload.get("epoch"),
            "metrics": payload.get("metrics", {}),
            "split": {k: v for k, v in payload.get("split", {}).items() if not isinstance(v, (list, dict))},
            "package_version": payload.get("package_version"),
            # Where the weights came from (training run, or an imported Keras file and its sha256).
            "provenance": payload.get("provenance", {}),
        }
        return cls(loaded.model, loaded.preset, model_version(payload), device, training_summary=summary)

    @classmethod
    def checkpoint_version(cls, url: str) -> str:
        return model_version(read_payload(url))

    @property
    def target_column(self) -> str:
        return self.preset.target.column

    @torch.inference_mode()
    def model_outputs(self, ecg: np.ndarray, covariates: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw forward pass: (main output in target units or probability, LVH probability or None)."""
        n = len(ecg)
        x = torch.from_numpy(prepare_input(ecg, self.preset)).to(self.device)
        cov = prepare_covariates(covariates, n, self.preset)
        cov_t = torch.from_numpy(cov).to(self.device) if cov.shape[1] else None
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.model(x, cov_t)
        main = model_to_target(out.main.float().cpu().numpy(), self.preset)
        lvh_prob = None
        if out.lvh_logits is not None:
            lvh_prob = torch.softmax(out.lvh_logits.float(), dim=-1)[:, 1].cpu().numpy()
        return main, lvh_prob

    def predict(self, ecg: np.ndarray, metadata: Mapping[str, Any]) -> pd.DataFrame:
        """Predictions for canonical int16 ECGs [n, 12, 5000] with their metadata columns.

        ``metadata`` maps column names (ecg_id, age, sex, height_cm, weight_kg, bsa_m2, ...) to
        arrays of length n; missing covariates are allowed. Returns one row per ECG.
        """
        n = len(ecg)
        main, lvh_prob = self.model_outputs(ecg, metadata)
        frame = pd.DataFrame({"ecg_id": np.asarray(metadata.get("ecg_id", np.arange(n).astype(str)), dtype=object)})
        sex = _column(metadata, "sex", n, object)
        if self.preset.target.task == "regression" and self.target_column == "lv_mass_g":
            sizes = {c: metadata.get(c) for c in ("height_cm", "weight_kg", "bsa_m2", "sex")}
            derived = derive({**sizes, "lv_mass_pred_g": main}, self.lvh_config, mass_column="lv_mass_pred_g", n=n)
            frame["lv_mass_pred_g"] = main
            frame["lvmi_pred"] = derived["lvmi"].to_numpy()
            frame["lvh_pred"] = derived["lvh"].to_numpy()
        elif self.preset.target.task == "regression":
            frame[f"{self.target_column}_pred"] = main
        else:
            frame[f"{self.target_column}_prob"] = main
        if lvh_prob is not None:
            frame["lvh_prob"] = lvh_prob
        rules = measure_batch(ecg, list(sex), self.rules_config)
        frame = pd.concat([frame, rules.reset_index(drop=True)], axis=1)
        frame["model_preset"] = self.preset.name
        frame["model_version"] = self.version
        return frame


def _column(metadata: Mapping[str, Any], name: str, n: int, kind: type) -> np.ndarray:
    values = metadata.get(name)
    if values is None:
        return np.full(n, np.nan if kind is float else None, dtype=kind)
    arr = np.asarray(values, dtype=object)
    if kind is float:
        return np.array([np.nan if v is None or (isinstance(v, float) and np.isnan(v)) else float(v) for v in arr])
    return arr
