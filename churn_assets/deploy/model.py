"""The deployment model: where primary traffic should go, and what applies it.

A rollout ``Decision`` (``churn_assets.rollout``) says where traffic should be; ``deployment_for``
turns it into a ``Deployment`` (which version is champion, which is challenger, how much primary
traffic the challenger gets, whether it is only shadowed) and a ``DeploymentTarget`` applies that.
``Deployment.strategy`` is ``shadow``, ``canary``, ``blue_green`` (the challenger is deployed and
warm but answers nothing) or ``single`` (only the champion is served: idle, promoted and
rolled-back rollouts).
"""

import math
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from churn_assets.rollout import Decision, Phase, RolloutPolicy, RolloutState, traffic_share

__all__ = [
    "STRATEGIES",
    "Deployment",
    "DeploymentError",
    "DeploymentTarget",
    "Strategy",
    "deployment_for",
]

Strategy = Literal["shadow", "canary", "blue_green", "single"]
STRATEGIES: tuple[str, ...] = ("shadow", "canary", "blue_green", "single")


class DeploymentError(RuntimeError):
    """A deployment could not be rendered, validated or applied; the message says why."""


@dataclass(frozen=True)
class Deployment:
    """Where primary traffic should go: the desired state a target applies.

    ``challenger_traffic`` is the challenger's share of primary traffic in [0, 1]; it is positive
    only for a canary. ``shadow`` means the challenger scores a mirror of every request.
    """

    strategy: str
    champion: str
    challenger: str | None
    challenger_traffic: float
    shadow: bool

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise DeploymentError(f"strategy {self.strategy!r} is not one of {STRATEGIES}")
        if not self.champion:
            raise DeploymentError("a deployment needs a champion version")
        traffic = self.challenger_traffic
        if isinstance(traffic, bool) or not isinstance(traffic, int | float):
            raise DeploymentError(f"challenger_traffic must be a number, got {traffic!r}")
        if not math.isfinite(traffic) or not 0.0 <= traffic <= 1.0:
            raise DeploymentError(f"challenger_traffic {traffic!r} is outside [0, 1]")
        if self.strategy == "single":
            if self.challenger is not None or traffic or self.shadow:
                raise DeploymentError("a 'single' deployment has no challenger, traffic or shadow")
            return
        if not self.challenger or self.challenger == self.champion:
            raise DeploymentError(
                f"strategy {self.strategy!r} needs a challenger other than {self.champion!r}"
            )
        if self.shadow != (self.strategy == "shadow"):
            raise DeploymentError("shadow=True goes with strategy 'shadow' and only with it")
        if self.strategy == "canary" and traffic <= 0.0:
            raise DeploymentError(f"a canary needs challenger_traffic > 0, got {traffic}")
        if self.strategy != "canary" and traffic:
            raise DeploymentError(f"strategy {self.strategy!r} sends the challenger no traffic")

    @property
    def live_versions(self) -> tuple[str, ...]:
        """The versions that must be deployed: the champion, then any challenger."""
        return (self.champion,) if self.challenger is None else (self.champion, self.challenger)


def deployment_for(
    source: Decision | RolloutState, policy: RolloutPolicy | None = None
) -> Deployment:
    """The deployment a rollout decision (its ``next_state`` and ``traffic``) or state asks for.

    A bare ``RolloutState`` in the canary phase needs ``policy`` to know the step's traffic.
    """
    if isinstance(source, Decision):
        state, traffic = source.next_state, source.traffic
    elif isinstance(source, RolloutState):
        state = source
        if state.phase is Phase.CANARY and policy is None:
            raise DeploymentError("a canary state needs the rollout policy to know its traffic")
        traffic = traffic_share(state, policy) if policy is not None else 0.0
    else:
        raise DeploymentError(f"expected a rollout Decision or RolloutState, got {source!r}")
    phase = state.phase
    if phase is Phase.SHADOW:
        return Deployment("shadow", state.champion, state.challenger, 0.0, shadow=True)
    if phase is Phase.CANARY:
        return Deployment("canary", state.champion, state.challenger, float(traffic), shadow=False)
    if phase is Phase.BLUE_GREEN_READY:
        return Deployment("blue_green", state.champion, state.challenger, 0.0, shadow=False)
    # IDLE, PROMOTED (the rollout state already names the new champion), ROLLED_BACK.
    return Deployment("single", state.champion, None, 0.0, shadow=False)


@runtime_checkable
class DeploymentTarget(Protocol):
    """Something that serves model versions and can be told where traffic goes."""

    def apply(self, deployment: Deployment) -> dict[str, Any]:
        """Make the target serve ``deployment``; return what was done."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-safe facts about the target (no secrets)."""
        ...
