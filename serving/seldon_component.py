"""The churn model as a Seldon Core v1 Python-wrapper component.

    seldon-core-microservice serving.seldon_component.ChurnSeldonModel --service-type MODEL \
        --parameters '[{"name": "version", "value": "champion", "type": "STRING"}]'

Seldon passes ``--parameters`` as keyword arguments. Input: an ndarray (or a list of rows) with
the features of the version's contract (the one it was trained with) in ``features_names`` order
(names required), validated like every other path.
Seldon builds one numpy array from a JSON ``ndarray``, so a row that mixes strings and numbers
arrives as strings only: a numeric feature's text is read back as the JSON number it was
(``"12.0"`` → 12.0; text that is not a JSON number, or ``"true"``, stays text and is refused).
Output: the churn probability per row. The model is loaded from the registry with its hashes
verified; nothing is unpickled.
"""

import logging
from typing import Any

import numpy as np
import orjson

from churn_assets.config import load_settings
from churn_assets.contract import Contract
from churn_assets.model import load_model
from churn_assets.registry import ModelRegistry
from serving.errors import InvalidInput
from serving.requests import validate_records

__all__ = ["ChurnSeldonModel"]

log = logging.getLogger(__name__)


def _value(contract: Contract, name: str, value: Any) -> Any:
    """A cell as the JSON value the client sent (see the module's docstring)."""
    if isinstance(value, np.generic):
        value = value.item()
    if name in contract.numeric_names and isinstance(value, str):
        try:
            number = orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
        if isinstance(number, int | float) and not isinstance(number, bool):
            return number
    return value


class ChurnSeldonModel:
    """Seldon v1 ``MODEL`` component scoring with one registered version."""

    def __init__(self, version: str = "champion", config_path: str = "") -> None:
        self.version = version
        self.config_path = config_path
        self.model: Any = None

    def load(self) -> None:
        """Called by Seldon in each worker process after it forks: loading here keeps XGBoost's
        thread pool out of the parent, where a fork would deadlock it."""
        settings = load_settings(self.config_path or None)
        self.model = load_model(ModelRegistry(settings.registry_dir), self.version)
        log.info("Seldon component serving %s", self.model.version)

    def predict(self, X: Any, features_names: list[str] | None = None, **_: Any) -> np.ndarray:  # noqa: N803 - Seldon's signature
        if self.model is None:
            self.load()
        names = list(features_names or [])
        rows = np.asarray(X, dtype=object)
        if rows.ndim != 2:
            raise InvalidInput([{"loc": ["data"], "msg": "expected a 2-D array of rows"}])
        contract = self.model.contract
        if sorted(names) != sorted(contract.names):
            raise InvalidInput(
                [
                    {
                        "loc": ["names"],
                        "msg": f"names must be the model's features {', '.join(contract.names)}",
                    }
                ]
            )
        records = [
            {name: _value(contract, name, value) for name, value in zip(names, row, strict=True)}
            for row in rows
        ]
        try:
            valid = validate_records(records, contract)
        except InvalidInput as exc:
            # Inside seldon-core-microservice, this exception becomes an HTTP 400 reply.
            from seldon_core.flask_utils import SeldonMicroserviceException

            raise SeldonMicroserviceException(
                str(exc), status_code=400, reason="BAD_INPUT"
            ) from exc
        return self.model.predict_columns(valid.columns, len(valid)).reshape(-1, 1)

    def class_names(self) -> list[str]:
        return ["churn_probability"]

    def tags(self) -> dict[str, Any]:
        return {"model_version": self.model.version if self.model is not None else None}
