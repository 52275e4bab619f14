"""Drift-report cost against a 100k-row reference, for 10k, 100k and 1M live rows.

    .venv/bin/python benchmarks/drift.py [--reference-rows 100000] [--mmd-sample 1000]

Rows come from ``sample_customers`` (reference and live with different seeds). Each size is timed
twice with :func:`churn_assets.drift.drift_report`: with ``mmd=False`` (validation, KS on the
numeric features and chi-squared on the categorical ones) and in full (the same plus MMD on a
fixed ``--mmd-sample`` rows from each side); the MMD share is the difference. The one-off import
of alibi-detect and TensorFlow is timed separately by a warm-up call and excluded. The last line
is the ratio of the 1M-row time to the 10k-row time: KS and chi-squared grow with the rows, MMD
does not, as its sample is fixed.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from churn_assets.drift import drift_report  # noqa: E402
from churn_assets.simulator import sample_customers  # noqa: E402

LIVE_ROWS = (10_000, 100_000, 1_000_000)


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference-rows", type=int, default=100_000)
    parser.add_argument("--mmd-sample", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    reference = sample_customers(args.reference_rows, seed=args.seed)
    warm_up_s, _ = timed(lambda: drift_report(reference.head(200), reference.tail(200), mmd=False))
    print(f"first call (imports alibi-detect and TensorFlow): {warm_up_s:.1f} s, excluded below")
    print(
        f"reference {args.reference_rows:,} rows; MMD on {args.mmd_sample:,} sampled rows per side"
    )
    print(
        f"{'live rows':>10}  {'KS+chi2':>9}  {'MMD':>7}  {'total':>7}  "
        f"{'rows/s (total)':>15}  drifted"
    )
    totals = {}
    for rows in LIVE_ROWS:
        live = sample_customers(rows, seed=args.seed + 1)
        univariate_s, _ = timed(lambda live=live: drift_report(reference, live, mmd=False))
        total_s, report = timed(
            lambda live=live: drift_report(
                reference, live, mmd_sample=args.mmd_sample, seed=args.seed
            )
        )
        totals[rows] = total_s
        mmd_s = max(total_s - univariate_s, 0.0)
        print(
            f"{rows:>10,}  {univariate_s:>7.2f} s  {mmd_s:>5.2f} s  {total_s:>5.2f} s  "
            f"{rows / total_s:>15,.0f}  {report.drifted_features or 'none'}"
            f"{' + mmd' if report.multivariate.get('drift') else ''}"
        )
    first, last = LIVE_ROWS[0], LIVE_ROWS[-1]
    print(
        f"time for {last:,} live rows / time for {first:,}: {totals[last] / totals[first]:.1f}x "
        f"({last // first:,}x the rows)"
    )


if __name__ == "__main__":
    main()
