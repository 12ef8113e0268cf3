"""Import the authors' published Keras LVM-AI models (ML4H HDF5 files) as ordinary lvm-ray runs.

The three released models (broadinstitute/ml4h, model_zoo/left_ventricular_mass_from_ecg_student_and_mri_teacher)
are Keras HDF5 files built by ML4H's ``make_multimodal_multitask_model``. This module reads such a
file with h5py alone (no TensorFlow, no Keras, no Ray): the architecture from its ``model_config``
attribute, walked as a graph by inbound nodes (layer names and order are never relied on), the
weights from ``model_weights``. It maps both onto the ``lvm-ai-2021`` family
(:class:`lvm_ray.model.LVMNet`) and writes ``RUN/model.pt`` and ``RUN/run.json``, so that
``score``, ``serve``, ``evaluate`` and ``report`` use the imported model unchanged.

What the mapping folds into the weights, so that the imported checkpoint eats canonical input
(leads I, II, III, aVR, aVL, aVF, V1..V6; microvolts / ``scale_uv``) and no stage special-cases it:

- ML4H's lead order (I, II, III, V1..V6, aVF, aVL, aVR) -> the stem convolution's input channels.
- Keras's channels-last Flatten -> the rows of the first Dense layer after it.
- The sex one-hot [female, male] -> a scalar covariate (M = 1, F = 0, standardised with 0.5 / 0.5,
  so that an unknown sex enters as [0.5, 0.5]).

Age and BMI are the preset's covariates with ML4H's z-score constants; the LV mass output is a
z-score, grams = z x ``lvm_sd`` + ``lvm_mean`` (the preset's target). Both Keras dialects are read:
TF 2.x Keras (nested-list ``inbound_nodes``, ``batch_input_shape``, weights ``kernel:0``) and the
Keras 3 legacy .h5 format (``__keras_tensor__`` args, ``batch_shape``, weights ``kernel``).
A file that is not such a model is refused with a :class:`KerasImportError` naming what did not
match, before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import posixpath
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch

from lvm_ray import __version__, store
from lvm_ray.model import MODEL_FILE, LVMNet, build_model, checkpoint_payload, count_parameters, write_payload
from lvm_ray.presets import ArchSpec, CovariateSpec, InputSpec, Preset, TargetSpec
from lvm_ray.schema import LEADS, N_LEADS, N_SAMPLES, SAMPLE_RATE_HZ

#: ML4H's ECG_REST_LEADS: the channel order of the released models' (5000, 12) ECG input.
ML4H_LEADS: tuple[str, ...] = ("I", "II", "III", "V1", "V2", "V3", "V4", "V5", "V6", "aVF", "aVL", "aVR")
#: The covariates an LVM-AI Keras file may take, and the token that names each input by default.
COVARIATES: tuple[str, ...] = ("age", "sex", "bmi")
#: Keras layers that are the identity at inference (ML4H's regularisation layers).
_IDENTITY_LAYERS = frozenset(
    {"Dropout", "SpatialDropout1D", "GaussianDropout", "GaussianNoise", "AlphaDropout", "ActivityRegularization"}
)
_MODEL_CLASSES = frozenset({"Functional", "Model"})
#: How the sex covariate is standardised after folding the one-hot: unknown sex -> z = 0 -> [0.5, 0.5].
_SEX_MEAN, _SEX_SD = 0.5, 0.5
KERAS2 = "tf-keras-2"
KERAS3 = "keras-3-legacy-h5"


class KerasImportError(ValueError):
    """The file is not a Keras LVM-AI model this importer can map (the message names what did not match)."""


@dataclass(frozen=True)
class ImportOptions:
    """How to read the file: which inputs and outputs are which, and ML4H's constants (defaults).

    ``covariate_inputs`` maps a Keras input name to 'age', 'sex' or 'bmi' (otherwise an input is
    recognised by one of those words in its name); ``ecg_input``, ``lvm_output`` and ``lvh_output``
    name layers explicitly when the file's names do not say. ``sex_one_hot`` is the order of the
    sex input's two units ('F', 'M'); ``lvh_positive_class`` the LVH output unit that means LVH.
    """

    ecg_input: str | None = None
    covariate_inputs: Mapping[str, str] = field(default_factory=dict)
    lvm_output: str | None = None
    lvh_output: str | None = None
    lead_order: tuple[str, ...] = ML4H_LEADS
    scale_uv: float = 2000.0
    lvm_mean: float = 89.7
    lvm_sd: float = 24.8
    age_mean: float = 63.358
    age_sd: float = 7.5546
    bmi_mean: float = 27.3397
    bmi_sd: float = 4.77216
    sex_one_hot: tuple[str, str] = ("F", "M")
    lvh_positive_class: int = 1

    def __post_init__(self) -> None:
        if sorted(self.lead_order) != sorted(LEADS) or len(self.lead_order) != N_LEADS:
            raise KerasImportError(
                f"lead order must name each of the {N_LEADS} leads {', '.join(LEADS)} once, "
                f"got {', '.join(self.lead_order)}"
            )
        for name, value in (("scale_uv", self.scale_uv), ("lvm_sd", self.lvm_sd), ("age_sd", self.age_sd)):
            if not value > 0:
                raise KerasImportError(f"{name} must be positive, got {value}")
        if not self.bmi_sd > 0:
            raise KerasImportError(f"bmi_sd must be positive, got {self.bmi_sd}")
        if sorted(self.sex_one_hot) != ["F", "M"]:
            raise KerasImportError(f"sex one-hot order must be F,M or M,F, got {','.join(self.sex_one_hot)}")
        if self.lvh_positive_class not in (0, 1):
            raise KerasImportError(f"the LVH positive class must be unit 0 or 1, got {self.lvh_positive_class}")
        for name, cov in self.covariate_inputs.items():
            if cov not in COVARIATES:
                raise KerasImportError(f"input {name!r} is mapped to {cov!r}; choose one of {', '.join(COVARIATES)}")

    def constants(self) -> dict[str, Any]:
        """The constants an import used (recorded in the checkpoint and run record)."""
        return {
            "ecg_lead_order": list(self.lead_order),
            "ecg_divide_uv_by": self.scale_uv,
            "lv_mass_grams": f"z * {self.lvm_sd} + {self.lvm_mean}",
            "lv_mass_mean_g": self.lvm_mean,
            "lv_mass_sd_g": self.lvm_sd,
            "age_mean": self.age_mean,
            "age_sd": self.age_sd,
            "bmi_mean": self.bmi_mean,
            "bmi_sd": self.bmi_sd,
            "sex_one_hot": list(self.sex_one_hot),
            "lvh_positive_class": self.lvh_positive_class,
        }


# --- reading the file ------------------------------------------------------------------------------


@dataclass
class _Layer:
    name: str
    cls: str
    config: dict[str, Any]
    inputs: list[str]  # producing layers, in call order


@dataclass
class _KerasFile:
    variant: str
    attrs: dict[str, str]
    model_name: str
    layers: dict[str, _Layer]
    inputs: list[str]
    outputs: list[str]
    weights: Any  # the h5py group holding one group per layer


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return str(value)


def _endpoints(value: Any, what: str) -> list[str]:
    """input_layers / output_layers: [[name, 0, 0], ...] or, for one tensor, [name, 0, 0]."""
    if isinstance(value, list) and value and isinstance(value[0], str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, list) and v and isinstance(v[0], str) for v in value):
        raise KerasImportError(f"model_config has unreadable {what}: {str(value)[:80]}")
    for v in value:
        if len(v) > 2 and (v[1], v[2]) != (0, 0):
            raise KerasImportError(f"{what} entry {v[0]!r} refers to node {v[1]}, tensor {v[2]}; expected 0, 0")
    return [v[0] for v in value]


def _keras3_tensors(value: Any, out: list[tuple[str, int, int]]) -> None:
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            history = value.get("config", {}).get("keras_history")
            if not isinstance(history, list) or len(history) < 3:
                raise KerasImportError(f"a __keras_tensor__ has no readable keras_history: {str(value)[:80]}")
            out.append((str(history[0]), int(history[1]), int(history[2])))
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            _keras3_tensors(v, out)


def _inbound(layer: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """(producer layer names, dialect) of one layer's single call."""
    name = layer.get("name") or layer.get("config", {}).get("name")
    nodes = layer.get("inbound_nodes", [])
    if not nodes:
        return [], None
    if len(nodes) > 1:
        raise KerasImportError(f"layer {name!r} is called {len(nodes)} times; shared layers are not part of LVM-AI")
    node = nodes[0]
    refs: list[tuple[str, int, int]] = []
    if isinstance(node, dict):  # Keras 3: {"args": [...tensors...], "kwargs": {...}}
        _keras3_tensors(node.get("args", []), refs)
        dialect = KERAS3
    elif isinstance(node, list):  # TF 2.x: [[name, node_index, tensor_index, kwargs], ...]
        for entry in node:
            if not isinstance(entry, list) or len(entry) < 3 or not isinstance(entry[0], str):
                raise KerasImportError(f"layer {name!r} has an unreadable inbound node: {str(entry)[:80]}")
            refs.append((entry[0], int(entry[1]), int(entry[2])))
        dialect = KERAS2
    else:
        raise KerasImportError(f"layer {name!r} has an unreadable inbound node: {str(node)[:80]}")
    for producer, node_index, tensor_index in refs:
        if (node_index, tensor_index) != (0, 0):
            raise KerasImportError(
                f"layer {name!r} reads output {tensor_index} of call {node_index} of {producer!r}; "
                "LVM-AI layers have one call and one output"
            )
    return [r[0] for r in refs], dialect


def _read_file(h5: Any) -> _KerasFile:
    attrs = {k: _text(v) for k, v in h5.attrs.items() if k in ("keras_version", "backend", "model_config")}
    if "model_config" not in attrs:
        raise KerasImportError(
            "the HDF5 file has no model_config attribute: not a Keras model file "
            "(a weights-only file cannot be imported: its architecture is unknown)"
        )
    try:
        config = json.loads(attrs.pop("model_config"))
    except json.JSONDecodeError as exc:
        raise KerasImportError(f"the file's model_config is not JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("class_name") not in _MODEL_CLASSES:
        got = config.get("class_name") if isinstance(config, dict) else type(config).__name__
        raise KerasImportError(f"model_config describes a {got!r}, not a functional Keras model (Functional/Model)")
    body = config.get("config", {})
    layers: dict[str, _Layer] = {}
    dialects: set[str] = set()
    for raw in body.get("layers", []):
        name = raw.get("name") or raw.get("config", {}).get("name")
        cls = raw.get("class_name")
        if not isinstance(name, str) or not isinstance(cls, str):
            raise KerasImportError(f"model_config has a layer without a name or class: {str(raw)[:80]}")
        if name in layers:
            raise KerasImportError(f"model_config names two layers {name!r}")
        inputs, dialect = _inbound(raw)
        if dialect:
            dialects.add(dialect)
        layers[name] = _Layer(name, cls, dict(raw.get("config", {})), inputs)
    if not layers:
        raise KerasImportError("model_config lists no layers")
    for layer in layers.values():
        for producer in layer.inputs:
            if producer not in layers:
                raise KerasImportError(f"layer {layer.name!r} reads {producer!r}, which the model does not define")
    if len(dialects) > 1:
        raise KerasImportError("model_config mixes TF 2.x and Keras 3 inbound-node formats")
    if "model_weights" not in h5:
        raise KerasImportError("the file has no model_weights group (saved without weights?)")
    variant = dialects.pop() if dialects else (KERAS3 if attrs.get("keras_version", "").startswith("3") else KERAS2)
    return _KerasFile(
        variant=variant,
        attrs=attrs,
        model_name=str(body.get("name", "")),
        layers=layers,
        inputs=_endpoints(body.get("input_layers", []), "input_layers"),
        outputs=_endpoints(body.get("output_layers", []), "output_layers"),
        weights=h5["model_weights"],
    )


def _layer_weights(kf: _KerasFile, name: str) -> dict[str, np.ndarray]:
    """A layer's arrays by short name ('kernel', 'bias'), from 'conv1d/kernel:0' or 'conv1d/kernel'."""
    if name not in kf.weights:
        raise KerasImportError(f"model_weights has no weights for layer {name!r}")
    group = kf.weights[name]
    names = [_text(n) for n in group.attrs.get("weight_names", [])]
    if not names:  # no index: every dataset below the layer's group
        found: list[str] = []
        group.visit(lambda n: found.append(n) if hasattr(group[n], "shape") else None)
        names = found
    out: dict[str, np.ndarray] = {}
    for weight in names:
        short = weight.rsplit("/", 1)[-1].split(":", 1)[0]
        if short in out:
            raise KerasImportError(f"layer {name!r} has two weights called {short!r}")
        try:
            out[short] = np.asarray(group[weight], dtype=np.float32)
        except KeyError:
            raise KerasImportError(f"layer {name!r} lists weight {weight!r} but the file does not hold it") from None
    return out


# --- matching the graph onto LVM-AI ------------------------------------------------------------------


def _activation_name(value: Any) -> str:
    if value is None:
        return "linear"
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # a serialised function or custom object
        return str(value.get("config", {}).get("name") or value.get("class_name") or value)
    return str(value)


def _ints(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


@dataclass(frozen=True)
class _Value:
    """A tensor after looking through identity layers: the layer that computed it and its activation."""

    layer: _Layer
    activation: str

    def describe(self) -> str:
        act = "" if self.activation == "linear" else f" + {self.activation}"
        return f"layer {self.layer.name!r} ({self.layer.cls}{act})"


@dataclass
class _Match:
    ecg_input: str
    stem: _Layer
    blocks: list[list[_Layer]]
    pools: list[_Layer]
    parts: list[tuple[str, _Layer | None]]  # Keras concatenation order: ('ecg', None) or (covariate, its Dense)
    covariate_inputs: dict[str, str]  # covariate -> Keras input name
    hidden: list[_Layer]
    lvm: _Layer
    lvm_output: str
    lvh: _Layer | None
    lvh_output: str | None


class _Matcher:
    def __init__(self, kf: _KerasFile, options: ImportOptions) -> None:
        self.kf, self.options = kf, options

    def single_input(self, layer: _Layer) -> _Layer:
        if len(layer.inputs) != 1:
            raise KerasImportError(f"layer {layer.name!r} ({layer.cls}) has {len(layer.inputs)} inputs, expected 1")
        return self.kf.layers[layer.inputs[0]]

    def value(self, layer: _Layer) -> _Value:
        """Look through Dropout-like layers and fold Activation/ReLU layers into the layer they follow."""
        cls = layer.cls
        if cls in _IDENTITY_LAYERS:
            return self.value(self.single_input(layer))
        if cls in ("Activation", "ReLU"):
            if cls == "ReLU":
                cfg = layer.config
                plain = cfg.get("max_value") is None and not cfg.get("negative_slope") and not cfg.get("threshold")
                if not plain:
                    raise KerasImportError(f"layer {layer.name!r} is a capped or leaky ReLU; LVM-AI uses a plain ReLU")
                act = "relu"
            else:
                act = _activation_name(layer.config.get("activation"))
            inner = self.value(self.single_input(layer))
            if act == "linear":
                return inner
            if inner.activation not in ("linear", act) or (inner.activation == act and act != "relu"):
                raise KerasImportError(f"layer {layer.name!r} applies {act} after {inner.describe()}")
            return _Value(inner.layer, act)
        if cls in ("Conv1D", "Dense"):
            return _Value(layer, _activation_name(layer.config.get("activation")))
        return _Value(layer, "linear")

    def input_value(self, layer: _Layer) -> _Value:
        return self.value(self.single_input(layer))

    def expect(self, value: _Value, cls: str, activation: str, where: str) -> _Layer:
        if value.layer.cls != cls or value.activation != activation:
            act = "" if activation == "linear" else f" + {activation}"
            raise KerasImportError(f"{where}: expected {cls}{act}, found {value.describe()}")
        return value.layer

    # -- the ECG branch, walked backwards from the flattened features

    def conv_value(self, value: _Value, where: str) -> _Layer:
        conv = self.expect(value, "Conv1D", "relu", where)
        cfg = conv.config
        problems = []
        if str(cfg.get("padding", "valid")).lower() != "same":
            problems.append(f"padding {cfg.get('padding')!r} (expected 'same')")
        if _ints(cfg.get("strides", 1)) not in ((1,), ()):
            problems.append(f"strides {cfg.get('strides')}")
        if _ints(cfg.get("dilation_rate", 1)) not in ((1,), ()):
            problems.append(f"dilation {cfg.get('dilation_rate')}")
        if int(cfg.get("groups", 1) or 1) != 1:
            problems.append(f"groups {cfg.get('groups')}")
        if cfg.get("data_format", "channels_last") != "channels_last":
            problems.append(f"data_format {cfg.get('data_format')!r}")
        if len(_ints(cfg.get("kernel_size"))) != 1:
            problems.append(f"kernel_size {cfg.get('kernel_size')}")
        if problems:
            raise KerasImportError(f"Conv1D {conv.name!r} has {', '.join(problems)}; LVM-AI convolutions differ")
        return conv

    def pool(self, value: _Value, where: str) -> _Layer:
        pool = self.expect(value, "MaxPooling1D", "linear", where)
        cfg = pool.config
        size = _ints(cfg.get("pool_size", 2))
        strides = _ints(cfg.get("strides")) or size
        if len(size) != 1 or strides != size or str(cfg.get("padding", "valid")).lower() != "valid":
            raise KerasImportError(
                f"MaxPooling1D {pool.name!r} has pool {cfg.get('pool_size')}, strides {cfg.get('strides')}, "
                f"padding {cfg.get('padding')!r}; LVM-AI pools with stride = size and 'valid' padding"
            )
        if cfg.get("data_format", "channels_last") != "channels_last":
            raise KerasImportError(f"MaxPooling1D {pool.name!r} has data_format {cfg.get('data_format')!r}")
        return pool

    def ecg_branch(self, features: _Value) -> tuple[str, _Layer, list[list[_Layer]], list[_Layer]]:
        blocks: list[list[_Layer]] = []
        pools: list[_Layer] = []
        where = "before the Flatten"
        value = features
        while True:
            conv = self.conv_value(value, where)
            before = self.input_value(conv)
            if before.layer.cls == "InputLayer":
                if not blocks:
                    raise KerasImportError(
                        f"the ECG branch has one convolution ({conv.name!r}); LVM-AI has dense blocks"
                    )
                return before.layer.name, conv, blocks, pools
            block = [conv]
            if before.layer.cls == "Concatenate":
                # A dense block's last conv reads [block input, conv 1, ..., conv k-1].
                parts = [self.value(self.kf.layers[n]) for n in before.layer.inputs]
                self.check_concat_axis(before.layer, rank=3)
                earlier = [
                    self.conv_value(p, f"input {i + 1} of {before.layer.name!r}") for i, p in enumerate(parts[1:])
                ]
                block_input = parts[0]
                for i, c in enumerate(earlier):
                    expected = [block_input, *[_Value(e, "relu") for e in earlier[:i]]]
                    got = self.input_value(c)
                    if got.layer.cls == "Concatenate":
                        self.check_concat_axis(got.layer, rank=3)
                        reads = [self.value(self.kf.layers[n]) for n in got.layer.inputs]
                    else:
                        reads = [got]
                    if reads != expected:
                        raise KerasImportError(
                            f"Conv1D {c.name!r} reads [{', '.join(v.describe() for v in reads)}]; a dense block "
                            f"conv reads [{', '.join(v.describe() for v in expected)}] (block input, earlier convs)"
                        )
                block = [*earlier, conv]
            else:
                block_input = before
            blocks.insert(0, block)
            pool = self.pool(block_input, f"input of the dense block ending in {conv.name!r}")
            pools.insert(0, pool)
            value = self.input_value(pool)
            where = f"before MaxPooling1D {pool.name!r}"

    def check_concat_axis(self, layer: _Layer, rank: int) -> None:
        axis = int(layer.config.get("axis", -1))
        if axis not in (-1, rank - 1):
            raise KerasImportError(f"Concatenate {layer.name!r} joins axis {axis}; LVM-AI joins channels (-1)")

    # -- the head

    def covariate_branch(self, dense: _Layer) -> str:
        source = self.input_value(dense)
        if source.layer.cls != "InputLayer":
            raise KerasImportError(
                f"Dense {dense.name!r} before the concatenation reads {source.describe()}, not a covariate input"
            )
        return source.layer.name

    def features(self, value: _Value) -> tuple[_Value, list[tuple[str, _Layer | None]]]:
        """The concatenation (or lone Flatten) after the ECG branch: ECG features and covariate Dense layers."""
        if value.layer.cls == "Concatenate" and value.activation == "linear":
            self.check_concat_axis(value.layer, rank=2)
            parts = [self.value(self.kf.layers[n]) for n in value.layer.inputs]
        elif value.layer.cls == "Flatten" and value.activation == "linear":
            parts = [value]
        else:
            raise KerasImportError(
                f"before the dense layers: expected Flatten or Concatenate, found {value.describe()}"
            )
        ecg: _Value | None = None
        out: list[tuple[str, _Layer | None]] = []
        for part in parts:
            if part.layer.cls == "Flatten" and part.activation == "linear":
                if part.layer.config.get("data_format", "channels_last") != "channels_last":
                    raise KerasImportError(
                        f"Flatten {part.layer.name!r} is channels_first; ML4H flattens channels-last"
                    )
                inner = self.input_value(part.layer)
                if inner.layer.cls == "Dense":  # ML4H flattens every encoder output; a flat one is unchanged
                    part = inner
                else:
                    if ecg is not None:
                        raise KerasImportError("the model flattens two convolutional branches; LVM-AI has one ECG")
                    ecg = inner
                    out.append(("ecg", None))
                    continue
            if part.layer.cls == "Dense" and part.activation == "relu":
                out.append((self.covariate_branch(part.layer), part.layer))
                continue
            raise KerasImportError(
                f"concatenated input {part.describe()} is neither the flattened ECG nor a covariate Dense + relu"
            )
        if ecg is None:
            raise KerasImportError("no flattened convolutional ECG branch reaches the dense layers")
        return ecg, out

    def outputs(self) -> tuple[str, str | None]:
        outputs = self.kf.outputs
        if not outputs:
            raise KerasImportError("model_config lists no outputs")
        for flag, name in (("LV mass", self.options.lvm_output), ("LVH", self.options.lvh_output)):
            if name is not None and name not in outputs:
                raise KerasImportError(f"{flag} output {name!r} is not an output of the model ({', '.join(outputs)})")

        def kind(name: str) -> str:
            v = self.value(self.kf.layers[name])
            units = int(v.layer.config.get("units", 0)) if v.layer.cls == "Dense" else 0
            if units == 1 and v.activation == "linear":
                return "lvm"
            if units == 2 and v.activation == "softmax":
                return "lvh"
            return v.describe() + (f" with {units} units" if units else "")

        lvm = self.options.lvm_output
        if lvm is None:
            candidates = [o for o in outputs if kind(o) == "lvm" and o != self.options.lvh_output]
            if len(candidates) != 1:
                found = ", ".join(candidates) if candidates else "none"
                raise KerasImportError(
                    f"cannot tell the LV mass output (a 1-unit linear Dense) among {', '.join(outputs)} "
                    f"(found {found}); name it with --lvm-output"
                )
            lvm = candidates[0]
        lvh = self.options.lvh_output
        rest = [o for o in outputs if o not in (lvm, lvh)]
        if lvh is None and rest:
            lvh = rest.pop(0)
        if rest:
            raise KerasImportError(f"output(s) {', '.join(rest)} are neither LV mass nor LVH; LVM-AI has at most two")
        for name, want, label in ((lvm, "lvm", "LV mass"), (lvh, "lvh", "LVH")):
            if name is not None and (got := kind(name)) != want:
                shape = "a 1-unit linear Dense" if want == "lvm" else "a 2-unit softmax Dense"
                raise KerasImportError(f"{label} output {name!r} is {got}; expected {shape}")
        return lvm, lvh

    def match(self) -> _Match:
        lvm_output, lvh_output = self.outputs()
        lvm = self.value(self.kf.layers[lvm_output]).layer
        top = self.input_value(lvm)
        lvh = None
        if lvh_output is not None:
            lvh = self.value(self.kf.layers[lvh_output]).layer
            if self.input_value(lvh) != top:
                raise KerasImportError(
                    f"LVH output {lvh_output!r} reads {self.input_value(lvh).describe()}, not the layer the "
                    f"LV mass output reads ({top.describe()}); LVM-AI's two heads share the last hidden layer"
                )
        hidden: list[_Layer] = []
        value = top
        while value.layer.cls == "Dense":
            hidden.insert(0, self.expect(value, "Dense", "relu", "hidden dense layer"))
            value = self.input_value(value.layer)
        ecg_features, parts = self.features(value)
        ecg_input, stem, blocks, pools = self.ecg_branch(ecg_features)
        # parts name each covariate Dense by its Keras input: turn those into covariate names.
        covariate_inputs = self.name_covariates([kind for kind, layer in parts if layer is not None])
        named = {v: k for k, v in covariate_inputs.items()}
        parts = [(kind if layer is None else named[kind], layer) for kind, layer in parts]
        used = {ecg_input, *covariate_inputs.values()}
        unused = [i for i in self.kf.inputs if i not in used]
        if unused:
            raise KerasImportError(f"input(s) {', '.join(unused)} do not feed LVM-AI's layers; this is another model")
        if self.options.ecg_input is not None and self.options.ecg_input != ecg_input:
            raise KerasImportError(
                f"--ecg-input {self.options.ecg_input!r} is not the input of the convolutions (that is {ecg_input!r})"
            )
        return _Match(ecg_input, stem, blocks, pools, parts, covariate_inputs, hidden, lvm, lvm_output, lvh, lvh_output)

    def name_covariates(self, input_names: Sequence[str]) -> dict[str, str]:
        """Keras covariate inputs -> {'age': name, ...}: explicit mapping first, else a word in the name."""
        out: dict[str, str] = {}
        for name in input_names:
            cov = self.options.covariate_inputs.get(name)
            if cov is None:
                words = set(re.split(r"[^a-z0-9]+", name.lower()))
                found = [c for c in COVARIATES if c in words]
                if len(found) != 1:
                    raise KerasImportError(
                        f"cannot tell which covariate input {name!r} is (age, sex or bmi); "
                        f"map it with --covariate {name}=age|sex|bmi"
                    )
                cov = found[0]
            if cov in out:
                raise KerasImportError(f"inputs {out[cov]!r} and {name!r} are both {cov}")
            out[cov] = name
        return out


# --- building the lvm-ray model ------------------------------------------------------------------------


@dataclass
class ImportedModel:
    """A Keras file mapped onto lvm-ray: the preset, the loaded network and where it came from."""

    preset: Preset
    model: LVMNet
    provenance: dict[str, Any]


def _input_shape(layer: _Layer) -> tuple[int | None, ...]:
    shape = layer.config.get("batch_shape") or layer.config.get("batch_input_shape")
    if not isinstance(shape, list):
        raise KerasImportError(f"input {layer.name!r} declares no batch_shape / batch_input_shape")
    return tuple(None if s is None else int(s) for s in shape)


def _same(values: Sequence[int], what: str, where: str) -> int:
    if len(set(values)) != 1:
        raise KerasImportError(f"{what} differ across {where} ({', '.join(map(str, values))}); the preset has one")
    return values[0]


def _copy(param: torch.nn.Parameter, array: np.ndarray, what: str) -> None:
    if tuple(param.shape) != tuple(array.shape):
        raise KerasImportError(f"{what} has shape {tuple(array.shape)} after mapping, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))


class _Weights:
    def __init__(self, kf: _KerasFile) -> None:
        self.kf = kf

    def get(self, layer: _Layer, dense_or_conv: str) -> tuple[np.ndarray, np.ndarray | None]:
        arrays = _layer_weights(self.kf, layer.name)
        if "kernel" not in arrays:
            raise KerasImportError(f"{dense_or_conv} {layer.name!r} has no kernel in model_weights")
        use_bias = layer.config.get("use_bias", True)
        bias = arrays.get("bias")
        if use_bias and bias is None:
            raise KerasImportError(f"{dense_or_conv} {layer.name!r} uses a bias but model_weights holds none")
        extra = sorted(set(arrays) - {"kernel", "bias"})
        if extra:
            raise KerasImportError(f"{dense_or_conv} {layer.name!r} has weights {', '.join(extra)} LVM-AI does not use")
        return arrays["kernel"], bias

    def conv(self, layer: _Layer, module: torch.nn.Conv1d, channel_order: np.ndarray | None = None) -> None:
        kernel, bias = self.get(layer, "Conv1D")
        if kernel.ndim != 3:
            raise KerasImportError(f"Conv1D {layer.name!r} kernel has shape {kernel.shape}, expected (k, in, out)")
        weight = kernel.transpose(2, 1, 0)  # Keras (k, in, out) -> torch (out, in, k)
        if channel_order is not None:
            if weight.shape[1] != len(channel_order):
                raise KerasImportError(f"Conv1D {layer.name!r} reads {weight.shape[1]} channels, expected {N_LEADS}")
            weight = weight[:, channel_order, :]
        _copy(module.weight, weight, f"Conv1D {layer.name!r} kernel")
        _copy(module.bias, bias if bias is not None else np.zeros(weight.shape[0], np.float32), f"{layer.name!r} bias")

    def dense(self, layer: _Layer, module: torch.nn.Linear, rows: np.ndarray | None = None) -> None:
        kernel, bias = self.get(layer, "Dense")
        if kernel.ndim != 2:
            raise KerasImportError(f"Dense {layer.name!r} kernel has shape {kernel.shape}, expected (in, out)")
        if rows is not None:
            if kernel.shape[0] != len(rows):
                raise KerasImportError(
                    f"Dense {layer.name!r} takes {kernel.shape[0]} features, but the ECG branch and covariates "
                    f"give {len(rows)}"
                )
            kernel = kernel[rows]
        _copy(module.weight, kernel.T, f"Dense {layer.name!r} kernel")
        out = kernel.shape[1]
        _copy(module.bias, bias if bias is not None else np.zeros(out, np.float32), f"Dense {layer.name!r} bias")


def _feature_rows(
    parts: Sequence[tuple[str, int]], covariates: Sequence[str], channels: int, length: int
) -> np.ndarray:
    """Row permutation for the first layer after the concatenation: ours[r] = keras[rows[r]].

    Keras: segments in its concatenation order, the ECG flattened channels-last (t * C + c).
    Ours (LVMNet): the ECG flattened channels-first (c * L + t), then covariates in preset order.
    """
    offsets: dict[str, int] = {}
    at = 0
    for kind, size in parts:
        offsets[kind] = at
        at += size
    c = np.arange(channels)[:, None]
    t = np.arange(length)[None, :]
    rows = [(offsets["ecg"] + t * channels + c).reshape(-1)]
    sizes = dict(parts)
    rows += [offsets[name] + np.arange(sizes[name]) for name in covariates]
    return np.concatenate(rows)


def map_keras_file(h5: Any, options: ImportOptions = ImportOptions()) -> tuple[Preset, LVMNet, dict[str, Any]]:
    """An open h5py file -> (preset, loaded eval-mode LVMNet, what was matched); raises KerasImportError."""
    kf = _read_file(h5)
    m = _Matcher(kf, options).match()

    shape = _input_shape(kf.layers[m.ecg_input])
    if shape[1:] != (N_SAMPLES, N_LEADS):
        raise KerasImportError(
            f"ECG input {m.ecg_input!r} has shape {shape[1:]}; LVM-AI reads ({N_SAMPLES}, {N_LEADS}) "
            f"(10 s at {SAMPLE_RATE_HZ} Hz, time x lead)"
        )
    convs = [m.stem, *[c for block in m.blocks for c in block]]
    kernel = _same([_ints(c.config.get("kernel_size"))[0] for c in convs], "kernel sizes", "the convolutions")
    if kernel % 2 == 0:
        raise KerasImportError(f"the convolutions have an even kernel ({kernel}); 'same' padding needs an odd one")
    pool = _same([_ints(p.config.get("pool_size", 2))[0] for p in m.pools], "pool sizes", "the poolings")
    n_convs = _same([len(b) for b in m.blocks], "convolutions per dense block", "the blocks")
    block_filters = []
    for block in m.blocks:
        filters = [int(c.config["filters"]) for c in block]
        block_filters.append(_same(filters, "filters", f"the dense block ending in {block[-1].name!r}"))
    covariates = [c for c in COVARIATES if c in m.covariate_inputs]
    dense_of = {kind: layer for kind, layer in m.parts if layer is not None}
    widths = [int(dense_of[c].config["units"]) for c in covariates]
    for cov in covariates:
        name = m.covariate_inputs[cov]
        want = 2 if cov == "sex" else 1
        got = _input_shape(kf.layers[name])[1:]
        if got != (want,):
            what = "a one-hot [female, male] of 2" if cov == "sex" else "one value"
            raise KerasImportError(f"{cov} input {name!r} has shape {got}; expected {what}")
    widths_kw: dict[str, Any] = {}
    if widths:  # one width for all covariates when they agree, else one each
        widths_kw = {"covariate_units": widths[0]} if len(set(widths)) == 1 else {"covariate_widths": tuple(widths)}
    arch = ArchSpec(
        kernel_size=kernel,
        stem_filters=int(m.stem.config["filters"]),
        block_filters=tuple(block_filters),
        convs_per_block=n_convs,
        pool_size=pool,
        batch_norm=False,
        head="flatten",
        dense_units=tuple(int(d.config["units"]) for d in m.hidden),
        dropout=0.0,
        **widths_kw,
    )
    spec = {
        "age": CovariateSpec("age", mean=options.age_mean, sd=options.age_sd),
        "sex": CovariateSpec("sex", mean=_SEX_MEAN, sd=_SEX_SD),
        "bmi": CovariateSpec("bmi", mean=options.bmi_mean, sd=options.bmi_sd),
    }
    name = "lvm-ai-2021-keras" + ("-covariates" if covariates else "") + ("-lvh" if m.lvh is not None else "")
    preset = Preset(
        name=name,
        description=(
            "LVM-AI imported from a Keras file of the authors' published architecture (ML4H): "
            f"kernel {kernel}, dense blocks {'/'.join(map(str, block_filters))}, "
            f"Dense {'-'.join(map(str, arch.dense_units))}-1"
            + (f", covariates {', '.join(covariates)}" if covariates else ", ECG only")
            + (", LVH head" if m.lvh is not None else "")
        ),
        input=InputSpec(scale_uv=options.scale_uv),
        arch=arch,
        target=TargetSpec(mean=options.lvm_mean, sd=options.lvm_sd),
        covariates=tuple(spec[c] for c in covariates),
        lvh_head=m.lvh is not None,
    )
    try:
        model = build_model(preset)
    except ValueError as exc:
        raise KerasImportError(f"the file's architecture does not fit the lvm-ai-2021 family: {exc}") from None

    w = _Weights(kf)
    leads = np.array([options.lead_order.index(lead) for lead in LEADS])  # torch channel j <- Keras channel
    w.conv(m.stem, model.stem[0], channel_order=leads)
    for block, module in zip(m.blocks, model.blocks, strict=True):
        for conv, seq in zip(block, module.convs, strict=True):
            w.conv(conv, seq[0])
    length = N_SAMPLES // pool ** len(m.blocks)
    sizes = [
        (kind, block_filters[-1] * length if kind == "ecg" else int(layer.config["units"])) for kind, layer in m.parts
    ]
    rows = _feature_rows(sizes, covariates, block_filters[-1], length)
    for cov, seq in zip(covariates, model.covariate_layers, strict=True):
        layer = dense_of[cov]
        kernel, bias = w.get(layer, "Dense")
        bias = bias if bias is not None else np.zeros(kernel.shape[-1], np.float32)
        if kernel.shape[0] != (2 if cov == "sex" else 1):
            raise KerasImportError(f"Dense {layer.name!r} kernel has shape {kernel.shape} for the {cov} input")
        if cov == "sex":
            # one-hot [f, m] = [1 - s, s] with s = mean + sd * z: fold into a Dense on z.
            female, male = kernel[options.sex_one_hot.index("F")], kernel[options.sex_one_hot.index("M")]
            weight = (_SEX_SD * (male - female))[None, :]
            bias = bias + female + _SEX_MEAN * (male - female)
        else:
            weight = kernel
        _copy(seq[0].weight, weight.T, f"Dense {layer.name!r} kernel")
        _copy(seq[0].bias, bias, f"Dense {layer.name!r} bias")
    linears = [mod for mod in model.hidden if isinstance(mod, torch.nn.Linear)]
    for i, (layer, module) in enumerate(zip(m.hidden, linears, strict=True)):
        w.dense(layer, module, rows=rows if i == 0 else None)
    first = rows if not m.hidden else None  # heads straight on the concatenation read permuted rows too
    w.dense(m.lvm, model.out, rows=first)
    if m.lvh is not None:
        assert model.lvh is not None
        kernel, bias = w.get(m.lvh, "Dense")
        order = [1 - options.lvh_positive_class, options.lvh_positive_class]  # ours: [no LVH, LVH]
        kernel = kernel[first] if first is not None else kernel
        if first is not None and kernel.shape[0] != len(first):
            raise KerasImportError(f"Dense {m.lvh.name!r} takes {kernel.shape[0]} features, expected {len(first)}")
        _copy(model.lvh.weight, kernel[:, order].T, f"Dense {m.lvh.name!r} kernel")
        _copy(model.lvh.bias, (bias if bias is not None else np.zeros(2, np.float32))[order], f"{m.lvh.name!r} bias")
    model.eval()
    matched = {
        "format_variant": kf.variant,
        "keras_version": kf.attrs.get("keras_version"),
        "keras_backend": kf.attrs.get("backend"),
        "keras_model_name": kf.model_name,
        "inputs": {"ecg": m.ecg_input, **{c: m.covariate_inputs[c] for c in covariates}},
        "outputs": {"lv_mass": m.lvm_output, **({"lvh": m.lvh_output} if m.lvh_output else {})},
        "concatenation_order": [kind for kind, _ in m.parts],
        "n_parameters": count_parameters(model),
    }
    return preset, model, matched


def _read_bytes(path: str) -> bytes:
    try:
        with fsspec.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise KerasImportError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise KerasImportError(f"{path} is a folder, not a Keras .h5 file") from None


def read_keras_model(path: str, options: ImportOptions = ImportOptions()) -> ImportedModel:
    """Read and map a Keras HDF5 file (any fsspec URL); nothing is written. Raises KerasImportError."""
    import h5py

    data = _read_bytes(path)
    file_name = posixpath.basename(path.rstrip("/"))
    try:
        h5 = h5py.File(io.BytesIO(data), "r")
    except OSError:
        raise KerasImportError(f"{file_name} is not an HDF5 file (a Keras .h5 model is expected)") from None
    with h5:
        preset, model, matched = map_keras_file(h5, options)
    provenance = {
        "source": "keras-hdf5",
        "source_file": file_name,
        "source_sha256": hashlib.sha256(data).hexdigest(),
        "source_bytes": len(data),
        **matched,
        "constants": options.constants(),
        "imported_by": f"lvm-ray {__version__}",
        "imported_unix": time.time(),
    }
    return ImportedModel(preset, model, provenance)


# --- writing the run ------------------------------------------------------------------------------------


@dataclass
class ImportResult:
    run: str
    model_path: str
    preset: Preset
    provenance: dict[str, Any]

    def summary(self) -> str:
        p = self.provenance
        heads = "LV mass" + (" + LVH probability" if self.preset.lvh_head else "")
        inputs = ", ".join(f"{k}={v}" for k, v in p["inputs"].items())
        return (
            f"import-keras -> {self.run}\n"
            f"  source   : {p['source_file']} (sha256 {p['source_sha256'][:16]}..., {p['format_variant']}, "
            f"Keras {p.get('keras_version') or '?'})\n"
            f"  inputs   : {inputs}\n"
            f"  outputs  : {heads}; grams = z x {p['constants']['lv_mass_sd_g']} + {p['constants']['lv_mass_mean_g']}\n"
            f"  preset   : {self.preset.name} ({p['n_parameters']:,} parameters)\n"
            f"  model    : {self.model_path}"
        )


def import_keras(
    path: str, run: str, options: ImportOptions = ImportOptions(), overwrite: bool = False
) -> ImportResult:
    """Import a Keras LVM-AI file into RUN (RUN/model.pt + RUN/run.json); refuse a wrong file before writing."""
    from lvm_ray.runs import RUN_FILE, TrainError, check_run_folder, load_run_record, remove_run_outputs

    try:
        check_run_folder(run)
    except TrainError as exc:
        raise KerasImportError(str(exc)) from None
    model_url = store.join_url(run, MODEL_FILE)
    if not overwrite and (load_run_record(run) is not None or store.exists(model_url)):
        raise KerasImportError(f"--run {run} already holds a model; pass --overwrite to replace it")
    imported = read_keras_model(path, options)
    if overwrite:
        remove_run_outputs(run)
    write_payload(model_url, checkpoint_payload(imported.model, imported.preset, provenance=imported.provenance))
    record = {
        "package_version": __version__,
        "kind": "keras-import",
        "status": "finished",
        "finished_unix": time.time(),
        "source": path,
        "provenance": imported.provenance,
        "options": store.jsonable(dataclasses.asdict(options)),
        "preset": imported.preset.to_dict(),
        "model_file": MODEL_FILE,
    }
    store.write_json(store.join_url(run, RUN_FILE), record)
    from lvm_ray.modelcard import write_model_card

    write_model_card(run)  # RUN/model_card.md: says plainly that these weights are imported
    return ImportResult(run, model_url, imported.preset, imported.provenance)
