"""The real-data recipe (preset ptbxl-lvh): inputs keep absolute voltage, augmentation never
rescales amplitudes and only runs in training, the best epoch is chosen by the preset's
selection metric, and the schedule is the preset's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvm_ray.fitting import augment, make_optimizer, make_scheduler, selection_score, step_scheduler, train_epoch
from lvm_ray.model import build_model
from lvm_ray.presets import AugmentSpec, OptimSpec, Preset, get_preset, prepare_input


def test_inputs_keep_absolute_voltage():
    """No per-record scaling: an ECG at twice the voltage gives twice the input."""
    rng = np.random.default_rng(0)
    ecg = rng.integers(-800, 800, size=(2, 12, 5000)).astype(np.int16)
    preset = get_preset("ptbxl-lvh")
    x1, x2 = prepare_input(ecg, preset), prepare_input(ecg * 2, preset)
    np.testing.assert_allclose(x2, 2 * x1, rtol=1e-5, atol=1e-6)
    assert preset.input.sample_rate_hz == 100 and preset.input.scale_uv == 1000.0


def test_time_shift_moves_each_ecg_and_never_rescales_it():
    torch.manual_seed(0)
    x = torch.randn(16, 12, 1000)
    out = augment(x, AugmentSpec(max_shift_s=1.0), sample_rate_hz=100)
    shifts = set()
    for i in range(len(x)):
        # Each ECG is the same samples moved by one whole number of samples, 0 uV shifted in.
        matches = [s for s in range(-100, 101) if torch.equal(out[i], torch.roll(x[i], s, dims=1) * _window(s, 1000))]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 8  # every ECG gets its own shift
    assert max(abs(s) for s in shifts) <= 100


def _window(shift: int, n: int) -> torch.Tensor:
    keep = torch.ones(n)
    if shift > 0:
        keep[:shift] = 0
    elif shift < 0:
        keep[shift:] = 0
    return keep


def test_lead_dropout_zeroes_whole_leads_and_off_is_identity():
    torch.manual_seed(1)
    x = torch.randn(64, 12, 100) + 5.0  # no sample is 0 by chance
    out = augment(x, AugmentSpec(lead_dropout=0.25), sample_rate_hz=100)
    zeroed = (out == 0).all(dim=2)
    kept = (out == x).all(dim=2)
    assert bool((zeroed | kept).all())  # a lead is either dropped entirely or untouched
    assert 0.15 < zeroed.float().mean().item() < 0.35
    assert augment(x, AugmentSpec(), sample_rate_hz=100) is x


def test_augmentation_runs_in_training_only():
    """train_epoch sees augmented inputs; the validation path (model forward) does not."""
    preset = get_preset("ptbxl-lvh")
    seen: list[torch.Tensor] = []
    model = build_model(preset)
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    x = torch.randn(8, 12, 1000) + 3.0
    batch = {"x": x, "cov": torch.zeros(8, 2), "y": torch.ones(8), "lvh": torch.full((8,), -1)}
    torch.manual_seed(0)
    train_epoch(model, [batch], make_optimizer(preset, model.parameters()), preset, torch.device("cpu"))
    assert not torch.equal(seen[0], x)  # shifted in training
    assert (seen[0] == 0).any()
    plain = get_preset("lvm-cpu")
    seen.clear()
    model = build_model(plain)
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    train_epoch(model, [batch], make_optimizer(plain, model.parameters()), plain, torch.device("cpu"))
    assert torch.equal(seen[0], x)  # presets without augmentation train on their inputs as before


def test_selection_score_orders_epochs_by_the_presets_metric():
    by_auroc = get_preset("ptbxl-lvh")
    by_loss = get_preset("lvm-cpu")
    assert by_auroc.optim.selection_metric == "auroc" and by_loss.optim.selection_metric == "loss"
    # A higher AUROC wins even with a higher loss; for a loss-selected preset the loss decides.
    good, bad = (0.40, {"auroc": 0.95}), (0.30, {"auroc": 0.90})
    assert selection_score(by_auroc, *good) < selection_score(by_auroc, *bad)
    assert selection_score(by_loss, *good) > selection_score(by_loss, *bad)
    assert selection_score(by_loss, 0.3, {}) == 0.3
    # An undefined metric (one class in validation) never counts as an improvement.
    assert selection_score(by_auroc, 0.1, {"auroc": float("nan")}) == float("inf")


def test_retargeting_keeps_the_selection_metric_only_where_it_fits():
    real = get_preset("ptbxl-lvh")
    assert real.with_target("other_flag", task="binary").optim.selection_metric == "auroc"
    regression = real.with_target("lv_mass_g", task="regression", mean=90.0, sd=25.0)
    assert regression.optim.selection_metric == "loss" and regression.target.loss == "logcosh"
    with pytest.raises(ValueError, match="does not fit a regression target"):
        Preset.from_dict({**get_preset("lvm-cpu").to_dict(), "optim": {"selection_metric": "auroc"}})
    with pytest.raises(ValueError, match="selection_metric must be one of"):
        OptimSpec(selection_metric="f1")


def test_cosine_schedule_decays_to_a_hundredth_over_the_epochs():
    preset = get_preset("ptbxl-lvh")
    model = build_model(preset)
    optimizer = make_optimizer(preset, model.parameters())
    scheduler = make_scheduler(preset, optimizer)
    rates = []
    for _ in range(preset.optim.max_epochs):
        optimizer.step()  # (no gradients: nothing moves; keeps torch's step order)
        step_scheduler(scheduler, val_loss=1.0)  # a fixed schedule ignores the loss
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == sorted(rates, reverse=True)
    assert rates[-1] == pytest.approx(preset.optim.lr / 100)
    plateau = get_preset("lvm-cpu")
    optimizer = make_optimizer(plateau, build_model(plateau).parameters())
    scheduler = make_scheduler(plateau, optimizer)
    for _ in range(plateau.optim.plateau_patience + 2):
        step_scheduler(scheduler, val_loss=1.0)  # no improvement: the plateau schedule halves the rate
    assert optimizer.param_groups[0]["lr"] == pytest.approx(plateau.optim.lr * plateau.optim.plateau_factor)
