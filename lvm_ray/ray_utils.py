"""The one rule for Ray: every distributed stage connects through :func:`ensure_connected`.

Library functions (``ingest``, ``measure_rules``, ``train``, ``score``, ``run_server``) take an
optional ``address`` and call :func:`ensure_connected` themselves; nothing else calls
``ray.init`` (the test fixture too). One GPU policy for every stage, :func:`resolve_gpu`:

- ``use_gpu=False``: CPUs only.
- ``use_gpu=None`` (default): GPUs when the cluster has them now or its autoscaler can add them.
- ``use_gpu=True``: request GPUs and wait for the autoscaler to bring GPU nodes up; an error,
  naming the cluster's resources, only when the cluster can never provide one (an embedded
  local Ray without a GPU, or an autoscaling cluster with no GPU node type).
- Either way, asking for more GPU workers than the cluster can ever have is an error, not an
  endless wait (tests/test_gpu_cluster.py shows the wait and the placement on a GPU node).

See docs/architecture.md, "One rule for Ray".
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import ray
import ray.data

from lvm_ray import store
from lvm_ray.machine import local_cores

log = logging.getLogger(__name__)

#: Object store of an embedded local Ray: streaming stages keep only a few ~120 MB shards in
#: flight; 2 GB bounds a laptop's memory (Ray's default is 30% of RAM) without slowing them.
EMBEDDED_OBJECT_STORE_BYTES = 2 * 1024**3
#: How long joining a cluster may take before we give up with a clear message.
CONNECT_TIMEOUT_S = 20.0


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached, or cannot provide what a stage asks for."""


@dataclass
class _Session:
    embedded: bool = False
    verbose: bool = False
    sigterm_interrupts: bool = False
    sigterm_received: bool = False


_SESSION = _Session()


def _probe(host: str, port: int, timeout_s: float) -> None:
    """Fail fast (``ClusterError``) when nothing answers at host:port within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as exc:
            last = exc
            time.sleep(1.0)
    raise ClusterError(f"no Ray cluster answers at {host}:{port} after {timeout_s:.0f} s ({last})")


def _host_port(address: str) -> tuple[str, int] | None:
    """host and port of 'ray://host:port' or 'host:port' (None for 'auto' and other forms)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    if ":" not in rest:
        return None
    host, _, port = rest.rpartition(":")
    try:
        return host.strip("[]"), int(port.split("/")[0])
    except ValueError:
        return None


def ensure_connected(
    address: str | None = None,
    *,
    verbose: bool = False,
    num_cpus: int | None = None,
    timeout_s: float = CONNECT_TIMEOUT_S,
    dashboard: bool = True,
) -> None:
    """Join a cluster (``auto``, ``host:port``, ``ray://host:10001``) or start an embedded local Ray.

    Does nothing when Ray is already initialised in this process. An embedded Ray advertises at
    least 4 logical CPUs: on a 2-core laptop Ray Data read tasks and Train workers otherwise wait
    on each other forever (docs/method.md, "Ray on small machines"). Ray's own INFO chatter and
    worker output stay in its log files (/tmp/ray/session_latest/logs) unless ``verbose``.
    ``dashboard=False`` starts an embedded Ray without the dashboard (about 350 MB less): for
    stages that never use the State API (scoring, rules); Train needs it.
    """
    if ray.is_initialized():
        return
    try:
        _connect(address, verbose=verbose, num_cpus=num_cpus, timeout_s=timeout_s, dashboard=dashboard)
        if not verbose:
            _spend_the_actor_restart_warning()
    finally:
        # ray.init put the driver's own SIGTERM handler in place of ours.
        if _SESSION.sigterm_interrupts and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, stop_on_sigterm)


def _connect(address: str | None, *, verbose: bool, num_cpus: int | None, timeout_s: float, dashboard: bool) -> None:
    # Inside `ray job submit` the job's cluster is in RAY_ADDRESS: join it rather than start another.
    address = address or os.environ.get("LVM_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS") or None
    quiet = {
        "configure_logging": False,
        "logging_config": ray.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
        "log_to_driver": verbose,
    }
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    context.print_on_execution_start = verbose
    # A worker's own exception (an unreadable shard's StoreError), not Ray Data's UserCodeException,
    # whose cause does not survive the trip to the driver: stages turn it into their one line.
    context.raise_original_map_exception = True
    if not verbose:
        for name in ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # "Token authentication is enabled" is a notice, not a problem: keep it in the logs.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # "Progress bars disabled": we disabled Ray Data's bars on purpose (lvm_ray.progress draws ours).
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    if address and address != "local":  # "local" (as in Ray) means: start our own
        target = _host_port(address)
        if target is not None:
            _probe(*target, timeout_s)
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, TimeoutError) as exc:
            raise ClusterError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}") from exc
        _SESSION.embedded, _SESSION.verbose = False, verbose
        return
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    # The dashboard (on 127.0.0.1) serves the State API that Ray Train's cleaner polls.
    # address="local": a new Ray of our own, never one that `ray start` (or another program's
    # Ray) left registered on this machine.
    ray.init(
        address="local",
        num_cpus=cpus,
        object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        **quiet,
    )
    _SESSION.embedded, _SESSION.verbose = True, verbose
    log.info("started a local Ray with %d logical CPUs", cpus)


#: A resource no node has: the actor of :func:`_spend_the_actor_restart_warning` is never scheduled.
_NEVER_SCHEDULED = "lvm_ray_never_scheduled"


def _spend_the_actor_restart_warning() -> None:
    """Keep Ray's "actor restart will fail" line (ray-project/ray#53727) off the console.

    Ray's core worker logs it once per process, at ERROR, when an actor with restarts gets
    constructor arguments in the object store, and copies every ERROR line to the driver's stderr
    besides its log file. Every Ray Data actor pool (scoring, evaluation, rules) is such an actor,
    so each stage printed it. Spent here: one such actor, never scheduled and killed at once,
    created while stderr points at /dev/null; the line stays in Ray's driver log.
    """

    @ray.remote(num_cpus=0, resources={_NEVER_SCHEDULED: 1}, max_restarts=1)
    class _NeverScheduled:
        def __init__(self, argument: object) -> None:
            pass

    # A cosmetic step: whatever goes wrong here (Ray Client, no fd 2) is logged and the stage goes on.
    try:
        argument = ray.put(None)  # in the object store: the condition Ray warns about
        stderr = os.dup(2)
    except Exception as exc:
        log.debug("could not pre-empt Ray's actor-restart warning: %s", exc)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    actor, error = None, None
    try:
        os.dup2(devnull, 2)
        actor = _NeverScheduled.remote(argument)  # the line is logged here, synchronously
    except Exception as exc:
        error = exc
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
        os.close(devnull)
    if error is not None:
        log.debug("could not pre-empt Ray's actor-restart warning: %s", error)
    if actor is not None:
        with contextlib.suppress(Exception):
            ray.kill(actor)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt (see :func:`sigterm_interrupts`)."""


def stop_on_sigterm(signum: int, frame: object) -> None:
    """The SIGTERM handler of :func:`sigterm_interrupts`: raises :class:`Terminated`, and remembers
    it (:func:`sigterm_received`), since ``ray.get`` turns any KeyboardInterrupt into a plain one."""
    _SESSION.sigterm_received = True
    raise Terminated


def sigterm_received() -> bool:
    """Whether SIGTERM stopped the current :func:`sigterm_interrupts` block."""
    return _SESSION.sigterm_received


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While active, SIGTERM (``kill``, SLURM at a time limit, systemd, ``docker stop``) raises
    :class:`Terminated`, a KeyboardInterrupt, so a stage stops as on Ctrl-C: one line, and what it
    finished is kept. Without it the signal reached the handler Ray's driver installs, which
    prints a stack dump and aborts. ``ensure_connected`` puts this one back after ``ray.init``.
    Main thread only (elsewhere it does nothing).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    _SESSION.sigterm_interrupts, _SESSION.sigterm_received = True, False
    try:
        yield
    finally:
        _SESSION.sigterm_interrupts = False
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def interrupting_on_sigterm() -> bool:
    """True inside :func:`sigterm_interrupts` (the CLI's long stages)."""
    return _SESSION.sigterm_interrupts


def is_embedded() -> bool:
    """True when this process started the (local, fixed-size) Ray cluster itself."""
    return _SESSION.embedded


def cpu_cores() -> int:
    """CPU cores for one-CPU workers: the cluster's CPUs, or this machine's cores when the Ray is
    embedded (it advertises more logical CPUs than the machine has cores)."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if is_embedded():
        cpus = min(cpus, local_cores())
    return max(1, cpus)


def describe_cluster() -> str:
    """'4 CPU, 0 GPU, 12.0 GB memory; node types: cpu (CPU 8), gpu (GPU 1 x 8)' for messages."""
    res = ray.cluster_resources()
    text = f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU, {res.get('memory', 0) / 1e9:.1f} GB memory"
    config = _autoscaler_config()
    if config is not None:
        groups = []
        for group in config.node_group_configs:
            shape = ", ".join(f"{k} {v:g}" for k, v in sorted(group.resources.items()) if k in ("CPU", "GPU"))
            groups.append(f"{group.name or '?'} ({shape}; up to {group.max_count})")
        text += "; node types: " + (", ".join(groups) or "none")
    elif is_embedded():
        text += "; embedded local Ray (cannot add nodes)"
    return text


def _autoscaler_config():  # -> autoscaler_pb2.ClusterConfig | None
    """The autoscaler's node types as it published them to the GCS (None without an autoscaler)."""
    try:
        return ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler state on static clusters
        return None


def gpus_now() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def max_gpus() -> int | None:
    """GPUs the cluster could ever offer, or None when that is unknown.

    An embedded local Ray has a fixed size (the GPUs it has now). Otherwise the autoscaler's node
    types as published to the GCS, at least what the cluster has now; None when no autoscaler
    published them (a static cluster whose nodes join by hand, or an autoscaler that does not
    publish its node types; KubeRay's and the cluster launcher's in Ray 2.60 do not).
    """
    have = gpus_now()
    if is_embedded():
        return have
    try:
        limits = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler state on static clusters
        limits = None
    if limits is None:
        return None
    return max(have, int(limits.get("GPU", 0)))


def resolve_gpu(use_gpu: bool | None, workers: int = 1, stage: str = "this stage") -> bool:
    """The GPU policy of every stage (see the module docstring). Call after :func:`ensure_connected`.

    ``workers`` is how many GPUs the stage asks for (one per worker or actor). When they are not
    all there yet, prints one line saying that the stage waits for them: Ray Train and Ray Data
    keep their GPU requests pending (the autoscaler's demand) until nodes with GPUs join.
    """
    if use_gpu is False:
        return False
    have, ceiling = gpus_now(), max_gpus()
    if ceiling == 0:
        if use_gpu is None:
            return False
        raise ClusterError(f"--use-gpu: this Ray cluster has no GPU and cannot add one ({describe_cluster()})")
    if ceiling is None and have == 0 and use_gpu is None:
        return False  # nothing says a GPU will ever come: the default stays on CPUs
    if ceiling is not None and ceiling < workers:
        raise ClusterError(
            f"{stage}: {workers} GPU workers asked for, but this Ray cluster can have at most {ceiling} GPU(s) "
            f"({describe_cluster()}); lower --num-workers, or --no-gpu for CPUs"
        )
    if have < workers:
        how = (
            "the autoscaler adds GPU nodes on demand, which can take minutes"
            if ceiling is not None
            else "GPU nodes that join the cluster (autoscaled or started by hand) are used as they come"
        )
        print(
            f"[lvm-ray] {stage}: waiting for {workers} GPU worker(s) ({have} GPU in the cluster now; {how}) "
            f"[{describe_cluster()}]",
            flush=True,
        )
    return True


def worker_error(exc: BaseException, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``types`` that a worker raised under ``exc`` (Ray wraps it in a
    RayTaskError, Ray Data in a UserCodeException), so a stage can re-raise it as its one line."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, types) and not isinstance(current, ray.exceptions.RayError):
            return current
        seen.add(id(current))
        current = getattr(current, "cause", None) or current.__cause__
    return None


def shard_paths_dataset(root: str) -> ray.data.Dataset:
    """The manifest's shards as a Dataset of paths (``store.SHARD_PATH_COLUMN``), a row and a block each.

    For a CPU stage whose workers read their own shards (``store.iter_row_groups``, a row group
    at a time on the worker's thread): no read tasks, no parquet sampling workers, no waveforms
    in the object store.
    """
    shards = store.read_manifest(root)["shards"]
    if not shards:
        raise store.StoreError(f"{root} has no shards")
    return ray.data.from_items([{store.SHARD_PATH_COLUMN: s["path"]} for s in shards], override_num_blocks=len(shards))


def read_ecg_dataset(
    root: str, columns: Sequence[str] | None = None, read_concurrency: int | None = None
) -> ray.data.Dataset:
    """The dataset's manifested shards as a Ray Dataset (waveforms keep their [12, 5000] shape).

    ``read_concurrency`` caps the shard reads in flight: a consumer slower than reading (model
    plus rules) needs few, and each holds a decoded ~120 MB shard in a worker's memory.
    """
    urls = store.shard_urls(root)
    if not urls:
        raise store.StoreError(f"{root} has no shards")
    # One block per shard: shards are already ~block-sized (1000 ECGs ~ 120 MB), and downstream
    # writers then emit one output part per shard, which bounds what a crash can lose. Ray 2.60's
    # V2 parquet datasource packs small files into one task and ignores override_num_blocks, so
    # this read uses the V1 datasource (the Dataset keeps a copy of the context it was made with).
    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(
            urls,
            columns=list(columns) if columns else None,
            override_num_blocks=len(urls),
            concurrency=read_concurrency,
        )
    finally:
        context.use_datasource_v2 = previous
