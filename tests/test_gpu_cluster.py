"""--use-gpu on a cluster without GPUs yet: train and score wait for GPU nodes, then land on them.

The scenarios run this file as a script in a process of its own, on one Ray cluster built with
``ray.cluster_utils.Cluster``: a head with CPUs and no GPU and no autoscaler config, like a
KubeRay cluster whose GPU group idles at 0 pods. The real job entrypoint (jobs/train.py, then
jobs/score.py, as a RayJob runs them) is started against it with ``--use-gpu``; the script checks
that it prints the wait line and asks Ray for GPUs (the demand an autoscaler acts on) instead of
starting CPU workers, then adds a node with 2 fake GPUs and checks that the Ray Train workers
(the predictor actor) are placed on that node. It stops there (torch sees no CUDA device here),
stops the job, removes the node and waits until no GPU is asked for, so the next scenario starts
from a cluster without GPUs again. Last, the autoscaler's node types are published.

On an embedded local Ray (fixed size, no GPU), ``train --use-gpu`` fails at once in one line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT = "RESULT "
#: Resource the fake GPU node carries, so the test can tell it apart.
GPU_NODE_MARKER = "fake_gpu_node"

# --------------------------------------------------------------------------------------------
# the scenarios (run as a script: `python tests/test_gpu_cluster.py WORKDIR`)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Output:
    """Lines of a child process, collected by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def find(self, text: str) -> str | None:
        return next((line for line in self.lines if text in line), None)


def _wait_for(what: str, check: Any, timeout_s: float, proc: subprocess.Popen[str], out: _Output) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            raise RuntimeError(f"the job exited ({proc.returncode}) before {what}:\n" + "\n".join(out.lines[-40:]))
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}:\n" + "\n".join(out.lines[-40:]))


def _actors(name_part: str) -> list[dict[str, Any]]:
    """Actors whose class name contains ``name_part``: state and node (GCS actor table, any state)."""
    import ray

    return [
        {"class": a["ActorClassName"], "state": a["State"], "node": a["Address"]["NodeID"]}
        for a in ray._private.state.actors().values()
        if name_part in a["ActorClassName"]
    ]


def _gpu_demand() -> list[dict[str, float]]:
    """Pending resource requests with a GPU in them (what an autoscaler would add nodes for)."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    demand = status.resource_demands
    bundles = [b.bundle for d in demand.placement_group_demand for b in d.bundles_by_count]
    bundles += [b.bundle for d in demand.ray_task_actor_demand for b in d.bundles_by_count]
    return [dict(b) for b in bundles if b.get("GPU", 0) > 0]


def _stage_scenario(cluster: Any, stage: str, workdir: Path) -> dict[str, Any]:
    """``--use-gpu`` on ``cluster`` (connected, no GPU): the wait, the demand, then the placement."""
    import ray

    from lvm_ray.model import build_model, save_checkpoint
    from lvm_ray.presets import get_preset
    from lvm_ray.synth import write_cohort

    data = str(workdir / "cohort")
    write_cohort(240, 5, data, chunk_size=120)
    if stage == "train":
        args = ["--run", str(workdir / "run"), "--preset", "lvm-cpu", "--num-workers", "2", "--max-epochs", "1"]
        workers, actor_class = 2, "RayTrainWorker"
    else:
        checkpoint = str(workdir / "model.pt")
        save_checkpoint(checkpoint, build_model(get_preset("lvm-cpu")), get_preset("lvm-cpu"))
        args = ["--checkpoint", checkpoint, "--out", str(workdir / "predictions")]
        workers, actor_class = 1, "ScoreBatch"

    gpu_node = None
    head_id = ray.get_runtime_context().get_node_id()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LVM_RAY_ADDRESS", None)
    command = [sys.executable, f"jobs/{stage}.py", "--data", data, *args, "--use-gpu", "--address", cluster.address]
    proc = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # killed as a group: the driver and anything it started
    )
    out = _Output(proc)
    try:
        wait_line = _wait_for(
            "the wait message", lambda: out.find(f"waiting for {workers} GPU worker(s)"), 240, proc, out
        )
        demand = _wait_for("a pending GPU request", _gpu_demand, 240, proc, out)
        time.sleep(3)  # long enough for a CPU fallback to have shown up
        before = _actors(actor_class)

        gpu_node = cluster.add_node(num_gpus=2, num_cpus=2, resources={GPU_NODE_MARKER: 2})

        def placed() -> list[dict[str, Any]]:
            found = [a for a in _actors(actor_class) if a["node"] == gpu_node.node_id]
            return found if len(found) >= workers else []

        placed_actors = _wait_for(f"{workers} {actor_class} actor(s) on the GPU node", placed, 240, proc, out)
        groups = [
            {"bundles": list(pg["bundles"].values()), "nodes": sorted(set(pg["bundles_to_node_id"].values()))}
            for pg in ray.util.placement_group_table().values()
            if pg["state"] == "CREATED" and any(b.get("GPU", 0) for b in pg["bundles"].values())
        ]
        return {
            "wait_line": wait_line,
            "demand": demand,
            "actors_before_gpu_node": before,
            "placed": placed_actors,
            "gpu_placement_groups": groups,
            "gpu_node": gpu_node.node_id,
            "head": head_id,
            "job_running": proc.poll() is None,
            "output": out.lines[-40:],
        }
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        if gpu_node is not None:
            cluster.remove_node(gpu_node, allow_graceful=True)
        # The next scenario starts without GPUs: the node gone from the GCS's view, and the job's
        # requests (they go with its driver) no longer pending.
        deadline = time.monotonic() + 120
        while (_gpu_demand() or ray.cluster_resources().get("GPU", 0)) and time.monotonic() < deadline:
            time.sleep(0.5)


def _ceiling_scenario() -> dict[str, Any]:
    """An autoscaler that published its node types (a CPU head type, a 2-GPU type up to 1 node):
    what resolve_gpu decides for requests it can and cannot ever meet (connected, no GPU node)."""
    import contextlib
    import io

    import ray
    from ray.core.generated import autoscaler_pb2

    from lvm_ray.ray_utils import ClusterError, resolve_gpu

    config = autoscaler_pb2.ClusterConfig()
    for name, resources, count in (("head", {"CPU": 2}, 1), ("gpu-2x", {"CPU": 8, "GPU": 2}, 1)):
        group = autoscaler_pb2.NodeGroupConfig(name=name, max_count=count)
        group.resources.update(resources)
        config.node_group_configs.append(group)
    ray._private.worker.global_worker.gcs_client.report_cluster_config(config.SerializeToString())
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        fits = resolve_gpu(None, workers=2, stage="train")
    try:
        resolve_gpu(True, workers=4, stage="train")
        too_many = None
    except ClusterError as exc:
        too_many = str(exc)
    return {"fits": fits, "printed": printed.getvalue(), "too_many": too_many}


def _scenarios(workdir: Path) -> dict[str, Any]:
    """Every scenario on one cluster (a cluster and a process each cost ~10 s): train, score, ceiling."""
    import ray
    from ray.cluster_utils import Cluster

    from lvm_ray.ray_utils import ensure_connected

    # A CPU-only head, no autoscaler config: the GPUs can only come from nodes that join later.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "num_gpus": 0, "dashboard_port": _free_port()},
    )
    try:
        ensure_connected(cluster.address)
        results = {}
        for stage in ("train", "score"):
            (workdir / stage).mkdir(parents=True, exist_ok=True)
            results[stage] = _stage_scenario(cluster, stage, workdir / stage)
        results["ceiling"] = _ceiling_scenario()  # last: the node types it publishes stay published
        return results
    finally:
        ray.shutdown()
        cluster.shutdown()


# --------------------------------------------------------------------------------------------
# the tests


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The scenarios' results, run once in their own process: {"train", "score", "ceiling"}."""
    workdir = tmp_path_factory.mktemp("gpu_cluster")
    proc = subprocess.run(
        [sys.executable, __file__, str(workdir)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    assert proc.returncode == 0 and lines, f"rc {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len(RESULT) :])


@pytest.mark.slow
def test_train_use_gpu_waits_for_gpu_nodes_and_places_its_workers_there(scenarios: dict[str, Any]) -> None:
    result = scenarios["train"]
    # It said it waits, and asked Ray for 2 x (1 CPU + 1 GPU): the autoscaler's cue.
    assert "[lvm-ray] train: waiting for 2 GPU worker(s) (0 GPU in the cluster now" in result["wait_line"]
    assert [b for b in result["demand"] if b.get("GPU") == 1.0], result["demand"]
    # No fallback: no training worker started before a GPU node existed.
    assert result["actors_before_gpu_node"] == [], result["actors_before_gpu_node"]
    # Once the GPU node joined, both workers (and their GPU bundles) are on it, none on the head.
    assert len(result["placed"]) == 2 and all(a["node"] == result["gpu_node"] for a in result["placed"])
    assert result["gpu_placement_groups"], result
    for group in result["gpu_placement_groups"]:
        assert group["nodes"] == [result["gpu_node"]] and len(group["bundles"]) == 2, group
        assert all(b["GPU"] == 1.0 for b in group["bundles"]), group
    assert not any("falling back" in line.lower() or "Traceback" in line for line in result["output"])


@pytest.mark.slow
def test_score_use_gpu_waits_for_a_gpu_node_and_places_its_predictor_there(scenarios: dict[str, Any]) -> None:
    result = scenarios["score"]
    assert "[lvm-ray] score: waiting for 1 GPU worker(s) (0 GPU in the cluster now" in result["wait_line"]
    assert [b for b in result["demand"] if b.get("GPU") == 1.0], result["demand"]
    # The predictor actor waited (queued, not created) rather than starting on the CPU-only head,
    # then was created on the GPU node.
    assert all(a["state"] == "PENDING_CREATION" for a in result["actors_before_gpu_node"]), result
    assert result["placed"] and all(a["node"] == result["gpu_node"] for a in result["placed"]), result


@pytest.mark.slow
def test_gpu_requests_are_checked_against_the_autoscalers_node_types(scenarios: dict[str, Any]) -> None:
    """With node types published (at most 1 node x 2 GPUs), 2 GPU workers are a wait for the
    autoscaler, even by default; 4 can never be placed and fail at once, naming the node types."""
    result = scenarios["ceiling"]
    assert result["fits"] is True
    assert result["printed"].startswith("[lvm-ray] train: waiting for 2 GPU worker(s) (0 GPU in the cluster now; ")
    assert "the autoscaler adds GPU nodes on demand" in result["printed"]
    message = result["too_many"]
    assert message and message.startswith(
        "train: 4 GPU workers asked for, but this Ray cluster can have at most 2 GPU(s)"
    )
    assert "node types: head (CPU 2; up to 1), gpu-2x (CPU 8, GPU 2; up to 1)" in message and "\n" not in message


def test_train_use_gpu_on_a_laptop_without_gpu_fails_in_one_line(tmp_path: Path, ray_cluster) -> None:
    """An embedded local Ray (the test session's, started as `lvm-ray` starts one) can never have a
    GPU: `lvm-ray train --use-gpu` exits non-zero with one line naming the cluster's resources,
    before any training starts, without a traceback."""
    from typer.testing import CliRunner

    from lvm_ray.cli import app
    from lvm_ray.synth import write_cohort

    data = str(tmp_path / "cohort")
    write_cohort(120, 6, data, chunk_size=120)
    result = CliRunner().invoke(app, ["train", "--data", data, "--run", str(tmp_path / "run"), "--use-gpu"])
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    (error,) = errors
    assert error.startswith("error: --use-gpu: this Ray cluster has no GPU and cannot add one (")
    assert " 0 GPU" in error and " CPU" in error and "embedded local Ray" in error, error
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert not (tmp_path / "run" / "run.json").exists()  # refused before the run started


if __name__ == "__main__":
    print(RESULT + json.dumps(_scenarios(Path(sys.argv[1]))), flush=True)
