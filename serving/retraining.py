"""``POST /admin/retrain``: the manual retraining trigger of the serving API.

It launches the platform's ``retraining_job`` in the Dagster instance through the webserver's
GraphQL API (:mod:`churn_assets.job_launch`), with the caller's reason as the run's
``churn/retraining_reason`` tag, and answers with the run id at once (the daemon runs the job).
It refuses while a rollout is in progress or pending: the job would end by registering a
challenger in place of the one being judged, which ``registered_model`` refuses anyway, so the
refusal comes now, with the reason, instead of as a failed run later. Both checks read files, and
the launch is two HTTP calls: they run in a worker thread, never on the event loop.
"""

import asyncio

from pydantic import BaseModel, ConfigDict, Field

from churn_assets.job_launch import (
    REASON_TAG,
    REQUESTED_VIA_TAG,
    RETRAINING_JOB,
    LaunchError,
    graphql_url,
    launch_job,
)
from churn_assets.rollout_control import rollout_in_progress
from serving.errors import ServingError, Unavailable
from serving.plane import ServingPlane

__all__ = ["RetrainRequest", "RetrainResponse", "retrain", "rollout_blocker"]

REQUESTED_VIA = "serving admin API"


class RetrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(
        min_length=1,
        max_length=500,
        pattern=r"\S",
        description="Why retrain now: recorded as the run's churn/retraining_reason tag",
        examples=["new pricing launched on 2026-03-01"],
    )


class RetrainResponse(BaseModel):
    run_id: str = Field(description="The Dagster run that retrains (queued; the daemon runs it)")
    job: str = Field(description="The Dagster job launched: retraining_job")
    reason: str


def rollout_blocker(plane: ServingPlane) -> str | None:
    """Why retraining must wait, or None: a canary taking traffic in this server, or a rollout
    in progress or pending (a registered challenger not judged yet) per the registry and the
    rollout's state, the check ``registered_model`` makes."""
    state = plane.state
    if state.strategy == "canary" and state.challenger and state.canary_weight > 0:
        return (
            f"a canary of {state.challenger} takes {state.canary_weight:.0%} of the traffic; "
            "let the rollout finish or roll it back (POST /router/rollback) before retraining"
        )
    rolling = rollout_in_progress(plane.settings)
    if rolling is not None:
        return (
            f"a rollout of {rolling} is in progress or pending (`churn rollout status`): a new "
            "challenger would replace the one being judged; let it finish or roll it back "
            "(POST /router/rollback) before retraining"
        )
    return None


def _launch(plane: ServingPlane, reason: str) -> RetrainResponse:
    blocker = rollout_blocker(plane)
    if blocker is not None:
        raise ServingError(blocker, 409)
    try:
        run = launch_job(
            graphql_url(plane.settings.dagster),
            RETRAINING_JOB,
            {REASON_TAG: reason, REQUESTED_VIA_TAG: REQUESTED_VIA},
        )
    except LaunchError as exc:
        raise Unavailable(f"retraining not launched: {exc}") from exc
    return RetrainResponse(run_id=run.run_id, job=run.job, reason=reason)


async def retrain(plane: ServingPlane, request: RetrainRequest) -> RetrainResponse:
    """Launch the retraining job for ``request`` (409 mid-rollout, 503 when Dagster cannot be
    reached or refuses), off the event loop."""
    return await asyncio.to_thread(_launch, plane, request.reason)
