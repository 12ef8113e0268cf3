"""Ray job entrypoints submitted to a real `ray start --head` cluster with `ray job submit`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lvm_ray import store

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A separate Ray head on 127.0.0.1 (token auth on, as by default), stopped afterwards."""
    temp_dir = tmp_path_factory.mktemp("rayhead")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    gcs_port, dashboard_port = _free_port(), _free_port()
    # Its own agent/metrics ports: the test session's Ray already holds the defaults on this host.
    ports = {
        name: _free_port()
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
        )
    }
    # A short temp dir: Ray's socket paths must stay under the Unix path length limit.
    ray_tmp = Path("/tmp") / f"lvmjobs-{secrets.token_hex(3)}"
    # --block keeps `ray start` in the foreground so the test stops exactly this head (its process
    # group) and never the session's own cluster, as `ray stop` would.
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--num-cpus=4",
            *(f"--{name}={port}" for name, port in ports.items()),
            f"--temp-dir={ray_tmp}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield f"http://127.0.0.1:{dashboard_port}", env, temp_dir
    finally:
        # Ray's own shutdown of a --block head takes about 30 s here (it waits on each process in
        # turn); the cluster is this test's alone, so after a short grace period it is killed.
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _submit(address: str, env: dict, *entrypoint: str, timeout: float = 600) -> str:
    """`ray job submit` (waits for the job); retries while the job agent is still starting."""
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"excludes": [".venv", ".git", "demo_output", "tests/fixtures"]}),
        "--",
        *entrypoint,
    ]
    deadline = time.time() + 120
    while True:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        retry = any(m in proc.stdout + proc.stderr for m in ("No available agent", "Failed to connect", "Connection"))
        if proc.returncode == 0 or not retry or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in (proc.stdout + proc.stderr).lower()
    return proc.stdout


@pytest.mark.slow
def test_train_and_score_jobs_on_a_ray_head(ray_head):
    address, env, workdir = ray_head
    from lvm_ray.synth import write_cohort

    data = str(workdir / "cohort")
    write_cohort(200, 5, data, chunk_size=100)
    run, preds = str(workdir / "run"), str(workdir / "preds")
    _submit(
        address,
        env,
        "python",
        "jobs/train.py",
        "--data",
        data,
        "--run",
        run,
        "--preset",
        "lvm-cpu",
        "--num-workers",
        "2",
        "--max-epochs",
        "2",
        "--address",
        "auto",
    )
    assert store.exists(f"{run}/model.pt")
    output = _submit(
        address,
        env,
        "python",
        "jobs/score.py",
        "--data",
        data,
        "--checkpoint",
        run,
        "--out",
        preds,
        "--address",
        "auto",
        "--num-actors",
        "1",
    )
    assert "200 scored now" in output
    from lvm_ray.score import read_predictions

    frame = read_predictions(preds, columns=["ecg_id", "lv_mass_pred_g"])
    assert len(frame) == 200 and frame.ecg_id.is_unique and frame.lv_mass_pred_g.notna().all()
