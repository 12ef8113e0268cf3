"""Stage `calibrate`: fit a run's prediction intervals and calibrated LVH probability on labelled ECGs.

Ray Data streams DATA through the run's Predictor (``lvm_ray.train.split_predictions``, the
same actors the test-split evaluation uses); :func:`lvm_ray.conformal.fit_calibration` fits the
Mondrian conformal predictive system on (predicted, CMR LV mass, sex, BSA); RUN/model.pt is
rewritten with it in ``payload["calibration"]`` (atomically; weights, preset and model_version
unchanged). ``train`` calls :func:`calibrate_after_training` on the validation split;
``lvm-ray calibrate`` recalibrates any run, an imported Keras one included, on a labelled
dataset (a new site's data, or the run's own validation split).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lvm_ray import __version__, store
from lvm_ray.conformal import DEFAULT_LEVEL, CalibrationError, check_level, fit_calibration, min_calibration_size
from lvm_ray.model import MODEL_FILE, CheckpointError, read_payload, write_calibration
from lvm_ray.presets import Preset
from lvm_ray.runs import SPLIT_FILE, columns_present
from lvm_ray.splits import SPLITS, ids_in_split

log = logging.getLogger(__name__)

#: The target a conformal calibration is defined for (log ratios of grams; LVH from LVMI).
CALIBRATED_TARGET = "lv_mass_g"


class CalibrateError(ValueError):
    """The run or the data cannot be calibrated (the message names the problem)."""


def calibrates(preset: Preset) -> bool:
    """Whether a model of ``preset`` gets prediction intervals (an LV mass regression)."""
    return preset.target.column == CALIBRATED_TARGET and preset.target.task == "regression"


@dataclass
class CalibrateResult:
    run: str
    model_path: str
    model_version: str
    data: str
    split: str | None
    level: float
    n_ecgs: int
    n_by_group: dict[str, int]
    calibration: dict[str, Any]
    seconds: float

    def summary(self) -> str:
        groups = ", ".join(f"{name} {n}" for name, n in self.n_by_group.items())
        short = [name for name, n in self.n_by_group.items() if n < min_calibration_size(self.level)]
        lines = [
            f"calibrate -> {self.model_path}",
            f"  model        : {self.model_version} (weights unchanged)",
            f"  calibrated on: {self.data} ({self.split or 'all labelled rows'}): {self.n_ecgs} ECGs ({groups})",
            f"  intervals    : {100 * self.level:g}% by default (score --interval-level changes it); "
            f"calibration {self.calibration['id']}",
            f"  time         : {self.seconds:.1f} s",
        ]
        if short:
            lines.append(
                f"warning: too few calibration ECGs in {', '.join(short)} for {100 * self.level:g}% intervals "
                f"(at least {min_calibration_size(self.level)} needed): those ECGs get no interval"
            )
        return "\n".join(lines)


def _dataset_ids(data: str) -> set[str]:
    return {str(i) for table in store.iter_shards(data, columns=["ecg_id"]) for i in table.column("ecg_id").to_pylist()}


def _rows_to_use(run: str, data: str, split: str | None) -> tuple[frozenset[str] | None, str | None]:
    """The ecg_ids of DATA to calibrate on (None: all) and the split's name; refuses training rows."""
    split_url = store.join_url(run, SPLIT_FILE)
    if split is None:
        if store.exists(split_url):
            training = ids_in_split(store.read_parquet(split_url), "train")
            overlap = len(training & _dataset_ids(data))
            if overlap:
                raise CalibrateError(
                    f"{data} holds {overlap} ECGs of {run}'s training split: intervals calibrated on them would "
                    "be too narrow; pass --split val, or calibrate on data the model never saw"
                )
        return None, None
    if split not in SPLITS or split == "train":
        choices = ", ".join(s for s in SPLITS if s != "train")
        raise CalibrateError(f"--split must be one of {choices} (never the training split), got {split!r}")
    if not store.exists(split_url):
        raise CalibrateError(
            f"--split {split} needs {split_url} (a run made by `lvm-ray train`); "
            "for another run calibrate on all labelled rows of a dataset it never saw"
        )
    ids = ids_in_split(store.read_parquet(split_url), split)
    if not ids & _dataset_ids(data):
        raise CalibrateError(f"{run}'s split does not cover {data}: none of its {len(ids)} {split} ECGs is in it")
    return frozenset(ids), split


def calibrate(
    run: str,
    data: str,
    *,
    split: str | None = None,
    level: float = DEFAULT_LEVEL,
    address: str | None = None,
    loader: Callable[[], Any] | None = None,
    stage: str = "calibrate",
    verbose: bool = False,
    predictions: Mapping[str, np.ndarray] | None = None,
) -> CalibrateResult:
    """Fit the conformal calibration of RUN's model on the labelled ECGs of DATA and store it in RUN/model.pt.

    ``split``: calibrate only on that split of RUN/split.parquet ('val', 'test'); default: every
    labelled row of DATA (refused if DATA holds the run's training rows). ``level``: the default
    interval level stored with it (scoring may choose another). ``predictions``: the model's
    :func:`lvm_ray.train.split_predictions` on those rows when the caller already has them (``train``
    predicts its validation and test splits in one read); otherwise DATA is read here. Everything
    that can be checked without Ray is checked first (CalibrateError, CheckpointError, StoreError).
    """
    from lvm_ray.predict import model_version
    from lvm_ray.ray_utils import ensure_connected
    from lvm_ray.train import rows_of, split_predictions

    started = time.time()
    level = check_level(level)
    model_url = store.join_url(run, MODEL_FILE)
    payload = read_payload(model_url)
    preset = Preset.from_dict(payload["preset"])
    if not calibrates(preset):
        raise CalibrateError(
            f"{run} predicts {preset.target.column} ({preset.target.task}); intervals are calibrated for LV mass models"
        )
    store.read_manifest(data)  # a missing dataset is named before Ray starts
    if CALIBRATED_TARGET not in columns_present(data):
        raise CalibrateError(f"{data} has no {CALIBRATED_TARGET} column: calibration needs CMR LV mass labels")
    ids, split = _rows_to_use(run, data, split)
    version = model_version(payload)
    if predictions is None:
        ensure_connected(address, verbose=verbose)
        arrays = split_predictions(model_url, data, ids, address=address, loader=loader)
    else:  # only the rows chosen above, whatever else the caller predicted
        arrays = rows_of(predictions, ids)
    provenance = {
        "stage": stage,
        "data": data,
        "split": split or "all labelled rows",
        "run": run,
        "model_version": version,
        "package_version": __version__,
    }
    try:
        calibration = fit_calibration(
            arrays["pred"], arrays["true"], arrays["sex"], arrays["bsa_m2"], level=level, provenance=provenance
        )
    except CalibrationError as exc:
        raise CalibrateError(f"{data}: {exc}") from exc
    write_calibration(model_url, calibration.to_payload())
    if model_version(read_payload(model_url)) != version:  # the weights must come back bit for bit
        raise CheckpointError(f"rewriting {model_url} changed its weights; restore it from RUN/ray")
    _refresh_model_card(run)
    log.info("calibrated %s on %d ECGs of %s", version, calibration.provenance["n_ecgs"], data)
    return CalibrateResult(
        run=run,
        model_path=model_url,
        model_version=version,
        data=data,
        split=split,
        level=level,
        n_ecgs=int(calibration.provenance["n_ecgs"]),
        n_by_group=dict(calibration.provenance["n_by_group"]),
        calibration=calibration.summary(),
        seconds=time.time() - started,
    )


def _refresh_model_card(run: str) -> None:
    """Rewrite RUN's model card when it has one, so the file states the calibration now in the checkpoint.

    (During `train` there is none yet: train writes it once, after calibrating.)
    """
    from lvm_ray.modelcard import CARD_JSON, write_model_card

    if store.exists(store.join_url(run, CARD_JSON)):
        write_model_card(run)


def calibrate_after_training(
    run: str, data: str, address: str | None = None, predictions: Mapping[str, np.ndarray] | None = None
) -> dict[str, Any] | None:
    """The end of ``train``: calibrate the best model on the validation split; its summary, or None.

    Models of another target have no intervals; a validation split without usable labels is
    logged, not fatal (the run is still usable, and `lvm-ray calibrate` can add them later).
    ``predictions``: the model's predictions of (at least) the validation split, when at hand.
    """
    payload = read_payload(store.join_url(run, MODEL_FILE))
    if not calibrates(Preset.from_dict(payload["preset"])):
        return None
    try:
        result = calibrate(run, data, split="val", address=address, stage="train", predictions=predictions)
    except CalibrateError as exc:
        log.warning("no prediction intervals for %s: %s", run, exc)
        return None
    return result.calibration


__all__ = ["CalibrateError", "CalibrateResult", "calibrate", "calibrate_after_training", "calibrates"]
