"""Point-in-time training sets, XGBoost and baseline training, and holdout evaluation.

Labels: for a snapshot time ``t`` and horizon ``h``, a customer active at ``t`` is positive when a
churn outcome happened in ``(t, t + h]``, negative when it was still a customer after ``t + h``
(an event or a retention outcome later than that), and left out otherwise (censored). Customers
whose churn happened at or before ``t`` are not in the population.

The split is by time with purging: every training row's label window ends before the first
validation snapshot, and every validation row's before the first test snapshot, so no outcome
labels rows on both sides of a split.

Snapshot data (a static export: each customer observed at one time only, or a few exports at a
few observation times too close together for a purged time split) has no later period to test
on. There each customer's observation is a row (features as of its observation time, label =
churn at or after it within the horizon), and the split is by customer, stratified on the label
and seeded: no customer in two parts. The training set records which split it used and why.
"""

import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    log_loss,
    roc_auc_score,
)

from churn_assets.contract import Contract
from churn_assets.features import FeatureTransformer, customer_features_as_of
from churn_assets.schemas import DEFAULT_CONTRACT

__all__ = [
    "GROUPED_SPLIT",
    "TIME_SPLIT",
    "LeakageError",
    "TrainingSet",
    "TrainingError",
    "XGBoostParams",
    "assert_point_in_time",
    "build_training_set",
    "data_fingerprint",
    "landed_frames",
    "evaluate",
    "expected_calibration_error",
    "LogisticBaseline",
    "plan_snapshots",
    "train_baseline",
    "train_xgboost",
    "search_xgboost",
    "SnapshotPlan",
    "best_f1_threshold",
    "predict_booster",
    "snapshot_window",
    "split_xy",
    "split_by_customer",
]

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot proceed with the data at hand (the message says what is missing)."""


class LeakageError(AssertionError):
    """A feature used information from after its snapshot time."""


# How a training set is split (its ``split_method``).
TIME_SPLIT = "time"
GROUPED_SPLIT = "customer_grouped_stratified"
# Train, validation and test shares of the customers in a grouped split.
GROUPED_FRACTIONS = (0.6, 0.2, 0.2)
# Snapshot data: at most this many distinct observation times (exports), where a purged time
# split does not fit, is split by customer instead of failing. More distinct times is an event
# stream, which needs the history a time split asks for.
MAX_EXPORT_SNAPSHOTS = 24


# -- snapshots and labels ---------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotPlan:
    train: list[pd.Timestamp]
    validation: list[pd.Timestamp]
    test: list[pd.Timestamp]

    @property
    def all(self) -> list[pd.Timestamp]:
        return [*self.train, *self.validation, *self.test]


def plan_snapshots(
    first_event: datetime,
    known_at: datetime,
    *,
    horizon_days: int,
    step_days: int,
    label_grace_days: int,
    min_history_days: int = 1,
) -> SnapshotPlan:
    """Snapshot times for train/validation/test with purging between the parts.

    The last usable snapshot leaves ``horizon + grace`` days before ``known_at`` so outcomes have
    had time to be reported. Test takes the last quarter of that span, validation the quarter
    before the purge gap, training everything before the next gap.
    """
    start = pd.Timestamp(first_event).floor("D") + pd.Timedelta(days=min_history_days)
    last = (pd.Timestamp(known_at) - pd.Timedelta(days=horizon_days + label_grace_days)).floor("h")
    horizon = pd.Timedelta(days=horizon_days)
    step = pd.Timedelta(days=step_days)
    span = last - start
    if span < 2 * horizon + 3 * step:
        need = 2 * horizon_days + 3 * step_days + horizon_days + label_grace_days + min_history_days
        raise TrainingError(
            f"not enough history for a purged time split: data spans {first_event} .. {known_at} "
            f"but a {horizon_days}-day horizon needs at least {need} days of landed events"
        )
    usable = span - 2 * horizon
    test_start = (last - usable / 4).ceil("h")
    validation_end = test_start - horizon
    validation_start = (validation_end - usable / 4).ceil("h")
    train_end = validation_start - horizon

    def times(lo: pd.Timestamp, hi: pd.Timestamp) -> list[pd.Timestamp]:
        out, t = [], lo
        while t <= hi:
            out.append(t)
            t += step
        return out

    plan = SnapshotPlan(
        train=times(start, train_end),
        validation=times(validation_start, validation_end),
        test=times(test_start, last),
    )
    if not (plan.train and plan.validation and plan.test):
        raise TrainingError(f"snapshot plan has an empty part: {plan}")
    return plan


def _labels_at(
    t: pd.Timestamp | pd.Series,
    population: pd.Series,
    events: pd.DataFrame,
    feedback: pd.DataFrame,
    horizon: pd.Timedelta,
    *,
    churn_from_observation: bool = False,
) -> pd.DataFrame:
    """Labels at snapshot ``t``: 1 churned in ``(t, t + h]``, 0 still a customer after ``t + h``,
    -1 unknown (censored), -2 already gone at ``t`` (a Series: each customer's own ``t``,
    aligned with ``population``'s positions). ``churn_from_observation``: ``t`` is the
    time the customer was observed at (snapshot data), so a churn at ``t`` itself counts as
    churn within the horizon (``[t, t + h]``), not as gone before it."""
    churns = feedback.loc[feedback["churned"]]
    churn_time = churns.groupby("customer_id")["outcome_time"].min()
    end = t + horizon
    last_event = events.groupby("customer_id")["event_time"].max()
    last_retained = feedback.loc[~feedback["churned"]].groupby("customer_id")["outcome_time"].max()
    frame = pd.DataFrame({"customer_id": population.to_numpy()})
    if isinstance(t, pd.Series):
        t = t.reset_index(drop=True)
        end = t + horizon
    ct = frame["customer_id"].map(churn_time)
    alive_after = (frame["customer_id"].map(last_event) > end) | (
        frame["customer_id"].map(last_retained) > end
    )
    started = ct >= t if churn_from_observation else ct > t
    frame["label"] = np.where(started & (ct <= end), 1, np.where(alive_after, 0, -1))
    gone = ct < t if churn_from_observation else ct <= t
    frame.loc[gone, "label"] = -2  # already gone at t
    return frame


@dataclass(frozen=True)
class TrainingSet:
    # customer_id, snapshot_time, split, label, split_method, split_reason, the contract's
    # features and the history features
    frame: pd.DataFrame
    plan: SnapshotPlan  # for a grouped split: each part's observation times
    known_at: pd.Timestamp | None  # None when rebuilt from a stored frame
    horizon_days: int
    split_method: str = TIME_SPLIT
    split_reason: str = ""

    def part(self, split: str) -> pd.DataFrame:
        return self.frame.loc[self.frame["split"] == split]

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, horizon_days: int) -> "TrainingSet":
        """A training set as stored by the ``training_set`` asset (its snapshot plan is read
        back from the rows), so later steps use exactly the rows that were materialised."""
        if frame.empty:
            raise TrainingError("the stored training set is empty; materialise training_set")
        times = {
            split: sorted(
                pd.Timestamp(t)
                for t in frame.loc[frame["split"] == split, "snapshot_time"].unique()
            )
            for split in ("train", "validation", "test")
        }
        # A set stored before grouped splits existed has no split columns: a time split.
        method, reason = TIME_SPLIT, _time_split_reason(len(frame["snapshot_time"].unique()))
        if "split_method" in frame.columns:
            method = str(frame["split_method"].iloc[0])
            reason = str(frame["split_reason"].iloc[0])
        return cls(
            frame=frame,
            plan=SnapshotPlan(
                train=times["train"], validation=times["validation"], test=times["test"]
            ),
            known_at=None,
            horizon_days=horizon_days,
            split_method=method,
            split_reason=reason,
        )


def _time_split_reason(snapshots: int) -> str:
    return f"event history: purged time split over {snapshots} snapshots"


def _snapshot_data_reason(events: pd.DataFrame) -> str | None:
    """Why ``events`` are snapshot data that a time split cannot serve, or None for a stream."""
    customers = events["customer_id"].nunique()
    times = events["event_time"].nunique()
    if times == 1:
        return (
            f"single snapshot: all {customers} customers are observed at one time "
            f"({events['event_time'].iloc[0]}), so there is no later period to test on"
        )
    if bool((events.groupby("customer_id")["event_time"].nunique() == 1).all()):
        return (
            f"static export: each of the {customers} customers is observed at one time only "
            f"({times} distinct observation times), no history to split by time"
        )
    return None


def split_by_customer(
    frame: pd.DataFrame, *, seed: int, fractions: tuple[float, float, float] = GROUPED_FRACTIONS
) -> np.ndarray:
    """Train/validation/test per row, by customer: every row of a customer goes to one part;
    customers who ever churned and those who never did are split apart in the same shares
    (stratified), in a seeded random order. Raises :class:`TrainingError` if a class has too
    few customers to give each part some."""
    ever_churned = frame.groupby("customer_id", sort=True)["label"].max()
    rng = np.random.default_rng(seed)
    part_of: dict[Any, str] = {}
    for label in (0, 1):
        customers = ever_churned.index[ever_churned == label].to_numpy()
        if len(customers) < 3:
            kind = "churned" if label else "retained"
            raise TrainingError(
                f"only {len(customers)} {kind} customers with a known outcome: a grouped "
                "split needs at least 3 (one per part) to train and evaluate"
            )
        order = rng.permutation(customers)
        n_validation = max(1, round(len(order) * fractions[1]))
        n_test = max(1, round(len(order) * fractions[2]))
        n_train = len(order) - n_validation - n_test
        for customer in order[:n_train]:
            part_of[customer] = "train"
        for customer in order[n_train : n_train + n_validation]:
            part_of[customer] = "validation"
        for customer in order[n_train + n_validation :]:
            part_of[customer] = "test"
    return frame["customer_id"].map(part_of).to_numpy(dtype=object)


def _snapshot_rows(
    events: pd.DataFrame,
    feedback: pd.DataFrame,
    horizon: pd.Timedelta,
    feature_builder: Callable[[pd.DataFrame, datetime], pd.DataFrame],
    *,
    own_times_only: bool = False,
) -> pd.DataFrame:
    """One row per customer observation: features as of the observation time, the label of
    churn at or after it within the horizon. Features and labels of a customer read only its
    own events and outcomes, so each time reads only the customers observed then.

    ``own_times_only``: the builder is :func:`customer_features_as_of`, whose features of a
    customer depend on its events' times relative to the snapshot only, and each customer is
    observed at one time. Then one call with every observation moved to a common time gives
    the same rows (the absolute ``last_event_time`` is put back) as one call per time, which a
    static export with a time per row would make thousands of.
    """
    if own_times_only and events["event_time"].nunique() > MAX_EXPORT_SNAPSHOTS:
        common = events["event_time"].max()
        own_time = events.groupby("customer_id")["event_time"].max()
        features = feature_builder(events.assign(event_time=common), common.to_pydatetime())
        times = features["customer_id"].map(own_time)
        if "last_event_time" in features.columns:
            features["last_event_time"] = times
        labels = _labels_at(
            times,
            features["customer_id"],
            events,
            feedback,
            horizon,
            churn_from_observation=True,
        )
        rows = features.assign(label=labels["label"].to_numpy(), snapshot_time=times)
        rows = rows.loc[rows["label"] >= 0]
        return rows.sort_values(["snapshot_time", "customer_id"], kind="stable").reset_index(
            drop=True
        )
    parts = []
    for t in sorted(pd.Timestamp(t) for t in events["event_time"].unique()):
        observed = events.loc[events["event_time"] == t, "customer_id"].unique()
        own_events = events.loc[events["customer_id"].isin(observed)]
        features = feature_builder(own_events, t.to_pydatetime())
        features = features.loc[features["customer_id"].isin(observed)]
        labels = _labels_at(
            t,
            features["customer_id"],
            own_events,
            feedback.loc[feedback["customer_id"].isin(observed)],
            horizon,
            churn_from_observation=True,
        )
        rows = features.assign(label=labels["label"].to_numpy())
        parts.append(rows.loc[rows["label"] >= 0].assign(snapshot_time=t))
    return pd.concat(parts, ignore_index=True)


def build_training_set(
    events: pd.DataFrame,
    feedback: pd.DataFrame,
    *,
    horizon_days: int,
    step_days: int,
    label_grace_days: int,
    feature_builder: Callable[[pd.DataFrame, datetime], pd.DataFrame] | None = None,
    contract: Contract = DEFAULT_CONTRACT,
    seed: int = 0,
) -> TrainingSet:
    """Features as of each snapshot and the churn label within the horizon after it.

    An event history is split by time (purged); snapshot data by customer (see the module
    docstring), seeded with ``seed``. ``feature_builder`` defaults to
    :func:`customer_features_as_of` for ``contract``.
    """
    if events.empty:
        raise TrainingError("no landed customer events: land churn.customers first")
    if feedback.empty:
        raise TrainingError("no landed outcomes: land ml.feedback first")
    default_builder = feature_builder is None
    if feature_builder is None:
        feature_builder = functools.partial(customer_features_as_of, contract=contract)
    known_at = max(events["event_time"].max(), feedback["observed_at"].max())
    # Only outcomes reported by the time of training count.
    feedback = feedback.loc[feedback["observed_at"] <= known_at]
    horizon = pd.Timedelta(days=horizon_days)
    snapshot_reason = _snapshot_data_reason(events)
    if snapshot_reason is None:
        try:
            plan = plan_snapshots(
                events["event_time"].min(),
                known_at,
                horizon_days=horizon_days,
                step_days=step_days,
                label_grace_days=label_grace_days,
            )
        except TrainingError as exc:
            times = events["event_time"].nunique()
            if times > MAX_EXPORT_SNAPSHOTS:
                raise
            snapshot_reason = (
                f"snapshot exports: {times} observation times are too few for a purged time "
                f"split ({exc})"
            )
    if snapshot_reason is not None:
        once = bool(events.groupby("customer_id")["event_time"].nunique().max() == 1)
        return _grouped_training_set(
            events,
            feedback,
            known_at,
            horizon_days,
            feature_builder,
            seed,
            snapshot_reason,
            own_times_only=default_builder and once,
        )
    parts = []
    for split, times in (
        ("train", plan.train),
        ("validation", plan.validation),
        ("test", plan.test),
    ):
        for t in times:
            features = feature_builder(events, t.to_pydatetime())
            labels = _labels_at(t, features["customer_id"], events, feedback, horizon)
            rows = features.assign(label=labels["label"].to_numpy())
            rows = rows.loc[rows["label"] >= 0].assign(snapshot_time=t, split=split)
            parts.append(rows)
    frame = pd.concat(parts, ignore_index=True)
    if frame.empty:
        raise TrainingError("the snapshots produced no labelled rows")
    reason = _time_split_reason(len(plan.all))
    frame = frame.assign(split_method=TIME_SPLIT, split_reason=reason)
    return TrainingSet(
        frame=frame,
        plan=plan,
        known_at=known_at,
        horizon_days=horizon_days,
        split_method=TIME_SPLIT,
        split_reason=reason,
    )


def _grouped_training_set(
    events: pd.DataFrame,
    feedback: pd.DataFrame,
    known_at: pd.Timestamp,
    horizon_days: int,
    feature_builder: Callable[[pd.DataFrame, datetime], pd.DataFrame],
    seed: int,
    why: str,
    *,
    own_times_only: bool = False,
) -> TrainingSet:
    """Snapshot data: a row per customer observation, split by customer (stratified)."""
    frame = _snapshot_rows(
        events,
        feedback,
        pd.Timedelta(days=horizon_days),
        feature_builder,
        own_times_only=own_times_only,
    )
    if frame.empty:
        raise TrainingError(
            f"no observation has a known outcome within the {horizon_days}-day horizon "
            "(land ml.feedback, or import the export with its label column)"
        )
    frame["split"] = split_by_customer(frame, seed=seed)
    reason = (
        f"{why}; split by customer, stratified on the label, seeded ({seed}), "
        f"{'/'.join(str(round(f * 100)) for f in GROUPED_FRACTIONS)} % train/validation/test"
    )
    frame = frame.assign(split_method=GROUPED_SPLIT, split_reason=reason)
    log.info("training set: %s", reason)
    times = {
        split: sorted(pd.Timestamp(t) for t in frame.loc[frame["split"] == split, "snapshot_time"])
        for split in ("train", "validation", "test")
    }
    plan = SnapshotPlan(
        train=sorted(set(times["train"])),
        validation=sorted(set(times["validation"])),
        test=sorted(set(times["test"])),
    )
    return TrainingSet(
        frame=frame,
        plan=plan,
        known_at=known_at,
        horizon_days=horizon_days,
        split_method=GROUPED_SPLIT,
        split_reason=reason,
    )


def assert_point_in_time(
    events: pd.DataFrame,
    as_of: datetime,
    feature_builder: Callable[[pd.DataFrame, datetime], pd.DataFrame] | None = None,
    contract: Contract = DEFAULT_CONTRACT,
) -> None:
    """Time-travel check: features as of ``t`` must not change when the future is deleted.

    Builds features from all events and from the events up to ``as_of`` only; any column that
    differs used information from after ``as_of``. Raises :class:`LeakageError` naming them.
    ``feature_builder`` defaults to :func:`customer_features_as_of` for ``contract``.
    """
    if feature_builder is None:
        feature_builder = functools.partial(customer_features_as_of, contract=contract)
    full = feature_builder(events, as_of).set_index("customer_id").sort_index()
    truncated = (
        feature_builder(events.loc[events["event_time"] <= pd.Timestamp(as_of)], as_of)
        .set_index("customer_id")
        .sort_index()
    )
    if list(full.index) != list(truncated.index):
        raise LeakageError(f"features as of {as_of} include customers seen only later")
    leaking = [
        column
        for column in full.columns
        if not full[column].equals(truncated[column])
        and not np.allclose(
            pd.to_numeric(full[column], errors="coerce"),
            pd.to_numeric(truncated[column], errors="coerce"),
            equal_nan=True,
        )
    ]
    if leaking:
        raise LeakageError(f"features {leaking} use information from after {as_of}")


_LANDED_FEEDBACK_COLUMNS = "customer_id, request_id, churned, outcome_time, observed_at"


def landed_frames(
    con: Any,
    contract: Contract = DEFAULT_CONTRACT,
    *,
    events: str = "landed_customer_events",
    feedback: str = "landed_feedback",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The landed customer events (with ``contract``'s features) and outcomes that training
    reads, from the warehouse tables (the default) or from any DuckDB relation with their
    columns, such as ``read_parquet('<read model>')`` (trusted relation names, never user
    input). A feature the events lack is an error naming it."""
    present = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {events}").fetchall()}
    missing = [name for name in contract.names if name not in present]
    if missing:
        raise TrainingError(
            f"the landed customer events have no column for the contract's features {missing}; "
            "land churn.customers with this contract first"
        )
    columns = ", ".join(["customer_id", "event_time", *contract.names])
    events_frame = con.execute(f"SELECT {columns} FROM {events}").df()
    feedback_frame = con.execute(f"SELECT {_LANDED_FEEDBACK_COLUMNS} FROM {feedback}").df()
    for frame, timestamps in (
        (events_frame, ["event_time"]),
        (feedback_frame, ["outcome_time", "observed_at"]),
    ):
        for column in timestamps:
            frame[column] = pd.to_datetime(frame[column], utc=True)
    return events_frame, feedback_frame


def data_fingerprint(frame: pd.DataFrame, contract: Contract = DEFAULT_CONTRACT) -> str:
    """SHA-256 of the training rows (order-independent), recorded with each model version."""
    columns = ["customer_id", "snapshot_time", "label", *contract.names]
    hashed = pd.util.hash_pandas_object(frame[columns].astype(str), index=False).to_numpy()
    return hashlib.sha256(np.sort(hashed).tobytes()).hexdigest()


# -- models -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class XGBoostParams:
    max_depth: int = 3
    learning_rate: float = 0.05
    n_estimators: int = 600
    min_child_weight: float = 5.0
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    reg_lambda: float = 1.0
    early_stopping_rounds: int = 40

    def booster_params(self, *, seed: int, n_threads: int, device: str, pos_weight: float):
        return {
            "objective": "binary:logistic",
            "eval_metric": "logloss",
            "tree_method": "hist",
            "max_depth": self.max_depth,
            "eta": self.learning_rate,
            "min_child_weight": self.min_child_weight,
            "subsample": self.subsample,
            "colsample_bytree": self.colsample_bytree,
            "lambda": self.reg_lambda,
            "scale_pos_weight": pos_weight,
            "seed": seed,
            "nthread": n_threads,
            "device": device,
        }


def train_xgboost(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    params: XGBoostParams,
    *,
    seed: int,
    n_threads: int,
    device: str = "cpu",
    balance_classes: bool = False,
    feature_names: Sequence[str] | None = None,
) -> xgb.Booster:
    """A seeded XGBoost booster with early stopping on the validation log loss.

    ``balance_classes`` reweights positives by the negative/positive ratio (class imbalance);
    it is off by default because it distorts calibrated probabilities.
    """
    positives = float(np.sum(y_train))
    if positives == 0 or positives == len(y_train):
        raise TrainingError("training labels hold a single class; cannot train a classifier")
    pos_weight = (len(y_train) - positives) / positives if balance_classes else 1.0
    names = list(feature_names) if feature_names else None
    dtrain = xgb.DMatrix(x_train, label=y_train, feature_names=names)
    dval = xgb.DMatrix(x_val, label=y_val, feature_names=names)
    booster = xgb.train(
        params.booster_params(seed=seed, n_threads=n_threads, device=device, pos_weight=pos_weight),
        dtrain,
        num_boost_round=params.n_estimators,
        evals=[(dval, "validation")],
        early_stopping_rounds=params.early_stopping_rounds,
        verbose_eval=False,
    )
    # Keep only the trees up to the best iteration, so every consumer (serving, SHAP, a reloaded
    # file) predicts with the early-stopped model without needing an iteration range.
    best = booster.best_iteration
    trimmed = booster[: best + 1]
    trimmed.set_attr(best_iteration=str(best))
    return trimmed


def predict_booster(booster: xgb.Booster, x: np.ndarray) -> np.ndarray:
    """Probabilities (the booster is already trimmed to its best iteration)."""
    return np.asarray(booster.inplace_predict(x), dtype=float)


def search_xgboost(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    base: XGBoostParams,
    *,
    trials: int,
    seed: int,
    n_threads: int,
    device: str = "cpu",
    balance_classes: bool = False,
    on_trial: Callable[[int, dict[str, Any], float], None] | None = None,
) -> tuple[XGBoostParams, list[dict[str, Any]]]:
    """Bounded random search (``trials`` candidates, seeded) scored by validation ROC-AUC."""
    rng = np.random.default_rng(seed)
    results = []
    best_params, best_auc = base, -1.0
    for trial in range(trials):
        candidate = XGBoostParams(
            max_depth=int(rng.integers(2, 7)),
            learning_rate=float(rng.choice([0.03, 0.05, 0.1])),
            n_estimators=base.n_estimators,
            min_child_weight=float(rng.choice([1.0, 5.0, 10.0, 20.0])),
            subsample=float(rng.uniform(0.6, 1.0)),
            colsample_bytree=float(rng.uniform(0.6, 1.0)),
            reg_lambda=float(rng.choice([0.5, 1.0, 5.0])),
            early_stopping_rounds=base.early_stopping_rounds,
        )
        booster = train_xgboost(
            x_train,
            y_train,
            x_val,
            y_val,
            candidate,
            seed=seed,
            n_threads=n_threads,
            device=device,
            balance_classes=balance_classes,
        )
        auc = float(roc_auc_score(y_val, predict_booster(booster, x_val)))
        record = {"trial": trial, **candidate.__dict__, "validation_roc_auc": auc}
        results.append(record)
        if on_trial is not None:
            on_trial(trial, record, auc)
        if auc > best_auc:
            best_params, best_auc = candidate, auc
    return best_params, results


@dataclass(frozen=True)
class LogisticBaseline:
    """Logistic regression on the transformed features, stored as coefficients (JSON)."""

    coefficients: tuple[float, ...]
    intercept: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        margin = x.astype(float) @ np.asarray(self.coefficients) + self.intercept
        return 1.0 / (1.0 + np.exp(-margin))

    def to_dict(self) -> dict[str, Any]:
        return {"coefficients": list(self.coefficients), "intercept": self.intercept}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LogisticBaseline":
        return cls(tuple(float(c) for c in data["coefficients"]), float(data["intercept"]))


def train_baseline(x: np.ndarray, y: np.ndarray, *, seed: int) -> LogisticBaseline:
    model = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    model.fit(x.astype(float), y)
    return LogisticBaseline(tuple(float(c) for c in model.coef_[0]), float(model.intercept_[0]))


# -- evaluation -------------------------------------------------------------------------------


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Mean |observed rate - mean prediction| over equal-count bins, weighted by bin size."""
    order = np.argsort(p)
    total = 0.0
    for chunk in np.array_split(order, bins):
        if len(chunk):
            total += len(chunk) * abs(float(np.mean(y[chunk])) - float(np.mean(p[chunk])))
    return total / len(p)


def evaluate(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """Holdout figures: scores, calibration curve, lift/gain by decile, confusion matrix."""
    y = np.asarray(y).astype(int)
    p = np.clip(np.asarray(p, dtype=float), 1e-7, 1 - 1e-7)
    if len(np.unique(y)) < 2:
        raise TrainingError("the holdout has a single class; its AUC is undefined")
    order = np.argsort(-p, kind="stable")
    deciles = []
    base_rate = float(np.mean(y))
    captured = 0
    for i, chunk in enumerate(np.array_split(order, 10), start=1):
        positives = int(np.sum(y[chunk]))
        captured += positives
        rate = positives / len(chunk)
        deciles.append(
            {
                "decile": i,
                "rows": int(len(chunk)),
                "churn_rate": round(rate, 4),
                "lift": round(rate / base_rate, 3),
                "cumulative_gain": round(captured / max(int(np.sum(y)), 1), 4),
            }
        )
    calibration = []
    for chunk in np.array_split(np.argsort(p), 10):
        calibration.append(
            {
                "mean_predicted": round(float(np.mean(p[chunk])), 4),
                "observed_rate": round(float(np.mean(y[chunk])), 4),
                "rows": int(len(chunk)),
            }
        )
    tn, fp, fn, tp = confusion_matrix(y, (p >= threshold).astype(int), labels=[0, 1]).ravel()
    return {
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "brier": float(brier_score_loss(y, p)),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "calibration_error": expected_calibration_error(y, p),
        "threshold": float(threshold),
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        "precision": float(tp / (tp + fp)) if tp + fp else 0.0,
        "recall": float(tp / (tp + fn)) if tp + fn else 0.0,
        "deciles": deciles,
        "calibration_curve": calibration,
        "rows": int(len(y)),
        "positive_rate": base_rate,
    }


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability threshold with the best F1 on (validation) data."""
    candidates = np.unique(np.quantile(p, np.linspace(0.5, 0.99, 50)))
    best, best_f1 = 0.5, -1.0
    for threshold in candidates:
        pred = p >= threshold
        tp = np.sum(pred & (y == 1))
        f1 = 2 * tp / (np.sum(pred) + np.sum(y == 1)) if np.sum(pred) else 0.0
        if f1 > best_f1:
            best, best_f1 = float(threshold), float(f1)
    return best


def split_xy(
    training_set: TrainingSet, transformer: FeatureTransformer, split: str
) -> tuple[np.ndarray, np.ndarray]:
    part = training_set.part(split)
    return transformer.transform(part), part["label"].to_numpy(dtype=int)


def snapshot_window(plan: SnapshotPlan) -> dict[str, str]:
    return {
        "train_from": str(plan.train[0]),
        "train_to": str(plan.train[-1]),
        "validation_from": str(plan.validation[0]),
        "validation_to": str(plan.validation[-1]),
        "test_from": str(plan.test[0]),
        "test_to": str(plan.test[-1]),
    }
