"""The local deployment target against a real `churn serve` process (v1 champion, v2
challenger): every way the rollout moves the router, checked on the live router state."""

import pytest

from churn_assets.deploy import Deployment, DeploymentError, DeploymentTarget, LocalServingTarget
from churn_assets.registry import ModelRegistry
from tests.conftest import write_config
from tests.serving_fixtures import ADMIN_TOKEN, build_registry, start_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    root = tmp_path_factory.mktemp("local_target")
    config = write_config(root)
    registry = ModelRegistry(build_registry(root / "data" / "models"))
    v1 = registry.get("v1")  # a third version (v1's artefacts) to roll out after v2
    registry.register({name: registry.read_file("v1", name) for name in v1.files}, v1.metadata)
    server = start_server(config, root / "serve.log")
    try:
        live = LocalServingTarget(server.http, ADMIN_TOKEN, timeout_s=10)
        live.registry = registry  # type: ignore[attr-defined]
        yield live
    finally:
        server.stop()


def router(target: LocalServingTarget) -> tuple:
    state = target.router_state()
    return (
        state["strategy"],
        state["champion"],
        state["challenger"],
        state["canary_weight"],
        tuple(state["previous_champions"]),
    )


def test_the_target_drives_the_live_router_through_a_rollout(target):
    assert isinstance(target, DeploymentTarget)
    assert ADMIN_TOKEN not in repr(target.describe())
    assert router(target)[1:3] == ("v1", "v2")

    shadow = target.apply(Deployment("shadow", "v1", "v2", 0.0, shadow=True))
    assert shadow["calls"] == ["policy"] and router(target)[:3] == ("shadow", "v1", "v2")

    target.apply(Deployment("canary", "v1", "v2", 0.25, shadow=False))
    assert router(target) == ("canary", "v1", "v2", 0.25, ())

    promoted = target.apply(Deployment("single", "v2", None, 0.0, shadow=False))
    assert promoted["calls"] == ["promote"]
    assert router(target)[1:] == ("v2", None, 0.25, ("v1",))
    assert target.registry.aliases() == {"champion": "v2"}  # serving keeps the aliases in step


def test_a_rolled_back_canary_drops_the_challenger_and_keeps_the_promotion(target):
    target.apply(Deployment("canary", "v2", "v1", 0.5, shadow=False))
    assert router(target)[:4] == ("canary", "v2", "v1", 0.5)
    result = target.apply(Deployment("single", "v2", None, 0.0, shadow=False))
    assert result["calls"] == ["policy"]
    assert router(target)[1:3] == ("v2", None)
    assert router(target)[4] == ("v1",)  # the earlier promotion stands


def test_rolling_back_to_the_previous_champion_stops_a_canary_first(target):
    target.apply(Deployment("canary", "v2", "v3", 0.5, shadow=False))
    assert router(target)[:4] == ("canary", "v2", "v3", 0.5)
    result = target.apply(Deployment("single", "v1", None, 0.0, shadow=False))
    assert result["calls"] == ["policy", "rollback", "policy"]
    assert router(target)[1:3] == ("v1", None)
    assert router(target)[4] == ()


def test_any_registered_version_can_be_made_champion(target):
    result = target.apply(Deployment("single", "v3", None, 0.0, shadow=False))
    assert result["calls"] == ["policy", "promote"]
    assert router(target)[1:3] == ("v3", None) and router(target)[4] == ("v1",)


def test_unknown_versions_and_bad_tokens_fail_loudly(target):
    with pytest.raises(DeploymentError, match=r"HTTP 404: .*v7"):
        target.apply(Deployment("single", "v7", None, 0.0, shadow=False))
    assert router(target)[1] == "v3"
    impostor = LocalServingTarget(target.base_url, "not-the-token", timeout_s=10)
    with pytest.raises(DeploymentError, match="HTTP 401"):
        impostor.apply(Deployment("shadow", "v3", "v1", 0.0, shadow=True))
    assert router(target)[2] is None
