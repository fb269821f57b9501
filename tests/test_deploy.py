"""docker-compose.yml and the Dockerfile describe a deployment that can run: every
service command is one the `kinora` CLI accepts, every setting is one Kinora reads,
and the services start in a safe order. (`make test` also has compose validate the
file wherever the docker client is installed; these checks need no docker at all.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from kinora.core.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def expand(value: str) -> str:
    """${NAME:-default} as compose expands it with NAME unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_services_and_their_start_order() -> None:
    services = compose()["services"]
    always = {name for name, service in services.items() if "profiles" not in service}
    assert always == {"redis", "postgres", "migrate", "api", "worker", "webhooks"}
    assert services["redis"]["image"].startswith("redis:7")
    assert services["postgres"]["image"].startswith("postgres:16")
    for name in ("redis", "postgres", "api"):
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    assert services["migrate"]["command"] == ["kinora", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    assert services["webhooks"]["command"] == ["kinora", "worker", "--webhooks"]
    for name in ("api", "worker", "webhooks"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"
        # One storage volume: workers write the videos that the API serves.
        assert "data:/data" in services[name]["volumes"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "ports" not in services["worker"]  # scalable: --scale worker=N
    assert any("--workers=" in part for part in services["api"]["command"])


def test_every_kinora_command_in_the_file_is_accepted_by_the_cli() -> None:
    services = compose()["services"]
    for name in ("migrate", "api", "worker", "webhooks"):
        command = [expand(part) for part in services[name]["command"]]
        assert command[0] == "kinora"
        result = subprocess.run(
            [sys.executable, "-m", "kinora", *command[1:], "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"{name}: {command}: {result.stderr}"


def test_the_sentinel_profile_watches_redis_and_its_url_is_one_kinora_reads() -> None:
    from kinora.streaming.connect import topology

    services = compose()["services"]
    profiled = {
        name for name, service in services.items() if "sentinel" in service.get("profiles", [])
    }
    assert profiled == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    assert services["redis-replica"]["command"][-3:] == ["--replicaof", "redis", "6379"]
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        script = services[name]["command"][-1]
        assert "sentinel monitor kinora redis 6379 2" in script  # a quorum of two of three
        assert "exec redis-sentinel" in script
    # The URL the file's comment gives, as Kinora parses it.
    comment = (ROOT / "docker-compose.yml").read_text()
    url = re.search(r"redis\+sentinel://\S+", comment)
    assert url is not None
    where = topology(url.group(0))
    assert {host for host, _ in where.sentinels} == {"sentinel-1", "sentinel-2", "sentinel-3"}
    assert where.service == "kinora"


def test_every_setting_in_the_file_is_one_kinora_reads() -> None:
    known = {(field.alias or name).upper() for name, field in Settings.model_fields.items()}
    environment = compose()["x-kinora"]["environment"]
    unknown = set(environment) - known
    assert not unknown, f"settings Kinora does not read: {unknown}"


def test_the_image_installs_the_package_and_runs_the_api_by_default() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", dockerfile, re.M)
    assert "COPY backend" in dockerfile  # the migrations travel inside the package
    assert "-c requirements.lock" in dockerfile  # the same pinned versions as make and CI
    assert re.search(r'^CMD \["kinora", "api"', dockerfile, re.M)
    assert re.search(r"^USER (?!root)", dockerfile, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "var", ".git"} <= set(ignored)


# -- Kubernetes (deploy/kubernetes), checked against Kubernetes' own schemas ------------

KUBERNETES = "1.33"  # the oldest release whose schema has a preStop `sleep`


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    text = (ROOT / "deploy" / "kubernetes" / "kinora.yaml").read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_every_kubernetes_manifest_is_valid_for_kubernetes() -> None:
    import kubernetes_validate

    found = manifests()
    assert set(found) == {
        ("Secret", "kinora"), ("ConfigMap", "kinora"), ("Job", "kinora-migrate"),
        ("Deployment", "kinora-api"), ("Deployment", "kinora-worker"),
        ("PersistentVolumeClaim", "kinora-data"), ("Service", "kinora-api"),
        ("PodDisruptionBudget", "kinora-api"), ("HorizontalPodAutoscaler", "kinora-api"),
    }  # fmt: skip
    for doc in found.values():
        # strict: a misspelt field (readinesProbe) is an error, not ignored
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_api_pods_drain_within_their_grace_period() -> None:
    found = manifests()
    pod = found[("Deployment", "kinora-api")]["spec"]["template"]["spec"]
    (api,) = pod["containers"]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"  # 503 from SIGTERM on
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pause = api["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(found[("ConfigMap", "kinora")]["data"]["DRAIN_SECONDS"])
    server_grace = 3  # kinora api's timeout_graceful_shutdown
    assert pod["terminationGracePeriodSeconds"] > pause + drain + server_grace + 5
    worker = found[("Deployment", "kinora-worker")]["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] >= 60  # a warm shutdown's last step
    labels = found[("Deployment", "kinora-api")]["spec"]["template"]["metadata"]["labels"]
    for kind in ("PodDisruptionBudget", "Service"):
        selector = found[(kind, "kinora-api")]["spec"]["selector"]
        assert selector.get("matchLabels", selector).items() <= labels.items(), kind
    scaled = found[("HorizontalPodAutoscaler", "kinora-api")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "kinora-api"
    assert scaled["metrics"][0]["pods"]["metric"]["name"] == "kinora_stream_clients"


def test_every_kubernetes_command_and_setting_is_kinoras() -> None:
    found = manifests()
    known = {(field.alias or name).upper() for name, field in Settings.model_fields.items()}
    for kind in ("Secret", "ConfigMap"):
        doc = found[(kind, "kinora")]
        unknown = set(doc.get("stringData", doc.get("data", {}))) - known
        assert not unknown, f"{kind}: settings Kinora does not read: {unknown}"
    for key in (
        ("Job", "kinora-migrate"),
        ("Deployment", "kinora-api"),
        ("Deployment", "kinora-worker"),
    ):
        pod = found[key]["spec"]["template"]["spec"]
        for container in pod["containers"]:
            command = container["command"]
            assert command[0] == "kinora"
            result = subprocess.run(
                [sys.executable, "-m", "kinora", *command[1:], "--help"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert result.returncode == 0, f"{key}: {command}: {result.stderr}"
