"""`lvm-ray import-keras`: the authors' Keras LVM-AI files, proved equivalent to Keras itself.

The released ML4H files are Git LFS objects that cannot be fetched here, so these tests build the
published architecture in Keras 3 (torch backend) the way ML4H's legacy model factory does (Conv1D,
then separate Activation and Dropout layers; dense blocks concatenating [block input, conv 1,
conv 2]; each covariate through its own Dense; two output heads), with random weights scaled so
that predictions spread over tens of grams, save it as .h5, import it, and compare what
lvm_ray.predict.Predictor (what `score` and `serve` call) gives with Keras's own model.predict.
A TF 2.x style file (``kernel:0`` names, nested-list ``inbound_nodes``, ``batch_input_shape``) is
written by hand with h5py from the same weights. The Keras inputs are built here independently of
the importer: ML4H lead order, microvolts / 2000, ML4H's covariate z-scores, sex one-hot [F, M].
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported: no TensorFlow anywhere
keras = pytest.importorskip("keras")
h5py = pytest.importorskip("h5py")

from typer.testing import CliRunner  # noqa: E402

from lvm_ray.cli import app  # noqa: E402
from lvm_ray.keras_import import ImportOptions, KerasImportError, import_keras, read_keras_model  # noqa: E402
from lvm_ray.model import load_checkpoint, read_payload  # noqa: E402
from lvm_ray.predict import Predictor  # noqa: E402
from lvm_ray.presets import get_preset  # noqa: E402
from lvm_ray.schema import LEADS  # noqa: E402
from lvm_ray.synth import generate_batch  # noqa: E402

L = keras.layers
N_ECG = 8
SEED = 5
# ML4H's conventions, stated here independently of lvm_ray.keras_import.
ML4H_ORDER = ("I", "II", "III", "V1", "V2", "V3", "V4", "V5", "V6", "aVF", "aVL", "aVR")
LVM_MEAN, LVM_SD = 89.7, 24.8
AGE, BMI = (63.358, 7.5546), (27.3397, 4.77216)
ECG_IN, AGE_IN, SEX_IN, BMI_IN = (
    "input_ecg_rest_raw_continuous",
    "input_age_2_continuous",
    "input_sex_categorical",
    "input_bmi_21_continuous",
)
LVM_OUT, LVH_OUT = "output_lvm_continuous", "output_lvh_categorical"


def ml4h_model(
    covariates: bool = False,
    dense_layers: tuple[int, ...] = (16, 64),
    order: tuple[str, ...] | None = None,
    n_samples: int = 5000,
    extra_input: bool = False,
    batch_norm: bool = False,
    last_block_kernel: int = 71,
    seed: int = 0,
) -> keras.Model:
    """The published LVM-AI as ML4H's legacy make_multimodal_multitask_model builds it (Keras 3)."""
    keras.utils.set_random_seed(seed)
    ecg = keras.Input((n_samples, 12), name=ECG_IN)
    x = L.Conv1D(32, 71, padding="same")(ecg)  # the "residual" stem: one conv, no Add
    x = L.Activation("relu")(x)
    x = L.SpatialDropout1D(0.1)(x)
    if batch_norm:
        x = L.BatchNormalization()(x)
    x = L.MaxPooling1D(2)(x)
    for i, filters in enumerate((32, 24, 16)):
        connections = [x]
        for j in range(3):
            kernel = last_block_kernel if i == 2 else 71
            x = L.Conv1D(filters, kernel, padding="same")(x)
            x = L.Activation("relu")(x)
            x = L.SpatialDropout1D(0.1)(x)
            if j < 2:  # the block's output is not concatenated
                connections.append(x)
                x = L.Concatenate()(connections[:])
        if i < 2:  # no pooling after the last dense block
            x = L.MaxPooling1D(2)(x)
    encoded = {"ecg": (ecg, x)}
    if covariates:
        specs = [("age", AGE_IN, 32, 1), ("sex", SEX_IN, 2, 2), ("bmi", BMI_IN, 32, 1)]
        if extra_input:
            specs.append(("ldl", "input_ldl_continuous", 32, 1))
        for key, name, width, shape in specs:
            tensor = keras.Input((shape,), name=name)
            h = L.Dense(width)(tensor)
            h = L.Activation("relu")(h)
            h = L.Dropout(0.1)(h)
            encoded[key] = (tensor, h)
    order = order or tuple(encoded)
    flat = [L.Flatten()(encoded[k][1]) for k in order]  # ML4H flattens every encoder output
    y = L.Concatenate()(flat) if len(flat) > 1 else flat[0]
    for k, width in enumerate(dense_layers):
        y = L.Dense(width, name="embed" if k == len(dense_layers) - 1 else None)(y)
        y = L.Activation("relu")(y)
        y = L.Dropout(0.1)(y)
    outputs = [L.Dense(1, name=LVM_OUT)(y)]
    if covariates:
        outputs.append(L.Dense(2, activation="softmax", name=LVH_OUT)(y))
    return keras.Model([encoded[k][0] for k in order], outputs)


def keras_inputs(ecg: np.ndarray, meta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Canonical int16 ECGs + covariates -> what ML4H feeds its Keras model."""
    leads = [LEADS.index(lead) for lead in ML4H_ORDER]
    x = (ecg[:, leads, :].astype(np.float32) / 2000.0).transpose(0, 2, 1)
    male = np.array([s == "M" for s in meta["sex"]], dtype=np.float32)
    return {
        ECG_IN: x,
        AGE_IN: ((meta["age"] - AGE[0]) / AGE[1]).astype(np.float32)[:, None],
        SEX_IN: np.stack([1.0 - male, male], axis=1).astype(np.float32),
        BMI_IN: ((meta["bmi"] - BMI[0]) / BMI[1]).astype(np.float32)[:, None],
    }


def keras_predict(model: keras.Model, ecg: np.ndarray, meta: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    inputs = keras_inputs(ecg, meta)
    out = model.predict({t.name: inputs[t.name] for t in model.inputs}, verbose=0, batch_size=len(ecg))
    out = out if isinstance(out, list) else [out]
    return tuple(np.asarray(o, dtype=np.float64) for o in out)


def spread_heads(model: keras.Model, ecg: np.ndarray, meta: dict[str, np.ndarray]) -> None:
    """Random weights give nearly constant outputs: rescale the heads so predictions spread widely."""
    outs = keras_predict(model, ecg, meta)
    head = model.get_layer(LVM_OUT)
    kernel, bias = head.get_weights()
    z = outs[0][:, 0] - bias[0]
    scale = 1.5 / z.std()  # ~37 g SD
    head.set_weights([kernel * scale, np.array([-scale * z.mean()], dtype=np.float32)])
    if len(outs) > 1:
        lvh = model.get_layer(LVH_OUT)
        kernel, bias = lvh.get_weights()
        logit = np.log(outs[1][:, 1] / outs[1][:, 0]) - (bias[1] - bias[0])
        scale = 2.0 / logit.std()
        lvh.set_weights([kernel * scale, np.array([scale * logit.mean() / 2, -scale * logit.mean() / 2], "float32")])


def metadata(table, sexes=None) -> dict[str, np.ndarray]:
    sex = np.asarray(table["sex"], dtype=object) if sexes is None else np.asarray(sexes, dtype=object)
    return {
        "ecg_id": np.asarray(table["ecg_id"], dtype=object),
        "age": np.asarray(table["age"], dtype=np.float64),
        "sex": sex,
        "bmi": np.asarray(table["bmi"], dtype=np.float64),
        "height_cm": np.asarray(table["height_cm"], dtype=np.float64),
        "weight_kg": np.asarray(table["weight_kg"], dtype=np.float64),
    }


def keras2_file(keras3_h5: str, out: str, class_name: str = "Functional") -> str:
    """Write a TF 2.x Keras style HDF5 by hand (h5py) from a Keras 3 .h5 of the same model."""
    with h5py.File(keras3_h5, "r") as src:
        config = json.loads(src.attrs["model_config"])
        layers = []
        for layer in config["config"]["layers"]:
            cfg = {k: v for k, v in layer["config"].items() if k != "optional"}
            if layer["class_name"] == "InputLayer":
                cfg["batch_input_shape"] = cfg.pop("batch_shape")
            cfg["dtype"] = "float32"
            nodes = []
            for node in layer["inbound_nodes"]:
                refs: list[list] = []

                def collect(v, refs=refs):
                    if isinstance(v, dict) and v.get("class_name") == "__keras_tensor__":
                        name, node_index, tensor_index = v["config"]["keras_history"]
                        refs.append([name, node_index, tensor_index, {}])
                    elif isinstance(v, list):
                        for item in v:
                            collect(item)

                collect(node["args"])
                nodes.append(refs)
            layers.append(
                {"class_name": layer["class_name"], "config": cfg, "name": layer["name"], "inbound_nodes": nodes}
            )

        def ends(v):
            return [v] if v and isinstance(v[0], str) else v

        tf2 = {
            "class_name": class_name,
            "config": {
                "name": "model_1",
                "layers": layers,
                "input_layers": ends(config["config"]["input_layers"]),
                "output_layers": ends(config["config"]["output_layers"]),
            },
            "keras_version": "2.4.0",
            "backend": "tensorflow",
        }
        with h5py.File(out, "w") as dst:
            dst.attrs["keras_version"] = b"2.4.0"
            dst.attrs["backend"] = b"tensorflow"
            dst.attrs["model_config"] = json.dumps(tf2).encode()
            dst.attrs["training_config"] = json.dumps({"loss": "logcosh"}).encode()
            weights = dst.create_group("model_weights")
            weights.attrs["layer_names"] = np.array([layer["name"].encode() for layer in layers])
            weights.attrs["backend"] = b"tensorflow"
            weights.attrs["keras_version"] = b"2.4.0"
            for layer in layers:
                name = layer["name"]
                group = weights.create_group(name)
                names = [
                    n.decode() if isinstance(n, bytes) else n for n in src["model_weights"][name].attrs["weight_names"]
                ]
                tf_names = [f"{name}/{n.rsplit('/', 1)[-1]}:0" for n in names]
                group.attrs["weight_names"] = np.array([n.encode() for n in tf_names])
                for keras3_name, tf_name in zip(names, tf_names, strict=True):
                    group.create_dataset(tf_name, data=np.asarray(src["model_weights"][name][keras3_name]))
            dst.create_group("optimizer_weights").create_dataset("iter:0", data=np.int64(1000))
    return out


# --- fixtures: the two published variants, each with Keras's own predictions -------------------------


@pytest.fixture(scope="module")
def cohort():
    batch = generate_batch(N_ECG, SEED)
    return batch.ecg, batch.table


@pytest.fixture(scope="module")
def ecg_only(cohort, tmp_path_factory):
    ecg, table = cohort
    meta = metadata(table)
    model = ml4h_model(covariates=False, seed=1)
    spread_heads(model, ecg, meta)
    path = str(tmp_path_factory.mktemp("keras") / "ecg_rest_raw_lvm_asymmetric_loss.h5")
    model.save(path)  # Keras 3 legacy HDF5
    (z,) = keras_predict(keras.saving.load_model(path, compile=False), ecg, meta)
    return path, z[:, 0] * LVM_SD + LVM_MEAN, None


@pytest.fixture(scope="module")
def with_covariates(cohort, tmp_path_factory):
    """ECG + age, sex, BMI -> LV mass and LVH; predictions for the cohort as it is and with sex flipped."""
    ecg, table = cohort
    meta = metadata(table)
    flipped = metadata(table, ["F" if s == "M" else "M" for s in table["sex"]])
    both_ecg = np.concatenate([ecg, ecg])
    both = {k: np.concatenate([meta[k], flipped[k]]) for k in meta}
    model = ml4h_model(covariates=True, dense_layers=(32, 64), seed=2)
    spread_heads(model, both_ecg, both)
    path = str(tmp_path_factory.mktemp("keras") / "ecg_rest_raw_age_sex_bmi_lvm_asymmetric_loss.h5")
    model.save(path)
    z, lvh = keras_predict(keras.saving.load_model(path, compile=False), both_ecg, both)
    return path, z[:, 0] * LVM_SD + LVM_MEAN, lvh[:, 1]


def ours(run: str, ecg: np.ndarray, meta: dict[str, np.ndarray]):
    return Predictor.from_checkpoint(run, use_gpu=False).predict(ecg, meta)


def assert_spread(grams: np.ndarray) -> None:
    # Random weights could make every prediction the same; then equality would prove nothing.
    assert grams.std() > 15.0 and np.ptp(grams) > 40.0, grams


# --- equivalence ------------------------------------------------------------------------------------


def test_keras3_ecg_only_model_predicts_what_keras_predicts(cohort, ecg_only, tmp_path):
    ecg, table = cohort
    path, keras_grams, _ = ecg_only
    result = import_keras(path, str(tmp_path / "run"))
    assert_spread(keras_grams)
    pred = ours(str(tmp_path / "run"), ecg, metadata(table))
    np.testing.assert_allclose(pred.lv_mass_pred_g.to_numpy(), keras_grams, atol=0.05, rtol=0)
    assert "lvh_prob" not in pred
    # The published ECG-only network is exactly our lvm-ai-2021 preset's network.
    assert result.preset.input_compatible(get_preset("lvm-ai-2021"))
    prov = read_payload(str(tmp_path / "run"))["provenance"]
    assert prov["format_variant"] == "keras-3-legacy-h5" and prov["source_file"] == os.path.basename(path)
    assert prov["source_sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert prov["constants"]["ecg_lead_order"] == list(ML4H_ORDER) and prov["constants"]["ecg_divide_uv_by"] == 2000


def test_keras3_covariate_model_predicts_what_keras_predicts(cohort, with_covariates, tmp_path):
    ecg, table = cohort
    path, keras_grams, keras_lvh = with_covariates
    run = str(tmp_path / "run")
    result = import_keras(path, run)
    assert result.preset.covariate_names == ("age", "sex", "bmi") and result.preset.lvh_head
    assert result.preset.arch.covariate_widths == (32, 2, 32) and result.preset.arch.dense_units == (32, 64)
    assert_spread(keras_grams)
    assert keras_lvh.std() > 0.1, keras_lvh
    # The covariates matter: flipping sex moves Keras's predictions (so the sex wiring is tested).
    assert np.abs(keras_grams[:N_ECG] - keras_grams[N_ECG:]).mean() > 1.0
    flipped = ["F" if s == "M" else "M" for s in table["sex"]]
    for half, meta in ((slice(0, N_ECG), metadata(table)), (slice(N_ECG, None), metadata(table, flipped))):
        pred = ours(run, ecg, meta)
        np.testing.assert_allclose(pred.lv_mass_pred_g.to_numpy(), keras_grams[half], atol=0.05, rtol=0)
        np.testing.assert_allclose(pred.lvh_prob.to_numpy(), keras_lvh[half], atol=1e-3, rtol=0)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["kind"] == "keras-import" and record["status"] == "finished"
    assert record["provenance"]["inputs"] == {"ecg": ECG_IN, "age": AGE_IN, "sex": SEX_IN, "bmi": BMI_IN}
    assert record["provenance"]["outputs"] == {"lv_mass": LVM_OUT, "lvh": LVH_OUT}


@pytest.mark.parametrize("class_name", ["Functional", "Model"])
def test_hand_built_keras2_files_read_the_same(cohort, ecg_only, with_covariates, tmp_path, class_name):
    ecg, table = cohort
    for name, (path, keras_grams, keras_lvh) in (("ecg", ecg_only), ("cov", with_covariates)):
        tf2 = keras2_file(path, str(tmp_path / f"{name}_tf2.h5"), class_name)
        with h5py.File(tf2, "r") as f:  # really the TF 2.x dialect
            config = json.dumps(json.loads(f.attrs["model_config"]))
            assert '"batch_input_shape"' in config and "__keras_tensor__" not in config
            assert all(bytes(n).endswith(b":0") for n in f["model_weights"][LVM_OUT].attrs["weight_names"])
        run = str(tmp_path / f"run_{name}")
        result = import_keras(tf2, run)
        assert result.provenance["format_variant"] == "tf-keras-2" and result.provenance["keras_version"] == "2.4.0"
        pred = ours(run, ecg, metadata(table))
        np.testing.assert_allclose(pred.lv_mass_pred_g.to_numpy(), keras_grams[:N_ECG], atol=0.05, rtol=0)
        if keras_lvh is not None:
            np.testing.assert_allclose(pred.lvh_prob.to_numpy(), keras_lvh[:N_ECG], atol=1e-3, rtol=0)


def test_concatenation_order_and_explicit_names(cohort, tmp_path):
    """Covariates before the ECG in the concatenation, unrecognisable input names mapped by hand."""
    ecg, table = cohort
    meta = metadata(table)
    model = ml4h_model(covariates=True, order=("bmi", "sex", "age", "ecg"), seed=3)
    spread_heads(model, ecg, meta)
    path = str(tmp_path / "reordered.h5")
    model.save(path)
    z, lvh = keras_predict(model, ecg, meta)
    # Rename the inputs so that only the explicit mapping can tell them apart.
    with h5py.File(path, "r+") as f:
        text = f.attrs["model_config"]
        for old, new in ((AGE_IN, "input_a"), (SEX_IN, "input_b"), (BMI_IN, "input_c"), (LVH_OUT, "head_two")):
            text = text.replace(f'"{old}"', f'"{new}"')
        f.attrs["model_config"] = text
        f["model_weights"].move(LVH_OUT, "head_two")
    with pytest.raises(KerasImportError, match="cannot tell which covariate input 'input_."):
        read_keras_model(path)
    options = ImportOptions(
        covariate_inputs={"input_a": "age", "input_b": "sex", "input_c": "bmi"}, lvh_output="head_two"
    )
    imported = read_keras_model(path, options)
    assert imported.provenance["concatenation_order"] == ["bmi", "sex", "age", "ecg"]
    run = str(tmp_path / "run")
    import_keras(path, run, options)
    pred = ours(run, ecg, meta)
    np.testing.assert_allclose(pred.lv_mass_pred_g.to_numpy(), z[:, 0] * LVM_SD + LVM_MEAN, atol=0.05, rtol=0)
    np.testing.assert_allclose(pred.lvh_prob.to_numpy(), lvh[:, 1], atol=1e-3, rtol=0)


# --- refusals -------------------------------------------------------------------------------------------


def _write_text(path: str) -> str:
    with open(path, "w") as f:
        f.write("not a model\n")
    return path


def _write_plain_h5(path: str) -> str:
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: _write_text(p), "not an HDF5 file"),
        (lambda p: _write_plain_h5(p), "no model_config attribute: not a Keras model file"),
        (lambda p: ml4h_model(batch_norm=True).save(p), r"expected Conv1D \+ relu, found layer 'batch_normalization'"),
        (lambda p: ml4h_model(covariates=True, extra_input=True).save(p), "input 'input_ldl_continuous'"),
        (lambda p: ml4h_model(n_samples=2500).save(p), r"has shape \(2500, 12\); LVM-AI reads \(5000, 12\)"),
        (lambda p: ml4h_model(last_block_kernel=35).save(p), "kernel sizes differ across the convolutions"),
    ],
    ids=["text", "plain-hdf5", "batch-norm", "extra-input", "short-ecg", "mixed-kernels"],
)
def test_wrong_files_are_refused_and_nothing_is_written(tmp_path, make, message):
    path = str(tmp_path / "model.h5")
    make(path)
    run = tmp_path / "run"
    with pytest.raises(KerasImportError, match=message):
        import_keras(path, str(run))
    assert not run.exists()


def test_run_folder_needs_overwrite_and_cli(ecg_only, tmp_path):
    path = ecg_only[0]
    run = str(tmp_path / "run")
    runner = CliRunner()
    result = runner.invoke(app, ["import-keras", path, "--run", run])
    assert result.exit_code == 0, result.output
    assert "import-keras ->" in result.output and "lvm-ai-2021-keras" in result.output
    first = read_payload(run)["provenance"]["imported_unix"]
    again = runner.invoke(app, ["import-keras", path, "--run", run])
    assert again.exit_code == 2 and "already holds a model; pass --overwrite" in again.output
    with pytest.raises(KerasImportError, match="already holds a model"):
        import_keras(path, run)
    flags = ["--overwrite", "--lvm-mean", "100", "--lvm-sd", "20", "--lead-order", ",".join(LEADS)]
    replaced = runner.invoke(app, ["import-keras", path, "--run", run, *flags])
    assert replaced.exit_code == 0, replaced.output
    loaded = load_checkpoint(run)
    prov = loaded.payload["provenance"]
    assert prov["imported_unix"] > first and prov["constants"]["ecg_lead_order"] == list(LEADS)
    assert (loaded.preset.target.mean, loaded.preset.target.sd) == (100.0, 20.0)
    bad = runner.invoke(app, ["import-keras", str(_write_text(str(tmp_path / "x.h5"))), "--run", str(tmp_path / "r2")])
    assert bad.exit_code == 2 and "error: x.h5 is not an HDF5 file" in bad.output
    assert not (tmp_path / "r2").exists()
    wrong_flag = runner.invoke(app, ["import-keras", path, "--run", str(tmp_path / "r3"), "--covariate", "foo"])
    assert wrong_flag.exit_code == 2 and "NAME=age|sex|bmi" in wrong_flag.output
    leads = runner.invoke(app, ["import-keras", path, "--run", str(tmp_path / "r3"), "--lead-order", "I,II"])
    assert leads.exit_code == 2 and "lead order must name each of the 12 leads" in leads.output


@pytest.mark.slow
def test_lvm_ray_score_end_to_end(cohort, with_covariates, tmp_path, ray_cluster):
    """The imported covariate model through `lvm-ray score` (Ray Data) gives Keras's numbers."""
    from lvm_ray.score import read_predictions
    from lvm_ray.synth import write_cohort

    ecg, table = cohort
    path, keras_grams, keras_lvh = with_covariates
    data = str(tmp_path / "cohort")
    write_cohort(N_ECG, SEED, data, chunk_size=N_ECG)  # the same people as the fixture's ECGs
    run, out = str(tmp_path / "run"), str(tmp_path / "preds")
    runner = CliRunner()
    assert runner.invoke(app, ["import-keras", path, "--run", run]).exit_code == 0
    result = runner.invoke(app, ["score", "--data", data, "--checkpoint", run, "--out", out, "--num-actors", "1"])
    assert result.exit_code == 0, result.output
    preds = read_predictions(out).set_index("ecg_id").loc[list(table["ecg_id"])]
    np.testing.assert_allclose(preds.lv_mass_pred_g.to_numpy(), keras_grams[:N_ECG], atol=0.05, rtol=0)
    np.testing.assert_allclose(preds.lvh_prob.to_numpy(), keras_lvh[:N_ECG], atol=1e-3, rtol=0)


def test_wrong_conventions_change_the_numbers(cohort, with_covariates, tmp_path):
    """The tolerance discriminates: importing with the canonical lead order or the sex units swapped is wrong."""
    ecg, table = cohort
    path, keras_grams, _ = with_covariates
    for name, options in (("leads", ImportOptions(lead_order=LEADS)), ("sex", ImportOptions(sex_one_hot=("M", "F")))):
        run = str(tmp_path / name)
        import_keras(path, run, options)
        off = np.abs(ours(run, ecg, metadata(table)).lv_mass_pred_g.to_numpy() - keras_grams[:N_ECG])
        assert off.max() > 1.0, (name, off)
