"""The train stage: splits, the pure epoch helpers, and real Ray Train runs on small data.

The Ray runs share the session cluster (conftest ``ray_cluster``) except the 2-node test,
which starts its own ray.cluster_utils.Cluster in a subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from lvm_ray import store
from lvm_ray.fitting import (
    autocast,
    epoch_metrics,
    memory_batches,
    refresh_batch_norm,
    shuffled_order,
    train_epoch,
    validate_epoch,
)
from lvm_ray.inputs import featurize
from lvm_ray.model import ModelOutput, build_model, load_checkpoint, read_payload
from lvm_ray.presets import get_preset
from lvm_ray.runs import FaultInjection, TrainError, make_config
from lvm_ray.splits import SPLIT_CODES, SplitSpec
from lvm_ray.stats import auroc
from lvm_ray.train import build_trainer, evaluate_run, train
from lvm_ray.train_inputs import CACHED, CachedInputs
from tests.helpers import interrupt_when_ready, start_as_foreground_job

REPO = Path(__file__).resolve().parents[1]


# --- pure helpers -----------------------------------------------------------------------------------


def test_hash_split_is_stable_patient_disjoint_and_near_the_fractions():
    split = SplitSpec(test_fraction=0.2, val_fraction=0.25)
    patients = [f"p{i // 3}" for i in range(6000)]  # 3 ECGs per patient
    ecgs = [f"e{i}" for i in range(6000)]
    codes = split.assign(patients, ecgs)
    assert np.array_equal(codes, split.assign(patients, ecgs))  # stable
    assert np.array_equal(codes[:300], split.assign(patients[:300], ecgs[:300]))  # batch-independent
    frame = pd.DataFrame({"patient": patients, "split": codes})
    assert (frame.groupby("patient")["split"].nunique() == 1).all()  # patient-disjoint
    share = frame.drop_duplicates("patient")["split"].value_counts(normalize=True)
    assert share[SPLIT_CODES["test"]] == pytest.approx(0.2, abs=0.03)
    assert share[SPLIT_CODES["val"]] == pytest.approx(0.8 * 0.25, abs=0.03)
    # ECGs without a patient id are their own patients.
    assert set(split.assign([None, np.nan], ["a", "b"])) <= {0, 1, 2}


def test_column_split_uses_values_and_excludes_missing():
    split = SplitSpec(column="strat_fold", val_values=("8",), test_values=("9", "10"))
    codes = split.assign([None] * 5, list("abcde"), [1, 8.0, "9", None, 7])
    assert codes.tolist() == [0, 1, 2, -1, 0]
    only = SplitSpec(column="strat_fold", val_values=("8",), train_values=("1",))
    assert only.assign([None] * 3, list("abc"), [1, 2, 8]).tolist() == [0, -1, 1]
    with pytest.raises(ValueError, match="val_values"):
        SplitSpec(column="strat_fold")


def test_auroc_matches_hand_computation():
    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auroc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert np.isnan(auroc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_epoch_helpers_learn_a_simple_signal():
    """The pure train/validate helpers (shared with the single-process baseline) reduce the loss."""
    preset = get_preset("lvm-cpu")
    rng = np.random.default_rng(0)
    ecg = (rng.normal(0, 50, (96, 12, 5000))).astype(np.int16)
    mass = rng.normal(90, 25, 96)
    wave = np.sin(np.arange(5000) / 500 * 2 * np.pi * 2)
    ecg[:, 1] += (wave[None] * mass[:, None] * 10).astype(np.int16)  # voltage grows with LV mass
    feats = featurize({"ecg": ecg, "lv_mass_g": mass}, preset)
    assert feats["x"].shape == (96, 12, 1000) and feats["lvh"].tolist() == [-1] * 96

    def batches():
        for i in range(0, 96, 32):
            yield {k: torch.from_numpy(v[i : i + 32]) for k, v in feats.items()}

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model(preset)
    optimizer = torch.optim.RAdam(model.parameters(), lr=3e-3)
    losses = [train_epoch(model, batches(), optimizer, preset, torch.device("cpu")).loss for _ in range(12)]
    after = validate_epoch(model, batches(), preset, torch.device("cpu"))
    assert after.n == 96
    assert losses[-1] < losses[0] / 2
    arrays = after.arrays()
    metrics = epoch_metrics(preset, arrays["main"], arrays["y"], arrays["lvh_prob"], arrays["lvh"])
    assert metrics["n"] == 96 and metrics["pearson_r"] > 0.8


def test_epoch_order_is_seeded_and_batches_cover_it():
    """An epoch's order depends only on (seed, rank, epoch): a resumed run sees the same batches."""
    a, b = shuffled_order(10, 9, (0, 1, 3)), shuffled_order(10, 9, (0, 1, 3))
    assert torch.equal(a, b) and len(set(a.tolist())) == 9
    assert not torch.equal(a, shuffled_order(10, 9, (0, 1, 4)))  # another epoch, another order
    rows = {"x": torch.arange(10.0)[:, None], "y": torch.arange(10.0)}
    batches = list(memory_batches(rows, 4, a))
    assert [len(b["y"]) for b in batches] == [4, 4, 1]
    assert torch.cat([b["y"] for b in batches]).tolist() == a.float().tolist()
    assert [b["y"].tolist() for b in memory_batches(rows, 6)] == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]


class _NormThenDropout(torch.nn.Module):
    """The smallest model with batch norm (on the input itself) and dropout after it."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(3)
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(3, 1)

    def forward(self, x, cov=None):
        return ModelOutput(self.head(self.drop(self.norm(x)))[:, 0], None)


def test_refresh_batch_norm_takes_the_batches_statistics_and_changes_nothing_else():
    torch.manual_seed(0)
    model = _NormThenDropout()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
    batches = [
        {"x": torch.randn(16, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([2.0, -1.0, 7.0])} for _ in range(4)
    ]
    model.train()
    assert refresh_batch_norm(model, batches) == 64
    every = torch.cat([b["x"] for b in batches])
    # Equal-weight average of the batches: with equal batch sizes, the mean of all 64 rows.
    torch.testing.assert_close(model.norm.running_mean, every.mean(0))
    torch.testing.assert_close(model.norm.running_var, torch.stack([b["x"].var(0) for b in batches]).mean(0))
    assert model.norm.momentum == 0.1 and model.training  # restored
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert refresh_batch_norm(torch.nn.Linear(3, 1), batches) == 0  # nothing to refresh
    assert refresh_batch_norm(model, []) == 0


def test_an_epoch_ends_with_batch_norm_statistics_of_its_last_rows_under_the_final_weights():
    preset = get_preset("lvm-cpu")
    preset = dataclasses.replace(preset, optim=dataclasses.replace(preset.optim, batch_norm_refresh_rows=6))
    torch.manual_seed(0)
    model = _NormThenDropout()
    batches = [{"x": torch.randn(4, 3) + i, "y": torch.randn(4), "lvh": torch.full((4,), -1)} for i in range(5)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights fixed: only the statistics move
    stats = train_epoch(model, batches, optimizer, preset, torch.device("cpu"))
    assert stats.n == 20 and stats.batch_norm_rows == 8  # the last two batches hold >= 6 rows
    torch.testing.assert_close(model.norm.running_mean, torch.cat([b["x"] for b in batches[-2:]]).mean(0))
    off = dataclasses.replace(preset, optim=dataclasses.replace(preset.optim, batch_norm_refresh_rows=0))
    model.norm.reset_running_stats()
    assert train_epoch(model, batches, optimizer, off, torch.device("cpu")).batch_norm_rows == 0
    # The running averages of training (momentum 0.1, 5 steps from 0), not the last rows' mean.
    assert not torch.allclose(model.norm.running_mean, torch.cat([b["x"] for b in batches[-2:]]).mean(0))


def test_cached_inputs_give_each_worker_every_wth_row_by_ecg_id(ray_cluster):
    """Workers' rows: disjoint, together the whole split, in ecg_id order, whatever the shards' order or grouping."""
    ray = ray_cluster

    def part(ids, split):
        return {
            "x": np.array([[float(i[1:])] for i in ids], dtype=np.float32),
            "y": np.array([float(i[1:]) for i in ids]),
            "ecg_id": np.array(ids),
            "split": np.array(split, dtype=np.int8),
        }

    train, val = SPLIT_CODES["train"], SPLIT_CODES["val"]
    tasks = (  # a read task returns the inputs of each of its shards
        ray.put([part(["e7", "e2", "e5"], [train, val, train]), part(["e9"], [train])]),
        ray.put([part(["e1", "e8", "e3", "e4", "e6"], [train, train, val, train, train])]),
    )
    cached = CachedInputs(tasks=tasks, counts={"train": 7, "val": 2})
    (rank0, totals), (rank1, _) = cached.take(0, 2), cached.take(1, 2)
    assert totals == {"train": 7, "val": 2}
    assert rank0["train"]["y"].tolist() == [1, 5, 7, 9] and rank1["train"]["y"].tolist() == [4, 6, 8]
    assert rank0["val"]["y"].tolist() == [2] and rank1["val"]["y"].tolist() == [3]
    assert rank0["train"]["x"][:, 0].tolist() == [1, 5, 7, 9]  # every column follows the same rows
    swapped = CachedInputs(tasks=tasks[::-1], counts=cached.counts)
    assert swapped.take(0, 2)[0]["train"]["y"].tolist() == [1, 5, 7, 9]


def test_ray_train_settings_last_one_fit_and_keep_the_users(ray_cluster, monkeypatch):
    """The controller's poll interval and (one node) no preemption watcher, for the fit only; user values win."""
    from lvm_ray.train import HEALTH_CHECK_INTERVAL_S, _ray_train_env

    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    with _ray_train_env():
        assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == HEALTH_CHECK_INTERVAL_S
        assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"  # the session's cluster is one node
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" not in os.environ
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    with _ray_train_env():
        assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"


def test_a_fit_on_cached_inputs_starts_no_dataset_manager(ray_cluster, tmp_path):
    """Ray Train starts a DatasetManager actor (a process) per fit even without Ray Datasets; with
    the inputs cached in the object store there are none, so none is started. Streamed inputs keep it."""
    import ray
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    cfg = make_config("data", str(tmp_path / "run"), "lvm-cpu")
    cached = build_trainer(cfg, {CACHED: object()})._create_default_callbacks()
    assert cached and not any(isinstance(c, DatasetsCallback) for c in cached)
    streamed = build_trainer(cfg, {"train": ray.data.range(4), "val": ray.data.range(2)})._create_default_callbacks()
    assert sum(isinstance(c, DatasetsCallback) for c in streamed) == 1


def test_trainer_picks_gpus_and_nccl_when_asked(tmp_path):
    gpu = build_trainer(make_config("data", str(tmp_path / "run"), "lvm-cpu", use_gpu=True, num_workers=4), {})
    assert gpu.scaling_config.use_gpu and gpu.scaling_config.num_workers == 4
    assert gpu.backend_config.backend == "nccl"
    assert gpu.run_config.storage_path == str(tmp_path / "run") and gpu.run_config.failure_config.max_failures == 3
    cpu = build_trainer(make_config("data", str(tmp_path / "run"), "lvm-cpu"), {})
    assert not cpu.scaling_config.use_gpu and cpu.backend_config.backend == "gloo"
    with autocast(torch.device("cpu")):  # bf16 autocast is for CUDA only
        assert not torch.is_autocast_enabled("cpu")


def test_batch_is_per_worker_and_the_learning_rate_follows_the_global_batch():
    """The preset's batch goes to every worker; RAdam's rate scales by sqrt(global / preset batch)."""
    published = get_preset("lvm-ai-2021").optim
    assert (published.batch_size, published.lr) == (32, 1e-4)
    one = make_config("data", "run", "lvm-ai-2021", num_workers=1)
    assert (one.per_worker_batch, one.global_batch, one.preset.optim.lr) == (32, 32, 1e-4)  # as published
    four = make_config("data", "run", "lvm-ai-2021", num_workers=4)
    assert (four.per_worker_batch, four.global_batch) == (32, 128)
    assert four.preset.optim.lr == pytest.approx(2e-4)  # 1e-4 x sqrt(128 / 32)
    big = make_config("data", "run", "lvm-ai-2021", num_workers=32)
    assert big.global_batch == 1024 and big.preset.optim.lr == pytest.approx(1e-4 * 32**0.5)
    # Recorded where run.json and the checkpoint's preset see them.
    record = four.to_dict()
    assert (record["per_worker_batch"], record["global_batch"], record["lr_scaling"]) == (32, 128, "sqrt")
    assert (record["reference_batch"], record["reference_lr"]) == (32, 1e-4)
    assert record["preset"]["optim"]["lr"] == pytest.approx(2e-4) and record["preset"]["optim"]["batch_size"] == 32
    # An explicit learning rate is used as given; a run resumes on other workers with the same global batch.
    given = make_config("data", "run", "lvm-ai-2021", num_workers=4, lr=3e-4)
    assert given.preset.optim.lr == 3e-4 and given.lr_scaling == "given"
    half = make_config("data", "run", "lvm-ai-2021", num_workers=16, batch_size=64)
    assert half.identity() == big.identity()
    assert four.identity() != big.identity()


# --- Ray Train runs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> str:
    """A small synthetic cohort with a binary label and a fold column added."""
    from lvm_ray.synth import extra_fields, generate_batch

    root = str(tmp_path_factory.mktemp("cohort") / "data")
    fields = [*extra_fields(), pa.field("big_heart", pa.int64()), pa.field("fold", pa.int64())]
    writer = store.DatasetWriter(root, extra_fields=fields)
    for lo in (0, 60):
        batch = generate_batch(60, seed=3, start_index=lo)
        table = batch.table.copy()
        table["big_heart"] = (table["lv_mass_g"] > table["lv_mass_g"].median()).astype(int)
        table["fold"] = np.arange(lo, lo + 60) % 5 + 1
        writer.write(table, batch.ecg)
    writer.close()
    return root


def _metrics_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_end_to_end_then_rerun_resumes(ray_cluster, cohort, tmp_path):
    run = tmp_path / "run"
    result = train(cohort, str(run), preset="lvm-cpu", num_workers=2, max_epochs=2, batch_size=16)
    assert result.epochs_run == 2 and result.resumed_from == []
    assert result.split_counts["train"] > 0 and result.split_counts["val"] > 0 and result.split_counts["test"] > 0
    assert sum(result.split_counts.values()) == 120
    assert result.test_metrics is not None and result.test_metrics["n"] == result.split_counts["test"]
    assert np.isfinite(result.val_metrics["mae"])
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and record["config"]["preset"]["name"] == "lvm-cpu"
    assert [m["epoch"] for m in _metrics_lines(run)] == [1, 2]
    split = pd.read_parquet(run / "split.parquet")
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()
    loaded = load_checkpoint(str(run), expected_preset="lvm-cpu")
    assert loaded.payload["epoch"] == result.best_epoch and loaded.payload["split"]["counts"] == result.split_counts
    # --batch-size is per worker (2 x 16 = 32 a step); the workers stepped with the preset's rate
    # scaled by sqrt(32 / the preset's batch), which run.json and the checkpoint's preset record.
    reference = get_preset("lvm-cpu").optim
    lr = reference.lr * (32 / reference.batch_size) ** 0.5
    assert (record["config"]["per_worker_batch"], record["config"]["global_batch"]) == (16, 32)
    assert loaded.payload["preset"]["optim"]["batch_size"] == 16
    assert loaded.payload["preset"]["optim"]["lr"] == pytest.approx(lr)
    assert _metrics_lines(run)[0]["lr"] == pytest.approx(lr)
    assert json.loads((run / "test_metrics.json").read_text())["split"] == "test"
    # train predicts its validation and test splits in one read of the data; the test split on its
    # own gives the same metrics (to float rounding: the batches differ, and this barely trained
    # model predicts almost one value, which makes its r sensitive to the last digits).
    alone = evaluate_run(str(run), cohort, "test")
    assert alone.keys() == result.test_metrics.keys() and alone["n"] == result.test_metrics["n"]
    for key, value in alone.items():
        if isinstance(value, float):
            assert result.test_metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key
    assert any(p.is_dir() for p in (run / "ray").glob("checkpoint_*"))

    # The same command again: the run is finished, nothing is retrained.
    again = train(cohort, str(run), preset="lvm-cpu", num_workers=2, max_epochs=2, batch_size=16)
    assert again.epochs_run == 2 and again.best_epoch == result.best_epoch
    # More epochs: resumes from the latest checkpoint instead of starting over.
    more = train(cohort, str(run), preset="lvm-cpu", num_workers=2, max_epochs=3, batch_size=16, evaluate_test=False)
    assert more.resumed_from == [2] and more.epochs_run == 3
    assert [m["epoch"] for m in _metrics_lines(run)] == [1, 2, 3]
    # Another preset or target in the same RUN is refused.
    with pytest.raises(TrainError, match="another run"):
        train(cohort, str(run), preset="lvm-cpu", target="age", num_workers=2, max_epochs=1, batch_size=16)


def test_killed_worker_resumes_from_checkpoint(ray_cluster, cohort, tmp_path):
    run = tmp_path / "run"
    result = train(
        cohort,
        str(run),
        preset="lvm-cpu",
        num_workers=2,
        max_epochs=2,
        batch_size=16,
        cache_inputs=True,
        evaluate_test=False,
        max_failures=2,
        fault=FaultInjection(epoch=2, rank=1, after_batches=1),
    )
    assert (run / "_fault_injected").exists()  # the worker really was SIGKILLed in epoch 2
    assert result.resumed_from == [1]  # ... and the restarted group resumed after epoch 1
    assert result.epochs_run == 2
    assert [m["epoch"] for m in _metrics_lines(run)] == [1, 2]
    checkpoints = sorted(p for p in (run / "ray").glob("checkpoint_*") if p.is_dir())
    final = read_payload(str(checkpoints[-1] / "model.pt"))
    assert final["epoch"] == 2 and final["training_state"]["resumed_from"] == [1]


def test_binary_target_with_split_column(ray_cluster, cohort, tmp_path):
    run = tmp_path / "run"
    result = train(
        cohort,
        str(run),
        preset="lvm-cpu",
        target="big_heart",
        num_workers=2,
        max_epochs=1,
        batch_size=16,
        split_column="fold",
        val_values=["5"],
        test_values=["4"],
        cache_inputs=True,
    )
    assert result.task == "binary" and result.target == "big_heart"
    assert result.split_counts == {"train": 72, "val": 24, "test": 24}
    assert 0.0 <= result.val_metrics["auroc"] <= 1.0 and 0.0 <= result.test_metrics["auroc"] <= 1.0
    loaded = load_checkpoint(str(run))
    assert loaded.preset.target.loss == "bce" and loaded.preset.target.column == "big_heart"


def test_bad_target_is_refused(ray_cluster, cohort, tmp_path):
    with pytest.raises(TrainError, match="not in"):
        train(cohort, str(tmp_path / "run"), target="no_such_column", max_epochs=1)


_TWO_NODE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from lvm_ray.train import train

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    try:
        result = train(sys.argv[1], sys.argv[2], preset="lvm-cpu", num_workers=2, max_epochs=1, batch_size=16,
                       placement_strategy="STRICT_SPREAD", evaluate_test=False, address=cluster.address)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        print("RESULT " + json.dumps({"worker_nodes": result.worker_nodes, "cluster_nodes": nodes,
                                      "epochs_run": result.epochs_run}))
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


@pytest.mark.slow
def test_two_node_cluster_one_worker_per_node(cohort, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _TWO_NODE_SCRIPT, cohort, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["epochs_run"] == 1
    assert len(out["cluster_nodes"]) == 2
    assert sorted(set(out["worker_nodes"])) == sorted(out["cluster_nodes"])  # one worker on each node


@pytest.mark.slow
def test_ctrl_c_or_sigterm_ends_training_in_one_line_and_each_rerun_resumes(ray_cluster, cohort, tmp_path):
    """SIGINT to `lvm-ray train` (as Ctrl-C sends it) after an epoch; the same command again resumes,
    and SIGTERM (`kill`, SLURM at a time limit) after its next epoch. Each time the run is aborted as
    Ray Train aborts it, exit 130 / 143, one line; then the run resumes once more and finishes.
    Ray Train's own handler ended the driver with status 1 and no word (and SIGTERM with exit 15)."""
    run = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import signal
        from lvm_ray.cli import app

        # As a terminal's foreground job has it (a shell's background job, e.g. CI, inherits SIGINT ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        app(["train", "--data", {cohort!r}, "--run", {str(run)!r}, "--max-epochs", "30", "--batch-size", "16",
             "--address", {ray_cluster.get_runtime_context().gcs_address!r}])
        """
    )
    snapshot = run / "ray" / "checkpoint_manager_snapshot.json"

    def committed() -> int:  # the last epoch whose checkpoint Ray Train has recorded
        try:
            return int(json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    interrupt_when_ready(start_as_foreground_job(script), committed, "training", signal.SIGINT, 130)
    first = committed()
    assert 1 <= first < 30
    interrupt_when_ready(
        start_as_foreground_job(script), lambda: committed() > first, "the resumed training", signal.SIGTERM, 143
    )
    second = committed()
    assert first < second < 30
    result = train(cohort, str(run), preset="lvm-cpu", num_workers=2, max_epochs=second + 1, batch_size=16)
    # Resumed twice: by the SIGTERMed run (from where Ctrl-C left it) and now (from where SIGTERM did).
    assert len(result.resumed_from) == 2 and first <= result.resumed_from[0] < result.resumed_from[1] <= second
    assert result.epochs_run == second + 1
