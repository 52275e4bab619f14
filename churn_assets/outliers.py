"""Outlier detection over the model's transformed feature matrix (Dagster-free, pickle-free).

Two detectors score rows of the matrix that :class:`~churn_assets.features.FeatureTransformer`
produces, so training, serving and monitoring see the same inputs:

* :class:`MahalanobisDetector` — the Mahalanobis distance to the training mean under the training
  covariance. Cheap (a few microseconds a row), so serving runs it on the request path. Its whole
  state (mean, precision matrix, threshold) is stored as JSON.
* :class:`IsolationForestDetector` — scikit-learn's ``IsolationForest``. A fitted forest can only
  be stored by pickling it, which the registry forbids, so it is *refitted at load time* from a
  stored sample of training rows with a fixed seed: same sample, same seed and the same
  scikit-learn version give the same forest and the same scores. About 5 ms for a single row, so
  it is for batches (monitoring) rather than the request path.

Each model version carries two extra artefacts made by :func:`reference_files`:

* ``reference.parquet`` — a seeded sample of the training rows' raw features (the transformer's
  inputs: the contract's features; Parquet), the isolation forest's training data and the drift
  reference for monitoring;
* ``outliers.json`` — the fitted Mahalanobis detector plus contamination, seed and forest size.

Both thresholds are the empirical ``1 - contamination`` quantile of the reference rows' scores, so
about ``contamination`` of normal traffic is flagged. A row is flagged when its score is strictly
above the threshold.
"""

import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import sklearn
from sklearn.ensemble import IsolationForest

from churn_assets.features import FeatureTransformer

__all__ = [
    "OUTLIER_FILE",
    "REFERENCE_FILE",
    "IsolationForestDetector",
    "MahalanobisDetector",
    "OutlierError",
    "OutlierScorer",
    "load_outlier_scorer",
    "load_reference_frame",
    "reference_files",
]

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.parquet"
OUTLIER_FILE = "outliers.json"
OUTLIER_FORMAT = 1
# Added to the covariance diagonal. The transformed numeric columns are standardised (variance
# about 1), so this is negligible for them, while it makes the one-hot groups (whose columns
# always sum to 1, a singular direction) invertible. A row that leaves such a direction (e.g. an
# all-zero one-hot group) gets a very large distance, which is the right answer for it.
COVARIANCE_RIDGE = 1e-6
DEFAULT_SAMPLE_ROWS = 5000
DEFAULT_N_ESTIMATORS = 100


class OutlierError(ValueError):
    """Outlier artefacts are malformed or do not match the model's transformer."""


def _check_contamination(contamination: float) -> float:
    value = float(contamination)
    if not 0.0 < value < 0.5:
        raise OutlierError(f"contamination must be in (0, 0.5), got {contamination!r}")
    return value


def _matrix(x: np.ndarray, columns: int | None = None) -> np.ndarray:
    """``x`` as a 2-D float64 array (one row for a 1-D input), checked for its column count."""
    array = np.asarray(x, dtype=np.float64)
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2:
        raise OutlierError(f"expected a 2-D matrix, got an array of shape {array.shape}")
    if columns is not None and array.shape[1] != columns:
        raise OutlierError(f"expected {columns} columns, got {array.shape[1]}")
    return array


def _upper_quantile(scores: np.ndarray, contamination: float) -> float:
    return float(np.quantile(scores, 1.0 - contamination))


@dataclass(frozen=True)
class MahalanobisDetector:
    """Mahalanobis distance to a reference mean; :meth:`score` returns the plain (not squared)
    distance ``sqrt((x - mean)' P (x - mean))`` with ``P`` the regularised inverse covariance.

    ``threshold`` is the empirical ``1 - contamination`` quantile of the reference rows' distances.
    """

    mean: tuple[float, ...]
    precision: tuple[tuple[float, ...], ...]
    threshold: float
    _mean: np.ndarray = field(init=False, repr=False, compare=False)
    _precision: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64)
        precision = np.asarray(self.precision, dtype=np.float64)
        if mean.ndim != 1 or precision.shape != (mean.size, mean.size):
            raise OutlierError(
                f"Mahalanobis detector needs a mean of length d and a d x d precision; got "
                f"{mean.shape} and {precision.shape}"
            )
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(precision))):
            raise OutlierError("Mahalanobis detector holds NaN or infinite values")
        if not np.isfinite(self.threshold):
            raise OutlierError(f"Mahalanobis threshold must be finite, got {self.threshold!r}")
        # Cached arrays so scoring a single row costs microseconds, not a tuple conversion.
        object.__setattr__(self, "_mean", mean)
        object.__setattr__(self, "_precision", precision)

    @property
    def dimension(self) -> int:
        """The number of matrix columns the detector scores."""
        return int(self._mean.size)

    @classmethod
    def fit(cls, x: np.ndarray, contamination: float) -> "MahalanobisDetector":
        """Mean and regularised inverse covariance of ``x``; threshold from ``x``'s distances."""
        contamination = _check_contamination(contamination)
        matrix = _matrix(x)
        if matrix.shape[0] < 2:
            raise OutlierError(f"need at least 2 reference rows, got {matrix.shape[0]}")
        if not np.all(np.isfinite(matrix)):
            raise OutlierError("reference matrix holds NaN or infinite values")
        mean = matrix.mean(axis=0)
        covariance = np.atleast_2d(np.cov(matrix, rowvar=False, bias=True))
        covariance += COVARIANCE_RIDGE * np.eye(covariance.shape[0])
        precision = np.linalg.inv(covariance)
        precision = (precision + precision.T) / 2.0  # exactly symmetric, so it stores and reloads
        unthresholded = cls(
            mean=tuple(float(v) for v in mean),
            precision=tuple(tuple(float(v) for v in row) for row in precision),
            threshold=0.0,
        )
        threshold = _upper_quantile(unthresholded.score(matrix), contamination)
        return cls(mean=unthresholded.mean, precision=unthresholded.precision, threshold=threshold)

    def score(self, x: np.ndarray) -> np.ndarray:
        """The plain Mahalanobis distance of each row of ``x`` (vectorised, float64)."""
        centred = _matrix(x, self.dimension) - self._mean
        squared = ((centred @ self._precision) * centred).sum(axis=1)
        return np.sqrt(np.maximum(squared, 0.0))

    def flag(self, scores: np.ndarray) -> np.ndarray:
        """``True`` where a score is above the threshold."""
        return np.asarray(scores) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (lists of floats) for JSON."""
        return {
            "mean": list(self.mean),
            "precision": [list(row) for row in self.precision],
            "threshold": self.threshold,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MahalanobisDetector":
        """Inverse of :meth:`to_dict`; :class:`OutlierError` if a key is missing or malformed."""
        try:
            return cls(
                mean=tuple(float(v) for v in data["mean"]),
                precision=tuple(tuple(float(v) for v in row) for row in data["precision"]),
                threshold=float(data["threshold"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, OutlierError):
                raise
            raise OutlierError(f"stored Mahalanobis detector is malformed: {exc!r}") from exc

    def to_json(self) -> str:
        """Strict JSON; Python floats round-trip exactly, so reloaded scores are identical."""
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "MahalanobisDetector":
        """Inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise OutlierError(f"stored Mahalanobis detector is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise OutlierError("stored Mahalanobis detector is not a JSON object")
        return cls.from_dict(data)


class IsolationForestDetector:
    """scikit-learn ``IsolationForest`` fitted on ``reference`` with a fixed seed.

    Never stored: it is refitted from the stored reference sample whenever a model loads, which is
    deterministic for a given scikit-learn version (``random_state=seed``, one job). :meth:`score`
    is ``-score_samples``, so higher means more anomalous; ``threshold`` is the empirical
    ``1 - contamination`` quantile of the reference rows' scores.
    """

    def __init__(
        self,
        reference: np.ndarray,
        contamination: float,
        seed: int,
        n_estimators: int = DEFAULT_N_ESTIMATORS,
    ) -> None:
        self.contamination = _check_contamination(contamination)
        self.seed = int(seed)
        self.n_estimators = int(n_estimators)
        matrix = _matrix(reference)
        if matrix.shape[0] < 2:
            raise OutlierError(f"need at least 2 reference rows, got {matrix.shape[0]}")
        self.dimension = int(matrix.shape[1])
        self.forest = IsolationForest(
            n_estimators=self.n_estimators,
            max_samples="auto",
            contamination="auto",
            random_state=self.seed,
            n_jobs=1,
        ).fit(matrix)
        self.threshold = _upper_quantile(self.score(matrix), self.contamination)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Anomaly score of each row of ``x`` (``-score_samples``; higher = more anomalous)."""
        return -np.asarray(self.forest.score_samples(_matrix(x, self.dimension)), dtype=np.float64)

    def flag(self, scores: np.ndarray) -> np.ndarray:
        """``True`` where a score is above the threshold."""
        return np.asarray(scores) > self.threshold


class OutlierScorer:
    """Both detectors over the transformed feature matrix.

    ``reference_frame`` holds the raw features (the contract's) of the reference sample; it is
    transformed with ``transformer`` to fit the isolation forest, and kept as
    :attr:`reference_frame` for monitoring (drift reference). Scoring methods take an already
    transformed matrix (what serving has in hand) and return ``(scores, flags)``.
    """

    def __init__(
        self,
        transformer: FeatureTransformer,
        reference_frame: pd.DataFrame,
        mahalanobis: MahalanobisDetector,
        contamination: float,
        seed: int,
        n_estimators: int = DEFAULT_N_ESTIMATORS,
    ) -> None:
        width = len(transformer.feature_names_out)
        if mahalanobis.dimension != width:
            raise OutlierError(
                f"the Mahalanobis detector scores {mahalanobis.dimension} columns but the "
                f"transformer produces {width}; the outlier artefacts belong to another model"
            )
        self.transformer = transformer
        self.reference_frame = reference_frame
        self.mahalanobis = mahalanobis
        self.contamination = _check_contamination(contamination)
        self.seed = int(seed)
        self.isolation_forest = IsolationForestDetector(
            transformer.transform(reference_frame),
            self.contamination,
            self.seed,
            n_estimators=n_estimators,
        )

    def score_mahalanobis(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distances and flags; cheap enough for the request path."""
        scores = self.mahalanobis.score(x)
        return scores, self.mahalanobis.flag(scores)

    def score_isolation_forest(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Isolation-forest scores and flags; about 5 ms a call even for one row, so batch it."""
        scores = self.isolation_forest.score(x)
        return scores, self.isolation_forest.flag(scores)


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink, compression="zstd")
    return sink.getvalue()


def reference_files(
    transformer: FeatureTransformer,
    train_frame: pd.DataFrame,
    contamination: float,
    seed: int,
    sample_rows: int = DEFAULT_SAMPLE_ROWS,
) -> dict[str, bytes]:
    """The outlier artefacts of a model trained on ``train_frame``: ``{name: bytes}``.

    * :data:`REFERENCE_FILE`: up to ``sample_rows`` training rows drawn without replacement with
      ``numpy.random.default_rng(seed)`` (kept in their original order), only the raw features
      the transformer reads (``transformer.inputs``, in ``train_frame``'s column order), as
      Parquet;
    * :data:`OUTLIER_FILE`: JSON with the Mahalanobis detector fitted on *all* training rows,
      ``contamination``, ``seed``, the forest size and the matrix's column names.
    """
    contamination = _check_contamination(contamination)
    if sample_rows < 2:
        raise OutlierError(f"sample_rows must be at least 2, got {sample_rows}")
    inputs = set(transformer.inputs)
    missing = [name for name in transformer.inputs if name not in train_frame.columns]
    if missing:
        raise OutlierError(f"training frame lacks the model features {missing}")
    if len(train_frame) < 2:
        raise OutlierError(f"need at least 2 training rows, got {len(train_frame)}")
    columns = [name for name in train_frame.columns if name in inputs]
    raw = train_frame[columns].reset_index(drop=True)
    mahalanobis = MahalanobisDetector.fit(transformer.transform(raw), contamination)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(raw), size=min(sample_rows, len(raw)), replace=False))
    sample = raw.iloc[rows].reset_index(drop=True)
    document = {
        "format_version": OUTLIER_FORMAT,
        "contamination": contamination,
        "seed": int(seed),
        "n_estimators": DEFAULT_N_ESTIMATORS,
        "reference_rows": len(sample),
        "training_rows": len(raw),
        "columns": transformer.feature_names_out,
        "score": "plain Mahalanobis distance; isolation forest -score_samples",
        "sklearn_version": sklearn.__version__,
        "mahalanobis": mahalanobis.to_dict(),
    }
    return {
        REFERENCE_FILE: _parquet_bytes(sample),
        OUTLIER_FILE: json.dumps(document, allow_nan=False, indent=1).encode(),
    }


def load_reference_frame(
    files: Mapping[str, bytes], features: Sequence[str] | None = None
) -> pd.DataFrame:
    """The raw-feature reference sample stored in :data:`REFERENCE_FILE`: all its columns (the
    model's inputs), or ``features`` in that order (a feature it lacks is an error)."""
    if REFERENCE_FILE not in files:
        raise OutlierError(f"no {REFERENCE_FILE!r} among the model files {sorted(files)}")
    data = bytes(files[REFERENCE_FILE])
    if data[:4] != b"PAR1":
        raise OutlierError(f"{REFERENCE_FILE!r} is not a Parquet file")
    frame = pq.read_table(pa.BufferReader(data)).to_pandas()
    if features is None:
        return frame
    missing = [name for name in features if name not in frame.columns]
    if missing:
        raise OutlierError(
            f"{REFERENCE_FILE!r} lacks the model features {missing} "
            f"(it holds {list(frame.columns)})"
        )
    return frame[list(features)]


def _load_document(files: Mapping[str, bytes]) -> dict[str, Any]:
    if OUTLIER_FILE not in files:
        raise OutlierError(f"no {OUTLIER_FILE!r} among the model files {sorted(files)}")
    try:
        document = json.loads(files[OUTLIER_FILE])
    except ValueError as exc:
        raise OutlierError(f"{OUTLIER_FILE!r} is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise OutlierError(f"{OUTLIER_FILE!r} is not a JSON object")
    if document.get("format_version") != OUTLIER_FORMAT:
        raise OutlierError(
            f"{OUTLIER_FILE!r} format {document.get('format_version')!r} is not supported "
            f"(expected {OUTLIER_FORMAT})"
        )
    return document


def load_outlier_scorer(
    transformer: FeatureTransformer, files: Mapping[str, bytes]
) -> OutlierScorer:
    """Both detectors from a model's :data:`REFERENCE_FILE` and :data:`OUTLIER_FILE`.

    The Mahalanobis detector is read as stored; the isolation forest is refitted (seeded) on the
    transformed reference sample. :class:`OutlierError` if the files are missing, malformed or
    were made for a transformer with other output columns.
    """
    document = _load_document(files)
    columns = document.get("columns")
    if columns is not None and list(columns) != list(transformer.feature_names_out):
        raise OutlierError(
            f"{OUTLIER_FILE!r} was fitted on columns {columns}, but the transformer produces "
            f"{transformer.feature_names_out}"
        )
    stored_version = document.get("sklearn_version")
    if stored_version is not None and stored_version != sklearn.__version__:
        log.warning(
            "outlier reference was stored with scikit-learn %s and is refitted with %s: "
            "isolation-forest scores may differ slightly from those at training time",
            stored_version,
            sklearn.__version__,
        )
    try:
        contamination = float(document["contamination"])
        seed = int(document["seed"])
        n_estimators = int(document.get("n_estimators", DEFAULT_N_ESTIMATORS))
        mahalanobis = MahalanobisDetector.from_dict(document["mahalanobis"])
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, OutlierError):
            raise
        raise OutlierError(f"{OUTLIER_FILE!r} is malformed: {exc!r}") from exc
    return OutlierScorer(
        transformer,
        load_reference_frame(files, transformer.inputs),
        mahalanobis,
        contamination,
        seed,
        n_estimators=n_estimators,
    )
