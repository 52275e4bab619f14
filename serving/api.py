"""The product's convenience REST endpoints, mounted on MLServer's FastAPI app.

Admin endpoints need ``Authorization: Bearer <token>`` where the token comes from the
``CHURN_ADMIN_TOKEN`` environment variable; without it configured, admin calls are refused.
"""

import asyncio
import hmac
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from serving.errors import ServingError, Unauthorized, Unavailable
from serving.plane import BatchPredictRequest, PredictRequest, ServingPlane

__all__ = ["create_router", "serving_error_handler", "validation_error_handler"]


class PolicyChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: Literal["shadow", "canary", "blue_green"] | None = None
    canary_weight: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    challenger: str | None = Field(default=None, pattern=r"^v[0-9]+$")
    remove_challenger: bool = Field(
        default=False,
        description="Stop serving and shadowing the challenger (the champion answers alone).",
    )


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_id: str = Field(min_length=1, max_length=128)
    request_id: str | None = Field(default=None, max_length=128)
    churned: bool
    outcome_time: AwareDatetime | None = None


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


FEEDBACK_DELIVERY_S = 5.0


def _deliver(producer: Any, topic: str, key: bytes, value: bytes) -> None:
    """Produce one message and wait for Kafka's acknowledgement of exactly it; a message that
    was not delivered (queue full, expired, refused) is :class:`Unavailable`, so a 2xx means
    the broker has it."""
    outcome: list[Any] = []
    try:
        producer.produce(topic, key=key, value=value, on_delivery=lambda e, _m: outcome.append(e))
    except BufferError as exc:
        raise Unavailable(f"feedback not accepted: {exc}") from exc
    producer.flush(FEEDBACK_DELIVERY_S)
    if not outcome:
        raise Unavailable(
            f"feedback could not be delivered to Kafka within {FEEDBACK_DELIVERY_S:.0f} s; retry"
        )
    if outcome[0] is not None:
        raise Unavailable(f"feedback was not delivered to Kafka ({outcome[0]}); retry")


def create_router(
    plane: ServingPlane, admin_token: str | None, feedback_producer: Any
) -> APIRouter:
    """The convenience endpoints for ``plane``; ``feedback_producer`` sends /feedback."""
    router = APIRouter()

    def require_admin(authorization: str | None) -> str:
        if not admin_token:
            raise Unauthorized("admin API disabled: set CHURN_ADMIN_TOKEN to enable it")
        expected = f"Bearer {admin_token}"
        if authorization is None or not hmac.compare_digest(authorization, expected):
            raise Unauthorized()
        return "admin"

    AuthHeader = Annotated[str | None, Header(description="Bearer <CHURN_ADMIN_TOKEN>")]

    @router.post("/predict", tags=["inference"], summary="Score one customer (routed)")
    async def predict(body: PredictRequest) -> dict[str, Any]:
        return plane.predict([body.model_dump(exclude_none=True)])[0].as_dict()

    @router.post("/predict/batch", tags=["inference"], summary="Score up to 1000 customers")
    async def predict_batch(body: BatchPredictRequest) -> dict[str, Any]:
        rows = [r.model_dump(exclude_none=True) for r in body.instances]
        return {"predictions": [p.as_dict() for p in plane.predict(rows)]}

    @router.post(
        "/explain",
        tags=["inference"],
        summary="Top SHAP contributions, or an Alibi anchor rule with method=anchors",
    )
    async def explain(
        body: PredictRequest,
        method: Literal["shap", "anchors"] = "shap",
        top_k: Annotated[int, Query(ge=1, le=11)] = 5,
        version: Annotated[str | None, Query(pattern=r"^v[0-9]+$")] = None,
    ) -> dict[str, Any]:
        row = body.model_dump(exclude_none=True)
        if method == "anchors":
            return await plane.explain_anchors(row, version=version)
        return plane.explain(row, version=version, top_k=top_k)

    @router.post("/feedback", tags=["inference"], summary="Report a ground-truth outcome")
    async def feedback(body: FeedbackRequest) -> dict[str, Any]:
        from churn_assets.schemas import FeedbackEvent, Topics, encode_message

        now = datetime.now(UTC)
        event = FeedbackEvent(
            event_id=f"api-{uuid.uuid4().hex}",
            customer_id=body.customer_id,
            request_id=body.request_id,
            churned=body.churned,
            outcome_time=body.outcome_time or now,
            observed_at=now,
        )
        if feedback_producer is None:
            raise Unavailable("Kafka is not configured for feedback")
        value = encode_message(Topics.FEEDBACK, event)
        # Waiting for Kafka's acknowledgement blocks: off the event loop, so one slow broker
        # never stalls the other requests.
        await asyncio.to_thread(
            _deliver, feedback_producer, Topics.FEEDBACK, body.customer_id.encode(), value
        )
        return {"accepted": True, "event_id": event.event_id}

    @router.get("/router/metrics", tags=["router"], summary="Router state, traffic, latency")
    async def router_metrics() -> dict[str, Any]:
        return plane.router_metrics()

    @router.get("/router/shadow-analysis", tags=["router"], summary="Primary vs shadow scores")
    async def shadow_analysis(
        version: Annotated[
            str | None,
            Query(pattern=r"^v[0-9]+$", description="Only pairs where this version shadowed"),
        ] = None,
    ) -> dict[str, Any]:
        return plane.shadow_analysis(version)

    @router.post("/router/promote-v2", tags=["admin"], summary="Promote the challenger")
    async def promote(authorization: AuthHeader = None) -> dict[str, Any]:
        state = plane.promote(require_admin(authorization))
        return {"champion": state.champion, "strategy": state.strategy}

    @router.post("/router/rollback", tags=["admin"], summary="Back to the previous champion")
    async def rollback(authorization: AuthHeader = None) -> dict[str, Any]:
        state = plane.rollback(require_admin(authorization))
        return {
            "champion": state.champion,
            "challenger": state.challenger,
            "strategy": state.strategy,
        }

    @router.put("/router/policy", tags=["admin"], summary="Set strategy and canary weight")
    async def set_policy(body: PolicyChange, authorization: AuthHeader = None) -> dict[str, Any]:
        actor = require_admin(authorization)
        state = plane.set_policy(
            strategy=body.strategy,
            canary_weight=body.canary_weight,
            challenger=body.challenger,
            remove_challenger=body.remove_challenger,
            actor=actor,
        )
        return plane.router_metrics()["state"] | {"strategy": state.strategy}

    @router.get("/router/audit", tags=["admin"], summary="Every router change")
    async def audit(authorization: AuthHeader = None) -> list[dict[str, Any]]:
        require_admin(authorization)
        return plane.store.audit()

    @router.get("/metrics", tags=["monitoring"], summary="Prometheus metrics")
    async def metrics() -> Response:
        plane.monitoring.refresh()
        body, content_type = plane.metrics.render()
        return Response(content=body, media_type=content_type)

    return router
