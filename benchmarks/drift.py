"""Drift-report cost: 100k live vs 100k reference rows, then 10k, 100k and 1M live rows.

    .venv/bin/python benchmarks/drift.py [--reference-rows 100000] [--mmd-sample 1000]
                                         [--repeats 5] [--no-baseline]

Rows come from ``sample_customers`` (reference and live with different seeds). A first,
small call is timed separately and excluded. Then:

1. The full report (:func:`churn_assets.drift.drift_report`: validation, KS on the numeric
   features, chi-squared on the categorical ones, MMD on ``--mmd-sample`` rows from each side
   with the report's 1,000 permutations) for ``--reference-rows`` live rows against as many
   reference rows: the median of ``--repeats`` runs, split into the report with ``mmd=False``
   (KS + chi-squared) and the MMD test alone (:func:`churn_assets.drift.mmd_permutation_test`
   on the report's own sample), with the report's permutations and with alibi-detect's 100.
2. The baseline, unless ``--no-baseline``: alibi-detect's ``MMDDrift`` (TensorFlow backend, its
   default 100 permutations, as the report ran until it was replaced) on the same sample,
   measured in this run (its TensorFlow import is timed separately and excluded), with the ratio
   to the NumPy test with as many permutations and both p-values and MMD² (they agree: same
   statistic, same permutations; alibi-detect's p-value is the share of permutations at least
   as extreme, ours counts the observed labelling as one more).
3. Each live size against the reference, with ``mmd=False`` and in full: KS and chi-squared grow
   with the rows, MMD does not, as its sample is fixed.
"""

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from churn_assets.drift import (  # noqa: E402
    MMD_PERMUTATIONS,
    REPORT_MMD_PERMUTATIONS,
    _standardised,
    drift_report,
    mmd_permutation_test,
)
from churn_assets.schemas import DEFAULT_CONTRACT  # noqa: E402
from churn_assets.simulator import sample_customers  # noqa: E402

LIVE_ROWS = (10_000, 100_000, 1_000_000)


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def median_time(call, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        elapsed, result = timed(call)
        times.append(elapsed)
    return statistics.median(times), result


def report_mmd_sample(reference, live, mmd_sample: int, seed: int):
    """The rows the report's MMD test sees, drawn as ``drift_report`` draws them, and the seed of
    its permutations."""
    rng = np.random.default_rng(seed)
    rows = min(mmd_sample, len(reference), len(live))
    ref_sample = reference.iloc[np.sort(rng.choice(len(reference), size=rows, replace=False))]
    live_sample = live.iloc[np.sort(rng.choice(len(live), size=rows, replace=False))]
    x_ref = _standardised(reference, ref_sample, DEFAULT_CONTRACT)
    x = _standardised(reference, live_sample, DEFAULT_CONTRACT)
    return x_ref, x, int(rng.integers(2**32 - 1))


def import_alibi_detect() -> None:
    import alibi_detect.cd  # noqa: F401 - timed: it imports TensorFlow


def alibi_mmd(x_ref, x, threshold: float, permutation_seed: int) -> dict:
    """alibi-detect's TensorFlow MMDDrift, as the report called it before (NumPy's global
    generator seeded for its permutations, and given back afterwards)."""
    from alibi_detect.cd import MMDDrift

    global_state = np.random.get_state()
    try:
        np.random.seed(permutation_seed)
        detector = MMDDrift(
            x_ref, backend="tensorflow", p_val=threshold, n_permutations=MMD_PERMUTATIONS
        )
        return detector.predict(x, return_p_val=True, return_distance=True)["data"]
    finally:
        np.random.set_state(global_state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference-rows", type=int, default=100_000)
    parser.add_argument("--mmd-sample", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip alibi-detect's MMD (and TensorFlow)"
    )
    args = parser.parse_args()

    reference = sample_customers(args.reference_rows, seed=args.seed)
    live = sample_customers(args.reference_rows, seed=args.seed + 1)
    warm_up_s, _ = timed(lambda: drift_report(reference.head(200), reference.tail(200)))
    print(f"first call: {warm_up_s:.2f} s, excluded below")
    print(
        f"\n{args.reference_rows:,} live vs {args.reference_rows:,} reference rows, MMD on "
        f"{args.mmd_sample:,} sampled rows per side, {REPORT_MMD_PERMUTATIONS} permutations "
        f"(median of {args.repeats} runs)"
    )

    def full_report():
        return drift_report(reference, live, mmd_sample=args.mmd_sample, seed=args.seed)

    full_s, report = median_time(full_report, args.repeats)
    univariate_s, _ = median_time(lambda: drift_report(reference, live, mmd=False), args.repeats)
    x_ref, x, permutation_seed = report_mmd_sample(reference, live, args.mmd_sample, args.seed)
    mmd_s, mmd = median_time(
        lambda: mmd_permutation_test(
            x_ref, x, n_permutations=REPORT_MMD_PERMUTATIONS, p_val=0.05, seed=permutation_seed
        ),
        args.repeats,
    )
    alibi_like_s, alibi_like = median_time(
        lambda: mmd_permutation_test(
            x_ref, x, n_permutations=MMD_PERMUTATIONS, p_val=0.05, seed=permutation_seed
        ),
        args.repeats,
    )
    print(f"  full report          {full_s:6.3f} s")
    print(f"  KS + chi-squared     {univariate_s:6.3f} s  (the report with mmd=False)")
    print(
        f"  MMD (NumPy)          {mmd_s:6.3f} s  p = {mmd.p_value:.3f}, MMD² = {mmd.distance:.6g}"
    )
    print(
        f"  MMD (NumPy), {MMD_PERMUTATIONS} permutations {alibi_like_s:6.3f} s  "
        f"p = {alibi_like.p_value:.2f}"
    )
    if mmd.p_value != report.multivariate["p_value"]:
        raise RuntimeError(
            f"the benchmark's MMD sample is not the report's: p {mmd.p_value} vs "
            f"{report.multivariate['p_value']}"
        )

    if not args.no_baseline:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import_s, _ = timed(import_alibi_detect)
            alibi_mmd(x_ref[:50], x[:50], 0.05, permutation_seed)  # TensorFlow's first graph
            alibi_s, data = median_time(
                lambda: alibi_mmd(x_ref, x, 0.05, permutation_seed), args.repeats
            )
        print(
            f"  baseline: alibi-detect MMDDrift (TensorFlow) {alibi_s:6.3f} s  "
            f"p = {float(data['p_val']):.2f}, MMD² = {float(data['distance']):.6g}  "
            f"(import of alibi-detect and TensorFlow: {import_s:.1f} s, excluded)"
        )
        print(
            f"  MMD speed-up at {MMD_PERMUTATIONS} permutations: {alibi_s / alibi_like_s:.0f}x; "
            f"full report {univariate_s + alibi_s:.2f} s with alibi-detect's MMD "
            f"({MMD_PERMUTATIONS} permutations) -> {full_s:.2f} s with ours "
            f"({REPORT_MMD_PERMUTATIONS} permutations)"
        )

    print(f"\nreference {args.reference_rows:,} rows; one run each")
    print(
        f"{'live rows':>10}  {'KS+chi2':>9}  {'MMD':>7}  {'total':>7}  "
        f"{'rows/s (total)':>15}  drifted"
    )
    totals = {}
    for rows in LIVE_ROWS:
        live_rows = sample_customers(rows, seed=args.seed + 1)
        univariate_s, _ = timed(lambda live=live_rows: drift_report(reference, live, mmd=False))
        total_s, report = timed(
            lambda live=live_rows: drift_report(
                reference, live, mmd_sample=args.mmd_sample, seed=args.seed
            )
        )
        totals[rows] = total_s
        mmd_share_s = max(total_s - univariate_s, 0.0)
        print(
            f"{rows:>10,}  {univariate_s:>7.2f} s  {mmd_share_s:>5.2f} s  {total_s:>5.2f} s  "
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
