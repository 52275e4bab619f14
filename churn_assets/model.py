"""A scoring model as stored in the registry: XGBoost booster + feature transformer + baseline,
and the feature contract it was trained with (``contract.json``; a version stored before
contracts has none and was trained on the default contract).

Artefacts are safe formats only: the booster as XGBoost UBJSON, the transformer and the baseline
as JSON. Any further artefacts (e.g. the outlier reference, ``reference.parquet`` and
``outliers.json``) travel unchanged as ``extra_files``. Loading goes through the registry, which
verifies every file's SHA-256.
"""

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import xgboost as xgb

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
        batch (a request's) is scored on the calling thread alone: starting XGBoost's thread
        pool costs more than scoring the rows (see benchmarks/serving.py)."""
        booster = self._one_thread if len(x) <= ONE_THREAD_ROWS else self.booster
        return np.asarray(booster.inplace_predict(x), dtype=float)

    @functools.cached_property
    def _one_thread(self) -> xgb.Booster:
        booster = self.booster.copy()
        booster.set_param({"nthread": 1})
        return booster

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
