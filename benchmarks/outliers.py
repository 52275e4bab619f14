"""Per-call cost of the two outlier detectors: one row, and batches of 100 and 1,000 rows.

    .venv/bin/python benchmarks/outliers.py [--train-rows 20000] [--seconds 0.5]

Both detectors are built the way serving builds them (``reference_files`` then
``load_outlier_scorer``, config contamination and seed) on simulator rows; they score an already
transformed matrix, as serving does. Each case repeats the call for about ``--seconds`` and reports
the median per call, rows/s, and the isolation-forest / Mahalanobis ratio per row.
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from churn_assets.config import load_settings  # noqa: E402
from churn_assets.features import FeatureTransformer  # noqa: E402
from churn_assets.outliers import load_outlier_scorer, reference_files  # noqa: E402
from churn_assets.simulator import sample_customers  # noqa: E402

BATCH_SIZES = (1, 100, 1_000)


def per_call_seconds(call: Callable[[], object], budget_s: float) -> float:
    """Median seconds per call over repeats of ~1 ms each, for about ``budget_s`` in total."""
    call()  # warm up
    started = time.perf_counter()
    call()
    single = max(time.perf_counter() - started, 1e-7)
    inner = max(1, int(1e-3 / single))
    samples = []
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline or len(samples) < 5:
        started = time.perf_counter()
        for _ in range(inner):
            call()
        samples.append((time.perf_counter() - started) / inner)
    return statistics.median(samples)


def describe(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:8.1f} µs"
    return f"{seconds * 1e3:8.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-rows", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=0.5, help="time budget per case")
    args = parser.parse_args()
    settings = load_settings()
    contamination = settings.monitoring.outlier_detection.contamination
    seed = settings.training.seed

    train = sample_customers(args.train_rows, seed=seed)
    transformer = FeatureTransformer.fit(train)
    started = time.perf_counter()
    files = reference_files(transformer, train, contamination, seed)
    built_s = time.perf_counter() - started
    started = time.perf_counter()
    scorer = load_outlier_scorer(transformer, files)
    loaded_s = time.perf_counter() - started
    traffic = transformer.transform(sample_customers(max(BATCH_SIZES), seed=seed + 1))
    print(
        f"reference files for {args.train_rows:,} training rows: {built_s * 1e3:.0f} ms "
        f"({', '.join(f'{n} {len(d):,} B' for n, d in files.items())}); "
        f"load incl. isolation-forest refit: {loaded_s * 1e3:.0f} ms"
    )
    print(f"matrix: {traffic.shape[1]} columns; contamination {contamination}, seed {seed}")
    print(
        f"{'rows':>6}  {'Mahalanobis/call':>16} {'rows/s':>12}  "
        f"{'IsolationForest/call':>20} {'rows/s':>12}  {'IF/M per row':>12}"
    )
    for rows in BATCH_SIZES:
        x = np.ascontiguousarray(traffic[:rows])
        mahalanobis = per_call_seconds(lambda x=x: scorer.score_mahalanobis(x), args.seconds)
        forest = per_call_seconds(lambda x=x: scorer.score_isolation_forest(x), args.seconds)
        print(
            f"{rows:>6}  {describe(mahalanobis):>16} {rows / mahalanobis:>12,.0f}  "
            f"{describe(forest):>20} {rows / forest:>12,.0f}  {forest / mahalanobis:>11,.0f}x"
        )


if __name__ == "__main__":
    main()
