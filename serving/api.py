"""The product's convenience REST endpoints, mounted on MLServer's FastAPI app.

Admin endpoints need ``Authorization: Bearer <token>`` where the token comes from the
``CHURN_ADMIN_TOKEN`` environment variable; without it configured, admin calls are refused.
"""

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from churn_assets.schemas import FeedbackEvent, Identifier, Timestamp, Topics, encode_message
from serving.errors import (
    ServingError,
    Unauthorized,
    Unavailable,
    bearer_matches,
    log_rejected,
)
from serving.feedback import FeedbackPublisher
from serving.plane import ServingPlane
from serving.requests import MAX_BATCH
from serving.retraining import RetrainRequest, RetrainResponse, retrain

__all__ = [
    "BodySizeLimit",
    "create_router",
    "serving_error_handler",
    "validation_error_handler",
]


class PolicyChange(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        # A challenger to set and remove_challenger together contradict each other.
        json_schema_extra={
            "not": {
                "required": ["challenger", "remove_challenger"],
                "properties": {
                    "challenger": {"type": "string"},
                    "remove_challenger": {"const": True},
                },
            }
        },
    )

    strategy: Literal["shadow", "canary", "blue_green"] | None = None
    canary_weight: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    challenger: str | None = Field(default=None, pattern=r"^v[0-9]+$")
    remove_challenger: bool = Field(
        default=False,
        description="Stop serving and shadowing the challenger (the champion answers alone).",
    )


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_id: Identifier | None = Field(
        default=None,
        description="Your id for this outcome: a retry with the same id lands once "
        "(default: a new api-<uuid> per call)",
    )
    customer_id: Identifier
    request_id: Identifier | None = None
    churned: bool = Field(strict=True)
    outcome_time: Timestamp | None = Field(
        default=None, description="ISO 8601 with a time zone; default: now"
    )


class ErrorBody(BaseModel):
    """Every error the product's endpoints answer other than 422."""

    detail: str


_ERROR_DESCRIPTIONS = {
    401: "Admin token missing or wrong (or CHURN_ADMIN_TOKEN not set on the server)",
    404: "A model version that is not registered or cannot be loaded",
    409: "The router's state does not allow it (e.g. no challenger to promote, or a version "
    "that needs inputs the served contract does not give)",
    503: "A dependency (Kafka, the registry) is unavailable; retry",
}
_RETRAIN_ERRORS = {
    401: _ERROR_DESCRIPTIONS[401],
    409: "A rollout is in progress or pending (a challenger in shadow or canary, or registered "
    "and not judged yet): the detail says which and what to do",
    503: "Dagster cannot be reached, or refused the launch: the detail says why",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[code]} for code in codes}


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 before it is read
    (by its Content-Length) or as soon as the bytes received pass the limit (chunked uploads),
    so no caller can make serving hold a large body in memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> str:
        return f"request body larger than {self.max_bytes} bytes (serving.max_request_bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status = 413 if declared.isdigit() else 400
            detail = self._too_large() if status == 413 else "invalid Content-Length header"
            log_rejected(f"{scope['method']} {scope['path']}", status, detail)
            response = JSONResponse(
                {"detail": detail}, status_code=status, headers={"connection": "close"}
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    log_rejected(f"{scope['method']} {scope['path']}", 413, self._too_large())
                    # An HTTPException passes through FastAPI's body parsing unchanged and is
                    # answered by the app's exception middleware.
                    raise HTTPException(413, self._too_large(), headers={"connection": "close"})
            return message

        await self.app(scope, limited, send)


async def serving_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServingError)
    return JSONResponse(status_code=exc.status_code, content=exc.body())


async def validation_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """422 with field-level errors; the offending input is not echoed (it may be NaN/inf,
    which JSON cannot carry, or large)."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "loc": list(error.get("loc", ())),
            "msg": error.get("msg", ""),
            "type": error.get("type", ""),
        }
        for error in exc.errors()
    ]
    return JSONResponse(status_code=422, content={"detail": errors})


def create_router(
    plane: ServingPlane, admin_token: str | None, publisher: FeedbackPublisher | None
) -> APIRouter:
    """The convenience endpoints for ``plane``; ``publisher`` sends /feedback to Kafka."""
    router = APIRouter()

    def require_admin(authorization: str | None) -> str:
        if not admin_token:
            raise Unauthorized("admin API disabled: set CHURN_ADMIN_TOKEN to enable it")
        if authorization is None or not bearer_matches(authorization, admin_token):
            raise Unauthorized()
        return "admin"

    AuthHeader = Annotated[str | None, Header(description="Bearer <CHURN_ADMIN_TOKEN>")]
    # The request bodies are the served contract's (the champion's at start-up), documented
    # with its example record.
    requests = plane.requests
    # SHAP names one contribution per model input: the contract's features and derived ones.
    inputs = len(plane.contract.names) + len(plane.contract.derived)
    summary = "A record as a CRM exports it"
    Record = Annotated[
        requests.single,  # type: ignore[name-defined]  # the served contract's, built at start
        Body(openapi_examples={"record": {"summary": summary, "value": requests.example}}),
    ]
    Records = Annotated[
        requests.batch,  # type: ignore[name-defined]  # the served contract's, built at start
        Body(
            openapi_examples={
                "records": {"summary": summary, "value": {"instances": [requests.example]}}
            }
        ),
    ]

    # Nothing here holds up the event loop: scoring runs on the plane's scoring thread, SHAP on
    # its explanation thread (a first explanation takes seconds), and the handlers that read
    # files or change the router are plain ``def``, run in FastAPI's worker threads. The plane
    # is thread-safe.
    @router.post(
        "/predict",
        tags=["inference"],
        summary="Score one customer (routed)",
        responses=_errors(503),
    )
    async def predict(body: Record) -> dict[str, Any]:
        row = body.model_dump(exclude_none=True)
        return (await plane.scored(lambda: plane.predict([row])))[0].as_dict()

    @router.post(
        "/predict/batch",
        tags=["inference"],
        summary=f"Score up to {MAX_BATCH} customers",
        responses=_errors(503),
    )
    async def predict_batch(body: Records) -> dict[str, Any]:
        rows = [r.model_dump(exclude_none=True) for r in body.instances]
        predictions = await plane.scored(lambda: plane.predict(rows))
        return {"predictions": [p.as_dict() for p in predictions]}

    @router.post(
        "/explain",
        tags=["inference"],
        summary="Top SHAP contributions, or an Alibi anchor rule with method=anchors",
        responses=_errors(404, 409, 503),
    )
    async def explain(
        body: Record,
        method: Literal["shap", "anchors"] = "shap",
        top_k: Annotated[
            int, Query(ge=1, le=inputs, description=f"contributions to list (1-{inputs})")
        ] = 5,
        version: Annotated[str | None, Query(pattern=r"^v[0-9]+$")] = None,
    ) -> dict[str, Any]:
        row = body.model_dump(exclude_none=True)
        if method == "anchors":
            return await plane.explain_anchors(row, version=version)
        return await plane.explained(lambda: plane.explain(row, version=version, top_k=top_k))

    @router.post(
        "/feedback",
        tags=["inference"],
        summary="Report a ground-truth outcome",
        responses=_errors(503),
    )
    async def feedback(body: FeedbackRequest) -> dict[str, Any]:
        now = datetime.now(UTC)
        event = FeedbackEvent(
            event_id=body.event_id or f"api-{uuid.uuid4().hex}",
            customer_id=body.customer_id,
            request_id=body.request_id,
            churned=body.churned,
            outcome_time=body.outcome_time or now,
            observed_at=now,
        )
        if publisher is None:
            raise Unavailable("Kafka is not configured for feedback")
        value = encode_message(Topics.FEEDBACK, event)
        # Awaits the broker's acknowledgement without blocking the event loop.
        await publisher.publish(Topics.FEEDBACK, body.customer_id.encode(), value)
        return {"accepted": True, "event_id": event.event_id}

    @router.get("/router/metrics", tags=["router"], summary="Router state, traffic, latency")
    def router_metrics() -> dict[str, Any]:
        return plane.router_metrics()

    @router.get("/router/shadow-analysis", tags=["router"], summary="Primary vs shadow scores")
    def shadow_analysis(
        version: Annotated[
            str | None,
            Query(pattern=r"^v[0-9]+$", description="Only pairs where this version shadowed"),
        ] = None,
    ) -> dict[str, Any]:
        return plane.shadow_analysis(version)

    @router.post(
        "/router/promote-v2",
        tags=["admin"],
        summary="Promote the challenger",
        responses=_errors(401, 404, 409, 503),
    )
    def promote(authorization: AuthHeader = None) -> dict[str, Any]:
        state = plane.promote(require_admin(authorization))
        return {"champion": state.champion, "strategy": state.strategy}

    @router.post(
        "/router/rollback",
        tags=["admin"],
        summary="Back to the previous champion",
        responses=_errors(401, 404, 409, 503),
    )
    def rollback(authorization: AuthHeader = None) -> dict[str, Any]:
        state = plane.rollback(require_admin(authorization))
        return {
            "champion": state.champion,
            "challenger": state.challenger,
            "strategy": state.strategy,
        }

    @router.put(
        "/router/policy",
        tags=["admin"],
        summary="Set strategy and canary weight",
        responses=_errors(401, 404, 409, 503),
    )
    def set_policy(body: PolicyChange, authorization: AuthHeader = None) -> dict[str, Any]:
        actor = require_admin(authorization)
        state = plane.set_policy(
            strategy=body.strategy,
            canary_weight=body.canary_weight,
            challenger=body.challenger,
            remove_challenger=body.remove_challenger,
            actor=actor,
        )
        return plane.router_metrics()["state"] | {"strategy": state.strategy}

    @router.get(
        "/router/audit",
        tags=["admin"],
        summary="Every router change",
        responses=_errors(401),
    )
    def audit(authorization: AuthHeader = None) -> list[dict[str, Any]]:
        require_admin(authorization)
        return plane.store.audit()

    @router.post(
        "/admin/retrain",
        tags=["admin"],
        summary="Launch the retraining job in Dagster (REST only)",
        description="Launches the platform's `retraining_job` in its Dagster instance through "
        "the Dagster webserver's GraphQL API (`dagster.url`), with `reason` as the run's "
        "`churn/retraining_reason` tag, and answers with the run id once it is queued. Refused "
        "with 409 while a rollout is in progress or pending.",
        responses={
            code: {"model": ErrorBody, "description": text}
            for code, text in _RETRAIN_ERRORS.items()
        },
    )
    async def retrain_now(
        body: RetrainRequest, authorization: AuthHeader = None
    ) -> RetrainResponse:
        require_admin(authorization)
        return await retrain(plane, body)

    @router.get(
        "/metrics",
        tags=["monitoring"],
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    def metrics() -> Response:
        plane.monitoring.refresh()
        body, content_type = plane.metrics.render()
        return Response(content=body, media_type=content_type)

    return router
