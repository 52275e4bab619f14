"""The rollout state machine: invariants over every phase x evidence outcome, and the paths."""

import itertools
import json
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from churn_assets.config import load_settings
from churn_assets.rollout import (
    TERMINAL_PHASES,
    CanaryEvidence,
    Decision,
    Phase,
    RolloutError,
    RolloutPolicy,
    RolloutState,
    ShadowEvidence,
    adopt,
    auc_standard_error,
    decide,
    start,
    traffic_share,
)

pytestmark = pytest.mark.unit

STEPS = (0.1, 0.25, 0.5, 0.75, 1.0)
CANARY_POLICY = RolloutPolicy(
    canary_steps=STEPS, min_shadow_requests=500, min_auc=0.75, min_step_seconds=60.0
)
BLUE_GREEN_POLICY = replace(CANARY_POLICY, strategy="blue_green")
SHORT_LAST_STEP_POLICY = replace(CANARY_POLICY, canary_steps=(0.2, 0.6))
POLICIES = (CANARY_POLICY, BLUE_GREEN_POLICY, SHORT_LAST_STEP_POLICY)

GOOD_SHADOW = ShadowEvidence(
    requests=800, agreement_rate=0.97, ks_statistic=0.05, latency_overhead_ms=8.0
)
SHADOWS: dict[str, ShadowEvidence | None] = {
    "none": None,
    "short": replace(GOOD_SHADOW, requests=120),
    "pass": GOOD_SHADOW,
    "low_agreement": replace(GOOD_SHADOW, agreement_rate=0.7),
    "high_ks": replace(GOOD_SHADOW, ks_statistic=0.4),
    "slow": replace(GOOD_SHADOW, latency_overhead_ms=120.0),
    # The challenger fails to score: rolled back however few requests there are.
    "failing": replace(GOOD_SHADOW, requests=0, errors=5),
    "some_errors": replace(GOOD_SHADOW, errors=40),
}

GOOD_CANARY = CanaryEvidence(
    requests=1000,
    errors=5,
    p99_latency_ms=90.0,
    champion_auc=0.84,
    challenger_auc=0.85,
    champion_labelled=400,
    challenger_labelled=300,
    auc_kind="realised",
    elapsed_s=600.0,
)
CANARIES: dict[str, CanaryEvidence | None] = {
    "none": None,
    "few_requests": replace(GOOD_CANARY, requests=50, errors=0),
    "too_soon": replace(GOOD_CANARY, elapsed_s=10.0),
    "pass": GOOD_CANARY,
    "no_auc": replace(GOOD_CANARY, challenger_auc=None, challenger_labelled=0),
    "estimated_pass": replace(GOOD_CANARY, auc_kind="estimated"),
    "noisy_errors": replace(GOOD_CANARY, requests=200, errors=4),
    "many_errors": replace(GOOD_CANARY, errors=45),
    "errors_on_short_sample": replace(GOOD_CANARY, requests=60, errors=12),
    "slow_p99": replace(GOOD_CANARY, p99_latency_ms=900.0),
    "auc_drop": replace(GOOD_CANARY, challenger_auc=0.80),
    "below_threshold": replace(GOOD_CANARY, champion_auc=0.70, challenger_auc=0.71),
    # The same 0.04 drop on 300/400 labelled rows is within the noise of a small canary...
    "auc_drop_noisy": replace(
        GOOD_CANARY, challenger_auc=0.80, champion_positives=40.0, challenger_positives=30.0
    ),
    # ...and on 20,000 rows per arm it is significant.
    "auc_drop_significant": replace(
        GOOD_CANARY,
        challenger_auc=0.80,
        champion_labelled=20_000,
        challenger_labelled=20_000,
        champion_positives=2_000.0,
        challenger_positives=2_000.0,
    ),
}
PASSING = {"pass", "estimated_pass", "noisy_errors", "auc_drop_noisy"}
NOW = 10_000.0
STARTED = 1_000.0


def states(policy: RolloutPolicy) -> list[RolloutState]:
    """One state for every phase, and for every canary step of ``policy``."""
    out = [
        RolloutState(Phase.IDLE, "v1", None),
        RolloutState(Phase.SHADOW, "v1", "v2", step_started_at=STARTED),
        RolloutState(Phase.BLUE_GREEN_READY, "v1", "v2", step_started_at=STARTED),
        RolloutState(Phase.PROMOTED, "v2", None),
        RolloutState(Phase.ROLLED_BACK, "v1", None),
    ]
    out += [
        RolloutState(Phase.CANARY, "v1", "v2", step_index=i, step_started_at=STARTED)
        for i in range(len(policy.canary_steps))
    ]
    return out


CASES = [
    pytest.param(
        policy,
        state,
        shadow_name,
        canary_name,
        id=f"{policy.strategy}{len(policy.canary_steps)}-{state.phase}{state.step_index}-"
        f"{shadow_name}-{canary_name}",
    )
    for policy in POLICIES
    for state, shadow_name, canary_name in itertools.product(states(policy), SHADOWS, CANARIES)
]


def check_invariants(
    policy: RolloutPolicy, state: RolloutState, decision: Decision, evidence_passed: bool
) -> None:
    allowed = {0.0, 1.0, *policy.canary_steps}
    before = traffic_share(state, policy)
    nxt = decision.next_state
    assert decision.traffic in allowed
    assert decision.traffic == traffic_share(nxt, policy)
    assert decision.reasons and all(isinstance(r, str) and r for r in decision.reasons)
    assert all(isinstance(v, float) and math.isfinite(v) for v in decision.figures.values())
    if decision.traffic > before:
        assert evidence_passed, decision
    if state.phase in TERMINAL_PHASES:
        assert decision.action == "hold" and nxt == state
    if decision.action in ("wait", "hold"):
        assert nxt == state
    else:
        assert len(nxt.history) == len(state.history) + 1
        entry = nxt.history[-1]
        assert entry["from"] == state.phase and entry["to"] == nxt.phase
        assert entry["action"] == decision.action and entry["at"] == NOW
        assert entry["reasons"] == list(decision.reasons)
    if decision.action == "rollback":
        assert decision.traffic == 0.0
        assert nxt.phase is Phase.ROLLED_BACK
        assert nxt.champion == state.champion and nxt.challenger is None
        assert nxt.history[-1]["challenger"] == state.challenger
    if nxt.phase is Phase.PROMOTED and state.phase is not Phase.PROMOTED:
        last_step = state.phase is Phase.CANARY and (
            state.step_index == len(policy.canary_steps) - 1
        )
        assert (decision.action, last_step) in {("promote", True), ("switch", False)}
        assert decision.action != "switch" or state.phase is Phase.BLUE_GREEN_READY
        assert nxt.champion == state.challenger and nxt.challenger is None
        assert decision.traffic == 1.0
    assert RolloutState.from_dict(json.loads(json.dumps(nxt.to_dict()))) == nxt


@pytest.mark.parametrize("policy, state, shadow_name, canary_name", CASES)
def test_invariants_over_phases_and_evidence(policy, state, shadow_name, canary_name):
    decision = decide(
        state, policy, shadow=SHADOWS[shadow_name], canary=CANARIES[canary_name], now=NOW
    )
    reads_shadow = state.phase in (Phase.SHADOW, Phase.BLUE_GREEN_READY)
    passed = (shadow_name if reads_shadow else canary_name) in PASSING
    check_invariants(policy, state, decision, passed)
    if state.phase is Phase.CANARY:
        waits = {"none", "few_requests", "too_soon", "no_auc"}
        expected = "wait" if canary_name in waits else "rollback"
        if canary_name in PASSING:
            last = state.step_index == len(policy.canary_steps) - 1
            expected = "promote" if last else "advance"
        assert decision.action == expected, decision.reasons
    if reads_shadow:
        expected = {"none": "wait", "short": "wait"}.get(shadow_name, "rollback")
        if shadow_name == "pass":
            expected = "switch" if state.phase is Phase.BLUE_GREEN_READY else "advance"
        assert decision.action == expected


def test_start_only_from_terminal_phases():
    for state in states(CANARY_POLICY):
        if state.phase in TERMINAL_PHASES:
            decision = start(state, "v3", now=NOW)
            assert decision.action == "start_shadow" and decision.traffic == 0.0
            assert decision.next_state.phase is Phase.SHADOW
            assert decision.next_state.challenger == "v3"
            assert decision.next_state.champion == state.champion
        else:
            with pytest.raises(RolloutError, match="finish or roll it back"):
                start(state, "v3", now=NOW)
    with pytest.raises(RolloutError, match="already the champion"):
        start(RolloutState(Phase.IDLE, "v1", None), "v1")


def test_happy_path_shadow_every_canary_step_then_promote():
    state = start(RolloutState(Phase.IDLE, "v1", None), "v2", now=0.0).next_state
    clock = 0.0
    waiting = decide(state, CANARY_POLICY, shadow=SHADOWS["short"], now=clock)
    assert waiting.action == "wait" and "120 < min 500" in waiting.reasons[0]
    decision = decide(state, CANARY_POLICY, shadow=GOOD_SHADOW, now=clock)
    seen = [decision.traffic]
    while decision.action == "advance":
        clock += 600.0
        decision = decide(decision.next_state, CANARY_POLICY, canary=GOOD_CANARY, now=clock)
        seen.append(decision.traffic)
    assert decision.action == "promote"
    assert seen == [*STEPS, 1.0]
    final = decision.next_state
    assert (final.phase, final.champion, final.challenger) == (Phase.PROMOTED, "v2", None)
    actions = [entry["action"] for entry in final.history]
    assert actions == ["start_shadow"] + ["advance"] * len(STEPS) + ["promote"]
    assert "last step passed; promoting v2" in decision.reasons
    assert decide(final, CANARY_POLICY, now=clock).action == "hold"


def test_high_error_rate_at_step_two_rolls_back_with_the_reason():
    state = RolloutState(Phase.CANARY, "v1", "v2", step_index=2, step_started_at=STARTED)
    bad = replace(GOOD_CANARY, errors=60)
    decision = decide(state, CANARY_POLICY, canary=bad, now=NOW)
    assert decision.action == "rollback" and decision.traffic == 0.0
    assert decision.next_state.champion == "v1"
    assert decision.next_state.phase is Phase.ROLLED_BACK
    (reason,) = decision.reasons
    assert reason.startswith("canary step 3/5 (50%): error rate 0.0600 (60/1000) vs max 0.0100")
    assert "significantly above" in reason
    assert decision.figures["error_rate"] == pytest.approx(0.06)
    assert decision.figures["error_p_value"] < CANARY_POLICY.alpha


def test_error_rate_rules_noise_passes_twice_the_max_fails():
    state = RolloutState(Phase.CANARY, "v1", "v2", step_index=0, step_started_at=STARTED)
    noisy = decide(state, CANARY_POLICY, canary=CANARIES["noisy_errors"], now=NOW)
    assert noisy.action == "advance" and noisy.figures["error_rate"] == 0.02
    lenient = replace(CANARY_POLICY, alpha=1e-6)
    double = replace(GOOD_CANARY, requests=200, errors=5)
    decision = decide(state, lenient, canary=double, now=NOW)
    assert decision.figures["error_p_value"] >= lenient.alpha
    assert decision.action == "rollback" and "above twice the max" in decision.reasons[0]


def test_blue_green_path_ready_then_switch():
    state = start(RolloutState(Phase.IDLE, "v1", None), "v2", now=0.0).next_state
    ready = decide(state, BLUE_GREEN_POLICY, shadow=GOOD_SHADOW, now=1.0)
    assert ready.action == "advance" and ready.traffic == 0.0
    assert ready.next_state.phase is Phase.BLUE_GREEN_READY
    waiting = decide(ready.next_state, BLUE_GREEN_POLICY, now=2.0)
    assert waiting.action == "wait" and waiting.next_state == ready.next_state
    switch = decide(ready.next_state, BLUE_GREEN_POLICY, shadow=GOOD_SHADOW, now=3.0)
    assert switch.action == "switch" and switch.traffic == 1.0
    assert (switch.next_state.phase, switch.next_state.champion) == (Phase.PROMOTED, "v2")
    stale = decide(ready.next_state, BLUE_GREEN_POLICY, shadow=SHADOWS["high_ks"], now=3.0)
    assert stale.action == "rollback" and "score KS 0.4000 > max 0.2000" in stale.reasons[0]


def test_waiting_names_what_is_short():
    state = RolloutState(Phase.CANARY, "v1", "v2", step_index=1, step_started_at=NOW - 30.0)
    policy = replace(CANARY_POLICY, min_step_seconds=300.0)
    decision = decide(state, policy, canary=replace(GOOD_CANARY, requests=150, errors=0), now=NOW)
    assert decision.action == "wait" and decision.traffic == 0.25
    assert decision.reasons == (
        "canary step 2/5 (25%): requests 150 < min 200; elapsed 30 s < min 300 s",
    )
    no_auc = decide(
        replace(state, step_started_at=STARTED), CANARY_POLICY, canary=CANARIES["no_auc"], now=NOW
    )
    assert no_auc.action == "wait" and "no performance evidence yet" in no_auc.reasons[0]


def test_round_trip_through_json():
    decision = start(RolloutState(Phase.IDLE, "v1", None), "v2", now=5.0)
    decision = decide(decision.next_state, CANARY_POLICY, shadow=GOOD_SHADOW, now=6.0)
    state = decision.next_state
    restored = RolloutState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state and restored.phase is Phase.CANARY
    with pytest.raises(RolloutError, match="unknown phase"):
        RolloutState.from_dict({**state.to_dict(), "phase": "half-way"})
    with pytest.raises(RolloutError, match="corrupt"):
        RolloutState.from_dict({"phase": "idle"})


def test_policy_from_settings():
    settings = load_settings()
    policy = RolloutPolicy.from_settings(settings, min_step_seconds=60.0)
    assert policy.canary_steps == tuple(settings.rollout.canary_steps)
    assert policy.min_shadow_requests == settings.rollout.min_shadow_requests
    assert policy.min_auc == settings.retraining.performance_threshold
    assert policy.min_step_seconds == 60.0
    plain = RolloutPolicy.from_settings(settings)
    assert plain.min_step_seconds == settings.rollout.min_step_minutes * 60
    assert (plain.strategy, plain.max_error_rate, plain.alpha) == (
        settings.rollout.strategy,
        settings.rollout.max_error_rate,
        settings.rollout.alpha,
    )
    # Settings themselves refuse decreasing steps; the policy checks them again on its own.
    bad = SimpleNamespace(
        rollout=SimpleNamespace(**(settings.rollout.model_dump() | {"canary_steps": [0.5, 0.2]})),
        retraining=settings.retraining,
    )
    with pytest.raises(RolloutError, match="strictly increasing"):
        RolloutPolicy.from_settings(bad)


@pytest.mark.parametrize(
    "make",
    [
        lambda: replace(GOOD_SHADOW, requests=-1),
        lambda: replace(GOOD_SHADOW, agreement_rate=1.2),
        lambda: replace(GOOD_SHADOW, ks_statistic=math.nan),
        lambda: replace(GOOD_SHADOW, latency_overhead_ms=math.inf),
        lambda: replace(GOOD_CANARY, errors=2000),
        lambda: replace(GOOD_CANARY, challenger_auc=-0.1),
        lambda: replace(GOOD_CANARY, champion_auc=math.nan),
        lambda: replace(GOOD_CANARY, p99_latency_ms=-5.0),
        lambda: replace(GOOD_CANARY, auc_kind="guessed"),
        lambda: replace(GOOD_CANARY, elapsed_s=math.nan),
        lambda: RolloutState(Phase.CANARY, "v1", "v2"),
        lambda: RolloutState(Phase.SHADOW, "v1", None),
        lambda: RolloutState(Phase.SHADOW, "v1", "v1"),
    ],
)
def test_invalid_inputs_raise(make):
    with pytest.raises(RolloutError):
        make()


def test_invalid_decide_calls_raise():
    state = RolloutState(Phase.CANARY, "v1", "v2", step_index=7, step_started_at=STARTED)
    with pytest.raises(RolloutError, match="outside the policy"):
        decide(state, CANARY_POLICY, canary=GOOD_CANARY, now=NOW)
    with pytest.raises(RolloutError, match="now"):
        decide(RolloutState(Phase.IDLE, "v1", None), CANARY_POLICY, now=math.nan)
    early = replace(state, step_index=0)
    with pytest.raises(RolloutError, match="precedes"):
        decide(early, CANARY_POLICY, canary=GOOD_CANARY, now=STARTED - 1)


def test_auc_standard_error_matches_the_spread_of_sampled_aucs():
    """Hanley-McNeil's standard error against the empirical spread of AUCs over seeded samples
    drawn from the same two score distributions."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(7)
    positives, negatives = 60, 540
    aucs = []
    for _ in range(400):
        scores = np.concatenate([rng.normal(1.2, 1, positives), rng.normal(0, 1, negatives)])
        labels = np.r_[np.ones(positives), np.zeros(negatives)]
        aucs.append(roc_auc_score(labels, scores))
    empirical = float(np.std(aucs))
    predicted = auc_standard_error(float(np.mean(aucs)), positives, positives + negatives)
    assert predicted is not None
    assert 0.75 * empirical < predicted < 1.35 * empirical, (predicted, empirical)
    assert auc_standard_error(0.8, 0, 100) is None and auc_standard_error(0.8, 100, 100) is None


def test_a_significant_auc_drop_names_the_test_in_the_reason():
    state = RolloutState(Phase.CANARY, "v1", "v2", step_index=1, step_started_at=STARTED)
    rolled = decide(state, CANARY_POLICY, canary=CANARIES["auc_drop_significant"], now=NOW)
    assert rolled.action == "rollback"
    assert any("z-test" in r and "significantly too low" in r for r in rolled.reasons)
    assert rolled.figures["auc_drop_p_value"] < CANARY_POLICY.alpha
    noisy = decide(state, CANARY_POLICY, canary=CANARIES["auc_drop_noisy"], now=NOW)
    assert noisy.action == "advance"
    assert noisy.figures["auc_drop_p_value"] >= CANARY_POLICY.alpha
    with pytest.raises(RolloutError, match="challenger_positives"):
        replace(GOOD_CANARY, challenger_positives=301.0)


def test_adopt_ends_any_rollout_with_the_operator_s_champion():
    for state in states(CANARY_POLICY):
        new_champion = state.challenger or "v9"
        decision = adopt(state, new_champion, now=NOW, reason="promoted by an operator")
        assert decision.action == "adopt" and decision.traffic == 0.0
        nxt = decision.next_state
        assert nxt.phase is Phase.IDLE and nxt.champion == new_champion
        assert nxt.challenger is None and nxt.history[-1]["action"] == "adopt"
        assert nxt.history[-1]["reasons"] == ["promoted by an operator"]
    idle = RolloutState(Phase.IDLE, "v1", None)
    with pytest.raises(RolloutError, match="already is the champion"):
        adopt(idle, "v1", now=NOW, reason="nothing changed")


def test_shadow_scoring_errors_roll_back_on_any_sample():
    state = RolloutState(Phase.SHADOW, "v1", "v2", step_started_at=STARTED)
    failing = decide(state, CANARY_POLICY, shadow=SHADOWS["failing"], now=NOW)
    assert failing.action == "rollback"
    assert "shadow scoring errors 5/5" in failing.reasons[0]
    assert failing.figures["shadow_error_rate"] == 1.0
    # One failure in 801 is noise at max_error_rate 0.01: judged on the other checks.
    rare = decide(state, CANARY_POLICY, shadow=replace(GOOD_SHADOW, errors=1), now=NOW)
    assert rare.action == "advance"
    with pytest.raises(RolloutError, match="shadow errors"):
        replace(GOOD_SHADOW, errors=-1)
