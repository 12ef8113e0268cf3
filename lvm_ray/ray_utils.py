"""Ray plumbing shared by the distributed stages: connecting, and reading the store with Ray Data."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import ray
import ray.data

from lvm_ray import store

log = logging.getLogger(__name__)


EMBEDDED_OBJECT_STORE_BYTES = 2 * 1024**3


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join a cluster (``auto``, ``ray://...``) or start an embedded local Ray (address None).

    Locally we advertise at least 4 logical CPUs: on a 2-core laptop Ray Data read tasks and
    Train workers otherwise wait on each other forever.
    """
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    # The dashboard (on 127.0.0.1) serves the State API that Ray Train's cleaner polls, and shows
    # progress; Ray's own INFO chatter from workers is kept out of the terminal (it stays in the logs).
    ray.init(
        num_cpus=cpus,
        # Streaming stages keep only a few ~120 MB shards in flight; a 2 GB store bounds a laptop's
        # memory (Ray's default is 30% of RAM) without slowing them down.
        object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        configure_logging=False,
        logging_config=ray.LoggingConfig(log_level="WARNING"),
    )
    log.info("started a local Ray with %d logical CPUs", cpus)


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
