"""Rollout policy: a pure state machine that turns shadow and canary evidence into decisions.

Phases and transitions (``decide`` unless noted)::

    IDLE / PROMOTED / ROLLED_BACK --start()--> SHADOW
    any phase --adopt()--> IDLE          (someone made another version champion by hand)
    SHADOW --evidence passes, strategy canary--> CANARY step 0
    SHADOW --evidence passes, strategy blue_green--> BLUE_GREEN_READY
    BLUE_GREEN_READY --shadow evidence still passes--> PROMOTED            ("switch")
    CANARY step i --evidence passes--> CANARY step i + 1, or PROMOTED after the last step
    SHADOW / BLUE_GREEN_READY / CANARY --evidence fails--> ROLLED_BACK

Design choices worth knowing:

* **Blue-green is two decisions.** Passing shadow evidence moves to ``BLUE_GREEN_READY`` (green is
  deployed and warm but answers nothing); the *next* call switches all traffic to green, and only
  if the shadow evidence it is given still passes. So a deployment target gets a decision to
  prepare green before the one that moves traffic, and every traffic increase in this module rests
  on evidence that passed in the same decision.
* **Error rates use a one-sided binomial test** (``scipy.stats.binomtest``) of the challenger's
  errors against ``max_error_rate``: a two-proportion test would need the champion's errors,
  which canary evidence does not carry. A step rolls back when the error rate is significantly
  above the maximum (``p < alpha``) or when its point estimate exceeds twice the maximum; a rate
  a little above the maximum that noise explains passes. The significance test alone may roll
  back *before* the step has its minimum sample (failing fast on a clearly broken challenger);
  nothing else is judged on a short sample.
* **AUC.** The challenger rolls back when its AUC is below ``min_auc``
  (``retraining.performance_threshold``), or when it is more than ``max_auc_drop`` below the
  champion's. When the evidence carries the positives behind each AUC, the second rule is a
  one-sided z-test (Hanley-McNeil standard errors, the two arms being different customers):
  roll back only when the challenger is *significantly* (``p < alpha``) below
  ``champion - max_auc_drop``, so a small canary's noise does not sink a good model. Without
  positives the point estimates are compared. While either AUC is still unknown the step waits.
  ``auc_kind`` (realised from labels, or estimated) is reported in the reasons.
* **Elapsed time** of a canary step is the smaller of the evidence's ``elapsed_s`` and
  ``now - step_started_at``, so evidence gathered partly before the step cannot shorten it.
* ``wait`` and ``hold`` leave the state unchanged; every other action appends one history entry
  ``{"at", "from", "to", "action", "reasons", "champion", "challenger", "traffic"}``.
* ``Decision.traffic`` is the share of primary traffic on the version being rolled out after the
  action: 0 in idle, shadow, blue-green-ready and rolled-back states, the step's share during a
  canary, 1.0 once promoted.

The module does no I/O and imports neither Dagster nor the serving package; a deployment target
applies its decisions (for the local server: ``serving.router.promote`` / ``rollback`` and the
canary weight).
"""

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, get_args

from scipy.stats import binomtest, norm

__all__ = [
    "Action",
    "CanaryEvidence",
    "Decision",
    "Phase",
    "RolloutError",
    "RolloutPolicy",
    "RolloutState",
    "ShadowEvidence",
    "TERMINAL_PHASES",
    "adopt",
    "auc_standard_error",
    "decide",
    "start",
    "traffic_share",
]

Action = Literal[
    "wait", "start_shadow", "advance", "promote", "rollback", "switch", "hold", "adopt"
]
AucKind = Literal["realised", "estimated"]


class RolloutError(ValueError):
    """An impossible rollout request: a bad policy, state or evidence, or a wrong-phase call."""


class Phase(StrEnum):
    """Where a rollout stands."""

    IDLE = "idle"
    SHADOW = "shadow"
    CANARY = "canary"
    BLUE_GREEN_READY = "blue_green_ready"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


TERMINAL_PHASES: frozenset[Phase] = frozenset({Phase.IDLE, Phase.PROMOTED, Phase.ROLLED_BACK})
_ACTIVE_PHASES = frozenset({Phase.SHADOW, Phase.CANARY, Phase.BLUE_GREEN_READY})


def _finite(name: str, value: float, low: float = -math.inf, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RolloutError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        raise RolloutError(f"{name} = {value!r} is outside [{low}, {high}] or not finite")


def _count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RolloutError(f"{name} must be a non-negative integer, got {value!r}")


@dataclass(frozen=True)
class RolloutPolicy:
    """Thresholds of a rollout. ``from_settings`` reads them from the platform settings.

    ``min_auc`` (an addition to the thresholds above it) is the absolute floor for the
    challenger's AUC; ``from_settings`` sets it to ``retraining.performance_threshold``.
    """

    canary_steps: tuple[float, ...]
    min_shadow_requests: int
    min_agreement: float = 0.9
    max_score_ks: float = 0.2
    max_latency_overhead_ms: float = 50.0
    max_error_rate: float = 0.01
    max_p99_latency_ms: float = 250.0
    min_canary_requests: int = 200
    min_step_seconds: float = 0.0
    max_auc_drop: float = 0.02
    alpha: float = 0.05
    strategy: Literal["canary", "blue_green"] = "canary"
    min_auc: float = 0.0

    def __post_init__(self) -> None:
        steps = tuple(self.canary_steps)
        object.__setattr__(self, "canary_steps", steps)
        if not steps:
            raise RolloutError("canary_steps must list at least one step")
        for step in steps:
            _finite("canary step", step)
            if not 0.0 < step <= 1.0:
                raise RolloutError(f"canary step {step} is not a traffic share in (0, 1]")
        if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise RolloutError(f"canary_steps {list(steps)} must be strictly increasing")
        _count("min_shadow_requests", self.min_shadow_requests)
        _count("min_canary_requests", self.min_canary_requests)
        _finite("min_agreement", self.min_agreement, 0.0, 1.0)
        _finite("max_score_ks", self.max_score_ks, 0.0, 1.0)
        _finite("max_latency_overhead_ms", self.max_latency_overhead_ms)
        _finite("max_error_rate", self.max_error_rate, 0.0, 1.0)
        if not 0.0 < self.max_error_rate < 1.0:
            raise RolloutError(f"max_error_rate {self.max_error_rate} must be in (0, 1)")
        _finite("max_p99_latency_ms", self.max_p99_latency_ms, 0.0)
        _finite("min_step_seconds", self.min_step_seconds, 0.0)
        _finite("max_auc_drop", self.max_auc_drop, 0.0, 1.0)
        _finite("alpha", self.alpha, 0.0, 1.0)
        _finite("min_auc", self.min_auc, 0.0, 1.0)
        if self.strategy not in ("canary", "blue_green"):
            raise RolloutError(f"strategy {self.strategy!r} is not 'canary' or 'blue_green'")

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> "RolloutPolicy":
        """The policy from validated platform settings (``rollout.*`` and the retraining AUC
        threshold); ``overrides`` replace individual thresholds."""
        rollout = settings.rollout
        values: dict[str, Any] = {
            "canary_steps": tuple(rollout.canary_steps),
            "min_shadow_requests": rollout.min_shadow_requests,
            "min_auc": settings.retraining.performance_threshold,
        }
        for name in (
            "strategy",
            "min_agreement",
            "max_score_ks",
            "max_latency_overhead_ms",
            "max_error_rate",
            "max_p99_latency_ms",
            "min_canary_requests",
            "max_auc_drop",
            "alpha",
        ):
            values[name] = getattr(rollout, name)
        values["min_step_seconds"] = float(rollout.min_step_minutes) * 60.0
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class RolloutState:
    """A rollout's state; persist it with ``to_dict`` / ``from_dict``."""

    phase: Phase
    champion: str
    challenger: str | None
    step_index: int = -1
    step_started_at: float | None = None
    history: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "phase", Phase(self.phase))
        except ValueError as exc:
            raise RolloutError(f"unknown phase {self.phase!r}") from exc
        object.__setattr__(self, "history", tuple(self.history))
        if not isinstance(self.champion, str) or not self.champion:
            raise RolloutError(f"champion must be a non-empty version name, got {self.champion!r}")
        if self.phase in _ACTIVE_PHASES and not self.challenger:
            raise RolloutError(f"phase {self.phase} needs a challenger")
        if self.phase in TERMINAL_PHASES and self.challenger is not None:
            raise RolloutError(f"phase {self.phase} has no challenger, got {self.challenger!r}")
        if self.challenger is not None and self.challenger == self.champion:
            raise RolloutError(f"{self.champion} cannot be champion and challenger at once")
        if self.phase is Phase.CANARY:
            if isinstance(self.step_index, bool) or not isinstance(self.step_index, int):
                raise RolloutError(f"step_index must be an integer, got {self.step_index!r}")
            if self.step_index < 0:
                raise RolloutError(f"a canary needs step_index >= 0, got {self.step_index}")
        elif self.step_index != -1:
            raise RolloutError(f"phase {self.phase} has no canary step, got {self.step_index}")
        if self.step_started_at is not None:
            _finite("step_started_at", self.step_started_at)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {
            "phase": self.phase.value,
            "champion": self.champion,
            "challenger": self.challenger,
            "step_index": self.step_index,
            "step_started_at": self.step_started_at,
            "history": [dict(entry, reasons=list(entry["reasons"])) for entry in self.history],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RolloutState":
        """The state from ``to_dict``'s output (after a JSON round trip too)."""
        try:
            return cls(
                phase=data["phase"],
                champion=data["champion"],
                challenger=data.get("challenger"),
                step_index=data.get("step_index", -1),
                step_started_at=data.get("step_started_at"),
                history=tuple(dict(entry) for entry in data.get("history", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, RolloutError):
                raise
            raise RolloutError(f"rollout state is corrupt: {exc!r}") from exc


@dataclass(frozen=True)
class ShadowEvidence:
    """What the shadow analysis saw: challenger scores beside the champion's answers.

    ``requests`` are the requests the challenger scored; ``errors`` those it failed to score.
    """

    requests: int
    agreement_rate: float
    ks_statistic: float
    latency_overhead_ms: float
    errors: int = 0

    def __post_init__(self) -> None:
        _count("shadow requests", self.requests)
        _count("shadow errors", self.errors)
        _finite("shadow agreement_rate", self.agreement_rate, 0.0, 1.0)
        _finite("shadow ks_statistic", self.ks_statistic, 0.0, 1.0)
        _finite("shadow latency_overhead_ms", self.latency_overhead_ms)


@dataclass(frozen=True)
class CanaryEvidence:
    """What the canary analysis saw during the current step."""

    requests: int
    errors: int
    p99_latency_ms: float
    champion_auc: float | None
    challenger_auc: float | None
    champion_labelled: int
    challenger_labelled: int
    auc_kind: AucKind
    elapsed_s: float
    champion_positives: float | None = None
    challenger_positives: float | None = None

    def __post_init__(self) -> None:
        _count("canary requests", self.requests)
        _count("canary errors", self.errors)
        if self.errors > self.requests:
            raise RolloutError(f"canary errors {self.errors} exceed requests {self.requests}")
        _finite("canary p99_latency_ms", self.p99_latency_ms, 0.0)
        for name in ("champion_auc", "challenger_auc"):
            value = getattr(self, name)
            if value is not None:
                _finite(f"canary {name}", value, 0.0, 1.0)
        _count("canary champion_labelled", self.champion_labelled)
        _count("canary challenger_labelled", self.challenger_labelled)
        if self.auc_kind not in get_args(AucKind):
            raise RolloutError(f"auc_kind {self.auc_kind!r} is not one of {get_args(AucKind)}")
        _finite("canary elapsed_s", self.elapsed_s, 0.0)
        for name, rows in (
            ("champion_positives", self.champion_labelled),
            ("challenger_positives", self.challenger_labelled),
        ):
            value = getattr(self, name)
            if value is not None:
                _finite(f"canary {name}", value, 0.0, float(rows))


@dataclass(frozen=True)
class Decision:
    """One decision: what to do, the state after it, and why."""

    action: Action
    next_state: RolloutState
    traffic: float
    reasons: tuple[str, ...]
    figures: dict[str, float] = field(default_factory=dict)


def traffic_share(state: RolloutState, policy: RolloutPolicy) -> float:
    """Share of primary traffic on the version being rolled out, in ``state``."""
    if state.phase is Phase.CANARY:
        _check_step(state, policy)
        return policy.canary_steps[state.step_index]
    if state.phase is Phase.PROMOTED:
        return 1.0
    return 0.0


def _check_step(state: RolloutState, policy: RolloutPolicy) -> None:
    if not 0 <= state.step_index < len(policy.canary_steps):
        raise RolloutError(
            f"canary step_index {state.step_index} is outside the policy's "
            f"{len(policy.canary_steps)} steps {list(policy.canary_steps)}"
        )


def _transition(
    state: RolloutState,
    action: Action,
    *,
    now: float | None,
    reasons: list[str],
    figures: dict[str, float],
    phase: Phase,
    champion: str,
    challenger: str | None,
    step_index: int = -1,
    traffic: float,
) -> Decision:
    entry = {
        "at": now,
        "from": state.phase.value,
        "to": phase.value,
        "action": action,
        "reasons": list(reasons),
        "champion": state.champion,
        "challenger": state.challenger if state.challenger is not None else challenger,
        "traffic": traffic,
    }
    next_state = RolloutState(
        phase=phase,
        champion=champion,
        challenger=challenger,
        step_index=step_index,
        step_started_at=now if phase in _ACTIVE_PHASES else None,
        history=(*state.history, entry),
    )
    return Decision(action, next_state, traffic, tuple(reasons), figures)


def _stay(
    state: RolloutState,
    policy: RolloutPolicy,
    action: Action,
    reasons: list[str],
    figures: dict[str, float],
) -> Decision:
    return Decision(action, state, traffic_share(state, policy), tuple(reasons), figures)


def _advance(
    state: RolloutState,
    phase: Phase,
    step_index: int,
    traffic: float,
    now: float,
    reasons: list[str],
    figures: dict[str, float],
) -> Decision:
    """The same champion and challenger, one phase or canary step further."""
    return _transition(
        state,
        "advance",
        now=now,
        reasons=reasons,
        figures=figures,
        phase=phase,
        champion=state.champion,
        challenger=state.challenger,
        step_index=step_index,
        traffic=traffic,
    )


def _rollback(
    state: RolloutState, now: float, reasons: list[str], figures: dict[str, float]
) -> Decision:
    return _transition(
        state,
        "rollback",
        now=now,
        reasons=reasons,
        figures=figures,
        phase=Phase.ROLLED_BACK,
        champion=state.champion,
        challenger=None,
        traffic=0.0,
    )


def _promote(
    state: RolloutState,
    action: Action,
    now: float,
    reasons: list[str],
    figures: dict[str, float],
) -> Decision:
    assert state.challenger is not None  # guaranteed by RolloutState for active phases
    return _transition(
        state,
        action,
        now=now,
        reasons=reasons,
        figures=figures,
        phase=Phase.PROMOTED,
        champion=state.challenger,
        challenger=None,
        traffic=1.0,
    )


def start(state: RolloutState, challenger: str, *, now: float | None = None) -> Decision:
    """Start shadowing ``challenger`` from an idle, promoted or rolled-back state.

    ``now`` is recorded in the history (``None`` when the caller gives no time).
    """
    if state.phase not in TERMINAL_PHASES:
        raise RolloutError(
            f"cannot start a rollout of {challenger!r}: {state.challenger!r} is in phase "
            f"{state.phase}; finish or roll it back first"
        )
    if not isinstance(challenger, str) or not challenger:
        raise RolloutError(f"challenger must be a non-empty version name, got {challenger!r}")
    if challenger == state.champion:
        raise RolloutError(f"{challenger} is already the champion")
    if now is not None:
        _finite("now", now)
    reasons = [f"shadowing challenger {challenger} beside champion {state.champion}"]
    return _transition(
        state,
        "start_shadow",
        now=now,
        reasons=reasons,
        figures={"traffic": 0.0},
        phase=Phase.SHADOW,
        champion=state.champion,
        challenger=challenger,
        traffic=0.0,
    )


def auc_standard_error(auc: float, positives: float, rows: float) -> float | None:
    """Hanley-McNeil (1982) standard error of a ROC-AUC from ``positives`` of ``rows``; None when
    either class is empty."""
    negatives = rows - positives
    if positives <= 0 or negatives <= 0:
        return None
    q1 = auc / (2.0 - auc)
    q2 = 2.0 * auc * auc / (1.0 + auc)
    variance = (
        auc * (1.0 - auc)
        + (positives - 1.0) * (q1 - auc * auc)
        + (negatives - 1.0) * (q2 - auc * auc)
    ) / (positives * negatives)
    return math.sqrt(max(variance, 0.0))


def _auc_drop_p_value(canary: CanaryEvidence, max_drop: float) -> float | None:
    """One-sided p-value of "challenger AUC >= champion AUC - max_drop"; None without positives."""
    assert canary.champion_auc is not None and canary.challenger_auc is not None
    if canary.champion_positives is None or canary.challenger_positives is None:
        return None
    champion_se = auc_standard_error(
        canary.champion_auc, canary.champion_positives, canary.champion_labelled
    )
    challenger_se = auc_standard_error(
        canary.challenger_auc, canary.challenger_positives, canary.challenger_labelled
    )
    if champion_se is None or challenger_se is None:
        return None
    se = math.sqrt(champion_se * champion_se + challenger_se * challenger_se)
    margin = canary.challenger_auc - (canary.champion_auc - max_drop)
    if se == 0.0:
        return 0.0 if margin < 0 else 1.0
    return float(norm.cdf(margin / se))


def adopt(state: RolloutState, champion: str, *, now: float, reason: str) -> Decision:
    """Record that ``champion`` serves all traffic because of a change made outside the rollout
    (an operator's promote or rollback); any rollout in progress ends. The deployment already
    is what the decision describes, so a target has nothing to apply."""
    _finite("now", now)
    if not isinstance(champion, str) or not champion:
        raise RolloutError(f"champion must be a non-empty version name, got {champion!r}")
    if champion == state.champion and state.phase in TERMINAL_PHASES:
        raise RolloutError(f"{champion} already is the champion in phase {state.phase}")
    return _transition(
        state,
        "adopt",
        now=now,
        reasons=[reason],
        figures={"traffic": 0.0},
        phase=Phase.IDLE,
        champion=champion,
        challenger=None,
        traffic=0.0,
    )


def _judge_shadow(
    shadow: ShadowEvidence, policy: RolloutPolicy
) -> tuple[bool, list[str], dict[str, float]]:
    figures = {
        "shadow_requests": float(shadow.requests),
        "min_shadow_requests": float(policy.min_shadow_requests),
        "agreement_rate": shadow.agreement_rate,
        "min_agreement": policy.min_agreement,
        "ks_statistic": shadow.ks_statistic,
        "max_score_ks": policy.max_score_ks,
        "latency_overhead_ms": shadow.latency_overhead_ms,
        "max_latency_overhead_ms": policy.max_latency_overhead_ms,
    }
    checks = [
        (
            shadow.agreement_rate >= policy.min_agreement,
            f"agreement {shadow.agreement_rate:.4f}",
            f"min {policy.min_agreement:.4f}",
            ">=",
            "<",
        ),
        (
            shadow.ks_statistic <= policy.max_score_ks,
            f"score KS {shadow.ks_statistic:.4f}",
            f"max {policy.max_score_ks:.4f}",
            "<=",
            ">",
        ),
        (
            shadow.latency_overhead_ms <= policy.max_latency_overhead_ms,
            f"latency overhead {shadow.latency_overhead_ms:.1f} ms",
            f"max {policy.max_latency_overhead_ms:.1f} ms",
            "<=",
            ">",
        ),
    ]
    passed = all(ok for ok, *_ in checks)
    reasons = [
        f"{what} {good if ok else bad} {limit}"
        for ok, what, limit, good, bad in checks
        if ok == passed
    ]
    return passed, [f"shadow over {shadow.requests} requests: {r}" for r in reasons], figures


def _decide_shadow(
    state: RolloutState, policy: RolloutPolicy, shadow: ShadowEvidence | None, now: float
) -> Decision:
    if shadow is None:
        return _stay(state, policy, "wait", ["no shadow evidence yet"], {})
    if shadow.errors:
        # A challenger that fails to score is judged like a canary's errors, before anything
        # else and on any sample: the binomial test needs no minimum to be significant.
        attempts = shadow.requests + shadow.errors
        rate = shadow.errors / attempts
        p_value = binomtest(shadow.errors, attempts, policy.max_error_rate, "greater").pvalue
        if p_value < policy.alpha or rate > 2 * policy.max_error_rate:
            reason = (
                f"shadow scoring errors {shadow.errors}/{attempts} (rate {rate:.4f}) vs max "
                f"{policy.max_error_rate:.4f}, binomial p={p_value:.4g} vs alpha {policy.alpha}"
            )
            figures = {
                "shadow_errors": float(shadow.errors),
                "shadow_error_rate": rate,
                "max_error_rate": policy.max_error_rate,
                "error_p_value": p_value,
            }
            return _rollback(state, now, [reason], figures)
    if shadow.requests < policy.min_shadow_requests:
        reason = (
            f"shadow requests {shadow.requests} < min {policy.min_shadow_requests}; "
            "waiting for more"
        )
        figures = {
            "shadow_requests": float(shadow.requests),
            "min_shadow_requests": float(policy.min_shadow_requests),
        }
        return _stay(state, policy, "wait", [reason], figures)
    passed, reasons, figures = _judge_shadow(shadow, policy)
    if not passed:
        return _rollback(state, now, reasons, figures)
    if state.phase is Phase.BLUE_GREEN_READY:
        reasons.append(f"switching all traffic to {state.challenger}")
        return _promote(state, "switch", now, reasons, figures)
    if policy.strategy == "blue_green":
        reasons.append(f"green {state.challenger} ready; the next passing decision switches")
        return _advance(state, Phase.BLUE_GREEN_READY, -1, 0.0, now, reasons, figures)
    first = policy.canary_steps[0]
    reasons.append(f"starting canary step 1/{len(policy.canary_steps)} at {first:.0%} traffic")
    return _advance(state, Phase.CANARY, 0, first, now, reasons, figures)


def _decide_canary(
    state: RolloutState, policy: RolloutPolicy, canary: CanaryEvidence | None, now: float
) -> Decision:
    _check_step(state, policy)
    index, steps = state.step_index, policy.canary_steps
    share = steps[index]
    label = f"canary step {index + 1}/{len(steps)} ({share:.0%})"
    if canary is None:
        return _stay(state, policy, "wait", [f"{label}: no canary evidence yet"], {})
    if state.step_started_at is not None and now < state.step_started_at:
        raise RolloutError(f"now {now} precedes the step's start {state.step_started_at}")
    elapsed = canary.elapsed_s
    if state.step_started_at is not None:
        elapsed = min(elapsed, now - state.step_started_at)

    error_rate = canary.errors / canary.requests if canary.requests else 0.0
    p_value = (
        binomtest(canary.errors, canary.requests, policy.max_error_rate, "greater").pvalue
        if canary.requests
        else 1.0
    )
    figures: dict[str, float] = {
        "step": float(index),
        "traffic": share,
        "requests": float(canary.requests),
        "min_canary_requests": float(policy.min_canary_requests),
        "elapsed_s": elapsed,
        "min_step_seconds": policy.min_step_seconds,
        "errors": float(canary.errors),
        "error_rate": error_rate,
        "max_error_rate": policy.max_error_rate,
        "error_p_value": p_value,
        "alpha": policy.alpha,
        "p99_latency_ms": canary.p99_latency_ms,
        "max_p99_latency_ms": policy.max_p99_latency_ms,
        "champion_labelled": float(canary.champion_labelled),
        "challenger_labelled": float(canary.challenger_labelled),
    }
    error_text = (
        f"error rate {error_rate:.4f} ({canary.errors}/{canary.requests}) vs max "
        f"{policy.max_error_rate:.4f}, binomial p={p_value:.4g} vs alpha {policy.alpha}"
    )
    if p_value < policy.alpha:
        return _rollback(state, now, [f"{label}: {error_text}: significantly above"], figures)

    short = []
    if canary.requests < policy.min_canary_requests:
        short.append(f"requests {canary.requests} < min {policy.min_canary_requests}")
    if elapsed < policy.min_step_seconds:
        short.append(f"elapsed {elapsed:.0f} s < min {policy.min_step_seconds:.0f} s")
    if short:
        return _stay(state, policy, "wait", [f"{label}: {'; '.join(short)}"], figures)

    failures, passes = [], []
    if error_rate > 2 * policy.max_error_rate:
        failures.append(f"{error_text}: above twice the max")
    else:
        passes.append(f"{error_text}: not significantly above")
    p99_text = f"p99 latency {canary.p99_latency_ms:.1f} ms"
    if canary.p99_latency_ms > policy.max_p99_latency_ms:
        failures.append(f"{p99_text} > max {policy.max_p99_latency_ms:.1f} ms")
    else:
        passes.append(f"{p99_text} <= max {policy.max_p99_latency_ms:.1f} ms")

    auc_known = canary.champion_auc is not None and canary.challenger_auc is not None
    if canary.challenger_auc is not None:
        figures["challenger_auc"] = canary.challenger_auc
        figures["min_auc"] = policy.min_auc
        auc_text = f"{canary.auc_kind} challenger AUC {canary.challenger_auc:.4f}"
        if canary.challenger_auc < policy.min_auc:
            failures.append(f"{auc_text} < performance threshold {policy.min_auc:.4f}")
        else:
            passes.append(f"{auc_text} >= performance threshold {policy.min_auc:.4f}")
    if canary.champion_auc is not None:
        figures["champion_auc"] = canary.champion_auc
    if auc_known:
        assert canary.champion_auc is not None and canary.challenger_auc is not None
        floor = canary.champion_auc - policy.max_auc_drop
        figures["auc_drop"] = canary.champion_auc - canary.challenger_auc
        figures["max_auc_drop"] = policy.max_auc_drop
        auc_text = (
            f"{canary.auc_kind} challenger AUC {canary.challenger_auc:.4f} "
            f"(n={canary.challenger_labelled}) vs champion {canary.champion_auc:.4f} "
            f"(n={canary.champion_labelled}) - max drop {policy.max_auc_drop:.4f} = {floor:.4f}"
        )
        p_drop = _auc_drop_p_value(canary, policy.max_auc_drop)
        if p_drop is None:
            if canary.challenger_auc < floor:
                failures.append(f"{auc_text}: too low")
            else:
                passes.append(f"{auc_text}: within")
        else:
            figures["auc_drop_p_value"] = p_drop
            auc_text += f", one-sided z-test p={p_drop:.4g} vs alpha {policy.alpha}"
            if p_drop < policy.alpha:
                failures.append(f"{auc_text}: significantly too low")
            else:
                passes.append(f"{auc_text}: not significantly below")

    if failures:
        return _rollback(state, now, [f"{label}: {f}" for f in failures], figures)
    if not auc_known:
        return _stay(state, policy, "wait", [f"{label}: no performance evidence yet"], figures)
    reasons = [f"{label}: {p}" for p in passes]
    if index == len(steps) - 1:
        reasons.append(f"last step passed; promoting {state.challenger}")
        return _promote(state, "promote", now, reasons, figures)
    nxt = steps[index + 1]
    reasons.append(f"advancing to step {index + 2}/{len(steps)} at {nxt:.0%} traffic")
    return _advance(state, Phase.CANARY, index + 1, nxt, now, reasons, figures)


def decide(
    state: RolloutState,
    policy: RolloutPolicy,
    *,
    shadow: ShadowEvidence | None = None,
    canary: CanaryEvidence | None = None,
    now: float,
) -> Decision:
    """The next decision for ``state`` given the latest evidence, at time ``now`` (seconds).

    SHADOW and BLUE_GREEN_READY read ``shadow``; CANARY reads ``canary``; IDLE, PROMOTED and
    ROLLED_BACK hold. Missing or short evidence waits; failing evidence rolls back.
    """
    _finite("now", now)
    for evidence, kind in ((shadow, ShadowEvidence), (canary, CanaryEvidence)):
        if evidence is not None and not isinstance(evidence, kind):
            raise RolloutError(f"expected {kind.__name__}, got {type(evidence).__name__}")
    if state.phase in (Phase.SHADOW, Phase.BLUE_GREEN_READY):
        return _decide_shadow(state, policy, shadow, now)
    if state.phase is Phase.CANARY:
        return _decide_canary(state, policy, canary, now)
    reason = {
        Phase.IDLE: f"no rollout in progress; {state.champion} serves all traffic",
        Phase.PROMOTED: f"{state.champion} was promoted; start() a new challenger to roll out",
        Phase.ROLLED_BACK: f"rolled back; {state.champion} serves all traffic",
    }[state.phase]
    return _stay(state, policy, "hold", [reason], {"traffic": traffic_share(state, policy)})
