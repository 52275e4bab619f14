"""The CloudEvents headers MLServer's data plane gives an inference response, for the paths that
answer without MLServer's response model (gRPC ``infer_message``, REST
:mod:`serving.rest_message`)."""

from typing import Any

from mlserver import MLModel
from mlserver.handlers import DataPlane
from mlserver.types import InferenceResponse
from mlserver.utils import extract_headers

__all__ = ["ResponseHeaders"]

_ID_MARK = "\x00response-id"  # stands for a response's id in the headers made once per model


class ResponseHeaders:
    """Per model, what MLServer's response middleware adds to a response, made once by that
    middleware on an empty response and given each response's id (MLServer leaves the id
    headers out when the id is empty)."""

    def __init__(self, data_plane: DataPlane) -> None:
        self._data_plane = data_plane
        self._made: dict[tuple[str, str | None], tuple[tuple[tuple[str, str], ...], Any]] = {}

    def _template(self, model: MLModel) -> tuple[tuple[tuple[str, str], ...], Any]:
        key = (model.name, model.version)
        made = self._made.get(key)
        if made is None:
            response = InferenceResponse(id=_ID_MARK, model_name=model.name, outputs=[])
            # MLServer 1.7's data plane attribute (pinned version)
            self._data_plane._inference_middleware.response_middleware(response, model.settings)
            headers = tuple((extract_headers(response) or {}).items())
            parameters = (
                None
                if response.parameters is None
                else response.parameters.model_dump(exclude_unset=True, exclude_none=True)
            )
            made = self._made[key] = (headers, parameters)
        return made

    def headers(self, model: MLModel, response_id: str) -> list[tuple[str, str]]:
        """The headers (name, value) of ``model``'s response ``response_id``."""
        template, _ = self._template(model)
        return [
            (name, response_id if value == _ID_MARK else value)
            for name, value in template
            if response_id or value != _ID_MARK
        ]

    def parameters(self, model: MLModel) -> Any:
        """The ``parameters`` MLServer's REST response of ``model`` shows once its headers are
        taken out of them (``{}``), or None where the middleware sets none."""
        return self._template(model)[1]
