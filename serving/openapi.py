"""What ``/openapi.json`` publishes: every route as serving really answers it.

MLServer's V2 routes come with FastAPI's defaults: any model name, a JSON body on health checks
that answer with none, no word of the 404s and 400s MLServer gives (``{"error": "..."}``). The
product's routes answer 413 (body size) and 400 (a body that is not JSON) on top of what they
declare. :func:`publish_openapi` removes MLServer's own docs pages (they load Swagger from a CDN;
``/docs`` and ``/redoc`` are served offline) and rewrites the schema once, so clients and
fuzzers see what serving does.
"""

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

__all__ = ["publish_openapi"]

V2_ERROR = {
    "title": "V2Error",
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
}
ERROR = {"$ref": "#/components/schemas/ErrorBody"}
VALIDATION = {"$ref": "#/components/schemas/HTTPValidationError"}
V2 = {"$ref": "#/components/schemas/V2Error"}
HEALTH_PATHS = (
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/{model_name}/ready",
    "/v2/models/{model_name}/versions/{model_version}/ready",
)
LARGEST_DIMENSION = 2**31 - 1


def _is_mlserver_docs(path: str) -> bool:
    return path.startswith("/v2") and (path.endswith("/docs") or path.endswith("/dataplane.json"))


def publish_openapi(app: FastAPI, *, models: Sequence[str], versions: Sequence[str]) -> None:
    """Drop MLServer's docs pages from ``app`` and make its OpenAPI schema name ``models`` and
    ``versions`` and every status serving answers with."""
    app.router.routes = [
        route for route in app.router.routes if not _is_mlserver_docs(getattr(route, "path", ""))
    ]
    app.openapi_schema = None

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            _describe(schema, list(models), list(versions))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _describe(schema: dict[str, Any], models: list[str], versions: list[str]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["V2Error"] = V2_ERROR
    components.setdefault(
        "ErrorBody",
        {
            "title": "ErrorBody",
            "type": "object",
            "properties": {"detail": {"type": "string"}},
            "required": ["detail"],
        },
    )
    _bound_tensors(components)
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            v2 = path.startswith("/v2")
            if v2:
                _name_models(operation, models, versions)
            if path in HEALTH_PATHS:
                responses.clear()
                responses["200"] = {"description": "live / ready (no body)"}
                responses["400"] = {"description": "not live / not ready (no body)"}
                if "{model_name}" in path:
                    responses["404"] = _json(V2, "No such model or version")
                continue
            if v2 and path != "/v2":
                responses["404"] = _json(V2, "No such model or version")
            if "requestBody" not in operation:
                continue
            responses["413"] = _json(ERROR, "Request body larger than serving.max_request_bytes")
            if v2:
                responses["400"] = _json(
                    {"anyOf": [ERROR, V2]}, "A body that is not JSON, or a request MLServer refused"
                )
                responses["422"] = _json(
                    {"anyOf": [VALIDATION, V2]},
                    "Input that does not match the request schema, or the model's inputs "
                    "(names, datatypes, shapes, values)",
                )
            else:
                responses["400"] = _json(ERROR, "A body that is not valid JSON")


def _name_models(operation: dict[str, Any], models: list[str], versions: list[str]) -> None:
    for parameter in operation.get("parameters", ()):
        if parameter.get("name") == "model_name":
            parameter["schema"] = {"type": "string", "enum": models, "title": "Model Name"}
        elif parameter.get("name") == "model_version" and parameter.get("required"):
            parameter["schema"] = {"type": "string", "enum": versions, "title": "Model Version"}
        elif parameter.get("name") == "model_version":
            # The query parameter of the routes without a version: MLServer takes it empty
            # ("?model_version=") as absent, the model's default version.
            parameter["schema"] = {
                "anyOf": [{"type": "string", "enum": ["", *versions]}, {"type": "null"}],
                "title": "Model Version",
            }
            parameter["description"] = "A version of the model; empty or absent: its default"


def _bound_tensors(components: dict[str, Any]) -> None:
    """Shapes are non-negative dimensions that fit a tensor; a request has inputs."""
    for name in ("RequestInput", "RequestOutput"):
        shape = components.get(name, {}).get("properties", {}).get("shape")
        if shape and isinstance(shape.get("items"), dict):
            shape["items"] |= {"minimum": 0, "maximum": LARGEST_DIMENSION}
    inputs = components.get("InferenceRequest", {}).get("properties", {}).get("inputs")
    if inputs is not None:
        inputs["minItems"] = 1
