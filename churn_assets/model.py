"""A scoring model as stored in the registry: XGBoost booster + feature transformer + baseline,
and the feature contract it was trained with (``contract.json``; a version stored before
contracts has none and was trained on the default contract).

Artefacts are safe formats only: the booster as XGBoost UBJSON, the transformer and the baseline
as JSON. Any further artefacts (e.g. the outlier reference, ``reference.parquet`` and
``outliers.json``) travel unchanged as ``extra_files``. Loading goes through the registry, which
verifies every file's SHA-256.
"""

import ctypes
import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import xgboost as xgb
from xgboost.core import _LIB, _check_call, c_bst_ulong, make_jcargs

from churn_assets.contract import Contract, ContractError, contract_from_dict
from churn_assets.features import FeatureTransformer
from churn_assets.registry import ModelRegistry, ModelVersion
from churn_assets.schemas import DEFAULT_CONTRACT
from churn_assets.training import LogisticBaseline

__all__ = [
    "BASELINE_FILE",
    "BOOSTER_FILE",
    "CONTRACT_FILE",
    "KNOWN_FILES",
    "TRANSFORMER_FILE",
    "ScoringModel",
    "contract_from_files",
    "load_model",
    "stored_contract",
]

BOOSTER_FILE = "model.ubj"
TRANSFORMER_FILE = "transformer.json"
BASELINE_FILE = "baseline.json"
CONTRACT_FILE = "contract.json"
ONE_THREAD_ROWS = 64
KNOWN_FILES = (BOOSTER_FILE, TRANSFORMER_FILE, BASELINE_FILE, CONTRACT_FILE)

# A transformed model matrix: the transformer's float32, or any float array of the same columns.
Matrix = npt.NDArray[np.floating[Any]]


@dataclass
class ScoringModel:
    booster: xgb.Booster
    transformer: FeatureTransformer
    baseline: LogisticBaseline | None = None
    version: str | None = None
    extra_files: dict[str, bytes] = field(default_factory=dict)  # other artefacts, as bytes
    contract: Contract = DEFAULT_CONTRACT

    def predict_matrix(self, x: Matrix) -> npt.NDArray[np.float64]:
        """Churn probabilities for an already transformed matrix (no DMatrix built). A small
        batch (a request's) is scored on the calling thread alone, straight through XGBoost's
        C API (:class:`DensePredictor`): starting XGBoost's thread pool costs more than scoring
        the rows, and so does ``inplace_predict``'s Python around the same C call (see
        benchmarks/serving.py)."""
        if len(x) <= ONE_THREAD_ROWS:
            return self._one_thread(x)
        return np.asarray(self.booster.inplace_predict(x), dtype=float)

    @functools.cached_property
    def _one_thread(self) -> "DensePredictor":
        booster = self.booster.copy()
        booster.set_param({"nthread": 1})
        return DensePredictor(booster)

    def margin_matrix(self, x: Matrix) -> npt.NDArray[np.float64]:
        return np.asarray(self.booster.inplace_predict(x, predict_type="margin"), dtype=float)

    def predict_frame(self, frame: pd.DataFrame) -> npt.NDArray[np.float64]:
        return self.predict_matrix(self.transformer.transform(frame))

    def predict_records(self, records: Iterable[Mapping[str, Any]]) -> npt.NDArray[np.float64]:
        return self.predict_matrix(self.transformer.transform_records(records))

    def predict_columns(
        self, columns: Mapping[str, Sequence[Any]], rows: int
    ) -> npt.NDArray[np.float64]:
        """Probabilities for validated columns (canonical values, ``None`` when missing)."""
        return self.predict_matrix(self.transformer.transform_columns(columns, rows))

    def to_files(self) -> dict[str, bytes]:
        files = {
            BOOSTER_FILE: bytes(self.booster.save_raw(raw_format="ubj")),
            TRANSFORMER_FILE: self.transformer.to_json().encode(),
            # Not key-sorted: the categories keep their declared order (the form lists them so).
            CONTRACT_FILE: json.dumps(self.contract.as_dict()).encode(),
        }
        if self.baseline is not None:
            files[BASELINE_FILE] = json.dumps(self.baseline.to_dict(), allow_nan=False).encode()
        clashes = sorted(set(self.extra_files) & set(KNOWN_FILES))
        if clashes:
            raise ValueError(f"extra_files must not use the reserved artefact names {clashes}")
        files.update({name: bytes(data) for name, data in self.extra_files.items()})
        return files

    @classmethod
    def from_files(cls, files: Mapping[str, bytes], version: str | None = None) -> "ScoringModel":
        booster = xgb.Booster()
        booster.load_model(bytearray(files[BOOSTER_FILE]))
        baseline = (
            LogisticBaseline.from_dict(json.loads(files[BASELINE_FILE]))
            if BASELINE_FILE in files
            else None
        )
        contract = contract_from_files(files, version)
        return cls(
            booster=booster,
            transformer=FeatureTransformer.from_json(files[TRANSFORMER_FILE]),
            baseline=baseline,
            version=version,
            extra_files={n: bytes(d) for n, d in files.items() if n not in KNOWN_FILES},
            contract=contract,
        )


def contract_from_files(files: Mapping[str, bytes], version: str | None = None) -> Contract:
    """The contract a version's files hold (``contract.json``); a version stored before
    contracts has none and was trained on the default contract."""
    if CONTRACT_FILE not in files:
        return DEFAULT_CONTRACT
    try:
        return contract_from_dict(json.loads(files[CONTRACT_FILE]))
    except (ValueError, ContractError) as exc:
        raise ContractError(f"{version or 'the model'} has a bad {CONTRACT_FILE}: {exc}") from exc


def stored_contract(registry: ModelRegistry, version: ModelVersion) -> Contract:
    """``version``'s contract, reading (and hash-checking) its ``contract.json`` only."""
    files = (
        {CONTRACT_FILE: registry.read_file(version.version, CONTRACT_FILE)}
        if CONTRACT_FILE in version.files
        else {}
    )
    return contract_from_files(files, version.version)


def load_model(registry: ModelRegistry, ref: str) -> ScoringModel:
    """Load a registered version (``v3``, ``champion``, ``challenger``), verifying its hashes."""
    version = registry.get(ref)
    files = {name: registry.read_file(version.version, name) for name in sorted(version.files)}
    return ScoringModel.from_files(files, version=version.version)


class DensePredictor:
    """``booster.inplace_predict(x)`` for a dense float matrix, as float64, with the same C call
    (``XGBoosterPredictFromDense``) but none of its per-call Python: the arguments are encoded
    once, the matrix's array interface is formatted directly and the answer copied out of
    XGBoost's buffer at once. Any other input goes through ``inplace_predict`` itself.

    Uses XGBoost's ctypes handle (``xgboost.core._LIB``, pinned with ``xgboost`` 3.0); the unit
    tests hold it equal to ``inplace_predict``. Like ``inplace_predict`` it is safe to call from
    several threads: XGBoost keeps each thread's answer buffer apart."""

    # inplace_predict's own arguments for a plain prediction (no margin, every tree).
    _ARGS = make_jcargs(
        type=0,
        training=False,
        iteration_begin=0,
        iteration_end=0,
        missing=float("nan"),
        strict_shape=False,
        cache_id=0,
    )
    _TYPESTR = {np.dtype(np.float32): b"<f4", np.dtype(np.float64): b"<f8"}
    _NO_PROXY = ctypes.c_void_p()

    def __init__(self, booster: xgb.Booster) -> None:
        self.booster = booster
        self._features = booster.num_features()

    def __call__(self, x: Matrix) -> npt.NDArray[np.float64]:
        typestr = self._TYPESTR.get(x.dtype) if isinstance(x, np.ndarray) else None
        if (
            typestr is None
            or x.ndim != 2
            or x.shape[1] != self._features
            or not x.flags.c_contiguous
            or not x.flags.aligned
            or x.shape[0] == 0
        ):
            return np.asarray(self.booster.inplace_predict(x), dtype=float)
        rows, columns = x.shape
        interface = (
            b'{"data": [%d, true], "shape": [%d, %d], "strides": null, '
            b'"typestr": "%s", "version": 3}' % (x.ctypes.data, rows, columns, typestr)
        )
        shape = ctypes.POINTER(c_bst_ulong)()
        dims = c_bst_ulong()
        answers = ctypes.POINTER(ctypes.c_float)()
        _check_call(
            _LIB.XGBoosterPredictFromDense(
                self.booster.handle,
                interface,
                self._ARGS,
                self._NO_PROXY,
                ctypes.byref(shape),
                ctypes.byref(dims),
                ctypes.byref(answers),
            )
        )
        answer_shape = tuple(int(shape[dim]) for dim in range(dims.value))
        # Copied before anything else runs on this thread: the buffer is XGBoost's.
        values = np.frombuffer(ctypes.string_at(answers, 4 * prod(answer_shape)), np.float32)
        return values.astype(np.float64).reshape(answer_shape)
