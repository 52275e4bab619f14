"""Deployment targets: Seldon manifests for every rollout phase validate against the real CRDs,
the local admin API gets the right calls, and missing clusters or servers fail clearly."""

import socket
from dataclasses import replace
from typing import Any

import pytest

from churn_assets.config import load_settings
from churn_assets.deploy import (
    CRD_FILES,
    Deployment,
    DeploymentError,
    DeploymentTarget,
    KubernetesSeldonTarget,
    LocalServingTarget,
    deployment_for,
    render_seldon_deployment,
    render_seldon_v2,
    seldon_schema_dir,
    validate_against_crd,
    validate_manifest,
)
from churn_assets.rollout import (
    CanaryEvidence,
    Decision,
    Phase,
    RolloutPolicy,
    RolloutState,
    ShadowEvidence,
    decide,
    start,
)

pytestmark = pytest.mark.unit

POLICY = RolloutPolicy.from_settings(load_settings())
STEPS = POLICY.canary_steps
GOOD_SHADOW = ShadowEvidence(
    requests=POLICY.min_shadow_requests + 100,
    agreement_rate=0.98,
    ks_statistic=0.03,
    latency_overhead_ms=5.0,
)
GOOD_CANARY = CanaryEvidence(
    requests=max(POLICY.min_canary_requests, 1000),
    errors=0,
    p99_latency_ms=50.0,
    champion_auc=0.95,
    challenger_auc=0.96,
    champion_labelled=500,
    challenger_labelled=500,
    auc_kind="realised",
    elapsed_s=POLICY.min_step_seconds + 60.0,
)
IDLE = RolloutState(phase=Phase.IDLE, champion="v1", challenger=None)


def _canary_run() -> list[Decision]:
    """Real decisions of the state machine: shadow, each canary step, promotion."""
    decisions = [start(IDLE, "v2", now=0.0)]
    now = 0.0
    while decisions[-1].next_state.phase is not Phase.PROMOTED:
        now += POLICY.min_step_seconds + 60.0
        decisions.append(
            decide(
                decisions[-1].next_state, POLICY, shadow=GOOD_SHADOW, canary=GOOD_CANARY, now=now
            )
        )
    return decisions


def _blue_green_run() -> list[Decision]:
    policy = replace(POLICY, strategy="blue_green")
    shadow = start(IDLE, "v2", now=0.0)
    ready = decide(shadow.next_state, policy, shadow=GOOD_SHADOW, now=1.0)
    switched = decide(ready.next_state, policy, shadow=GOOD_SHADOW, now=2.0)
    return [shadow, ready, switched]


def _rolled_back() -> Decision:
    canary = _canary_run()[1]
    bad = replace(GOOD_CANARY, errors=GOOD_CANARY.requests // 2)
    return decide(canary.next_state, POLICY, canary=bad, now=1e6)


def _all_deployments() -> dict[str, Deployment]:
    run = _canary_run()
    deployments = {"shadow": deployment_for(run[0])}
    for index, decision in enumerate(run[1:-1]):
        deployments[f"canary-{index}"] = deployment_for(decision)
    deployments["promoted"] = deployment_for(run[-1])
    bg_shadow, ready, switched = _blue_green_run()
    deployments["blue_green_ready"] = deployment_for(ready)
    deployments["blue_green_promoted"] = deployment_for(switched)
    deployments["rolled_back"] = deployment_for(_rolled_back())
    return deployments


DEPLOYMENTS = _all_deployments()


def test_the_state_machine_yields_every_phase() -> None:
    assert [DEPLOYMENTS[f"canary-{i}"].challenger_traffic for i in range(len(STEPS))] == list(STEPS)
    assert DEPLOYMENTS["shadow"] == Deployment("shadow", "v1", "v2", 0.0, shadow=True)
    assert DEPLOYMENTS["blue_green_ready"] == Deployment("blue_green", "v1", "v2", 0.0, False)
    assert DEPLOYMENTS["promoted"] == Deployment("single", "v2", None, 0.0, False)
    assert DEPLOYMENTS["blue_green_promoted"] == Deployment("single", "v2", None, 0.0, False)
    assert DEPLOYMENTS["rolled_back"] == Deployment("single", "v1", None, 0.0, False)


def test_deployment_for_a_bare_canary_state_needs_the_policy() -> None:
    state = RolloutState(phase=Phase.CANARY, champion="v1", challenger="v2", step_index=1)
    with pytest.raises(DeploymentError, match="policy"):
        deployment_for(state)
    assert deployment_for(state, POLICY).challenger_traffic == STEPS[1]


def _quantity(value: str) -> float:
    """A Kubernetes resource quantity ("250m", "1", "512Mi", "1Gi") as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


@pytest.mark.parametrize("key", sorted(DEPLOYMENTS))
def test_seldon_deployment_matches_the_crd(key: str) -> None:
    deployment = DEPLOYMENTS[key]
    manifest = render_seldon_deployment(deployment)
    validate_against_crd(manifest, seldon_schema_dir() / CRD_FILES["SeldonDeployment"])
    spec = manifest["spec"]
    assert spec["protocol"] == "v2"
    predictors = {p["name"]: p for p in spec["predictors"]}
    assert set(predictors) == set(deployment.live_versions)
    live = [p for p in predictors.values() if not p.get("shadow")]
    assert sum(p["traffic"] for p in live) == 100
    for version, predictor in predictors.items():
        container = predictor["componentSpecs"][0]["spec"]["containers"][0]
        assert {"name": "CHURN_MODEL_VERSION", "value": version} in container["env"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert predictor["graph"]["type"] == "MODEL"
        assert predictor["graph"]["name"] == container["name"]
        assert predictor["graph"]["modelUri"] == f"s3://churn-models/{version}"
        resources = container["resources"]
        for kind in ("cpu", "memory"):  # a limit below its request is rejected by Kubernetes
            assert _quantity(resources["requests"][kind]) <= _quantity(resources["limits"][kind])
        hpa = predictor["componentSpecs"][0]["hpaSpec"]
        assert predictor["replicas"] == hpa["minReplicas"], "start at the autoscaling floor"
        assert hpa["maxReplicas"] > hpa["minReplicas"], "the autoscaler has room to scale"
        # CPU utilisation targets are relative to the request, so the request must be set.
        assert hpa["metrics"][0]["resource"]["name"] == "cpu" and "cpu" in resources["requests"]
    if deployment.strategy == "shadow":
        assert predictors["v2"]["shadow"] is True and "traffic" not in predictors["v2"]
        assert predictors["v1"]["traffic"] == 100
    if deployment.strategy == "canary":
        weight = round(deployment.challenger_traffic * 100)
        assert (predictors["v1"]["traffic"], predictors["v2"]["traffic"]) == (100 - weight, weight)
    if deployment.strategy == "blue_green":
        assert (predictors["v1"]["traffic"], predictors["v2"]["traffic"]) == (100, 0)
        assert predictors["v2"]["shadow"] is True and not predictors["v1"].get("shadow")
    if deployment.strategy == "single":
        assert predictors[deployment.champion]["traffic"] == 100


@pytest.mark.parametrize("key", sorted(DEPLOYMENTS))
def test_seldon_v2_models_and_experiment_match_the_crds(key: str) -> None:
    deployment = DEPLOYMENTS[key]
    manifests = render_seldon_v2(deployment)
    for manifest in manifests:
        validate_manifest(manifest)
    *models, experiment = manifests
    assert [m["kind"] for m in models] == ["Model"] * len(deployment.live_versions)
    assert [m["spec"]["storageUri"] for m in models] == [
        f"s3://churn-models/{v}" for v in deployment.live_versions
    ]
    assert all(1 <= m["spec"]["minReplicas"] < m["spec"]["maxReplicas"] for m in models)
    arms = {m["spec"]["storageUri"].rsplit("/", 1)[1]: m["spec"]["parameters"] for m in models}
    assert arms[deployment.champion] == [{"name": "arm", "value": "primary"}]
    if deployment.challenger is not None:
        arm = "canary" if deployment.strategy == "canary" else "shadow"
        assert arms[deployment.challenger] == [{"name": "arm", "value": arm}]
    spec = experiment["spec"]
    assert experiment["kind"] == "Experiment"
    assert spec["default"] == f"churn-{deployment.champion}"
    assert sum(c["weight"] for c in spec["candidates"]) == 100
    weights = {c["name"]: c["weight"] for c in spec["candidates"]}
    if deployment.strategy == "canary":
        weight = round(deployment.challenger_traffic * 100)
        assert weights == {"churn-v1": 100 - weight, "churn-v2": weight}
    else:
        assert weights == {f"churn-{deployment.champion}": 100}
    if deployment.strategy in ("shadow", "blue_green"):
        # Blue-green's green is mirrored too: warm, and the switch is judged on fresh evidence.
        assert spec["mirror"] == {"name": "churn-v2", "percent": 100}
    else:
        assert "mirror" not in spec


def test_a_wrong_type_fails_crd_validation_with_a_message() -> None:
    manifest = render_seldon_deployment(DEPLOYMENTS["canary-0"])
    manifest["spec"]["predictors"][1]["traffic"] = "ten"
    with pytest.raises(DeploymentError, match=r"predictors\.1\.traffic: 'ten' is not of type"):
        validate_manifest(manifest)
    experiment = render_seldon_v2(DEPLOYMENTS["shadow"])[-1]
    del experiment["spec"]["mirror"]["percent"]
    with pytest.raises(DeploymentError, match="'percent' is a required property"):
        validate_manifest(experiment)


def test_deployment_rejects_inconsistent_fields() -> None:
    with pytest.raises(DeploymentError, match="needs a challenger"):
        Deployment("canary", "v1", None, 0.5, False)
    with pytest.raises(DeploymentError, match="outside"):
        Deployment("canary", "v1", "v2", 1.5, False)
    with pytest.raises(DeploymentError, match="no traffic"):
        Deployment("shadow", "v1", "v2", 0.2, True)


# ------------------------------------------------------------------- the local admin API


# The local target's calls are tested against a real serving process in
# tests/integration/test_local_target.py; here only what needs no server.


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_local_target_gives_up_after_bounded_retries() -> None:
    target = LocalServingTarget(
        f"http://127.0.0.1:{_closed_port()}", "s3cret", timeout_s=2, retries=2, backoff_s=0
    )
    with pytest.raises(DeploymentError, match=r"GET .*/router/metrics failed after 3 attempt"):
        target.apply(DEPLOYMENTS["shadow"])


# ------------------------------------------------------------------- Kubernetes


def test_kubernetes_target_without_a_cluster_fails_clearly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    target = KubernetesSeldonTarget("churn", kind="v2")
    assert isinstance(target, DeploymentTarget)
    assert target.describe()["api_version"] == "mlops.seldon.io/v1alpha1"
    with pytest.raises(DeploymentError, match="^no Kubernetes cluster reachable"):
        target.apply(DEPLOYMENTS["shadow"])


def test_kubernetes_target_with_an_unreachable_api_server_fails_clearly() -> None:
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{_closed_port()}"
    configuration.retries = 0
    with client.ApiClient(configuration) as api_client:
        target = KubernetesSeldonTarget("churn", api_client=api_client, request_timeout_s=2)
        with pytest.raises(DeploymentError, match="^no Kubernetes cluster reachable"):
            target.apply(DEPLOYMENTS["canary-0"])
