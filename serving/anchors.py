"""Alibi AnchorTabular explanations, computed off the request path in a child process.

Alibi imports TensorFlow, which must never enter the serving process. Anchors therefore run in one
spawned worker process that imports Alibi once, keeps a fitted explainer per model version and
answers requests; the serving process only awaits the result.
"""

import asyncio
import logging
import multiprocessing
import signal
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

__all__ = ["AnchorService"]

log = logging.getLogger(__name__)

# Child-process cache: model version -> (explainer, the contract's feature names, categories)
_EXPLAINERS: dict[str, Any] = {}


def _ignore_interrupts() -> None:
    """The worker shares the terminal's process group: a Ctrl-C is the server's to handle (it
    stops the pool), not a KeyboardInterrupt traceback in the worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode(
    frame: Any, names: tuple[str, ...], categories: Mapping[str, tuple[str, ...]]
) -> np.ndarray:
    """The columns ``names`` as numbers: a category as its index, a boolean as 0 or 1."""
    columns = []
    for name in names:
        if name in categories:
            lookup = {value: float(i) for i, value in enumerate(categories[name])}
            columns.append(np.array([lookup[v] for v in frame[name]], dtype=float))
        else:
            columns.append(frame[name].to_numpy(dtype=float))
    return np.stack(columns, axis=1)


def _explain_in_child(
    version: str,
    files: Mapping[str, bytes],
    record: Mapping[str, Any],
    decision: float,
    threshold: float,
    seed: int,
) -> dict[str, Any]:
    import pandas as pd

    from churn_assets.model import ScoringModel
    from churn_assets.outliers import load_reference_frame

    if version not in _EXPLAINERS:
        from alibi.explainers import AnchorTabular

        model = ScoringModel.from_files(files)
        # The features of the contract the version was trained with, in its order.
        names = model.contract.names
        categories = dict(model.transformer.categories)

        def predictor(encoded: np.ndarray) -> np.ndarray:
            frame = pd.DataFrame(encoded, columns=list(names))
            for name, values in categories.items():
                frame[name] = [values[int(round(i))] for i in frame[name]]
            return (model.predict_frame(frame) >= decision).astype(int)

        reference = load_reference_frame(files)
        explainer = AnchorTabular(
            predictor,
            feature_names=list(names),
            categorical_names={
                names.index(name): list(values) for name, values in categories.items()
            },
            seed=seed,
        )
        explainer.fit(_encode(reference, names, categories), disc_perc=(25, 50, 75))
        _EXPLAINERS[version] = (explainer, names, categories)
    explainer, names, categories = _EXPLAINERS[version]
    row = _encode(pd.DataFrame([dict(record)]), names, categories)[0]
    explanation = explainer.explain(row, threshold=threshold)
    return {
        "method": "anchors",
        "model_version": version,
        "anchor": list(explanation.anchor),
        "precision": float(np.mean(explanation.precision)),
        "coverage": float(explanation.coverage),
        "predicted_high_risk": bool(explanation.raw["prediction"][0]),
        "high_risk_threshold": decision,
    }


class AnchorService:
    """One spawned worker process; ``explain`` awaits it without blocking the event loop."""

    def __init__(self, seed: int = 42) -> None:
        self.seed = seed
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_ignore_interrupts,
            )
        return self._pool

    async def explain(
        self,
        version: str,
        files: Mapping[str, bytes],
        record: Mapping[str, Any],
        decision: float,
        threshold: float = 0.95,
    ) -> dict[str, Any]:
        """The anchor (rule) that keeps the model's decision (score >= ``decision``) with at
        least ``threshold`` precision, with its precision and coverage."""
        future = self._executor().submit(
            _explain_in_child, version, dict(files), dict(record), decision, threshold, self.seed
        )
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
