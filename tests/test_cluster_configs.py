"""The cluster configuration validates offline, the way the cluster would read it.

- KubeRay manifests (cluster/kuberay/*.yaml) against the KubeRay CRDs' v1 openAPIV3Schema, with
  schema defaults filled in first as the API server does, and unknown fields rejected as
  `kubectl apply` (strict field validation) does, except under x-kubernetes-preserve-unknown-fields;
- cluster-launcher YAML (cluster/launcher/*.yaml) against ray/autoscaler/ray-schema.json of the
  installed Ray;
- one Ray version everywhere: pyproject.toml's pin, the installed Ray, every rayVersion, every
  image tag and the Dockerfile's base image;
- jobs/serve_config.yaml and the RayService's serveConfigV2 with Ray Serve's own schema;
  jobs/runtime_env.yaml and the RayJobs' runtimeEnvYAML as Ray runtime environments.
Not checked: the CRDs' CEL rules (x-kubernetes-validations; none applies to fields we set) and
anything only a live cluster knows (images pulling, nodes fitting the requests).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import json
import os
import re
import shlex
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
DOCKERFILE = REPO_ROOT / "cluster" / "Dockerfile"
SERVE_CONFIG = REPO_ROOT / "jobs" / "serve_config.yaml"
RUNTIME_ENV = REPO_ROOT / "jobs" / "runtime_env.yaml"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")

IMPORT_PATH = "lvm_ray.serve:build_app"
DEPLOYMENT = "LVMassPredictor"
# The flags fixed by the project's interface (DESIGN.md); jobs/*.py take the same.
JOB_FLAGS = {
    "jobs/train.py": {"--data", "--run", "--preset", "--target", "--num-workers", "--use-gpu", "--address"},
    "jobs/score.py": {"--data", "--checkpoint", "--out", "--address"},
}

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


def entrypoint_args(entrypoint: str) -> tuple[str, dict[str, str | None]]:
    """('jobs/train.py', {'--data': 's3://...', '--use-gpu': None, ...}) from 'python jobs/train.py ...'."""
    words = shlex.split(entrypoint)
    assert words[0] == "python", entrypoint
    flags: dict[str, str | None] = {}
    for i, word in enumerate(words[2:], start=2):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
            flags[word] = value
    return words[1], flags


# --------------------------------------------------------------------------------------------
# KubeRay manifests


def test_the_expected_manifests_are_there() -> None:
    assert {p.name for p in KUBERAY_MANIFESTS} >= {
        "raycluster.yaml",
        "rayjob-train.yaml",
        "rayjob-score.yaml",
        "rayservice.yaml",
    }
    kinds = sorted(key.split("/")[0] for key in manifests())
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayService"]


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_the_crd(path: Path, crds: dict[str, Crd]) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no object"
    errors = [error for doc in docs for error in manifest_errors(doc, crds)]
    assert not errors, "\n".join(errors)


def test_defaults_are_filled_as_the_api_server_does(crds: dict[str, Crd]) -> None:
    doc = manifests()["RayCluster/lvm-ray"]
    del doc["spec"]["workerGroupSpecs"][0]["minReplicas"]
    del doc["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    plain = manifest_errors(doc, crds, defaults=False)
    assert any("'minReplicas' is a required property" in e for e in plain), plain
    assert any("'maxReplicas' is a required property" in e for e in plain), plain
    assert manifest_errors(doc, crds) == []
    filled = fill_defaults(copy.deepcopy(doc), crds["RayCluster"].schema)
    group = filled["spec"]["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (0, 2**31 - 1)
    assert "minReplicas" not in doc["spec"]["workerGroupSpecs"][0], "defaulting must not touch its input"
    # Defaults reach into lists: every container port gets protocol TCP.
    head = filled["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {port["protocol"] for port in head["ports"]} == {"TCP"}


def _broken(crds: dict[str, Crd], change: Any) -> list[str]:
    doc = manifests()["RayCluster/lvm-ray"]
    change(doc)
    return manifest_errors(doc, crds)


def test_wrong_type_for_replicas_is_rejected_clearly(crds: dict[str, Crd]) -> None:
    errors = _broken(crds, lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="two"))
    assert errors == ["RayCluster 'lvm-ray': spec.workerGroupSpecs[0].replicas: 'two' is not of type 'integer'"]


def test_unknown_api_version_is_rejected_clearly(crds: dict[str, Crd]) -> None:
    errors = _broken(crds, lambda d: d.update(apiVersion="ray.io/v2"))
    assert len(errors) == 1 and "apiVersion 'ray.io/v2' is not ray.io/v1" in errors[0], errors
    assert "ray.io/v1alpha1" in errors[0]  # says what the CRD serves


def test_unknown_field_is_rejected_clearly(crds: dict[str, Crd]) -> None:
    errors = _broken(crds, lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplica=8))
    assert errors == [
        "RayCluster 'lvm-ray': spec.workerGroupSpecs[0]: Additional properties are not allowed "
        "('maxReplica' was unexpected)"
    ]


def test_ray_start_params_must_be_strings(crds: dict[str, Crd]) -> None:
    errors = _broken(crds, lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}))
    assert errors == ["RayCluster 'lvm-ray': spec.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'"]


@pytest.mark.parametrize(("value", "ok"), [("8", True), (8, True), ("500m", True), ("eight", False), ([8], False)])
def test_int_or_string_quantities(crds: dict[str, Crd], value: Any, ok: bool) -> None:
    def change(doc: dict[str, Any]) -> None:
        doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = value

    errors = _broken(crds, change)
    assert (errors == []) == ok, errors
    if not ok:
        assert "containers[0].resources.limits.cpu" in errors[0]


def test_preserve_unknown_fields_and_nullable() -> None:
    schema = {
        "type": "object",
        "properties": {
            "strict": {"type": "object", "properties": {"a": {"type": "string"}}},
            "open": {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "x-kubernetes-preserve-unknown-fields": True,
            },
            "maybe": {"type": "string", "nullable": True},
        },
    }
    validator = jsonschema.Draft7Validator(to_json_schema(schema))
    assert validator.is_valid({"open": {"a": "x", "anything": {"b": 1}}, "maybe": None})
    assert not validator.is_valid({"strict": {"a": "x", "anything": 1}})
    assert not validator.is_valid({"open": {"a": 1}})  # known fields are still typed


def test_int32_fields_are_range_checked(crds: dict[str, Crd]) -> None:
    errors = _broken(crds, lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas=2**31))
    assert len(errors) == 1 and "maxReplicas" in errors[0] and "int32" in errors[0], errors


def test_raycluster_autoscales_a_gpu_group_from_zero() -> None:
    spec = manifests()["RayCluster/lvm-ray"]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = [g for g in spec["workerGroupSpecs"] if gpus(g) > 0]
    assert gpu_groups and all(g["minReplicas"] == 0 < g["maxReplicas"] for g in gpu_groups)
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_every_cluster_keeps_token_auth_on() -> None:
    for key, doc in manifests().items():
        assert cluster_spec(doc).get("authOptions", {}).get("mode") == "token", key


def test_job_entrypoints_use_the_project_commands() -> None:
    from lvm_ray.presets import PRESETS

    jobs = {key: doc for key, doc in manifests().items() if key.startswith("RayJob/")}
    scripts = {}
    for key, doc in jobs.items():
        script, flags = entrypoint_args(doc["spec"]["entrypoint"])
        scripts[script] = flags
        assert script in JOB_FLAGS, f"{key}: unknown entrypoint {script}"
        assert set(flags) <= JOB_FLAGS[script], f"{key}: flags outside the interface: {set(flags) - JOB_FLAGS[script]}"
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        assert doc["spec"]["ttlSecondsAfterFinished"] > 0
        assert flags.get("--address") == "auto"
    assert {"--data", "--run"} <= set(scripts["jobs/train.py"])
    assert {"--data", "--checkpoint", "--out"} <= set(scripts["jobs/score.py"])
    assert scripts["jobs/train.py"]["--preset"] in PRESETS


def test_training_job_has_a_gpu_for_every_worker() -> None:
    doc = manifests()["RayJob/lvm-ray-train"]
    _, flags = entrypoint_args(doc["spec"]["entrypoint"])
    assert "--use-gpu" in flags
    groups = [g for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"] if gpus(g) > 0]
    # Fixed-size groups: the GPUs are all there when the job starts.
    assert all(g["replicas"] == g["minReplicas"] == g["maxReplicas"] for g in groups)
    assert sum(g["replicas"] * gpus(g) for g in groups) == int(flags["--num-workers"]) == 32


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

    images = [image for doc in manifests().values() for image in find_images(doc)]
    for path in LAUNCHER_CONFIGS:
        images += list(find_images(yaml.safe_load(path.read_text())["docker"]))
    assert images
    for image in images:
        assert version in image_tag(image), f"image {image} does not carry Ray {version} in its tag"
    assert len(set(images)) == 1, f"one image everywhere, found {sorted(set(images))}"

    (base,) = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert base.startswith("rayproject/ray:") and image_tag(base).startswith(f"{version}-"), base


def test_dockerfile_pins_torch_before_the_package() -> None:
    text = DOCKERFILE.read_text()
    assert text.index("torch==2.13.0") < text.index("pip install --no-cache-dir .")


# --------------------------------------------------------------------------------------------
# Ray cluster launcher


@pytest.fixture(scope="session")
def launcher_validator() -> jsonschema.Draft7Validator:
    import ray

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_launcher_configs_exist() -> None:
    assert {p.name for p in LAUNCHER_CONFIGS} >= {"aws-gpu.yaml", "gcp-gpu.yaml"}


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
def test_serve_config_parses_and_names_the_project_app(name: str) -> None:
    config = _serve_configs()[name]
    parsed = _check_serve_config(config)
    (app,) = parsed.applications
    assert app.import_path == IMPORT_PATH
    assert app.route_prefix == "/"
    assert [d.name for d in app.deployments] == [DEPLOYMENT]
    assert "checkpoint" in app.args
    (deployment,) = config["applications"][0]["deployments"]
    auto = deployment["autoscaling_config"]
    assert 1 <= auto["min_replicas"] <= auto["max_replicas"]


def test_local_serve_config_listens_on_localhost_8000() -> None:
    config = _serve_configs()["jobs/serve_config.yaml"]
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    assert config["applications"][0]["args"] == {"checkpoint": "demo_output/run"}


def test_cluster_serve_config_is_reachable_from_the_service() -> None:
    http = _serve_configs()["rayservice serveConfigV2"].get("http_options", {})
    assert http.get("host", "0.0.0.0") != "127.0.0.1", "a proxy on 127.0.0.1 is unreachable from the k8s Service"


def test_a_broken_serve_config_is_rejected() -> None:
    from pydantic import ValidationError

    config = _serve_configs()["jobs/serve_config.yaml"]
    config["applications"][0]["deployments"][0]["max_ongoing_requests"] = "many"
    with pytest.raises(ValidationError, match="max_ongoing_requests"):
        _check_serve_config(config)


def test_serve_import_path_imports() -> None:
    """Starts checking the moment lvm_ray/serve.py lands (import errors inside it fail, not skip)."""
    module_name, attr = IMPORT_PATH.split(":")
    if importlib.util.find_spec(module_name) is None:
        pytest.skip(f"{module_name} does not exist yet")
    from ray import serve

    module = importlib.import_module(module_name)
    build_app = getattr(module, attr)
    assert callable(build_app)
    names = {obj.name for obj in vars(module).values() if isinstance(obj, serve.Deployment)}
    assert DEPLOYMENT in names, f"{module_name} defines deployments {sorted(names)}, the configs name {DEPLOYMENT}"
    if "loader" in inspect.signature(build_app).parameters:  # bind without loading a checkpoint
        for name, config in _serve_configs().items():
            app = build_app(dict(config["applications"][0]["args"]), loader=_no_model)
            assert isinstance(app, serve.Application), name


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


def test_runtime_env_uploads_the_checkout() -> None:
    env = _runtime_envs()["jobs/runtime_env.yaml"]
    assert env["working_dir"] == "."
    assert ".venv/" in env["excludes"]
