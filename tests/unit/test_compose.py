"""docker-compose.yml: valid against the Compose Specification schema in ../shared/schemas/compose
(no Docker engine runs here), every file it mounts or builds exists, images are pinned, secrets come
from the environment, and its Prometheus configuration passes promtool with the project's rules."""

import json
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
