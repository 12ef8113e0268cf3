"""Publish a run's model as an immutable, versioned copy, for serving and scoring.

    python jobs/publish_model.py --run s3://bucket/lvm-ray/runs/lvm-ai-2021-1x4 --to s3://bucket/lvm-ray/models

copies RUN/model.pt to TO/<preset>-<epoch>-<digest>/model.pt, where <digest> is the weights'
digest that the endpoint's GET /v1/model reports at the end of ``model_version``, and writes
published.json beside it (model_version, source run, the file's sha256). A version is written
once: publishing it again is a no-op when the bytes are the same and an error otherwise, so
the path always names the same model. Prints the model URL for the RayService's
``args.checkpoint`` (cluster/kuberay/rayservice.yaml).

RUN/model.pt itself is live: a re-run of training, or calibration, rewrites it, so replicas that
load it at different times could serve different models. Serve the published copy.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from typing import Any

from lvm_ray import store
from lvm_ray.model import MODEL_FILE, CheckpointError, read_payload
from lvm_ray.predict import model_version

RECORD_FILE = "published.json"


def version_folder(version: str) -> str:
    """'0.1.0/lvm-ai-2021/epoch57/3f2a9c1b7d4e' -> 'lvm-ai-2021-epoch57-3f2a9c1b7d4e'."""
    _package, preset, label, digest = version.split("/")
    return f"{preset}-{label}-{digest}"


def publish(run: str, to: str) -> dict[str, Any]:
    """Copy RUN's model to its versioned folder under TO (once); the record of what was published."""
    source = run if run.endswith(".pt") else store.join_url(run, MODEL_FILE)
    payload = read_payload(source)  # a readable lvm-ray checkpoint, or CheckpointError
    data = store.read_bytes(source)
    version = model_version(payload)
    target_dir = store.join_url(to, version_folder(version))
    target = store.join_url(target_dir, MODEL_FILE)
    sha256 = hashlib.sha256(data).hexdigest()
    if store.exists(target):
        existing = hashlib.sha256(store.read_bytes(target)).hexdigest()
        if existing != sha256:
            raise CheckpointError(
                f"{target} already holds another file for model {version} (sha256 {existing[:12]}, "
                f"this one {sha256[:12]}, e.g. a re-calibration); published models are never replaced: "
                "choose another --to"
            )
        return {**store.read_json(store.join_url(target_dir, RECORD_FILE)), "already_published": True}
    record = {
        "model_version": version,
        "model": target,
        "sha256": sha256,
        "source": source,
        "package_version": payload.get("package_version"),
        "published_unix": time.time(),
    }
    store.write_atomic(target, data)
    store.write_json(store.join_url(target_dir, RECORD_FILE), record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="Run folder (or a model.pt) to publish, any URL.")
    parser.add_argument("--to", required=True, help="Folder of published models, any URL (e.g. s3://bucket/models).")
    args = parser.parse_args(argv)
    try:
        record = publish(args.run, args.to)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state = "already published" if record.get("already_published") else "published"
    print(f"{state} {record['model_version']}\n  {record['model']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
