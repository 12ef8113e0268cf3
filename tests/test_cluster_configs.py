"""The cluster configuration validates offline, the way the cluster would read it.

- KubeRay manifests (cluster/kuberay/*.yaml) against the KubeRay CRDs' v1 openAPIV3Schema, with
  schema defaults filled in first as the API server does, and unknown fields rejected as
  `kubectl apply` (strict field validation) does, except under x-kubernetes-preserve-unknown-fields;
- cluster-launcher YAML (cluster/launcher/*.yaml) against ray/autoscaler/ray-schema.json of the
  installed Ray;
- one Ray version everywhere: pyproject.toml's pin, the installed Ray, every rayVersion, every
  image tag and the Dockerfile's base image;
- jobs/serve_config.yaml and the RayService's serveConfigV2 with Ray Serve's own schema;
  jobs/runtime_env.yaml and the RayJobs' runtimeEnvYAML as Ray runtime environments;
- what a first cluster run depends on: images with a registry and an immutable tag, RayJob
  retries that resume the same run, GPU pods on GPU nodes with spill space and NCCL's interface,
  a served model that is a published version on replicas spread over pods behind TLS and auth,
  bucket access on every launcher node.
Not checked: the CRDs' CEL rules (x-kubernetes-validations; none applies to fields we set) and
anything only a live cluster knows (images pulling, nodes fitting the requests).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
KUBERAY_DIR = REPO_ROOT / "cluster" / "kuberay"
LAUNCHER_DIR = REPO_ROOT / "cluster" / "launcher"
INGRESS = REPO_ROOT / "cluster" / "ingress" / "endpoint-ingress.yaml"
DOCKERFILE = REPO_ROOT / "cluster" / "Dockerfile"
SERVE_CONFIG = REPO_ROOT / "jobs" / "serve_config.yaml"
RUNTIME_ENV = REPO_ROOT / "jobs" / "runtime_env.yaml"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")

KUBERAY_MANIFESTS = sorted(KUBERAY_DIR.glob("*.yaml"))
LAUNCHER_CONFIGS = sorted(LAUNCHER_DIR.glob("*.yaml"))


# --------------------------------------------------------------------------------------------
# CRD schema -> JSON Schema, and API-server-style defaulting


def to_json_schema(node: Any) -> Any:
    """An OpenAPI v3 (structural, Kubernetes-flavoured) schema as a Draft 7 JSON Schema.

    - x-kubernetes-int-or-string: integer or string (a pattern then only constrains strings);
    - nullable: null is allowed too;
    - an object schema with `properties` and no `additionalProperties` rejects other fields
      (Kubernetes strict field validation) unless it says x-kubernetes-preserve-unknown-fields.
    """
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: to_json_schema(value) for key, value in node.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def fill_defaults(instance: Any, schema: Mapping[str, Any]) -> Any:
    """Fill missing fields that have a schema `default`, top-down, as the API server does.

    Works in place and returns ``instance``; a defaulted value is itself defaulted.
    """
    if isinstance(instance, dict):
        properties: Mapping[str, Any] = schema.get("properties", {})
        for name, sub in properties.items():
            if name not in instance and "default" in sub:
                instance[name] = copy.deepcopy(sub["default"])
            if name in instance:
                fill_defaults(instance[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, value in instance.items():
                if name not in properties:
                    fill_defaults(value, extra)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            fill_defaults(item, schema["items"])
    return instance


def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


FORMATS = jsonschema.FormatChecker(formats=())
FORMATS.checks("int32")(_int32)
FORMATS.checks("int64")(_int64)

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class Crd:
    kind: str
    group: str
    served: tuple[str, ...]
    schema: dict[str, Any]  # the v1 openAPIV3Schema as written in the CRD
    validator: jsonschema.Draft7Validator

    @property
    def api_versions(self) -> list[str]:
        return [f"{self.group}/{version}" for version in self.served]


def load_crd(path: Path) -> Crd:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML
    crd = yaml.load(path.read_text(), Loader=loader)
    versions = crd["spec"]["versions"]
    (v1,) = [v for v in versions if v["name"] == "v1"]
    schema = v1["schema"]["openAPIV3Schema"]
    converted = to_json_schema(schema)
    jsonschema.Draft7Validator.check_schema(converted)
    return Crd(
        kind=crd["spec"]["names"]["kind"],
        group=crd["spec"]["group"],
        served=tuple(v["name"] for v in versions if v.get("served")),
        schema=schema,
        validator=jsonschema.Draft7Validator(converted, format_checker=FORMATS),
    )


def _path(parts: Iterable[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"


def manifest_errors(doc: Mapping[str, Any], crds: Mapping[str, Crd], *, defaults: bool = True) -> list[str]:
    """Everything the API server would reject in ``doc``, one readable line each ([] if none)."""
    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name")
    where = f"{kind} {name!r}"
    if kind not in crds:
        return [f"{where}: unknown kind {kind!r} (the CRDs define {sorted(crds)})"]
    crd = crds[kind]
    errors = []
    if doc.get("apiVersion") != f"{crd.group}/v1":
        errors.append(
            f"{where}: apiVersion {doc.get('apiVersion')!r} is not {crd.group}/v1 "
            f"(the {kind} CRD serves {crd.api_versions}; these manifests are written for v1)"
        )
    if not isinstance(name, str) or len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        errors.append(f"{where}: metadata.name must be a DNS-1123 subdomain")
    instance = copy.deepcopy(dict(doc))
    if defaults:
        fill_defaults(instance, crd.schema)
    for error in sorted(crd.validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))):
        errors.append(f"{where}: {_path(error.absolute_path)}: {error.message}")
    return errors


# --------------------------------------------------------------------------------------------
# fixtures and loaders


def _crd_dir() -> Path:
    configured = os.environ.get("LVM_RAY_SHARED_KUBERAY")
    path = Path(configured) if configured else REPO_ROOT.parent / "shared" / "kuberay" / "crds"
    return path / "crds" if (path / "crds").is_dir() else path


@pytest.fixture(scope="session")
def crds() -> dict[str, Crd]:
    """The KubeRay CRDs from ../shared/kuberay/crds (or $LVM_RAY_SHARED_KUBERAY), by kind."""
    path = _crd_dir()
    missing = [name for name in CRD_FILES if not (path / name).is_file()]
    if missing and os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(f"KubeRay CRDs not found in {path} (missing {', '.join(missing)}); CI must validate the manifests")
    if missing:
        pytest.skip(
            f"KubeRay CRDs not found in {path} (missing {', '.join(missing)}); "
            "set LVM_RAY_SHARED_KUBERAY to the folder holding ray.io_*.yaml"
        )
    loaded = [load_crd(path / name) for name in CRD_FILES]
    return {crd.kind: crd for crd in loaded}


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> dict[str, dict[str, Any]]:
    """Every KubeRay object in cluster/kuberay, by metadata.name and kind ('lvm-ray-train' ...)."""
    return {f"{doc['kind']}/{doc['metadata']['name']}": doc for path in KUBERAY_MANIFESTS for doc in load_docs(path)}


def cluster_spec(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The RayCluster spec inside a RayCluster, RayJob or RayService."""
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        doc["kind"]
    ]


def find_images(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("image", "head_image", "worker_image") and isinstance(value, str):
                yield value
            else:
                yield from find_images(value)
    elif isinstance(node, list):
        for item in node:
            yield from find_images(item)


def image_tag(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else "latest"


def gpus(group: Mapping[str, Any]) -> int:
    (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


RAY_CONTAINERS = ("ray-head", "ray-worker")


def ray_containers(doc: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(group, Ray container) for the head group and every worker group (not sidecars)."""
    spec = cluster_spec(doc)
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        for container in group["template"]["spec"]["containers"]:
            if container["name"] in RAY_CONTAINERS:
                yield group, container


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity_bytes(text: str) -> int:
    """'250Gi' -> bytes (the binary and decimal suffixes Kubernetes quantities use for storage)."""
    match = re.fullmatch(r"(\d+)([KMGT]i?|k)?", str(text))
    assert match, f"not a storage quantity: {text!r}"
    return int(match[1]) * _UNITS.get(match[2] or "", 1)


# --------------------------------------------------------------------------------------------
# KubeRay manifests


#: Where the docs point at repository files (cluster/..., jobs/...).
DOC_FILES = (
    REPO_ROOT / "README.md",
    REPO_ROOT / "cluster" / "README.md",
    DOCKERFILE,
    SERVE_CONFIG,
    RUNTIME_ENV,
    *KUBERAY_MANIFESTS,
    *LAUNCHER_CONFIGS,
)
REPO_PATH = re.compile(r"(?<![\w/.-])((?:cluster|jobs)/[\w./-]*\w)")


def test_every_file_the_docs_and_manifests_name_exists() -> None:
    named = {
        (doc.name, match)
        for doc in DOC_FILES
        for match in REPO_PATH.findall(doc.read_text())
        if not match.endswith("/")  # a folder reference checks below
    }
    assert {m for _, m in named} >= {"cluster/kuberay/raycluster.yaml", "jobs/train.py"}, named
    missing = sorted(f"{doc}: {path}" for doc, path in named if not (REPO_ROOT / path).exists())
    assert not missing, missing


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_the_crd(path: Path, crds: dict[str, Crd]) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no object"
    errors = [error for doc in docs for error in manifest_errors(doc, crds)]
    assert not errors, "\n".join(errors)


def _set(path: str, value: Any) -> Any:
    """A change to the RayCluster manifest: set the dotted ``path`` ([n] indexes lists) to ``value``."""
    keys = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]

    def change(doc: dict[str, Any]) -> None:
        node = doc
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return change


CONTAINER = "spec.headGroupSpec.template.spec.containers[0]"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("spec.workerGroupSpecs[0].replicas", "two"), "workerGroupSpecs[0].replicas: 'two' is not of type"),
        (_set("apiVersion", "ray.io/v2"), "apiVersion 'ray.io/v2' is not ray.io/v1 (the RayCluster CRD serves"),
        (_set("spec.workerGroupSpecs[0].maxReplica", 8), "('maxReplica' was unexpected)"),  # a typo
        (_set("spec.headGroupSpec.rayStartParams.num-cpus", 0), "rayStartParams.num-cpus: 0 is not of type 'string'"),
        (_set(f"{CONTAINER}.resources.limits.cpu", "eight"), "containers[0].resources.limits.cpu"),
        (_set(f"{CONTAINER}.resources.limits.cpu", [8]), "containers[0].resources.limits.cpu"),
        (_set("spec.workerGroupSpecs[0].maxReplicas", 2**31), "maxReplicas"),  # int32
        (_set("metadata.name", "LVM_Ray"), "metadata.name must be a DNS-1123 subdomain"),
    ],
)
def test_the_crd_check_catches_real_mistakes(crds: dict[str, Crd], change: Any, message: str) -> None:
    """What kubectl apply would refuse, the offline check refuses too (so passing means something)."""
    doc = manifests()["RayCluster/lvm-ray"]
    change(doc)
    errors = manifest_errors(doc, crds)
    assert len(errors) == 1 and message in errors[0], errors


@pytest.mark.parametrize(
    "change",
    [
        _set(f"{CONTAINER}.resources.limits.cpu", 8),  # quantities are int-or-string
        _set(f"{CONTAINER}.resources.limits.cpu", "500m"),
        _set("spec.headGroupSpec.template.metadata", {"annotations": {"any/key": "x"}}),
        lambda d: d["spec"]["workerGroupSpecs"][0].pop("minReplicas"),  # the API server defaults it
    ],
)
def test_the_crd_check_accepts_what_the_api_server_accepts(crds: dict[str, Crd], change: Any) -> None:
    doc = manifests()["RayCluster/lvm-ray"]
    change(doc)
    assert manifest_errors(doc, crds) == []


def test_raycluster_autoscales_a_gpu_group_from_zero() -> None:
    spec = manifests()["RayCluster/lvm-ray"]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = [g for g in spec["workerGroupSpecs"] if gpus(g) > 0]
    assert gpu_groups and all(g["minReplicas"] == 0 < g["maxReplicas"] for g in gpu_groups)
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_every_cluster_keeps_token_auth_on() -> None:
    for key, doc in manifests().items():
        assert cluster_spec(doc).get("authOptions", {}).get("mode") == "token", key


def _cli_params(command: str, argv: list[str]) -> dict[str, Any]:
    """What `lvm-ray <command> argv` parses to, without running it (click raises on bad flags)."""
    import click
    import typer

    from lvm_ray.cli import app

    group = typer.main.get_command(app)
    sub = group.get_command(click.Context(group), command)
    assert sub is not None, f"lvm-ray has no {command!r} command"
    return sub.make_context(command, list(argv)).params


def test_job_entrypoints_parse_with_the_real_cli() -> None:
    """Each RayJob runs a script of this repository whose flags the CLI command behind it accepts."""
    from lvm_ray.presets import PRESETS

    jobs = {key: doc for key, doc in manifests().items() if key.startswith("RayJob/")}
    assert len(jobs) == 2
    for key, doc in jobs.items():
        words = shlex.split(doc["spec"]["entrypoint"])
        assert words[0] == "python" and (REPO_ROOT / words[1]).is_file(), f"{key}: {words[:2]}"
        command = Path(words[1]).stem  # jobs/train.py forwards to `lvm-ray train` (checked below)
        params = _cli_params(command, words[2:])
        assert params["address"] == "auto", key  # the driver joins the job's own cluster
        assert doc["spec"]["shutdownAfterJobFinishes"] is True and doc["spec"]["ttlSecondsAfterFinished"] > 0
        if command == "train":
            assert params["preset"] in PRESETS and params["use_gpu"] is True
        help_text = subprocess.run(
            [sys.executable, words[1], "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
        )
        assert help_text.returncode == 0 and "--address" in help_text.stdout, help_text.stderr


def test_training_job_has_a_gpu_for_every_worker() -> None:
    doc = manifests()["RayJob/lvm-ray-train"]
    params = _cli_params("train", shlex.split(doc["spec"]["entrypoint"])[2:])
    groups = [g for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"] if gpus(g) > 0]
    # Fixed-size groups: the GPUs are all there when the job starts, one per Ray Train worker.
    assert all(g["replicas"] == g["minReplicas"] == g["maxReplicas"] for g in groups)
    assert params["use_gpu"] is True
    assert sum(g["replicas"] * gpus(g) for g in groups) == params["num_workers"]


@pytest.mark.parametrize("name", ["RayJob/lvm-ray-train", "RayJob/lvm-ray-score"])
def test_rayjob_retries_resume_the_same_run(name: str) -> None:
    """KubeRay retries a failed job on a new cluster with the same entrypoint: the run (or the
    predictions folder) is a fixed object-storage URL, so the retry resumes it; an attempt that
    never starts (no GPU capacity, an image that does not pull) fails after a deadline."""
    spec = manifests()[name]["spec"]
    assert spec["backoffLimit"] >= 1
    assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"]
    # KubeRay (v1.7 ValidateRayJobSpec) refuses retries in InteractiveMode, a TTL without
    # shutdownAfterJobFinishes, and a deletionStrategy unless a feature gate is on.
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode" and "deletionStrategy" not in spec
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    words = shlex.split(spec["entrypoint"])
    command = Path(words[1]).stem
    params = _cli_params(command, words[2:])
    resumed = params["run"] if command == "train" else params["out"]
    assert re.match(r"^(s3|gs)://", resumed), resumed  # outlives every cluster


def test_training_job_logs_outlive_its_cluster() -> None:
    """Each pod of the training job copies Ray's log files (driver on the head, workers on the
    GPU pods) from the Ray container's /tmp/ray to a sidecar's stdout, which the Kubernetes log
    pipeline keeps after the pods are gone."""
    doc = manifests()["RayJob/lvm-ray-train"]
    for group, container in ray_containers(doc):
        (volume,) = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp/ray"]
        sidecars = [c for c in group["template"]["spec"]["containers"] if c["name"] not in RAY_CONTAINERS]
        (tailer,) = [c for c in sidecars if any(m["name"] == volume for m in c.get("volumeMounts", []))]
        paths = next(a for a in tailer["args"] if a.startswith("path="))
        wanted = "job-driver-" if container["name"] == "ray-head" else "worker-"
        assert f"/tmp/ray/session_latest/logs/{wanted}" in paths, paths


ACCELERATOR_LABELS = {"cloud.google.com/gke-accelerator", "node.kubernetes.io/instance-type"}


def test_gpu_pods_land_on_gpu_nodes_with_room_to_spill() -> None:
    """Every Ray pod keeps /tmp/ray (logs, object spilling) on an emptyDir that fits its
    ephemeral-storage limit; GPU pods select accelerator nodes (GKE auto-provisioning creates a
    GPU pool only from the selector) and tolerate the GPU taint; those that can train tell NCCL
    which interface to use."""
    for key, doc in manifests().items():
        for group, container in ray_containers(doc):
            pod = group["template"]["spec"]
            resources = container["resources"]
            assert "ephemeral-storage" in resources["requests"], (key, container["name"])
            (volume,) = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp/ray"]
            (spill,) = [v["emptyDir"] for v in pod["volumes"] if v["name"] == volume]
            assert quantity_bytes(spill["sizeLimit"]) <= quantity_bytes(resources["limits"]["ephemeral-storage"])
            if not int(resources["limits"].get("nvidia.com/gpu", 0)):
                continue
            assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
            assert set(pod["nodeSelector"]) & ACCELERATOR_LABELS, (key, pod.get("nodeSelector"))
            trains = doc["kind"] == "RayCluster" or "jobs/train.py" in doc["spec"].get("entrypoint", "")
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("NCCL_SOCKET_IFNAME") or not trains, (key, env)  # DDP's all-reduce between pods


#: Where jobs/publish_model.py puts a model: <to>/<preset>-<epoch|ensemble>-<weights digest>/model.pt.
PUBLISHED_MODEL = re.compile(r"/[a-z0-9.-]+-(epoch\d+|ensemble\d+)-[0-9a-f]{12}/model\.pt$")


def test_the_endpoint_serves_a_published_model_from_replicas_on_different_pods() -> None:
    spec = importlib.util.spec_from_file_location("publish_model", REPO_ROOT / "jobs" / "publish_model.py")
    assert spec and spec.loader
    publish = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(publish)
    example = publish.version_folder("0.1.0/lvm-ai-2021/epoch57/3f2a9c1b7d4e") + "/model.pt"
    assert PUBLISHED_MODEL.search("/" + example)

    (app,) = _serve_configs()["rayservice serveConfigV2"]["applications"]
    assert PUBLISHED_MODEL.search(app["args"]["checkpoint"]), app["args"]["checkpoint"]
    score = manifests()["RayJob/lvm-ray-score"]["spec"]["entrypoint"]
    assert PUBLISHED_MODEL.search(_cli_params("score", shlex.split(score)[2:])["checkpoint"])

    (deployment,) = app["deployments"]
    auto = deployment["autoscaling_config"]
    assert deployment["max_replicas_per_node"] == 1
    doc = manifests()["RayService/lvm-ray-endpoint"]
    replica_groups = [g for g in cluster_spec(doc)["workerGroupSpecs"]]
    assert sum(g["minReplicas"] for g in replica_groups) >= auto["min_replicas"] >= 2
    assert sum(g["maxReplicas"] for g in replica_groups) >= auto["max_replicas"]
    for group in replica_groups:
        labels = group["template"]["metadata"]["labels"]
        spread = group["template"]["spec"]["topologySpreadConstraints"]
        assert any(c["topologyKey"] == "kubernetes.io/hostname" for c in spread)
        assert all(c["labelSelector"]["matchLabels"].items() <= labels.items() for c in spread)
        (container,) = [c for c in group["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
        assert float(container["resources"]["limits"]["cpu"]) >= deployment["ray_actor_options"]["num_cpus"]


def test_ingress_puts_tls_and_auth_in_front_of_the_serve_service() -> None:
    (ingress,) = load_docs(INGRESS)
    assert (ingress["apiVersion"], ingress["kind"]) == ("networking.k8s.io/v1", "Ingress")
    service_name = manifests()["RayService/lvm-ray-endpoint"]["metadata"]["name"] + "-serve-svc"  # KubeRay's name
    port = _serve_configs()["rayservice serveConfigV2"].get("http_options", {}).get("port", 8000)
    rules = ingress["spec"]["rules"]
    backends = [p["backend"]["service"] for r in rules for p in r["http"]["paths"]]
    assert backends == [{"name": service_name, "port": {"number": port}}]
    assert {r["host"] for r in rules} <= {h for t in ingress["spec"]["tls"] for h in t["hosts"]}
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/auth-type"] == "basic"
    assert annotations["nginx.ingress.kubernetes.io/auth-secret"]
    assert annotations["nginx.ingress.kubernetes.io/force-ssl-redirect"] == "true"


# --------------------------------------------------------------------------------------------
# one Ray version everywhere


def _pinned_ray() -> Any:
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (ray_req,) = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "ray"]
    return ray_req.specifier


def test_ray_version_is_the_same_everywhere() -> None:
    import ray

    version = ray.__version__
    assert version in _pinned_ray(), f"installed Ray {version} is not what pyproject.toml pins ({_pinned_ray()})"
    for key, doc in manifests().items():
        assert cluster_spec(doc)["rayVersion"] == version, key

    images = [container["image"] for doc in manifests().values() for _, container in ray_containers(doc)]
    for path in LAUNCHER_CONFIGS:
        images += list(find_images(yaml.safe_load(path.read_text())["docker"]))
    assert images
    for image in images:
        assert version in image_tag(image), f"image {image} does not carry Ray {version} in its tag"
    assert len(set(images)) == 1, f"one image everywhere, found {sorted(set(images))}"

    (base,) = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert base.startswith("rayproject/ray:") and image_tag(base).startswith(f"{version}-"), base


#: The project image's tags end in the commit they were built from: never reused.
IMMUTABLE_TAG = re.compile(r"-g[0-9a-f]{7,40}$")


def test_images_name_a_registry_and_an_immutable_tag() -> None:
    """No bare name (which pulls from Docker Hub) and no reusable tag (which a node that cached
    it never refreshes): the project image's tag ends in its commit, others pin a release."""
    images = {image for doc in manifests().values() for image in find_images(doc)}
    for path in LAUNCHER_CONFIGS:
        images |= set(find_images(yaml.safe_load(path.read_text())["docker"]))
    for image in images:
        registry = image.split("/", 1)[0]
        assert "/" in image and ("." in registry or ":" in registry), f"{image}: no registry host"
        tag = image_tag(image)
        assert "@sha256:" in image or (tag != "latest" and re.search(r"\d+\.\d+", tag)), image
    ours = {image for image in images if "/lvm-ray:" in image}
    assert ours and all(IMMUTABLE_TAG.search(image_tag(image)) for image in ours), ours


def test_the_image_tag_names_the_cuda_torch_is_built_for() -> None:
    """One CUDA in the image, torch's: the base is Ray's CPU image, the build checks torch's CUDA
    version, and the tag says it (-cu130- for 13.0), which is what decides the driver nodes need."""
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert image_tag(base).endswith("-cpu"), base
    (cuda,) = re.findall(r"^ARG TORCH_CUDA=(\S+)$", text, flags=re.MULTILINE)
    assert "torch.version.cuda" in text and "${TORCH_CUDA}" in text
    tags = {image_tag(container["image"]) for doc in manifests().values() for _, container in ray_containers(doc)}
    assert tags and all(f"-cu{cuda.replace('.', '')}-" in tag for tag in tags), (cuda, tags)


def _torch_pin(text: str) -> str:
    (pin,) = set(re.findall(r"torch==([\w.+-]+)", text))
    return pin


def test_torch_is_pinned_alike_and_before_the_package() -> None:
    """The image, the Makefile and pyproject.toml install one torch, the image before the package
    (so that `pip install .` keeps the image's build)."""
    text = DOCKERFILE.read_text()
    pins = {
        "Dockerfile": _torch_pin(text),
        "Makefile": _torch_pin((REPO_ROOT / "Makefile").read_text()),
        "pyproject.toml": _torch_pin((REPO_ROOT / "pyproject.toml").read_text()),
    }
    assert len(set(pins.values())) == 1, pins
    assert text.index("torch==") < text.index("pip install --no-cache-dir .")


def test_what_the_image_copies_exists_and_reaches_the_build() -> None:
    """Every COPY source exists and is not filtered out by the Dockerfile's .dockerignore."""
    from ray._private.thirdparty.pathspec import PathSpec

    sources = [
        word
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith("COPY ")
        for word in line.split()[1:-1]
        if not word.startswith("--")
    ]
    assert {"lvm_ray", "jobs", "pyproject.toml"} <= set(sources), sources
    ignore = [line for line in (REPO_ROOT / "cluster" / "Dockerfile.dockerignore").read_text().splitlines()]
    spec = PathSpec.from_lines("gitwildmatch", [line for line in ignore if line and not line.startswith("#")])
    for source in sources:
        path = REPO_ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        assert files and not any(spec.match_file(str(f.relative_to(REPO_ROOT))) for f in files), source


# --------------------------------------------------------------------------------------------
# Ray cluster launcher


@pytest.fixture(scope="session")
def launcher_validator() -> jsonschema.Draft7Validator:
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_validates_against_ray_schema(path: Path, launcher_validator: Any) -> None:
    config = yaml.safe_load(path.read_text())
    errors = [f"{_path(e.absolute_path)}: {e.message}" for e in launcher_validator.iter_errors(config)]
    assert not errors, "\n".join(errors)

    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    node = json.dumps(workers)
    assert any(marker in node for marker in ("p4d.", "g5.", "a2-", "guestAccelerators")), "no GPU worker type"
    assert sum(t.get("max_workers", 0) for t in workers.values()) <= config["max_workers"]
    assert any("pip install" in c and "lvm-ray" in c for c in config["setup_commands"])


def test_a_broken_launcher_config_is_rejected(launcher_validator: Any) -> None:
    config = yaml.safe_load((LAUNCHER_DIR / "aws-gpu.yaml").read_text())
    config["docker"]["imagee"] = config["docker"].pop("image")
    config["available_node_types"]["gpu_8x"]["resources"] = {"GPU": "8"}
    messages = sorted(e.message for e in launcher_validator.iter_errors(config))
    assert messages == [
        "'8' is not of type 'integer'",
        "Additional properties are not allowed ('imagee' was unexpected)",
    ]


def test_every_launcher_node_reaches_the_bucket() -> None:
    """Workers read shards and write checkpoints: every AWS node type has an instance profile;
    every GCP worker type runs as a service account with the cloud-platform scope (Ray gives the
    GCP head its own account with storage access)."""
    aws = yaml.safe_load((LAUNCHER_DIR / "aws-gpu.yaml").read_text())
    for name, node_type in aws["available_node_types"].items():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    gcp = yaml.safe_load((LAUNCHER_DIR / "gcp-gpu.yaml").read_text())
    for name, node_type in gcp["available_node_types"].items():
        if name == gcp["head_node_type"]:
            continue
        (account,) = node_type["node_config"]["serviceAccounts"]
        assert account["email"].endswith(".iam.gserviceaccount.com"), name
        assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"], name


def test_gcp_gpu_nodes_wait_for_the_driver_install(tmp_path: Path) -> None:
    """A GCP GPU node installs its driver on first boot; its initialization command waits until
    nvidia-smi works (here a stand-in that works on the third call) before Docker starts."""
    gcp = yaml.safe_load((LAUNCHER_DIR / "gcp-gpu.yaml").read_text())
    gpu_types = [t for t in gcp["available_node_types"].values() if t["node_config"].get("guestAccelerators")]
    assert gpu_types
    for node_type in gpu_types:
        (command,) = [c for c in node_type["initialization_commands"] if "nvidia-smi" in c]
        fake = tmp_path / "nvidia-smi"
        fake.write_text(
            '#!/bin/sh\nn=$(cat "$0.calls" 2>/dev/null || echo 0); echo $((n+1)) > "$0.calls"; [ "$n" -ge 2 ]\n'
        )
        fake.chmod(0o755)
        fast = command.replace("sleep 10", "sleep 0.1")
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
        done = subprocess.run(["bash", "-c", fast], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "nvidia-smi.calls").read_text().strip() == "3"
        (tmp_path / "nvidia-smi.calls").unlink()


# --------------------------------------------------------------------------------------------
# Serve configs and runtime environments


def _check_serve_config(config: Mapping[str, Any]) -> Any:
    """Parse with Ray Serve's schema; also reject keys it would silently ignore (typos)."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    parsed = ServeDeploySchema.model_validate(config)
    assert set(config) <= set(ServeDeploySchema.model_fields)
    for app in config["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), set(app) - set(ServeApplicationSchema.model_fields)
        for deployment in app.get("deployments", []):
            assert set(deployment) <= set(DeploymentSchema.model_fields)
            if "autoscaling_config" in deployment:
                assert set(deployment["autoscaling_config"]) <= set(AutoscalingConfig.model_fields)
                AutoscalingConfig.model_validate(deployment["autoscaling_config"])
            if "ray_actor_options" in deployment:
                assert set(deployment["ray_actor_options"]) <= set(RayActorOptionsSchema.model_fields)
    return parsed


def _serve_configs() -> dict[str, dict[str, Any]]:
    rayservice = manifests()["RayService/lvm-ray-endpoint"]
    return {
        "jobs/serve_config.yaml": yaml.safe_load(SERVE_CONFIG.read_text()),
        "rayservice serveConfigV2": yaml.safe_load(rayservice["spec"]["serveConfigV2"]),
    }


@pytest.mark.parametrize("name", ["jobs/serve_config.yaml", "rayservice serveConfigV2"])
def test_serve_config_builds_the_project_app(name: str) -> None:
    """Ray Serve's schema parses it; its import path builds the app from its args (without loading
    a model) and names deployments the app defines, with options the deployment can use."""
    from ray import serve

    config = _serve_configs()[name]
    parsed = _check_serve_config(config)
    (app,) = parsed.applications
    assert app.route_prefix == "/"
    module_name, attr = app.import_path.split(":")
    module = importlib.import_module(module_name)
    built = getattr(module, attr)(dict(app.args), loader=_no_model)  # unknown args raise here
    assert isinstance(built, serve.Application)
    defined = {obj.name for obj in vars(module).values() if isinstance(obj, serve.Deployment)}
    (deployment,) = config["applications"][0]["deployments"]
    assert deployment["name"] in defined, f"{module_name} defines {sorted(defined)}"
    # A batch never fills when fewer requests than the batch size may be in flight.
    batch = int(app.args.get("max_batch_size", 16))
    assert deployment["max_ongoing_requests"] >= batch, (deployment["max_ongoing_requests"], batch)
    auto = deployment["autoscaling_config"]
    assert 1 <= auto["min_replicas"] <= auto["max_replicas"]


def test_local_serve_config_serves_where_lvm_ray_serve_does() -> None:
    """`serve run jobs/serve_config.yaml` and `lvm-ray serve` answer at the same address."""
    config = _serve_configs()["jobs/serve_config.yaml"]
    defaults = _cli_params("serve", ["--checkpoint", "x"])
    assert config["http_options"] == {"host": defaults["host"], "port": defaults["port"]}


def test_cluster_serve_config_is_reachable_from_the_service() -> None:
    http = _serve_configs()["rayservice serveConfigV2"].get("http_options", {})
    assert http.get("host", "0.0.0.0") != "127.0.0.1", "a proxy on 127.0.0.1 is unreachable from the k8s Service"


def test_a_broken_serve_config_is_rejected() -> None:
    from pydantic import ValidationError

    config = _serve_configs()["jobs/serve_config.yaml"]
    config["applications"][0]["deployments"][0]["max_ongoing_requests"] = "many"
    with pytest.raises(ValidationError, match="max_ongoing_requests"):
        _check_serve_config(config)


def _no_model() -> Any:
    raise AssertionError("binding the app must not load the model")


def _runtime_envs() -> dict[str, dict[str, Any]]:
    envs = {"jobs/runtime_env.yaml": yaml.safe_load(RUNTIME_ENV.read_text())}
    for key, doc in manifests().items():
        if "runtimeEnvYAML" in doc["spec"]:
            envs[key] = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    return envs


@pytest.mark.parametrize("name", ["jobs/runtime_env.yaml", "RayJob/lvm-ray-train", "RayJob/lvm-ray-score"])
def test_runtime_env_is_valid(name: str) -> None:
    from ray.runtime_env import RuntimeEnv

    env = _runtime_envs()[name]
    assert isinstance(env, dict) and env
    unknown = set(env) - set(RuntimeEnv.known_fields)
    assert not unknown, f"{name}: not runtime_env fields: {sorted(unknown)}"  # RuntimeEnv(**env) would accept them
    RuntimeEnv(**env)
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())


def test_runtime_env_uploads_the_package_and_not_the_bulk(tmp_path: Path) -> None:
    """The package `ray job submit --runtime-env jobs/runtime_env.yaml` builds from this checkout
    (Ray's own packaging code, same excludes and .gitignore) holds the code, fits Ray's limit,
    and leaves out the virtualenv, git and test data."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package

    env = _runtime_envs()["jobs/runtime_env.yaml"]
    package = tmp_path / "working_dir.zip"
    create_package(str(REPO_ROOT / env["working_dir"]), package, include_gitignore=True, excludes=list(env["excludes"]))
    with zipfile.ZipFile(package) as archive:
        names = set(archive.namelist())
    assert {"lvm_ray/__init__.py", "lvm_ray/cli.py", "jobs/train.py", "jobs/score.py", "pyproject.toml"} <= names
    bulky = sorted(n for n in names if n.startswith((".venv/", ".git/", "tests/fixtures/", "demo_output/")))
    assert not bulky, bulky[:10]
    assert package.stat().st_size < GCS_STORAGE_MAX_SIZE // 10, package.stat().st_size
