"""A seeded customer-base simulator with a documented churn model (docs/simulator.md).

Each simulated day some customers emit their current state on ``churn.customers``; churn happens
with a daily hazard given by :func:`monthly_churn_logit`; the outcome reaches ``ml.feedback``
after a reporting delay (churned) or at each monthly renewal (retained). Because the true churn
probability of every customer is known, :func:`expected_best_auc` gives the best AUC any model can
reach on the simulated data.

Scenarios switch on at ``scenario_start_day``:

* ``covariate_drift``: a 15 % price rise and a payment-mix shift towards electronic checks;
  the churn model itself is unchanged.
* ``concept_drift``: support tickets start to matter much more; features keep their distribution.
* ``outlier_burst``: for three days, 5 % of events carry extreme (but valid) values.
"""

import functools
import hashlib
import heapq
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np

from churn_assets.schemas import CATEGORY_VALUES, Topics

__all__ = [
    "SCENARIOS",
    "ChurnModel",
    "SimulationConfig",
    "SimulationSummary",
    "Simulator",
    "expected_best_auc",
    "monthly_churn_logit",
    "true_churn_probability",
    "simulate_frames",
    "produce_simulation",
    "sample_customers",
]

log = logging.getLogger(__name__)

# The simulator speaks the default contract's vocabulary (config/features.yaml).
CONTRACT_TYPES = CATEGORY_VALUES["contract_type"]
PAYMENT_METHODS = CATEGORY_VALUES["payment_method"]
INTERNET_SERVICES = CATEGORY_VALUES["internet_service"]
SCENARIOS = ("none", "covariate_drift", "concept_drift", "outlier_burst")
DAY_SECONDS = 86_400
OUTLIER_BURST_DAYS = 3


@dataclass(frozen=True)
class ChurnModel:
    """Coefficients of the 30-day churn log-odds (see :func:`monthly_churn_logit`).

    Thresholds, a saturating ticket effect and an interaction make the true model non-linear, so
    a tree model can beat a linear baseline.
    """

    intercept: float = -4.4
    month_to_month: float = 1.2
    two_year: float = -1.0
    new_customer: float = 1.5  # tenure under 6 months
    tenure_per_month: float = -0.005
    fiber_month_to_month: float = 1.6  # interaction
    high_charges: float = 0.2  # monthly charges above 90
    high_charges_month_to_month: float = 1.2  # interaction: no contract keeps them
    tickets: float = 0.45  # per ticket, saturating at 5
    low_logins: float = 1.0  # fewer than 8 logins in 30 days
    electronic_check: float = 0.45


BASE_MODEL = ChurnModel()
CONCEPT_DRIFT_MODEL = ChurnModel(tickets=1.0)


def monthly_churn_logit(features: dict[str, np.ndarray], model: ChurnModel = BASE_MODEL):
    """Log-odds that a customer churns within the next 30 days, vectorised over customers.

    ``features`` holds the eight features; categorical ones as their string values or as indices
    into :data:`CONTRACT_TYPES`, :data:`PAYMENT_METHODS` and :data:`INTERNET_SERVICES`.
    """

    def code(name: str, values: tuple[str, ...]) -> np.ndarray:
        column = np.asarray(features[name])
        if column.dtype.kind in "OUS":
            lookup = {v: i for i, v in enumerate(values)}
            return np.array([lookup.get(v, -1) for v in column])
        return column

    contract = code("contract_type", CONTRACT_TYPES)
    payment = code("payment_method", PAYMENT_METHODS)
    internet = code("internet_service", INTERNET_SERVICES)
    tenure = np.asarray(features["customer_tenure"], dtype=float)
    m2m = contract == CONTRACT_TYPES.index("month-to-month")
    return (
        model.intercept
        + model.month_to_month * m2m
        + model.two_year * (contract == CONTRACT_TYPES.index("two_year"))
        + model.new_customer * (tenure < 6)
        + model.tenure_per_month * tenure
        + model.fiber_month_to_month * (m2m & (internet == INTERNET_SERVICES.index("fiber_optic")))
        + model.high_charges * (np.asarray(features["monthly_charges"], dtype=float) > 90)
        + model.high_charges_month_to_month
        * (m2m & (np.asarray(features["monthly_charges"], dtype=float) > 90))
        + model.tickets * np.minimum(np.asarray(features["support_tickets"], dtype=float), 5)
        + model.low_logins * (np.asarray(features["login_frequency"], dtype=float) < 8)
        + model.electronic_check * (payment == PAYMENT_METHODS.index("electronic_check"))
    )


def true_churn_probability(features: dict[str, np.ndarray], model: ChurnModel = BASE_MODEL):
    """The simulator's true probability of churn within 30 days for the given features."""
    return 1.0 / (1.0 + np.exp(-monthly_churn_logit(features, model)))


def expected_best_auc(probabilities: np.ndarray) -> float:
    """AUC of the true probabilities against outcomes drawn from them (the Bayes AUC).

    Ratio of expected positive-over-negative pair orderings to expected pairs; exact in the limit
    of many customers.
    """
    p = np.sort(np.asarray(probabilities, dtype=float))
    q = 1.0 - p
    # For each i as the positive: mass of negatives with a strictly lower score, ties counted half.
    cum_q = np.concatenate([[0.0], np.cumsum(q)])
    unique, first, counts = np.unique(p, return_index=True, return_counts=True)
    lower_q = np.repeat(cum_q[first], counts)
    tie_q = np.repeat(cum_q[first + counts] - cum_q[first], counts)
    ordered = np.sum(p * (lower_q + 0.5 * (tie_q - q)))
    pairs = p.sum() * q.sum() - np.sum(p * q)
    return float(ordered / pairs)


@dataclass(frozen=True)
class SimulationConfig:
    seed: int = 42
    customers: int = 2000
    days: int = 60
    start_date: date = date(2026, 1, 1)
    scenario: str = "none"
    scenario_start_day: int = 30
    activity_rate: float = 0.35
    arrival_rate: float = 0.003
    mean_report_delay_days: float = 5.0

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario {self.scenario!r} is not one of {SCENARIOS}")
        if self.customers < 1 or self.days < 1:
            raise ValueError("customers and days must be at least 1")

    @functools.cached_property
    def id_prefix(self) -> str:
        """What every message id of this simulation starts with (after ``ev-``/``fb-``).

        Landing is idempotent by message id, so two different simulations must never share
        ids: the prefix is the seed plus a digest of everything else that shapes the events.
        The product's default base (10,000 customers, 90 days from 2026-01-01, no scenario)
        keeps the bare seed, the ids earlier releases landed, so a restart on their warehouse
        recognises its data.
        """
        shape = {
            "customers": self.customers,
            "days": self.days,
            "start_date": self.start_date.isoformat(),
            "scenario": self.scenario,
            "scenario_start_day": self.scenario_start_day if self.scenario != "none" else None,
            "activity_rate": self.activity_rate,
            "arrival_rate": self.arrival_rate,
            "mean_report_delay_days": self.mean_report_delay_days,
        }
        if shape == _DEFAULT_SHAPE:
            return f"{self.seed}-"
        digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.seed}-{digest}-"


# The product's default simulation (config/config.yaml), whose ids carry only the seed.
_DEFAULT_SHAPE = {
    "customers": 10_000,
    "days": 90,
    "start_date": "2026-01-01",
    "scenario": "none",
    "scenario_start_day": None,
    "activity_rate": 0.35,
    "arrival_rate": 0.003,
    "mean_report_delay_days": 5.0,
}


@dataclass
class SimulationSummary:
    customer_events: int = 0
    feedback_events: int = 0
    churned: int = 0
    retained_labels: int = 0
    customers_seen: int = 0
    best_auc_30d: float = float("nan")
    churn_rate_30d: float = float("nan")
    per_day: list[int] = field(default_factory=list)


class _Population:
    """Column arrays for every customer who has joined so far."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.cols: dict[str, np.ndarray] = {
            name: np.empty(0, dtype=dtype)
            for name, dtype in (
                ("number", np.int64),
                ("tenure_days", np.float64),
                ("monthly_charges", np.float64),
                ("total_charges", np.float64),
                ("contract_type", np.int8),
                ("payment_method", np.int8),
                ("internet_service", np.int8),
                ("support_tickets", np.int64),
                ("login_frequency", np.float64),
                ("active", np.bool_),
                ("joined_day", np.int64),
            )
        }

    def __len__(self) -> int:
        return len(self.cols["number"])

    def add(self, n: int, day: int, *, new_signups: bool) -> None:
        rng = self.rng
        start = len(self)
        contract = rng.choice(3, size=n, p=[0.55, 0.25, 0.20]).astype(np.int8)
        internet = rng.choice(3, size=n, p=[0.35, 0.45, 0.20]).astype(np.int8)
        payment = rng.choice(4, size=n, p=[0.34, 0.20, 0.22, 0.24]).astype(np.int8)
        if new_signups:
            tenure_days = np.zeros(n)
        else:
            tenure_days = np.floor(np.minimum(rng.exponential(24 * 30, size=n), 72 * 30))
        base = np.array([55.0, 90.0, 25.0])[internet] + rng.normal(0, 8, size=n)
        monthly = np.clip(base + 5.0 * (contract == 0), 15.0, 150.0)
        total = monthly * tenure_days / 30.0 * rng.uniform(0.92, 1.03, size=n)
        new = {
            "number": np.arange(start, start + n),
            "tenure_days": tenure_days,
            "monthly_charges": monthly,
            "total_charges": total,
            "contract_type": contract,
            "payment_method": payment,
            "internet_service": internet,
            "support_tickets": rng.poisson(rng.gamma(1.2, 0.6, size=n)),
            "login_frequency": np.round(rng.gamma(3.0, 6.0, size=n), 1),
            "active": np.ones(n, dtype=bool),
            "joined_day": np.full(n, day),
        }
        for name, values in new.items():
            self.cols[name] = np.concatenate(
                [self.cols[name], values.astype(self.cols[name].dtype)]
            )


class Simulator:
    """Generates the event stream day by day; deterministic for a seed."""

    def __init__(self, config: SimulationConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.population = _Population(self.rng)
        self.summary = SimulationSummary()
        self._pending_feedback: list[tuple[float, int, dict[str, Any]]] = []
        self._sequence = 0
        self._start = datetime.combine(config.start_date, datetime.min.time(), tzinfo=UTC)

    # -- scenario switches ---------------------------------------------------------------------
    def _scenario_on(self, day: int) -> bool:
        return self.config.scenario != "none" and day >= self.config.scenario_start_day

    def _model(self, day: int) -> ChurnModel:
        if self.config.scenario == "concept_drift" and self._scenario_on(day):
            return CONCEPT_DRIFT_MODEL
        return BASE_MODEL

    def _apply_scenario_start(self, day: int) -> None:
        if self.config.scenario == "covariate_drift" and day == self.config.scenario_start_day:
            cols = self.population.cols
            cols["monthly_charges"] = np.clip(cols["monthly_charges"] * 1.15, 0, 10_000)
            switch = self.rng.random(len(self.population)) < 0.4
            cols["payment_method"][switch] = PAYMENT_METHODS.index("electronic_check")

    # -- observed features -----------------------------------------------------------------------
    def _observe(self, idx: np.ndarray, day: int) -> dict[str, np.ndarray]:
        """The features of customers ``idx`` as emitted on ``day`` (their current state)."""
        cols = self.population.cols
        rng = self.rng
        features = {
            "customer_tenure": (cols["tenure_days"][idx] // 30).astype(np.int64),
            "monthly_charges": np.round(cols["monthly_charges"][idx], 2),
            "total_charges": np.round(cols["total_charges"][idx], 2),
            "contract_type": cols["contract_type"][idx],
            "payment_method": cols["payment_method"][idx],
            "internet_service": cols["internet_service"][idx],
            "support_tickets": cols["support_tickets"][idx],
            "login_frequency": cols["login_frequency"][idx],
        }
        burst = self.config.scenario == "outlier_burst" and (
            self.config.scenario_start_day
            <= day
            < self.config.scenario_start_day + OUTLIER_BURST_DAYS
        )
        if burst:
            hit = rng.random(len(idx)) < 0.05
            k = int(hit.sum())
            features["monthly_charges"] = features["monthly_charges"].copy()
            features["monthly_charges"][hit] = np.round(rng.uniform(400, 900, size=k), 2)
            features["support_tickets"] = features["support_tickets"].copy()
            features["support_tickets"][hit] = rng.integers(15, 40, size=k)
            features["login_frequency"] = features["login_frequency"].copy()
            features["login_frequency"][hit] = np.round(rng.uniform(300, 900, size=k), 1)
        return features

    def _state(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return self._state_of(self.population.cols, idx)

    @staticmethod
    def _state_of(cols: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
        state = {
            name: cols[name][idx]
            for name in (
                "monthly_charges",
                "total_charges",
                "contract_type",
                "payment_method",
                "internet_service",
                "support_tickets",
                "login_frequency",
            )
        }
        state["customer_tenure"] = cols["tenure_days"][idx] // 30
        return state

    # -- one day ---------------------------------------------------------------------------------
    def step(self, day: int) -> list[tuple[str, str, dict[str, Any]]]:
        """Advance one simulated day; returns (topic, key, payload) in event-time order."""
        cfg, rng, pop = self.config, self.rng, self.population
        if day == 0:
            pop.add(cfg.customers, day, new_signups=False)
        else:
            arrivals = rng.poisson(cfg.customers * cfg.arrival_rate)
            if arrivals:
                pop.add(arrivals, day, new_signups=True)
        self._apply_scenario_start(day)
        cols = pop.cols
        active = np.flatnonzero(cols["active"])
        day_start = self._start + timedelta(days=day)
        out: list[tuple[float, str, str, dict[str, Any]]] = []

        # Daily evolution of the state. Usage drifts at each monthly renewal only, so a customer's
        # features stay what drives its churn hazard for most of a 30-day horizon.
        cols["tenure_days"][active] += 1
        renew = active[cols["tenure_days"][active] % 30 == 0]
        drifting = renew[rng.random(len(renew)) < 0.2]
        cols["login_frequency"][drifting] = np.round(
            cols["login_frequency"][drifting] * rng.uniform(0.6, 1.1, size=len(drifting)), 1
        )
        cols["support_tickets"][drifting] = rng.poisson(
            0.5 + 0.5 * cols["support_tickets"][drifting]
        )
        cols["total_charges"][active] += cols["monthly_charges"][active] / 30.0

        emit = active[
            (rng.random(len(active)) < cfg.activity_rate) | (cols["joined_day"][active] == day)
        ]
        features = self._observe(emit, day)
        seconds = np.sort(rng.uniform(0, DAY_SECONDS, size=len(emit)))
        for i, number in enumerate(emit):
            at = day_start + timedelta(seconds=float(seconds[i]))
            payload = {
                "schema_version": 1,
                "event_id": f"ev-{cfg.id_prefix}{self._next_id()}",
                "customer_id": f"C{int(number):07d}",
                "event_time": at,
                "customer_tenure": int(features["customer_tenure"][i]),
                "monthly_charges": float(features["monthly_charges"][i]),
                "total_charges": float(features["total_charges"][i]),
                "contract_type": CONTRACT_TYPES[features["contract_type"][i]],
                "payment_method": PAYMENT_METHODS[features["payment_method"][i]],
                "internet_service": INTERNET_SERVICES[features["internet_service"][i]],
                "support_tickets": int(features["support_tickets"][i]),
                "login_frequency": float(features["login_frequency"][i]),
            }
            out.append((at.timestamp(), Topics.CUSTOMERS, payload["customer_id"], payload))

        # Churn: daily hazard from the 30-day probability of the customers' current state.
        p30 = true_churn_probability(self._state(active), self._model(day))
        if day == 0:
            self.summary.best_auc_30d = expected_best_auc(p30)
            self.summary.churn_rate_30d = float(p30.mean())
        daily = 1.0 - np.power(1.0 - p30, 1.0 / 30.0)
        churned = active[rng.random(len(active)) < daily]
        cols["active"][churned] = False
        for number in churned:
            outcome = day_start + timedelta(seconds=float(rng.uniform(0, DAY_SECONDS)))
            delay = timedelta(days=1 + float(rng.exponential(cfg.mean_report_delay_days - 1)))
            self._schedule_feedback(int(number), outcome, outcome + delay, churned=True)
        renewing = active[cols["active"][active] & (cols["tenure_days"][active] % 30 == 0)]
        for number in renewing:
            outcome = day_start + timedelta(seconds=float(rng.uniform(0, DAY_SECONDS)))
            self._schedule_feedback(
                int(number), outcome, outcome + timedelta(days=1), churned=False
            )

        day_end = (day_start + timedelta(days=1)).timestamp()
        while self._pending_feedback and self._pending_feedback[0][0] < day_end:
            observed_ts, _, payload = heapq.heappop(self._pending_feedback)
            out.append((observed_ts, Topics.FEEDBACK, payload["customer_id"], payload))
            self.summary.feedback_events += 1
            if payload["churned"]:
                self.summary.churned += 1
            else:
                self.summary.retained_labels += 1
        self.summary.customer_events += len(emit)
        self.summary.customers_seen = len(pop)
        self.summary.per_day.append(len(out))
        out.sort(key=lambda item: item[0])
        return [(topic, key, payload) for _, topic, key, payload in out]

    def _next_id(self) -> int:
        self._sequence += 1
        return self._sequence

    def _schedule_feedback(
        self, number: int, outcome: datetime, observed: datetime, *, churned: bool
    ):
        payload = {
            "schema_version": 1,
            "event_id": f"fb-{self.config.id_prefix}{self._next_id()}",
            "customer_id": f"C{number:07d}",
            "request_id": None,
            "churned": churned,
            "outcome_time": outcome,
            "observed_at": observed,
        }
        heapq.heappush(self._pending_feedback, (observed.timestamp(), self._sequence, payload))

    def events(self) -> Iterator[tuple[int, list[tuple[str, str, dict[str, Any]]]]]:
        """Yield (day, events) for every simulated day."""
        for day in range(self.config.days):
            yield day, self.step(day)


def produce_simulation(
    producer: Any,
    simulator: Simulator,
    *,
    rate: float = 0.0,
    on_day: Callable[[int, int], None] | None = None,
) -> SimulationSummary:
    """Validate and produce every simulated event; ``rate`` caps events/s (0 = no cap)."""
    from churn_assets.schemas import encode_message

    sent = 0
    failures: list[str] = []

    def delivered(error: Any, _message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    started = time.monotonic()
    for day, events in simulator.events():
        for topic, key, payload in events:
            value = encode_message(topic, payload)
            while True:
                try:
                    producer.produce(topic, key=key.encode(), value=value, on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.05)
            sent += 1
            if rate > 0 and sent % 500 == 0:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        producer.poll(0)
        if on_day is not None:
            on_day(day, len(events))
    remaining = producer.flush(60)
    if remaining:
        raise RuntimeError(f"{remaining} simulated events were not delivered to Kafka within 60s")
    if failures:
        raise RuntimeError(
            f"{len(failures)} simulated events failed delivery; first: {failures[0]}"
        )
    return simulator.summary


def simulate_frames(config: SimulationConfig) -> tuple[Any, Any]:
    """The whole simulation as (customer events, outcomes) DataFrames, without Kafka.

    Columns match the landed tables' payload columns; used by benchmarks, notebooks and tests.
    """
    import pandas as pd

    customers: list[dict[str, Any]] = []
    outcomes: list[dict[str, Any]] = []
    for _, events in Simulator(config).events():
        for topic, _, payload in events:
            (customers if topic == Topics.CUSTOMERS else outcomes).append(payload)
    events_frame = pd.DataFrame(customers).drop(columns=["schema_version"])
    feedback_frame = pd.DataFrame(outcomes).drop(columns=["schema_version"])
    for frame, columns in (
        (events_frame, ["event_time"]),
        (feedback_frame, ["outcome_time", "observed_at"]),
    ):
        for column in columns:
            frame[column] = pd.to_datetime(frame[column], utc=True)
    return events_frame, feedback_frame


def sample_customers(n: int, seed: int = 0, horizon_days: int = 14) -> Any:
    """``n`` customers drawn like the simulator's base, with a label drawn from the true model.

    A quick source of realistic feature rows at any size (benchmarks, notebooks); the label is
    churn within ``horizon_days`` under :data:`BASE_MODEL`.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    population = _Population(rng)
    population.add(n, 0, new_signups=False)
    cols = population.cols
    state = Simulator._state_of(cols, np.arange(n))
    p30 = true_churn_probability(state)
    p = 1.0 - np.power(1.0 - p30, horizon_days / 30.0)
    frame = pd.DataFrame(
        {
            "customer_id": [f"S{i:08d}" for i in range(n)],
            "customer_tenure": state["customer_tenure"].astype(int),
            "monthly_charges": np.round(state["monthly_charges"], 2),
            "total_charges": np.round(state["total_charges"], 2),
            "contract_type": np.array(CONTRACT_TYPES)[state["contract_type"]],
            "payment_method": np.array(PAYMENT_METHODS)[state["payment_method"]],
            "internet_service": np.array(INTERNET_SERVICES)[state["internet_service"]],
            "support_tickets": state["support_tickets"].astype(int),
            "login_frequency": state["login_frequency"],
        }
    )
    frame["label"] = (rng.random(n) < p).astype(int)
    frame["true_probability"] = p
    return frame
