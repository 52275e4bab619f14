"""Kubernetes manifests under k8s/: kustomize renders every overlay, built-in kinds validate against
the Kubernetes OpenAPI schemas (kubernetes-validate, strict), Seldon kinds against the CRDs in
``../shared/schemas/seldon``, generated files equal a fresh render, the rollout target's RBAC is
exactly what it uses, and Kafka, monitoring and the Dagster Helm values agree with the code."""

import importlib.util
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import kubernetes_validate
import pytest
import yaml
from dagster._config import process_config
from dagster_k8s import K8sRunLauncher
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict

from churn_assets.config import REPO_ROOT, load_settings
from churn_assets.deploy import (
    CRD_FILES,
    Deployment,
    DeploymentError,
    KubernetesSeldonTarget,
    validate_manifest,
)
from churn_assets.schemas import ALL_TOPICS, Topics
from tests.k8s_recording import RecordingApiClient

pytestmark = pytest.mark.unit

K8S = REPO_ROOT / "k8s"
KUSTOMIZATIONS = ("overlays/local", "overlays/prod", "seldon/v1", "seldon/v2")
K8S_VERSIONS = ("1.30.0", "1.37.0")
BUILTIN_GROUPS = {"v1", "apps/v1", "rbac.authorization.k8s.io/v1", "networking.k8s.io/v1"}
# Operator kinds with no schema available offline: checked field by field below.
OPERATOR_KINDS = {
    "kafka.strimzi.io/v1beta2": {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser"},
    "monitoring.coreos.com/v1": {"PrometheusRule", "ServiceMonitor"},
    # Seldon Core 2's Server: no CRD schema in shared/schemas/seldon.
    "mlops.seldon.io/v1alpha1": {"Server"},
}
SELDON_API_VERSIONS = {"machinelearning.seldon.io/v1", "mlops.seldon.io/v1alpha1"}
DAY_MS = 86_400_000


def _kubectl() -> str:
    """kubectl with kustomize v5: the one scripts/bootstrap.sh installs, else the one on PATH."""
    bundled = REPO_ROOT / ".venv/tools/kubectl/bin/kubectl"
    found = str(bundled) if bundled.is_file() else shutil.which("kubectl")
    assert found, "kubectl is missing: run ./scripts/bootstrap.sh"
    version = subprocess.run(
        [found, "version", "--client"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Kustomize Version: v(\d+)", version)
    assert match and int(match.group(1)) >= 5, f"{found} lacks kustomize v5: {version}"
    return found


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    kubectl = _kubectl()
    out = {}
    for path in KUSTOMIZATIONS:
        result = subprocess.run(
            [kubectl, "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"kustomize {path} failed: {result.stderr}"
        out[path] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


# --------------------------------------------------------------------------- schema validation


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_rendered_manifest_validates(rendered, path):
    docs = rendered[path]
    assert docs
    for doc in docs:
        api, kind = doc["apiVersion"], doc["kind"]
        name = f"{kind} {doc['metadata'].get('name')}"
        if api in BUILTIN_GROUPS:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
        elif api in SELDON_API_VERSIONS and kind in CRD_FILES:
            validate_manifest(doc)
        else:
            assert kind in OPERATOR_KINDS.get(api, set()), f"{api} {name}: no check for it"
        if kind != "Namespace":
            assert doc["metadata"].get("namespace") == "churn", f"{name} outside namespace churn"


def test_strict_schema_and_crd_validation_reject_bad_manifests(rendered):
    """The validators in use really reject a misspelt field."""
    dashboard = _one(rendered["overlays/local"], "Deployment", "churn-dashboard")
    broken = yaml.safe_load(yaml.safe_dump(dashboard))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    sdep = yaml.safe_load(yaml.safe_dump(_one(rendered["seldon/v1"], "SeldonDeployment")))
    sdep["spec"]["predictors"][0]["traffic"] = "all"
    with pytest.raises(DeploymentError):
        validate_manifest(sdep)


def test_every_seldon_state_file_validates_against_the_crds():
    files = sorted((K8S / "seldon").glob("v*/seldon-*.yaml"))
    names = {f.name for f in files}
    for state in ("shadow", "canary", "blue-green"):
        assert f"seldon-deployment-{state}.yaml" in names
        assert f"seldon-v2-{state}.yaml" in names
    for path in files:
        for doc in _load_yaml_docs(path):
            assert doc["kind"] in CRD_FILES
            validate_manifest(doc)


def test_generated_files_equal_a_fresh_render():
    spec = importlib.util.spec_from_file_location(
        "render_seldon_manifests", REPO_ROOT / "scripts/render_seldon_manifests.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    files = module.rendered_files()
    assert len(files) == 10
    for relative, content in files.items():
        assert (REPO_ROOT / relative).read_text() == content, f"{relative} is stale"
    check = subprocess.run(
        [str(REPO_ROOT / ".venv/bin/python"), "scripts/render_seldon_manifests.py", "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr


def test_seldon_states_are_what_the_rollout_target_applies():
    """The committed canary file carries the first configured canary step, blue-green keeps the
    green predictor warm at 0, and the probes hit the V2 health endpoints."""
    step = load_settings().rollout.canary_steps[0]
    canary = _load_yaml_docs(K8S / "seldon/v1/seldon-deployment-canary.yaml")[0]
    traffic = {p["name"]: p["traffic"] for p in canary["spec"]["predictors"]}
    assert traffic == {"v1": 100 - round(step * 100), "v2": round(step * 100)}
    blue_green = _load_yaml_docs(K8S / "seldon/v1/seldon-deployment-blue-green.yaml")[0]
    assert {p["name"]: p["traffic"] for p in blue_green["spec"]["predictors"]} == {
        "v1": 100,
        "v2": 0,
    }
    # Green is warm and judged: Seldon mirrors every request to it, as the local router does.
    assert [p.get("shadow", False) for p in blue_green["spec"]["predictors"]] == [False, True]
    shadow = _load_yaml_docs(K8S / "seldon/v1/seldon-deployment-shadow.yaml")[0]
    assert [p.get("shadow", False) for p in shadow["spec"]["predictors"]] == [False, True]
    for predictor in shadow["spec"]["predictors"]:
        container = predictor["componentSpecs"][0]["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    experiment = _load_yaml_docs(K8S / "seldon/v2/seldon-v2-shadow.yaml")[-1]
    assert experiment["spec"]["mirror"] == {"name": "churn-v2", "percent": 100}


def test_seldon_core_2_models_autoscale(rendered):
    models = _by_kind(rendered["seldon/v2"], "Model")
    assert models
    for model in models:
        spec = model["spec"]
        assert spec["replicas"] == spec["minReplicas"], "a Model starts at its autoscaling floor"
        assert spec["maxReplicas"] > spec["minReplicas"], "the autoscaler has room to scale"


# --------------------------------------------------------------------------- RBAC


def _used_permissions() -> dict[tuple[str, str], set[str]]:
    used: dict[tuple[str, str], set[str]] = defaultdict(set)
    fresh = Deployment("single", "v1", None, 0.0, shadow=False)
    shadow = Deployment("shadow", "v1", "v2", 0.0, shadow=True)
    canary = Deployment("canary", "v1", "v2", 0.25, shadow=False)
    for kind in ("v1", "v2"):
        api = RecordingApiClient()
        target = KubernetesSeldonTarget("churn", api_client=api, kind=kind)
        first = target.apply(fresh)
        assert {a["action"] for a in first["applied"]} == {"created"}
        for deployment in (shadow, canary):
            target.apply(deployment)
        assert {namespace for *_, namespace in api.calls} == {"churn"}
        for group, plural, verb, _ in api.calls:
            used[(group, plural)].add(verb)
    return dict(used)


def test_rollout_role_grants_exactly_what_the_target_uses(rendered):
    used = _used_permissions()
    assert used == {
        ("machinelearning.seldon.io", "seldondeployments"): {"create", "patch"},
        ("mlops.seldon.io", "models"): {"create", "patch"},
        ("mlops.seldon.io", "experiments"): {"create", "patch"},
    }
    docs = rendered["overlays/prod"]
    role = _one(docs, "Role", "churn-rollout")
    granted: dict[tuple[str, str], set[str]] = defaultdict(set)
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames/nonResource"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted[(group, resource)] |= set(rule["verbs"])
    assert dict(granted) == used
    binding = _one(docs, "RoleBinding", "churn-rollout")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "churn-rollout",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "churn-rollout", "namespace": "churn"}
    ]
    assert _one(docs, "ServiceAccount", "churn-rollout")
    assert not _by_kind(docs, "ClusterRole") and not _by_kind(docs, "ClusterRoleBinding")


# --------------------------------------------------------------------------- Kafka


@pytest.mark.parametrize("overlay", ["overlays/local", "overlays/prod"])
def test_kafka_is_kraft_with_every_topic_retained_long_enough(rendered, overlay):
    docs = rendered[overlay]
    kafka = _one(docs, "Kafka", "churn-kafka")
    annotations = kafka["metadata"]["annotations"]
    assert annotations["strimzi.io/kraft"] == "enabled"
    assert annotations["strimzi.io/node-pools"] == "enabled"
    assert "zookeeper" not in kafka["spec"]
    pool = _one(docs, "KafkaNodePool")
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == "churn-kafka"
    nodes = pool["spec"]["replicas"]
    config = kafka["spec"]["kafka"]["config"]
    assert config["auto.create.topics.enable"] is False
    assert config["offsets.topic.replication.factor"] <= nodes

    topics = {t["spec"]["topicName"]: t for t in _by_kind(docs, "KafkaTopic")}
    assert set(topics) == set(ALL_TOPICS)
    settings = load_settings(REPO_ROOT / "config/config.production.yaml")
    for name, topic in topics.items():
        spec = topic["spec"]
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "churn-kafka"
        assert spec["partitions"] == settings.kafka.partitions
        # As many replicas as the production profile asks for (what `churn topics create`
        # would request), or every node of a smaller cluster (the local overlay's single node).
        assert spec["replicas"] == min(settings.kafka.replication_factor, nodes)
        min_isr = int(spec["config"]["min.insync.replicas"])
        assert min_isr <= spec["replicas"]
        if nodes > 1:
            assert min_isr < spec["replicas"], "losing one broker must not stop producers"
        retention_ms = int(spec["config"]["retention.ms"])
        # Longer than any recovery: a lander down over a long weekend and the weekly
        # retraining cycle both fit; dead letters are kept longer than the data they describe.
        assert retention_ms >= 7 * DAY_MS, name
        assert retention_ms > settings.landing.drain_max_seconds * 1000
    assert int(topics[Topics.DEAD_LETTER]["spec"]["config"]["retention.ms"]) >= 30 * DAY_MS
    if overlay == "overlays/prod":
        assert nodes == 3 and all(t["spec"]["replicas"] == 3 for t in topics.values())


def test_production_profile_connects_to_the_strimzi_tls_listener(rendered, monkeypatch):
    from churn_assets.kafka import KafkaConfigError, client_config

    docs = rendered["overlays/prod"]
    kafka = _one(docs, "Kafka")
    user = _one(docs, "KafkaUser")
    path = REPO_ROOT / "config/config.production.yaml"
    assert "sasl_password" not in yaml.safe_load(path.read_text())["kafka"]
    monkeypatch.delenv("CHURN_KAFKA__SASL_PASSWORD", raising=False)
    settings = load_settings(path)
    with pytest.raises(KafkaConfigError, match="CHURN_KAFKA__SASL_PASSWORD"):
        client_config(settings)
    monkeypatch.setenv("CHURN_KAFKA__SASL_PASSWORD", "from-the-secret")
    settings = load_settings(path)
    config = client_config(settings)
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.password"] == "from-the-secret"

    [listener] = kafka["spec"]["kafka"]["listeners"]
    name, namespace = kafka["metadata"]["name"], kafka["metadata"]["namespace"]
    assert config["bootstrap.servers"] == (
        f"{name}-kafka-bootstrap.{namespace}.svc:{listener['port']}"
    )
    assert listener["tls"] is True
    mechanism = listener["authentication"]["type"].upper()
    assert config["sasl.mechanism"] == mechanism == user["spec"]["authentication"]["type"].upper()
    assert config["sasl.username"] == user["metadata"]["name"]
    assert settings.kafka.replication_factor <= _one(docs, "KafkaNodePool")["spec"]["replicas"]

    acls = user["spec"]["authorization"]["acls"]

    def allowed(kind: str, resource: str, operation: str) -> bool:
        return any(
            acl["resource"]["type"] == kind
            and resource.startswith(acl["resource"]["name"])
            and operation in acl["operations"]
            for acl in acls
        )

    for topic in ALL_TOPICS:
        assert allowed("topic", topic, "Read") and allowed("topic", topic, "Write"), topic
    assert allowed("group", settings.kafka.consumer_group, "Read")
    assert allowed("group", "churn-status-1", "Read")


# --------------------------------------------------------------------------- monitoring


def test_monitoring_objects_carry_the_project_rules_and_dashboards(rendered):
    docs = rendered["overlays/prod"]
    rule = _one(docs, "PrometheusRule", "churn-platform")
    alerts = yaml.safe_load((REPO_ROOT / "config/prometheus/alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    dashboards = sorted((REPO_ROOT / "config/grafana/dashboards").glob("*.json"))
    maps = {
        key: value
        for cm in _by_kind(docs, "ConfigMap")
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
        for key, value in cm["data"].items()
    }
    assert maps == {path.name: path.read_text() for path in dashboards}
    assert len(maps) == 4

    monitor = _one(docs, "ServiceMonitor", "churn-serving")
    service = _one(docs, "Service", "churn-serving-metrics")
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    job = {r["targetLabel"]: r.get("replacement") for r in endpoint["relabelings"]}["job"]
    assert f'up{{job="{job}"}}' in (REPO_ROOT / "config/prometheus/alerts.yml").read_text()
    sdep = _one(rendered["seldon/v1"], "SeldonDeployment")
    assert service["spec"]["selector"] == {"seldon-deployment-id": sdep["metadata"]["name"]}


SELDON_ARMS = {
    "single": {"v1": "primary"},
    "shadow": {"v1": "primary", "v2": "shadow"},
    "canary": {"v1": "primary", "v2": "canary"},
    "blue-green": {"v1": "primary", "v2": "shadow"},
}


@pytest.mark.parametrize("state", sorted(SELDON_ARMS))
def test_seldon_predictor_pods_export_their_version_and_arm_and_mirror(state, monkeypatch):
    """What the rollout's prometheus evidence needs of every Seldon v1 predictor pod: it knows
    its version and arm (so predictions_total / prediction_latency_seconds carry both), runs
    the production profile (Kafka configured: every answer mirrored to ml.predictions) with
    the SASL password by reference and the cluster CA mounted where the profile reads it, and
    is selected by the Service the ServiceMonitor scrapes."""
    [sdep] = _load_yaml_docs(K8S / f"seldon/v1/seldon-deployment-{state}.yaml")
    arms = {}
    for predictor in sdep["spec"]["predictors"]:
        [component] = predictor["componentSpecs"]
        [container] = component["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["CHURN_MODEL_VERSION"]["value"] == predictor["name"]
        arms[predictor["name"]] = env["CHURN_SERVING__ARM"]["value"]
        assert env["CHURN_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "churn-platform",
            "key": "password",
        }
        for name in ("CHURN_MODEL_VERSION", "CHURN_SERVING__ARM", "CHURN_CONFIG"):
            monkeypatch.setenv(name, env[name]["value"])
        monkeypatch.setenv("CHURN_KAFKA__SASL_PASSWORD", "from-the-secret")
        config = REPO_ROOT / env["CHURN_CONFIG"]["value"].removeprefix("/opt/churn/")
        settings = load_settings(config)
        assert settings.serving.arm == arms[predictor["name"]]
        assert settings.kafka.bootstrap_servers and not settings.kafka.uses_embedded_broker
        ca = Path(settings.kafka.ssl_ca_location)
        [mount] = [m for m in container["volumeMounts"] if ca.is_relative_to(m["mountPath"])]
        volume = next(v for v in component["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["items"] == [{"key": "ca.crt", "path": ca.name}]
        assert predictor["graph"]["modelUri"].endswith(f"/{predictor['name']}")
    assert arms == SELDON_ARMS[state]
    service = _one(_load_yaml_docs(K8S / "monitoring/serving-metrics.yaml"), "Service", None)
    assert service["spec"]["selector"] == {"seldon-deployment-id": sdep["metadata"]["name"]}


@pytest.mark.parametrize("state", sorted(SELDON_ARMS))
def test_seldon_core_2_models_name_their_arm_and_the_server_mirrors(state):
    """Seldon Core 2: each Model's `arm` parameter (parameters.extra in the runtime) is its
    rollout arm; the churn Server runs the production profile with Kafka's password by
    reference and CA mounted where the profile reads it, and parallel workers off (MLServer then
    serves the runtime's metrics from the process's registry)."""
    docs = _load_yaml_docs(K8S / f"seldon/v2/seldon-v2-{state}.yaml")
    arms = {
        model["metadata"]["name"].removeprefix("churn-"): {
            p["name"]: p["value"] for p in model["spec"]["parameters"]
        }["arm"]
        for model in _by_kind(docs, "Model")
    }
    assert arms == SELDON_ARMS[state]
    server = _one(_load_yaml_docs(K8S / "seldon/v2/server.yaml"), "Server", "churn-mlserver")
    [container] = server["spec"]["podSpec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLSERVER_PARALLEL_WORKERS"]["value"] == "0"
    assert env["CHURN_CONFIG"]["value"] == "/opt/churn/config/config.production.yaml"
    assert env["CHURN_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "churn-platform",
        "key": "password",
    }
    production = load_settings(REPO_ROOT / "config/config.production.yaml")
    ca = Path(production.kafka.ssl_ca_location)
    [mount] = [m for m in container["volumeMounts"] if ca.is_relative_to(m["mountPath"])]
    [volume] = [v for v in server["spec"]["podSpec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["items"] == [{"key": "ca.crt", "path": ca.name}]


# --------------------------------------------------------------------------- namespace policy


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


SENSITIVE = re.compile(r"PASSWORD|TOKEN|SECRET|CREDENTIAL", re.IGNORECASE)


def _assert_secrets_by_reference(node: Any) -> None:
    for item in _walk(node):
        if isinstance(item, dict) and "name" in item and SENSITIVE.search(str(item["name"])):
            assert "value" not in item, f"{item['name']} is set inline, not by reference"


@pytest.mark.parametrize("overlay", ["overlays/local", "overlays/prod"])
def test_network_policies_secrets_and_pod_security(rendered, overlay):
    docs = rendered[overlay]
    assert not _by_kind(docs, "Secret"), "secrets are created outside the repository"
    _assert_secrets_by_reference(docs)
    policies = {p["metadata"]["name"]: p["spec"] for p in _by_kind(docs, "NetworkPolicy")}
    deny = policies["default-deny-ingress"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"]
    assert "ingress" not in deny
    for name, spec in policies.items():
        for rule in spec.get("ingress", []):
            for peer in rule["from"]:
                assert "ipBlock" not in peer, f"{name} opens to addresses, not workloads"
    dashboard = _one(docs, "Deployment", "churn-dashboard")["spec"]["template"]["spec"]
    assert dashboard["securityContext"]["runAsNonRoot"] is True
    assert dashboard["securityContext"]["runAsUser"] != 0
    for container in dashboard["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["resources"]["requests"] and container["readinessProbe"]
        assert not container["image"].endswith(":latest") and ":" in container["image"]
    limits = _one(docs, "LimitRange")["spec"]["limits"][0]
    assert limits["type"] == "Container" and limits["defaultRequest"] and limits["default"]


def test_overlays_differ_where_they_should(rendered):
    local, prod = rendered["overlays/local"], rendered["overlays/prod"]
    assert _one(local, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert _one(prod, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    assert _one(local, "KafkaNodePool")["spec"]["replicas"] == 1
    image = _one(prod, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.com/churn-platform/dashboard:0.1.0"


# --------------------------------------------------------------------------- Dagster Helm values


@pytest.fixture(scope="module")
def dagster_values() -> dict[str, Any]:
    return yaml.safe_load((K8S / "dagster/values.yaml").read_text())


def _run_launcher_instance_config(values: dict[str, Any]) -> dict[str, Any]:
    """The ``run_launcher.config`` the chart's instance ConfigMap renders from our values (the
    keys we set, plus those the chart always fills in for a release named "dagster")."""
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    run_config = launcher["runK8sConfig"]
    return {
        "dagster_home": "/opt/dagster/dagster_home",
        "instance_config_map": "dagster-instance",
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
        "service_account_name": "dagster",
        "env_config_maps": ["dagster-pipeline-env"],
        "image_pull_policy": launcher["imagePullPolicy"],
        "job_namespace": launcher["jobNamespace"],
        "load_incluster_config": launcher["loadInclusterConfig"],
        "volumes": launcher["volumes"],
        "volume_mounts": launcher["volumeMounts"],
        "run_k8s_config": {
            "container_config": run_config["containerConfig"],
            "pod_spec_config": run_config["podSpecConfig"],
            "job_spec_config": run_config["jobSpecConfig"],
        },
    }


def test_helm_values_configure_a_valid_k8s_run_launcher(dagster_values, rendered):
    values = dagster_values
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    config = _run_launcher_instance_config(values)
    result = process_config(K8sRunLauncher.config_type(), config)
    assert result.success, result.errors
    broken = {**config, "run_k8s_config": {"container_cfg": {}}}
    assert not process_config(K8sRunLauncher.config_type(), broken).success

    # What dagster-k8s does with these dicts when it builds a run's Job: each must convert to
    # the Kubernetes model (unknown keys raise).
    models = kubernetes.client
    run_config = config["run_k8s_config"]
    container = {"name": "dagster", **run_config["container_config"]}
    k8s_model_from_dict(models.V1Container, k8s_snake_case_dict(models.V1Container, container))
    pod_spec = {"containers": [container], **run_config["pod_spec_config"]}
    k8s_model_from_dict(models.V1PodSpec, k8s_snake_case_dict(models.V1PodSpec, pod_spec))
    job_spec = {"template": {}, **run_config["job_spec_config"]}
    k8s_model_from_dict(models.V1JobSpec, k8s_snake_case_dict(models.V1JobSpec, job_spec))
    for volume in config["volumes"]:
        k8s_model_from_dict(models.V1Volume, k8s_snake_case_dict(models.V1Volume, volume))
    for mount in config["volume_mounts"]:
        k8s_model_from_dict(models.V1VolumeMount, k8s_snake_case_dict(models.V1VolumeMount, mount))

    # Run pods (where the rollout assets run) use the service account the Role is bound to.
    binding = _one(rendered["overlays/prod"], "RoleBinding", "churn-rollout")
    assert run_config["pod_spec_config"]["serviceAccountName"] == binding["subjects"][0]["name"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in config["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {_one(rendered["overlays/prod"], "PersistentVolumeClaim")["metadata"]["name"]}


def test_helm_values_code_location_postgres_and_secrets(dagster_values):
    values = dagster_values
    assert values["postgresql"]["enabled"] is False
    assert values["generatePostgresqlPasswordSecret"] is False
    assert values["global"]["postgresqlSecretName"]
    instance = yaml.safe_load((REPO_ROOT / "config/dagster-postgres.yaml").read_text())
    scheme = instance["storage"]["postgres"]["postgres_db"]["scheme"]
    assert values["postgresql"]["postgresqlScheme"] == scheme == "postgresql+psycopg2"
    _assert_secrets_by_reference(values)
    [location] = values["dagster-user-deployments"]["deployments"]
    args = location["codeServerArgs"]
    module = args[args.index("--module-name") + 1]
    assert importlib.util.find_spec(module) is not None
    assert args[args.index("--location-name") + 1] == "churn_platform"
    assert location["image"]["repository"] == "churn-platform/dagster"
    assert location["image"]["tag"] != "latest"
    models = kubernetes.client
    for env in location["env"]:
        k8s_model_from_dict(models.V1EnvVar, k8s_snake_case_dict(models.V1EnvVar, env))
    env = {e["name"]: e for e in location["env"]}
    assert env["CHURN_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == (
        "churn-platform"
    )
    config_path = env["CHURN_CONFIG"]["value"]
    assert config_path == "/opt/churn/config/config.production.yaml"
    dockerfile = (REPO_ROOT / "docker/dagster/Dockerfile").read_text()
    assert f"COPY config/config.production.yaml {config_path}" in dockerfile
    mounts = {m["mountPath"] for m in location["volumeMounts"]}
    production = load_settings(REPO_ROOT / "config/config.production.yaml")
    assert str(Path(production.kafka.ssl_ca_location).parent) in mounts
    assert str(production.data_dir) in mounts


def test_the_churn_server_offers_what_every_churn_model_requires(rendered):
    """Field by field (no Server CRD schema offline): the Server runs the serving image on the
    stock mlserver config and offers the capability every rendered Model requires, which no
    stock server has."""
    docs = rendered["seldon/v2"]
    server = _one(docs, "Server", "churn-mlserver")
    assert set(server["spec"]) == {"serverConfig", "extraCapabilities", "replicas", "podSpec"}
    assert server["spec"]["serverConfig"] == "mlserver"
    [container] = server["spec"]["podSpec"]["containers"]
    assert container["name"] == "mlserver"
    assert container["image"].startswith("churn-platform/serving:")
    offered = set(server["spec"]["extraCapabilities"])
    models = [d for d in docs if d["kind"] == "Model"]
    state_files = sorted((K8S / "seldon" / "v2").glob("seldon-v2-*.yaml"))
    models += [d for f in state_files for d in _load_yaml_docs(f) if d["kind"] == "Model"]
    assert models
    for model in models:
        assert set(model["spec"]["requirements"]) <= offered
        assert "mlserver" not in model["spec"]["requirements"]


def test_production_rollout_patches_the_deployed_seldon_deployment(
    rendered, dagster_values, monkeypatch
):
    """The production profile applies decisions to the SeldonDeployment the prod overlay
    deploys, in its namespace, from run pods under the service account the Role is bound to; no
    serving admin token is needed there, and none is given to the run pods."""
    from churn_assets.resources import DeploymentTargetResource

    for key in (
        "ADMIN_TOKEN",
        "ROLLOUT__TARGET",
        "ROLLOUT__KUBERNETES_NAMESPACE",
        "ROLLOUT__SELDON_NAME",
    ):
        monkeypatch.delenv(f"CHURN_{key}", raising=False)
    production = load_settings(REPO_ROOT / "config/config.production.yaml")
    assert production.rollout.target == "seldon_v1"
    docs = rendered["overlays/prod"]
    deployment = _one(docs, "SeldonDeployment")["metadata"]
    rollout = production.rollout
    assert (rollout.kubernetes_namespace, rollout.seldon_name) == (
        deployment["namespace"],
        deployment["name"],
    )
    target = DeploymentTargetResource().target(production)
    assert isinstance(target, KubernetesSeldonTarget)
    assert target.describe() == {
        "target": "kubernetes-seldon",
        "namespace": deployment["namespace"],
        "kind": "v1",
        "api_version": "machinelearning.seldon.io/v1",
        "name": deployment["name"],
    }
    role = _one(docs, "Role", "churn-rollout")
    binding = _one(docs, "RoleBinding", "churn-rollout")
    assert (
        role["metadata"]["namespace"]
        == binding["metadata"]["namespace"]
        == (rollout.kubernetes_namespace)
    )
    launcher = dagster_values["runLauncher"]["config"]["k8sRunLauncher"]
    assert launcher["jobNamespace"] == rollout.kubernetes_namespace
    run = launcher["runK8sConfig"]
    assert run["podSpecConfig"]["serviceAccountName"] == binding["subjects"][0]["name"]
    env = {e["name"]: e for e in run["containerConfig"]["env"]}
    assert env["CHURN_CONFIG"]["value"] == "/opt/churn/config/config.production.yaml"
    assert "CHURN_ADMIN_TOKEN" not in env
