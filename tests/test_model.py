"""The LVM-AI network, its losses, the presets' single preprocessing path, and checkpoints."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import numpy as np
import pytest
import torch

from lvm_ray.model import (
    CheckpointError,
    LVMNet,
    asymmetric_outlier,
    build_model,
    checkpoint_payload,
    count_parameters,
    load_checkpoint,
    logcosh,
    read_payload,
    save_checkpoint,
    total_loss,
    write_payload,
)
from lvm_ray.presets import (
    PRESETS,
    ArchSpec,
    InputSpec,
    Preset,
    get_preset,
    lvh_labels,
    model_to_target,
    prepare_covariates,
    prepare_input,
    preset_names,
    target_to_model,
)
from lvm_ray.schema import N_SAMPLES


def test_published_network_has_about_1_05_million_parameters():
    model = build_model("lvm-ai-2021")
    # Conv 886,328 + Dense(10000->16) 160,016 + Dense(16->64) 1,088 + Dense(64->1) 65.
    assert count_parameters(model) == 1_047_497
    assert count_parameters(model) == pytest.approx(1.05e6, rel=0.01)
    assert model.hidden[0].in_features == 10_000  # flatten 625 x 16
    assert [m.kernel_size[0] for m in model.modules() if isinstance(m, torch.nn.Conv1d)] == [71] * 10
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())


def test_covariate_and_lvh_variants():
    ecg_only = count_parameters(build_model("lvm-ai-2021"))
    with_cov = build_model("lvm-ai-2021-covariates")
    assert with_cov.n_covariates == 3 and count_parameters(with_cov) > ecg_only
    assert with_cov.hidden[0].in_features == 10_000 + 3 * 8
    lvh = build_model("lvm-ai-2021-lvh")
    assert lvh.lvh is not None and lvh.lvh.out_features == 2
    assert get_preset("lvm-ai-2021-lvh").lvh_class_weights == (1.0, 25.0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_forward_shapes(name: str):
    preset = get_preset(name)
    model = build_model(preset).eval()
    x = torch.from_numpy(prepare_input(np.zeros((2, 12, N_SAMPLES), dtype=np.int16), preset))
    cov = torch.from_numpy(prepare_covariates({"age": [50, 70], "sex": ["M", "F"], "bmi": [25, 30]}, 2, preset))
    with torch.no_grad():
        out = model(x, cov if preset.covariates else None)
    assert out.main.shape == (2,)
    assert (out.lvh_logits is not None) == preset.lvh_head
    if out.lvh_logits is not None:
        assert out.lvh_logits.shape == (2, 2)


def test_per_covariate_widths_and_old_presets_unchanged():
    # ML4H's covariate branches differ in width (age 32, sex 2, BMI 32).
    arch = ArchSpec(covariate_widths=(32, 2, 32))
    model = LVMNet(arch, n_covariates=3)
    assert [seq[0].out_features for seq in model.covariate_layers] == [32, 2, 32]
    assert model.hidden[0].in_features == 10_000 + 66
    out = model(torch.zeros(2, 12, N_SAMPLES), torch.zeros(2, 3))
    assert out.main.shape == (2,)
    # Presets and checkpoints written before the field existed read back as the same preset.
    for name in preset_names():
        payload = get_preset(name).to_dict()
        del payload["arch"]["covariate_widths"]
        assert Preset.from_dict(payload) == get_preset(name)
    widened = dataclasses.replace(get_preset("lvm-ai-2021-covariates"), arch=arch)
    assert Preset.from_dict(json.loads(json.dumps(widened.to_dict()))) == widened


def test_cpu_preset_is_small_and_fast_shape():
    preset = get_preset("lvm-cpu")
    assert preset.input.sample_rate_hz == 100 and preset.input.n_samples == 1000
    assert count_parameters(build_model(preset)) < 200_000


def test_logcosh_matches_hand_computation():
    y = torch.tensor([0.0, 0.0, 1.0, 0.0])
    yhat = torch.tensor([1.0, -2.0, 1.0, 100.0])
    expected = [math.log(math.cosh(1.0)), math.log(math.cosh(2.0)), 0.0, 100.0 - math.log(2.0)]
    assert logcosh(y, yhat).tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_asymmetric_outlier_matches_hand_computation():
    y = torch.tensor([3.0, 1.5, 0.0, 1.5])
    yhat = torch.tensor([2.0, 2.5, -1.0, 1.0])
    lc = math.log(math.cosh(1.0))
    lc_half = math.log(math.cosh(0.5))
    expected = [
        lc + 1.0 * (40 * 1 * 1 + 20 * 2 * 1),  # large heart under-predicted: heavily punished
        lc + 1.0 * (5 * 0.5 * 1),  # large heart over-predicted: mildly punished
        lc,  # normal heart: logcosh only
        lc_half + 0.25 * (20 * 0.5 * 0.5),
    ]
    assert asymmetric_outlier(y, yhat).tolist() == pytest.approx(expected, rel=1e-6)
    # It is asymmetric: under-predicting a big heart costs more than over-predicting it.
    assert asymmetric_outlier(torch.tensor([3.0]), torch.tensor([2.0])) > asymmetric_outlier(
        torch.tensor([3.0]), torch.tensor([4.0])
    )


def test_total_loss_adds_weighted_lvh_cross_entropy_and_ignores_unknown():
    preset = get_preset("lvm-ai-2021-lvh")
    from lvm_ray.model import ModelOutput

    out = ModelOutput(torch.zeros(3), torch.zeros(3, 2))
    y = torch.zeros(3)
    base = total_loss(preset, ModelOutput(torch.zeros(3), None), y)
    assert float(base) == pytest.approx(0.0, abs=1e-7)
    # Equal logits: CE = log 2 whatever the class weights; unknown labels (-1) are ignored.
    assert float(total_loss(preset, out, y, torch.tensor([1, 0, -1]))) == pytest.approx(math.log(2), rel=1e-5)
    assert float(total_loss(preset, out, y, torch.tensor([-1, -1, -1]))) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": ArchSpec(kernel_size=70)}, "odd"),
        ({"arch": ArchSpec(kernel_size=0)}, "kernel_size"),
        ({"arch": ArchSpec(stem_filters=0)}, "stem_filters"),
        ({"arch": ArchSpec(block_filters=(32, -1))}, "block_filters"),
        ({"arch": ArchSpec(block_filters=())}, "block_filters"),
        ({"arch": ArchSpec(head="attention")}, "head"),  # type: ignore[arg-type]
        ({"arch": ArchSpec(dropout=1.0)}, "dropout"),
        ({"n_samples": 7, "arch": ArchSpec(kernel_size=3)}, "too short"),
        ({"n_samples": 50}, "longer than the input"),
        ({"n_covariates": -1}, "n_covariates"),
        ({"n_covariates": 3, "arch": ArchSpec(covariate_widths=(4, 4))}, "2 widths for 3 covariates"),
        ({"n_covariates": 1, "arch": ArchSpec(covariate_widths=(0,))}, "covariate width"),
    ],
)
def test_network_validates_its_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LVMNet(**kwargs)


def test_forward_rejects_wrong_input():
    model = build_model("lvm-cpu")
    with pytest.raises(ValueError, match="expected input"):
        model(torch.zeros(2, 12, 5000))
    cov_model = build_model("lvm-ai-2021-covariates")
    with pytest.raises(ValueError, match="covariates"):
        cov_model(torch.zeros(1, 12, 5000))


def test_get_preset_lists_names_on_error():
    with pytest.raises(ValueError, match="lvm-ai-2021.*lvm-cpu"):
        get_preset("nope")
    assert "lvm-ai-2021" in preset_names() and "lvm-cpu" in preset_names()


def test_input_spec_validation():
    with pytest.raises(ValueError, match="divide"):
        InputSpec(sample_rate_hz=300)
    with pytest.raises(ValueError, match="n_samples"):
        InputSpec(sample_rate_hz=100, n_samples=1001)


def test_prepare_input_scales_and_decimates():
    t = np.arange(N_SAMPLES) / 500.0
    wave = (1000 * np.sin(2 * np.pi * 5 * t)).astype(np.int16)
    ecg = np.broadcast_to(wave, (3, 12, N_SAMPLES)).copy()
    ecg[:, 0] = 2000
    published = prepare_input(ecg, "lvm-ai-2021")
    assert published.dtype == np.float32 and published.shape == (3, 12, 5000)
    assert np.allclose(published[:, 0], 1.0)  # microvolts / 2000
    cpu = prepare_input(ecg, "lvm-cpu")
    assert cpu.shape == (3, 12, 1000)
    # A 5 Hz sine survives the anti-aliased 500 -> 100 Hz decimation (uV / 1000).
    t100 = np.arange(1000) / 100.0
    assert np.allclose(cpu[0, 1, 50:-50], np.sin(2 * np.pi * 5 * t100)[50:-50], atol=0.02)
    assert prepare_input(ecg[0], "lvm-cpu").shape == (12, 1000)
    with pytest.raises(ValueError, match="canonical"):
        prepare_input(np.zeros((2, 12, 1000), dtype=np.int16), "lvm-cpu")


def test_covariates_targets_and_lvh_labels():
    preset = get_preset("lvm-ai-2021-covariates")
    table = {"age": [60.0, None], "sex": ["M", "F"], "height_cm": [180.0, np.nan], "weight_kg": [81.0, 70.0]}
    cov = prepare_covariates(table, 2, preset)
    assert cov.shape == (2, 3) and cov.dtype == np.float32
    assert cov[0, 0] == pytest.approx(0.0) and cov[1, 0] == 0.0  # age 60 is the mean; unknown -> 0
    assert cov[0, 1] == pytest.approx(1.0) and cov[1, 1] == pytest.approx(-1.0)  # sex M/F
    assert cov[0, 2] == pytest.approx((81 / 1.8**2 - 27.0) / 4.5, rel=1e-5) and cov[1, 2] == 0.0
    lv = get_preset("lvm-ai-2021")
    z = target_to_model(np.array([89.7, 114.5]), lv)
    assert z.tolist() == pytest.approx([0.0, 1.0])
    assert model_to_target(z, lv).tolist() == pytest.approx([89.7, 114.5])
    labels = lvh_labels(
        {
            "lv_mass_g": [150.0, 100.0, 100.0, np.nan],
            "bsa_m2": [2.0, 2.0, np.nan, 2.0],
            "sex": ["M", "M", "F", "F"],
            "height_cm": [None] * 4,
            "weight_kg": [None] * 4,
        },
        4,
    )
    assert labels.tolist() == [1, 0, -1, -1]  # 75 > 72; 50 < 72; no BSA; no mass


def test_preset_dict_round_trip_and_retarget():
    for name in preset_names():
        preset = get_preset(name)
        assert Preset.from_dict(preset.to_dict()) == preset
    binary = get_preset("lvm-ai-2021-lvh").with_target("lvh", task="binary")
    assert binary.target.loss == "bce" and binary.lvh_head is False
    age = get_preset("lvm-ai-2021").with_target("age", mean=60.0, sd=10.0)
    assert age.target.loss == "logcosh" and age.input_compatible(get_preset("lvm-ai-2021"))
    with pytest.raises(ValueError, match="does not fit"):
        dataclasses.replace(get_preset("lvm-cpu").target, task="binary", loss="logcosh").__post_init__()


def test_checkpoint_round_trip(tmp_path):
    preset = get_preset("lvm-cpu")
    torch.manual_seed(1)
    model = build_model(preset).eval()
    url = str(tmp_path / "run" / "model.pt")
    save_checkpoint(url, model, preset, epoch=3, metrics={"val_loss": 0.5}, split={"column": None})
    loaded = load_checkpoint(str(tmp_path / "run"), expected_preset="lvm-cpu")  # a run directory works
    assert loaded.preset == preset and loaded.payload["epoch"] == 3
    assert loaded.payload["normalisation"]["input_divide_uv_by"] == 1000.0
    assert loaded.package_version == loaded.payload["package_version"]
    x = torch.randn(4, 12, 1000)
    with torch.no_grad():
        assert torch.allclose(model(x).main, loaded.model(x).main)
    assert loaded.payload["provenance"] == {}  # trained here: no foreign source


def test_checkpoint_carries_provenance(tmp_path):
    preset = get_preset("lvm-cpu")
    source = {"source_file": "model.h5", "source_sha256": "ab" * 32, "constants": {"lead_order": ["I", "II"]}}
    save_checkpoint(str(tmp_path / "model.pt"), build_model(preset), preset, provenance=source)
    assert load_checkpoint(str(tmp_path / "model.pt")).payload["provenance"] == source


def test_checkpoint_refuses_mismatches(tmp_path):
    preset = get_preset("lvm-cpu")
    model = build_model(preset)
    url = str(tmp_path / "model.pt")
    save_checkpoint(url, model, preset)
    with pytest.raises(CheckpointError, match="lvm-cpu.*not 'lvm-ai-2021'"):
        load_checkpoint(url, expected_preset="lvm-ai-2021")
    payload = read_payload(url)
    payload["schema_version"] = 999
    write_payload(str(tmp_path / "schema.pt"), payload)
    with pytest.raises(CheckpointError, match="schema version"):
        load_checkpoint(str(tmp_path / "schema.pt"))
    changed = checkpoint_payload(model, preset)
    changed["preset"]["input"]["scale_uv"] = 2000.0  # same name, different input: refuse
    write_payload(str(tmp_path / "changed.pt"), changed)
    with pytest.raises(CheckpointError, match="differs"):
        load_checkpoint(str(tmp_path / "changed.pt"), expected_preset="lvm-cpu")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(str(tmp_path / "junk.pt"))


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_checkpoint_loading_runs_no_pickled_code(tmp_path):
    buffer = io.BytesIO()
    torch.save({"format": "lvm-ray-checkpoint", "evil": _Evil()}, buffer)
    (tmp_path / "evil.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(str(tmp_path / "evil.pt"))
