"""Train, evaluate, stage and gate a candidate model (Dagster-free; the ML assets wrap it).

A candidate is staged in ``<registry_dir>/_candidate/`` (artefacts + ``candidate.json``) so the
quality-gate checks and the registration step read exactly what was trained.
"""

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from churn_assets.config import Settings
from churn_assets.contract import Contract
from churn_assets.features import FeatureTransformer
from churn_assets.model import ScoringModel, load_model
from churn_assets.outliers import reference_files
from churn_assets.registry import ModelRegistry, VersionNotFound
from churn_assets.schemas import DEFAULT_CONTRACT
from churn_assets.simulator import true_churn_probability
from churn_assets.training import (
    TrainingSet,
    XGBoostParams,
    best_f1_threshold,
    build_training_set,
    data_fingerprint,
    evaluate,
    landed_frames,
    predict_booster,
    search_xgboost,
    snapshot_window,
    split_xy,
    train_baseline,
    train_xgboost,
)

__all__ = [
    "Candidate",
    "GateResult",
    "evaluate_gates",
    "landed_data_fingerprint",
    "load_candidate",
    "stage_candidate",
    "train_candidate",
    "training_set_for",
]

log = logging.getLogger(__name__)
STAGING = "_candidate"
CANDIDATE_FILE = "candidate.json"


@dataclass
class Candidate:
    model: ScoringModel
    report: dict[str, Any]  # metrics, baseline, champion comparison, window, fingerprint


def training_set_for(settings: Settings, events: pd.DataFrame, feedback: pd.DataFrame):
    """The point-in-time training set of landed ``events`` and ``feedback`` under the
    training settings (what the ``training_set`` asset stores)."""
    cfg = settings.training
    return build_training_set(
        events,
        feedback,
        horizon_days=cfg.horizon_days,
        step_days=cfg.snapshot_step_days,
        label_grace_days=cfg.label_grace_days,
        contract=settings.contract,
        seed=cfg.seed,
    )


def landed_data_fingerprint(settings: Settings) -> str:
    """The ``data_fingerprint`` a training run would record for the data landed now, computed
    from the published read models (never the live warehouse), so `churn up` can tell whether
    a registered version was already trained on exactly this data."""
    import duckdb

    from churn_assets.warehouse import read_model_table

    # Read through one open file each (read_model_table), so a running platform publishing a
    # newer version meanwhile is never half-read.
    landed_events = read_model_table(settings.read_models_dir, "landed_customer_events")
    landed_outcomes = read_model_table(settings.read_models_dir, "landed_feedback")
    con = duckdb.connect()
    try:
        con.register("landed_events", landed_events)
        con.register("landed_outcomes", landed_outcomes)
        events, feedback = landed_frames(
            con, settings.contract, events="landed_events", feedback="landed_outcomes"
        )
    finally:
        con.close()
    return data_fingerprint(training_set_for(settings, events, feedback).frame, settings.contract)


def _params(settings: Settings) -> XGBoostParams:
    return XGBoostParams(**settings.training.xgboost.model_dump())


def train_candidate(
    training_set: TrainingSet,
    settings: Settings,
    *,
    champion: ScoringModel | None = None,
    shuffle_labels: bool = False,
    on_progress: Callable[[str], None] | None = None,
) -> Candidate:
    """Fit transformer, XGBoost and the logistic baseline on the configured feature contract;
    evaluate all on the holdout (the time split's last period, or the grouped split's test
    customers)."""
    cfg = settings.training
    contract = settings.contract
    say = on_progress or log.info
    train = training_set.part("train")
    transformer = FeatureTransformer.fit(train, contract)
    x_train, y_train = split_xy(training_set, transformer, "train")
    x_val, y_val = split_xy(training_set, transformer, "validation")
    x_test, y_test = split_xy(training_set, transformer, "test")
    if shuffle_labels:
        # A deliberately bad candidate: the features no longer carry information about labels.
        y_train = np.random.default_rng(cfg.seed).permutation(y_train)
        y_val = np.random.default_rng(cfg.seed + 1).permutation(y_val)
    params = _params(settings)
    search: list[dict[str, Any]] = []
    if cfg.search_trials:
        say(f"hyperparameter search: {cfg.search_trials} trials")
        params, search = search_xgboost(
            x_train,
            y_train,
            x_val,
            y_val,
            params,
            trials=cfg.search_trials,
            seed=cfg.seed,
            n_threads=cfg.n_threads,
            device=cfg.device,
            balance_classes=cfg.balance_classes,
            on_trial=lambda i, _r, auc: say(f"trial {i}: validation AUC {auc:.4f}"),
        )
    say(f"training XGBoost on {len(y_train)} rows ({cfg.device})")
    booster = train_xgboost(
        x_train,
        y_train,
        x_val,
        y_val,
        params,
        seed=cfg.seed,
        n_threads=cfg.n_threads,
        device=cfg.device,
        balance_classes=cfg.balance_classes,
        feature_names=transformer.feature_names_out,
    )
    baseline = train_baseline(x_train, y_train, seed=cfg.seed)
    # The outlier detectors' reference (and monitoring's drift reference) ships with the model.
    # It is the most recent labelled window (the test holdout): the purged split leaves weeks
    # between the training snapshots and deployment, and the customer base ages over them
    # (tenure alone moves a KS distance of ~0.1), which would read as drift on day one.
    outlier_files = reference_files(
        transformer,
        training_set.part("test"),
        settings.monitoring.outlier_detection.contamination,
        cfg.seed,
    )
    model = ScoringModel(
        booster=booster,
        transformer=transformer,
        baseline=baseline,
        extra_files=outlier_files,
        contract=contract,
    )

    threshold = best_f1_threshold(y_val, predict_booster(booster, x_val))
    p_test = predict_booster(booster, x_test)
    metrics = evaluate(y_test, p_test, threshold)
    baseline_metrics = evaluate(y_test, baseline.predict(x_test), threshold)
    test_rows = training_set.part("test")
    oracle_auc = _simulator_best_auc(contract, test_rows, y_test)

    champion_report = None
    if champion is not None:
        champion_p = champion.predict_frame(test_rows)
        champion_report = {
            "version": champion.version,
            "roc_auc": evaluate(y_test, champion_p, threshold)["roc_auc"],
        }
    report = {
        "metrics": {f"test_{k}": v for k, v in metrics.items() if not isinstance(v, (list, dict))},
        "deciles": metrics["deciles"],
        "calibration_curve": metrics["calibration_curve"],
        "confusion": metrics["confusion"],
        "baseline": {k: v for k, v in baseline_metrics.items() if not isinstance(v, (list, dict))},
        "baseline_calibration_curve": baseline_metrics["calibration_curve"],
        "simulator_best_auc": oracle_auc,
        "contract_digest": contract.digest,
        "split": {"method": training_set.split_method, "reason": training_set.split_reason},
        "champion": champion_report,
        "rows": {
            split: int((training_set.frame["split"] == split).sum())
            for split in ("train", "validation", "test")
        },
        "training_window": snapshot_window(training_set.plan),
        "horizon_days": training_set.horizon_days,
        "data_fingerprint": data_fingerprint(training_set.frame, contract),
        "params": params.__dict__,
        "best_iteration": int(booster.attr("best_iteration") or 0),
        "search": search,
        "shuffled_labels": shuffle_labels,
        "seed": cfg.seed,
    }
    return Candidate(model=model, report=report)


def _simulator_best_auc(
    contract: Contract, test_rows: pd.DataFrame, y_test: np.ndarray
) -> float | None:
    """The holdout AUC of the simulator's own churn probability (the best any model can do on
    simulated data), or None: the simulator's formula reads the default contract's features,
    so under any other contract it has nothing to say."""
    if contract.digest != DEFAULT_CONTRACT.digest:
        return None
    oracle = true_churn_probability({c: test_rows[c].to_numpy() for c in contract.names})
    return float(evaluate(y_test, oracle, 0.5)["roc_auc"])


def staging_dir(settings: Settings) -> Path:
    return settings.registry_dir / STAGING


def stage_candidate(candidate: Candidate, settings: Settings) -> Path:
    """Write the candidate's artefacts and report atomically to the staging directory."""
    final = staging_dir(settings)
    tmp = final.with_name(f"{STAGING}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, data in candidate.model.to_files().items():
        (tmp / name).write_bytes(data)
    (tmp / CANDIDATE_FILE).write_text(json.dumps(candidate.report, allow_nan=False, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_candidate(settings: Settings) -> Candidate:
    directory = staging_dir(settings)
    if not (directory / CANDIDATE_FILE).is_file():
        raise FileNotFoundError(
            f"no staged candidate in {directory}; materialise candidate_model first"
        )
    files = {p.name: p.read_bytes() for p in directory.iterdir() if p.name != CANDIDATE_FILE}
    report = json.loads((directory / CANDIDATE_FILE).read_text())
    return Candidate(model=ScoringModel.from_files(files), report=report)


def current_champion(registry: ModelRegistry) -> ScoringModel | None:
    try:
        return load_model(registry, "champion")
    except VersionNotFound:
        return None


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    observed: float | None
    threshold: float | None
    description: str


def parity_gate(candidate: Candidate, sample: pd.DataFrame) -> GateResult:
    """Training and serving paths give the same matrix and the same scores, after a reload."""
    transformer = candidate.model.transformer
    training_path = transformer.transform(sample)
    inputs = list(candidate.model.contract.names)
    serving_path = transformer.transform_records(sample[inputs].to_dict("records"))
    reloaded = ScoringModel.from_files(candidate.model.to_files())
    difference = max(
        float(np.max(np.abs(training_path - serving_path))) if len(sample) else 0.0,
        float(
            np.max(
                np.abs(
                    candidate.model.predict_frame(sample)
                    - reloaded.predict_records(sample.to_dict("records"))
                )
            )
        )
        if len(sample)
        else 0.0,
    )
    return GateResult(
        "transformer_parity",
        difference <= 1e-6,
        difference,
        1e-6,
        "max |training-path - serving-path| over the transformed matrix and the scores",
    )


def evaluate_gates(candidate: Candidate, settings: Settings) -> dict[str, GateResult]:
    """The deployability gates over a staged candidate's report (parity is checked separately)."""
    gates = settings.training.gates
    report = candidate.report
    auc = report["metrics"]["test_roc_auc"]
    results = {
        "auc": GateResult(
            "auc",
            auc >= settings.retraining.performance_threshold,
            auc,
            settings.retraining.performance_threshold,
            "test ROC-AUC must reach retraining.performance_threshold",
        ),
        "calibration": GateResult(
            "calibration",
            report["metrics"]["test_calibration_error"] <= gates.max_calibration_error,
            report["metrics"]["test_calibration_error"],
            gates.max_calibration_error,
            "expected calibration error on the test holdout",
        ),
        "min_training_rows": GateResult(
            "min_training_rows",
            report["rows"]["train"] >= gates.min_training_rows,
            float(report["rows"]["train"]),
            float(gates.min_training_rows),
            "labelled training rows",
        ),
    }
    champion = report.get("champion")
    if champion is None:
        results["vs_champion"] = GateResult(
            "vs_champion", True, None, None, "no champion yet: nothing to compare with"
        )
    else:
        drop = champion["roc_auc"] - auc
        results["vs_champion"] = GateResult(
            "vs_champion",
            drop <= gates.max_auc_drop_vs_champion,
            drop,
            gates.max_auc_drop_vs_champion,
            f"AUC drop versus champion {champion['version']} on the same holdout",
        )
    return results
