"""Training time at 100k and 1M rows, and SHAP explanation throughput (batched and single row).

    .venv/bin/python benchmarks/training.py [--sizes 100000 1000000] [--threads 2]

Rows come from the simulator's customer distribution with labels from its true churn model.
For each size it times the transformer (fit + transform), XGBoost (early stopping on a 20 %
validation split, config defaults) and the logistic-regression baseline in the same run, and
prints their ratio. SHAP TreeExplainer is then timed on 10,000 rows in one batch and on 300
single-row calls, with the ratio between the two.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from churn_assets.config import load_settings  # noqa: E402
from churn_assets.explain import ShapExplainer  # noqa: E402
from churn_assets.features import FeatureTransformer  # noqa: E402
from churn_assets.model import ScoringModel  # noqa: E402
from churn_assets.simulator import sample_customers  # noqa: E402
from churn_assets.training import XGBoostParams, train_baseline, train_xgboost  # noqa: E402


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    settings = load_settings()
    params = XGBoostParams(**settings.training.xgboost.model_dump())
    model = None
    for size in args.sizes:
        rows = sample_customers(size, seed=size)
        cut = int(size * 0.8)
        train, val = rows.iloc[:cut], rows.iloc[cut:]
        transformer, fit_s = timed(FeatureTransformer.fit, train)
        (x_train, x_val), transform_s = timed(
            lambda t=transformer, a=train, b=val: (t.transform(a), t.transform(b))
        )
        y_train, y_val = train["label"].to_numpy(), val["label"].to_numpy()
        booster, xgb_s = timed(
            train_xgboost,
            x_train,
            y_train,
            x_val,
            y_val,
            params,
            seed=1,
            n_threads=args.threads,
            device=args.device,
            feature_names=transformer.feature_names_out,
        )
        _, baseline_s = timed(train_baseline, x_train, y_train, seed=1)
        print(
            f"rows {size:>9,}: transformer {fit_s + transform_s:6.2f}s  "
            f"xgboost {xgb_s:6.2f}s ({booster.num_boosted_rounds()} trees)  "
            f"baseline {baseline_s:6.2f}s  xgboost/baseline {xgb_s / baseline_s:5.2f}"
        )
        model = ScoringModel(booster=booster, transformer=transformer)

    assert model is not None
    explainer = ShapExplainer(model)
    sample = sample_customers(10_000, seed=7)
    x = model.transformer.transform(sample)
    _, batch_s = timed(explainer.input_contributions, x)
    records = sample.head(300).to_dict("records")
    started = time.perf_counter()
    for record in records:
        explainer.explain_records([record])
    single_s = time.perf_counter() - started
    batched_rate = len(x) / batch_s
    single_rate = len(records) / single_s
    print(f"SHAP batched      {batched_rate:12,.0f} rows/s (10,000 rows in {batch_s:.2f}s)")
    print(
        f"SHAP single row   {single_rate:12,.0f} rows/s ({single_s / len(records) * 1e3:.2f} ms a "
        "row, transform included)"
    )
    print(f"batched / single  {batched_rate / single_rate:12.1f}")
    np.testing.assert_allclose(
        explainer.input_contributions(x[:100]).sum(axis=1) + explainer.base_value,
        model.margin_matrix(x[:100]),
        atol=1e-4,
    )


if __name__ == "__main__":
    main()
