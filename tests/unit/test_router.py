import math
from dataclasses import replace

import pytest

from churn_assets.registry import CHAMPION_HISTORY_LIMIT
from serving.router import (
    RouterError,
    RouterState,
    RouterStore,
    bucket,
    promote,
    rollback,
    route,
)

pytestmark = pytest.mark.unit

CUSTOMERS = [f"C{i:07d}" for i in range(20_000)]


def canary(weight: float) -> RouterState:
    return RouterState(strategy="canary", champion="v1", challenger="v2", canary_weight=weight)


@pytest.mark.parametrize("weight", [0.1, 0.25, 0.5])
def test_canary_share_is_within_statistical_bounds(weight):
    share = sum(route(canary(weight), c).primary == "v2" for c in CUSTOMERS) / len(CUSTOMERS)
    sigma = math.sqrt(weight * (1 - weight) / len(CUSTOMERS))
    assert abs(share - weight) < 4 * sigma


def test_canary_is_sticky_per_customer_and_grows_monotonically():
    first = [route(canary(0.25), c) for c in CUSTOMERS[:2000]]
    again = [route(canary(0.25), c) for c in CUSTOMERS[:2000]]
    assert first == again
    at_10 = {c for c in CUSTOMERS if route(canary(0.10), c).primary == "v2"}
    at_25 = {c for c in CUSTOMERS if route(canary(0.25), c).primary == "v2"}
    assert at_10 < at_25  # raising the weight never moves a canary customer back
    assert all(0 <= bucket(c) < 1 for c in CUSTOMERS[:100])


def test_shadow_answers_with_the_champion_and_shadows_the_challenger():
    state = RouterState(strategy="shadow", champion="v1", challenger="v2")
    assert {route(state, c) for c in CUSTOMERS[:500]} == {
        route(state, "x").__class__(primary="v1", arm="primary", shadows=("v2",))
    }


def test_blue_green_sends_everything_to_the_champion_and_switches_at_once():
    state = RouterState(strategy="blue_green", champion="v1", challenger="v2")
    assert {route(state, c).primary for c in CUSTOMERS[:500]} == {"v1"}
    # Green scores a mirror off the request path: warm, and the switch sees fresh evidence.
    assert {route(state, c).shadows for c in CUSTOMERS[:500]} == {("v2",)}
    switched = promote(state)
    assert {route(switched, c).primary for c in CUSTOMERS[:500]} == {"v2"}
    back = rollback(switched)
    assert (back.champion, back.challenger) == ("v1", "v2")


def test_promote_and_rollback_rules():
    state = canary(0.5)
    promoted = promote(state)
    assert (promoted.champion, promoted.challenger, promoted.previous_champions) == (
        "v2",
        None,
        ("v1",),
    )
    with pytest.raises(RouterError, match="no challenger"):
        promote(promoted)
    back = rollback(promoted)
    assert (back.champion, back.challenger) == ("v1", "v2")
    assert back.strategy == "shadow"  # the demoted version gets no live traffic
    stopped = rollback(canary(0.3))
    assert stopped.strategy == "shadow" and stopped.champion == "v1"
    # After a promotion, a new canary is stopped first; the promotion stands.
    second = replace(promoted, strategy="canary", challenger="v3", canary_weight=0.25)
    stopped = rollback(second)
    assert (stopped.strategy, stopped.champion, stopped.challenger) == ("shadow", "v2", "v3")
    assert stopped.previous_champions == ("v1",)
    assert rollback(stopped).champion == "v1"  # the next rollback undoes the promotion
    with pytest.raises(RouterError, match="no previous champion"):
        rollback(RouterState(strategy="shadow", champion="v1"))


def test_invalid_states_are_refused():
    with pytest.raises(RouterError, match="strategy"):
        RouterState(strategy="yolo", champion="v1").validate()
    with pytest.raises(RouterError, match="outside"):
        RouterState(strategy="canary", champion="v1", challenger="v2", canary_weight=1.5).validate()
    with pytest.raises(RouterError, match="champion and challenger"):
        RouterState(strategy="canary", champion="v1", challenger="v1").validate()


def test_store_persists_state_and_audit(tmp_path):
    store = RouterStore(tmp_path)
    assert store.load() is None
    saved = store.save(canary(0.2), action="set_policy", actor="admin", detail={"w": 0.2})
    saved = store.save(promote(saved), action="promote", actor="admin", detail={})
    reloaded = RouterStore(tmp_path).load()
    assert reloaded == saved
    assert [e["action"] for e in RouterStore(tmp_path).audit()] == ["set_policy", "promote"]
    (tmp_path / "router_state.json").write_text("{not json")
    with pytest.raises(RouterError, match="corrupt"):
        RouterStore(tmp_path).load()


def test_previous_champions_are_bounded_like_the_registry_history():
    state = RouterState(strategy="shadow", champion="v0", challenger=None)
    for n in range(1, CHAMPION_HISTORY_LIMIT + 11):
        state = promote(replace(state, challenger=f"v{n}"))
    assert state.champion == f"v{CHAMPION_HISTORY_LIMIT + 10}"
    assert len(state.previous_champions) == CHAMPION_HISTORY_LIMIT
    assert state.previous_champions[-1] == f"v{CHAMPION_HISTORY_LIMIT + 9}"
    assert rollback(state).champion == f"v{CHAMPION_HISTORY_LIMIT + 9}"
