"""Offline checks of docker/ and k8s/: no engine or cluster here, so the files are parsed
and held against the code they deploy (the CLI's parser, the settings, the queue names)."""

from __future__ import annotations

import json
import re
import secrets
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from api import webhook
from synthsentry.cli import build_parser
from synthsentry.settings import Settings
from tasks.queues import QUEUES
from workers.detectors.registry import BUILTIN_SPECS

REPO = Path(__file__).resolve().parents[1]
SETTINGS_VARS = {f"SYNTHSENTRY_{name.upper()}" for name in Settings.model_fields}


def _k8s_documents() -> list[dict[str, Any]]:
    documents = []
    for path in sorted((REPO / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document:
                document["__file"] = path.name
                documents.append(document)
    return documents


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _k8s_documents() if d["kind"] == kind]


def _queues_of(args: list[str]) -> list[str]:
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


def _fill_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables the secret (k8s/secret.example.yaml) holds, set as a real one sets them."""
    example = yaml.safe_load((REPO / "k8s" / "secret.example.yaml").read_text(encoding="utf-8"))
    assert set(example["stringData"]) <= SETTINGS_VARS
    for name in example["stringData"]:
        monkeypatch.setenv(name, secrets.token_hex(24))
    monkeypatch.setenv("SYNTHSENTRY_DATABASE_URL", "postgresql+psycopg2://u:p@db:5432/s")


def test_every_manifest_is_well_formed() -> None:
    documents = _k8s_documents()
    assert len(documents) >= 10
    for document in documents:
        assert {"apiVersion", "kind", "metadata"} <= set(document), document["__file"]
        assert document["metadata"].get("name"), document["__file"]


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((REPO / "k8s" / "kustomization.yaml").read_text())
    files = {p.name for p in (REPO / "k8s").glob("*.yaml")}
    assert set(kustomization["resources"]) == files - {"kustomization.yaml", "secret.example.yaml"}


def test_containers_run_real_commands_as_non_root_with_limits() -> None:
    parser = build_parser()
    for kind in ("Deployment", "Job"):
        for document in _by_kind(kind):
            pod = document["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for container in pod["containers"]:
                parser.parse_args(container["args"])  # exits (fails the test) if invalid
                assert container["resources"]["requests"] and container["resources"]["limits"]
                refs = {next(iter(r.values()))["name"] for r in container["envFrom"]}
                assert refs == {"synthsentry"}


def test_configmap_and_env_only_name_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    (configmap,) = _by_kind("ConfigMap")
    assert set(configmap["data"]) <= SETTINGS_VARS
    # The values parse as the settings they name (with the secret's variables filled in).
    for name, value in configmap["data"].items():
        monkeypatch.setenv(name, value)
    _fill_secret(monkeypatch)
    settings = Settings()
    # Every detector of the fleet's ensemble is known and has a worker on its queue: an
    # image waits for all of them.
    consumed = {
        queue
        for d in _by_kind("Deployment")
        for queue in _queues_of(d["spec"]["template"]["spec"]["containers"][0]["args"])
    }
    assert settings.fleet_detectors
    for detector in settings.fleet_detectors:
        assert detector in BUILTIN_SPECS, detector
        assert QUEUES.detect(detector) in consumed, f"no worker for {detector}"
    for document in _by_kind("Deployment"):
        for container in document["spec"]["template"]["spec"]["containers"]:
            for variable in container.get("env", []):
                assert variable["name"] in SETTINGS_VARS


def test_each_worker_scales_on_the_queue_it_consumes() -> None:
    deployments = {d["metadata"]["name"]: d for d in _by_kind("Deployment")}
    scaled = _by_kind("ScaledObject")
    assert scaled
    for scaled_object in scaled:
        target = deployments[scaled_object["spec"]["scaleTargetRef"]["name"]]
        (container,) = target["spec"]["template"]["spec"]["containers"]
        triggers = scaled_object["spec"]["triggers"]
        assert {trigger["type"] for trigger in triggers} == {"redis"}
        # Every queue it consumes, uploads and bulk work alike, counts towards its scale.
        assert [t["metadata"]["listName"] for t in triggers] == _queues_of(container["args"])
    workers = [
        d
        for d in deployments.values()
        if _queues_of(d["spec"]["template"]["spec"]["containers"][0]["args"])
    ]
    assert {d["metadata"]["name"] for d in workers} == {
        s["spec"]["scaleTargetRef"]["name"] for s in scaled
    }


def test_model_workers_get_a_gpu_and_outlive_their_longest_task() -> None:
    (configmap,) = _by_kind("ConfigMap")
    time_limit = int(configmap["data"]["SYNTHSENTRY_TASK_TIME_LIMIT_SECONDS"])
    for document in _by_kind("Deployment"):
        pod = document["spec"]["template"]["spec"]
        args = pod["containers"][0]["args"]
        if not _queues_of(args):
            continue
        assert pod["terminationGracePeriodSeconds"] > time_limit, document["metadata"]["name"]
        parsed = build_parser().parse_args(args)
        detector = parsed.detector
        if detector and BUILTIN_SPECS[detector].family != "provenance":
            resources = pod["containers"][0]["resources"]
            assert resources["limits"]["nvidia.com/gpu"] == 1
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
                "tolerations"
            ]
            # One model process per GPU, batching across messages on threads.
            assert parsed.concurrency == 1 and parsed.pool in (None, "threads")
            assert parsed.batch_size is None or parsed.batch_size > 1


def test_configured_limits_pass_the_settings_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ConfigMap's values go through the same validation a worker applies at start."""
    (configmap,) = _by_kind("ConfigMap")
    for name, value in configmap["data"].items():
        monkeypatch.setenv(name, value)
    _fill_secret(monkeypatch)
    parsed = Settings()
    assert parsed.visibility_timeout_seconds > 2 * parsed.task_time_limit_seconds


def _compose() -> dict[str, Any]:
    text = (REPO / "docker" / "docker-compose.yml").read_text(encoding="utf-8")
    # Compose interpolation: ${VAR:?message} must be set by the user; resolve it for parsing.
    text = re.sub(r"\$\{(\w+):\?[^}]*\}", r"placeholder-for-\1", text)
    document: dict[str, Any] = yaml.safe_load(text)
    return document


def test_compose_services_run_real_commands_with_real_settings() -> None:
    compose = _compose()
    parser = build_parser()
    fleet = {
        name: s for name, s in compose["services"].items() if s.get("image") == "synthsentry:latest"
    }
    assert {"migrate", "api", "intake", "provenance"} <= set(fleet)
    for name, service in fleet.items():
        parser.parse_args(service["command"])
        assert set(service["environment"]) <= SETTINGS_VARS | {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        }, name
    for detector in (
        fleet["intake"]["environment"]["SYNTHSENTRY_FLEET_DETECTORS"].strip("[]").split(",")
    ):
        assert detector.strip().strip('"') in fleet, f"no worker for {detector}"


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


def test_the_k8s_api_serves_the_port_its_service_targets() -> None:
    deployments = {d["metadata"]["name"]: d for d in _by_kind("Deployment")}
    services = {s["metadata"]["name"]: s for s in _by_kind("Service")}
    (container,) = deployments["synthsentry-api"]["spec"]["template"]["spec"]["containers"]
    served = build_parser().parse_args(container["args"])
    assert (served.command, served.host) == ("serve", "0.0.0.0")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": served.port}
    (port,) = services["synthsentry-api"]["spec"]["ports"]
    assert port["targetPort"] == "http"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_dockerfile_runs_as_non_root_and_copies_what_exists() -> None:
    lines = [
        line.strip()
        for line in (REPO / "docker" / "Dockerfile").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert re.fullmatch(r"FROM python:3\.11-[\w.-]+", lines[0])
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    # The image runs the project's console script, and its default command works.
    entrypoint = json.loads(_instruction(lines, "ENTRYPOINT"))
    command = json.loads(_instruction(lines, "CMD"))
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["synthsentry"] and "synthsentry" in scripts
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from {scripts['synthsentry'].replace(':', ' import ')} as m; raise SystemExit(m())",
            *command,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for line in lines:
        if line.startswith("COPY "):
            for source in shlex.split(line)[1:-1]:
                assert (REPO / source).exists(), source
    assert not any(line.startswith("ADD ") for line in lines)


def _instruction(lines: list[str], name: str) -> str:
    """The argument of the last ``name`` instruction (the one that takes effect)."""
    (last, *_) = [line for line in reversed(lines) if line.startswith(f"{name} ")]
    return last.removeprefix(f"{name} ")


@pytest.mark.parametrize("path", ["docker/detectors.toml"])
def test_example_detector_config_parses(path: str) -> None:
    from workers.detectors.registry import Catalog

    assert "provenance" in Catalog.build(REPO / path).specs


def test_the_image_copies_every_package_the_project_installs() -> None:
    """A package left out of the image installs nothing: ``serve`` would fail at import."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile, flags=re.MULTILINE))
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"
