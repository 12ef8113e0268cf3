"""The one rule for Ray: ensure_connected, the GPU policy, and failing fast on a dead address."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from lvm_ray.ray_utils import ClusterError, _host_port, is_embedded, resolve_gpu


def test_host_port_parsing():
    assert _host_port("ray://10.0.0.1:10001") == ("10.0.0.1", 10001)
    assert _host_port("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert _host_port("auto") is None
    assert _host_port("ray://[::1]:10001") == ("::1", 10001)


def test_gpu_policy_on_an_embedded_cpu_cluster(ray_cluster):
    """No GPU and no way to add one: the default uses CPUs; --use-gpu is a one-line error naming resources."""
    assert is_embedded()
    assert resolve_gpu(False) is False
    assert resolve_gpu(None) is False
    with pytest.raises(ClusterError) as info:
        resolve_gpu(True, workers=2, stage="train")
    message = str(info.value)
    assert "no GPU and cannot add one" in message and "0 GPU" in message and "CPU" in message
    assert "\n" not in message


def test_unreachable_address_fails_fast_with_the_address(tmp_path):
    """A cluster address nobody answers fails in seconds, naming the address (no endless retries)."""
    script = (
        "from lvm_ray.ray_utils import ClusterError, ensure_connected\n"
        "try:\n"
        "    ensure_connected('127.0.0.1:9', timeout_s=3)\n"
        "except ClusterError as exc:\n"
        "    print('ERR', exc)\n"
    )
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert time.monotonic() - started < 30
    assert "ERR no Ray cluster answers at 127.0.0.1:9" in proc.stdout, proc.stdout + proc.stderr


def test_the_warning_step_never_stops_a_stage_and_gives_stderr_back(ray_cluster, monkeypatch, capfd):
    """Keeping Ray's actor-restart line off the console is cosmetic: if creating its actor fails
    (Ray Client, an odd cluster), the stage goes on, and fd 2 is the console again afterwards."""
    import os

    import ray

    from lvm_ray import ray_utils

    class Refuses:
        def __init__(self, cls: object) -> None:
            pass

        def remote(self, *args: object) -> None:
            raise RuntimeError("no actors here")

    before = os.fstat(2)
    monkeypatch.setattr(ray, "remote", lambda **options: Refuses)
    ray_utils._spend_the_actor_restart_warning()  # no exception
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    os.write(2, b"still the console\n")
    assert "still the console" in capfd.readouterr().err
