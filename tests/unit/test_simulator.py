import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from churn_assets.schemas import Topics, decode_message, encode_message
from churn_assets.simulator import SimulationConfig, Simulator, expected_best_auc

pytestmark = pytest.mark.unit


def run(**config):
    simulator = Simulator(SimulationConfig(**{"customers": 400, "days": 40, **config}))
    days = [events for _, events in simulator.events()]
    return simulator, days


def test_same_seed_same_events_other_seed_other_events():
    _, first = run(seed=7)
    _, again = run(seed=7)
    _, other = run(seed=8)
    assert first == again
    assert first != other


def test_events_validate_and_are_time_ordered():
    _, days = run()
    events = [e for day in days for e in day]
    assert {topic for topic, _, _ in events} == {Topics.CUSTOMERS, Topics.FEEDBACK}
    for topic, _, payload in events[:2000]:
        decode_message(topic, encode_message(topic, payload))
    for day in days:
        stamps = [p.get("event_time") or p["observed_at"] for _, _, p in day]
        assert stamps == sorted(stamps)


def test_feedback_arrives_after_the_outcome():
    _, days = run()
    feedback = [p for day in days for topic, _, p in day if topic == Topics.FEEDBACK]
    assert any(p["churned"] for p in feedback) and any(not p["churned"] for p in feedback)
    assert all(p["observed_at"] > p["outcome_time"] for p in feedback)


def mean_charges(days, first, last):
    values = [
        p["monthly_charges"]
        for day in days[first:last]
        for topic, _, p in day
        if topic == Topics.CUSTOMERS
    ]
    return float(np.mean(values))


def test_covariate_drift_raises_prices_and_electronic_checks_after_the_switch():
    _, base = run(seed=3)
    _, drift = run(seed=3, scenario="covariate_drift", scenario_start_day=20)
    assert mean_charges(drift, 0, 20) == pytest.approx(mean_charges(base, 0, 20))
    assert mean_charges(drift, 21, 40) > 1.1 * mean_charges(base, 21, 40)

    def echeck_share(days):
        methods = [p["payment_method"] for d in days[21:] for t, _, p in d if t == Topics.CUSTOMERS]
        return methods.count("electronic_check") / len(methods)

    assert echeck_share(drift) > echeck_share(base) + 0.15


def test_concept_drift_changes_churn_not_features():
    base_sim, base = run(seed=5, customers=3000, days=45)
    drift_sim, drift = run(
        seed=5, customers=3000, days=45, scenario="concept_drift", scenario_start_day=0
    )
    assert mean_charges(drift, 0, 1) == pytest.approx(mean_charges(base, 0, 1))
    assert drift_sim.summary.churned > 1.2 * base_sim.summary.churned


def test_outlier_burst_is_bounded_in_time():
    _, days = run(seed=2, scenario="outlier_burst", scenario_start_day=10)

    def extreme(day):
        return sum(1 for t, _, p in day if t == Topics.CUSTOMERS and p["monthly_charges"] >= 400)

    assert sum(extreme(d) for d in days[:10]) == 0
    assert sum(extreme(d) for d in days[10:13]) > 10
    assert sum(extreme(d) for d in days[13:]) == 0


def test_expected_best_auc_matches_sampled_outcomes():
    rng = np.random.default_rng(0)
    p = rng.beta(1.2, 6.0, size=20_000)
    sampled = [roc_auc_score(rng.random(p.size) < p, p) for _ in range(20)]
    assert expected_best_auc(p) == pytest.approx(np.mean(sampled), abs=0.005)


def test_simulation_reports_a_plausible_best_auc():
    simulator, _ = run(customers=2000, days=2)
    assert 0.7 < simulator.summary.best_auc_30d < 0.95
    assert 0.05 < simulator.summary.churn_rate_30d < 0.3


def test_bad_scenario_is_refused():
    with pytest.raises(ValueError, match="scenario 'meteor'"):
        SimulationConfig(scenario="meteor")
