"""docker-compose.yml: valid against the Compose Specification schema in ../shared/schemas/compose
(no Docker engine runs here), every file it mounts or builds exists, images are pinned, secrets come
from the environment, and its Prometheus configuration passes promtool with the project's rules."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from churn_assets.config import REPO_ROOT
from churn_assets.schemas import ALL_TOPICS

pytestmark = pytest.mark.unit

COMPOSE = REPO_ROOT / "docker-compose.yml"
SCHEMA = REPO_ROOT.parent / "shared" / "schemas" / "compose" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    assert SCHEMA.is_file(), f"Compose schema missing at {SCHEMA}"
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_file_matches_the_compose_specification(compose, validator):
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    broken = json.loads(json.dumps(compose))
    broken["services"]["kafka"]["ports"] = 9094
    broken["services"]["serving"]["restart_policy"] = "always"
    assert len(list(validator.iter_errors(broken))) == 2


def test_services_the_deployment_guide_promises(compose):
    services = compose["services"]
    expected = {"kafka", "postgres", "dagster-code", "dagster-webserver", "dagster-daemon"}
    expected |= {"serving", "dashboard", "prometheus", "alertmanager", "grafana", "topics"}
    assert set(services) == expected
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "KAFKA_ZOOKEEPER_CONNECT" not in kafka["environment"]
    assert kafka["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert services["topics"]["command"] == ["churn", "topics", "create"]
    assert len(ALL_TOPICS) == 6
    advertised = kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    bootstrap = compose["x-churn-env"]["CHURN_KAFKA__BOOTSTRAP_SERVERS"]
    assert f"PLAINTEXT://{bootstrap}" in advertised.split(",")
    for name in ("serving", "dagster-code", "dagster-daemon", "topics"):
        env = services[name]["environment"]
        assert env["CHURN_KAFKA__BOOTSTRAP_SERVERS"] == bootstrap, name
    for name in ("dagster-webserver", "dagster-daemon"):
        assert services[name]["depends_on"]["dagster-code"]["condition"] == "service_healthy"


def test_every_mounted_or_built_path_exists(compose):
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = REPO_ROOT / build["context"]
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO_ROOT / source).exists(), f"{name}: {source} missing"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"


def test_images_are_pinned_and_secrets_come_from_the_environment(compose):
    for name, service in compose["services"].items():
        image = service["image"]
        tag = image.rpartition(":")[2]
        assert ":" in image and tag != "latest" and re.search(r"\d", tag), f"{name}: {image}"
        environment = service.get("environment", {})
        for key, value in environment.items():
            if re.search(r"PASSWORD|TOKEN|SECRET", key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:\?[^}]*|:-)?\}", str(value)), (name, key)


def test_dagster_services_get_every_variable_the_instance_reads(compose):
    instance = yaml.safe_load((REPO_ROOT / "config/dagster-postgres.yaml").read_text())
    postgres_db = instance["storage"]["postgres"]["postgres_db"]
    wanted = {node["env"] for node in postgres_db.values() if isinstance(node, dict)}
    assert wanted == {f"DAGSTER_PG_{k}" for k in ("HOST", "PORT", "DB", "USERNAME", "PASSWORD")}
    postgres = compose["services"]["postgres"]["environment"]
    for name in ("dagster-code", "dagster-webserver", "dagster-daemon"):
        env = compose["services"][name]["environment"]
        assert wanted <= set(env), name
        assert env["DAGSTER_PG_HOST"] == "postgres"
        assert env["DAGSTER_PG_USERNAME"] == postgres["POSTGRES_USER"]
        assert env["DAGSTER_PG_DB"] == postgres["POSTGRES_DB"]
        assert env["DAGSTER_PG_PASSWORD"] == postgres["POSTGRES_PASSWORD"]
    workspace = yaml.safe_load((REPO_ROOT / "docker/dagster/workspace.yaml").read_text())
    [server] = [entry["grpc_server"] for entry in workspace["load_from"]]
    assert server["host"] == "dagster-code" and server["port"] == 4000


def test_prometheus_config_passes_promtool_with_the_project_rules(compose, tmp_path):
    """Lay the files out as the Compose mounts do and let promtool check them."""
    prometheus = compose["services"]["prometheus"]
    mounts = {}
    for volume in prometheus["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = REPO_ROOT / source
    etc = tmp_path / "etc"
    etc.mkdir()
    for target, source in mounts.items():
        shutil.copyfile(source, etc / Path(target).name)
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run ./scripts/bootstrap.sh"
    result = subprocess.run(
        [promtool, "check", "config", str(etc / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
    config = yaml.safe_load((etc / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["job_name"] == "churn-serving"
    [target] = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose["services"] and f"{port}:{port}" in compose["services"][host]["ports"]
    [am] = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am.split(":")[0] == "alertmanager"


def test_grafana_is_provisioned_with_the_dashboards(compose):
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    provider = yaml.safe_load(
        (REPO_ROOT / "config/grafana/provisioning/dashboards.yml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    assert mounts["./config/grafana/dashboards"] == path
    datasource = yaml.safe_load(
        (REPO_ROOT / "config/grafana/provisioning/datasources.yml").read_text()
    )
    url = datasource["datasources"][0]["url"]
    assert (
        url == "http://prometheus:9090"
        and "9090:9090" in compose["services"]["prometheus"]["ports"]
    )
    assert any(t.startswith("/etc/grafana/provisioning/dashboards/") for t in mounts.values())
    assert any(t.startswith("/etc/grafana/provisioning/datasources/") for t in mounts.values())


# What each service talks to, and so which settings it must carry. Runs execute in dagster-code
# (the instance's default run launcher starts them in the code server's container), so the
# rollout's serving URL and admin token belong there; the daemon and the webserver only reach
# PostgreSQL and the code location.
NEEDS = {
    "topics": {"kafka"},
    "serving": {"kafka", "admin_token", "dagster"},
    "dagster-code": {"kafka", "postgres", "serving", "admin_token"},
    "dagster-daemon": {"kafka", "postgres"},
    "dagster-webserver": {"postgres"},
    "dashboard": {"kafka", "serving", "admin_token", "dagster"},
}
REQUIRED_FROM_ENVIRONMENT = r"\$\{CHURN_ADMIN_TOKEN:\?[^}]+\}"


def _container_ports(service: dict[str, Any]) -> set[int]:
    """Ports the service listens on inside the Compose network: the container side of
    ``ports`` and ``expose``."""
    ports = {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}
    return ports | {int(str(p).split("/")[0]) for p in service.get("expose", [])}


def _dockerfile_env(service: dict[str, Any], key: str) -> str | None:
    build = service.get("build")
    if not build:
        return None
    text = (REPO_ROOT / build["context"] / build["dockerfile"]).read_text()
    match = re.search(rf"\b{key}=(\S+)", text)
    return match.group(1) if match else None


def _settings_in(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch):
    """The settings a process in ``service`` loads: the image's config file with the service's
    CHURN_* environment over it (secrets and the in-image config path left out)."""
    from churn_assets.config import load_settings

    for key in [k for k in os.environ if k.startswith("CHURN_")]:
        monkeypatch.delenv(key)
    for key, value in service.get("environment", {}).items():
        if key.startswith("CHURN_") and key not in ("CHURN_CONFIG", "CHURN_ADMIN_TOKEN"):
            monkeypatch.setenv(key, str(value))
    return load_settings(REPO_ROOT / "config/config.yaml")


def test_every_service_can_reach_what_it_talks_to(compose, monkeypatch):
    """For each service, the settings its processes load name a Compose service that listens
    there: Kafka's bootstrap is the broker's advertised PLAINTEXT listener, the serving URL (as
    the rollout and the dashboard resolve it) a serving container's REST port, the Dagster URL
    the webserver's port; the admin token is required from the environment exactly where it is
    used."""
    from urllib.parse import urlsplit

    from churn_assets.rollout_control import serving_url

    services = compose["services"]
    [kafka] = [n for n, s in services.items() if s["image"].startswith("apache/kafka:")]
    [postgres] = [n for n, s in services.items() if s["image"].startswith("postgres:")]
    [webserver] = [n for n, s in services.items() if "dagster-webserver" in s.get("command", [])]
    servings = {
        n
        for n, s in services.items()
        if s.get("build", {}).get("dockerfile") == "docker/serving/Dockerfile"
    }
    advertised = services[kafka]["environment"]["KAFKA_ADVERTISED_LISTENERS"].split(",")
    problems = []
    for name, needs in NEEDS.items():
        service = services[name]
        env = service.get("environment", {})
        with monkeypatch.context() as patch:
            settings = _settings_in(service, patch)
        if "kafka" in needs:
            servers = settings.kafka.bootstrap_servers or ""
            if not servers or not all(
                s.split(":")[0] == kafka and f"PLAINTEXT://{s}" in advertised
                for s in servers.split(",")
            ):
                problems.append(f"{name}: Kafka bootstrap {servers!r} is not {kafka}'s listener")
            if settings.kafka.security_protocol != "PLAINTEXT":
                problems.append(f"{name}: Kafka security protocol is not PLAINTEXT")
        if "postgres" in needs and env.get("DAGSTER_PG_HOST") != postgres:
            problems.append(f"{name}: DAGSTER_PG_HOST is not {postgres}")
        if "serving" in needs:
            url = urlsplit(serving_url(settings))
            target = services.get(url.hostname or "", {})
            if not (
                url.scheme == "http"
                and url.hostname in servings
                and url.port in _container_ports(target)
                and str(url.port) == _dockerfile_env(target, "CHURN_SERVING__HTTP_PORT")
            ):
                problems.append(f"{name}: serving URL {url.geturl()} is no serving container")
        if "dagster" in needs:
            url = urlsplit(settings.dagster.url or "")
            command = services[webserver]["command"]
            if not (
                url.hostname == webserver
                and url.port == int(command[command.index("-p") + 1])
                and url.port in _container_ports(services[webserver])
            ):
                problems.append(f"{name}: Dagster URL {settings.dagster.url} is not {webserver}")
        token = env.get("CHURN_ADMIN_TOKEN")
        if "admin_token" in needs and not re.fullmatch(REQUIRED_FROM_ENVIRONMENT, str(token)):
            problems.append(f"{name}: CHURN_ADMIN_TOKEN is {token!r}, not required from the env")
        if "admin_token" not in needs and token is not None:
            problems.append(f"{name}: has CHURN_ADMIN_TOKEN but never uses it")
    assert problems == [], "\n".join(problems)
