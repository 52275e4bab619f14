"""Router policy: pure strategies (request + policy -> primary target, shadow targets) and the
persistent router state with its audit log.

Strategies:

* ``shadow``: the champion answers; the challenger is scored off the request path and never
  touches the response.
* ``canary``: a sticky share of customers (``canary_weight``) is answered by the challenger; the
  split hashes ``customer_id`` with a fixed salt, so one customer always meets the same version.
* ``blue_green``: all traffic goes to the champion ("blue"); the challenger ("green") scores a
  mirror of every request off the request path, so it is warm and the switch is judged on fresh
  evidence; switching promotes green instantly, and rollback switches back.
"""

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from churn_assets.registry import CHAMPION_HISTORY_LIMIT

__all__ = [
    "STRATEGIES",
    "Route",
    "RouterError",
    "RouterState",
    "RouterStore",
    "route",
    "bucket",
    "reconcile",
]

Strategy = Literal["shadow", "canary", "blue_green"]
STRATEGIES: tuple[str, ...] = ("shadow", "canary", "blue_green")
HASH_SALT = "churn-router-v1"


class RouterError(ValueError):
    """An impossible router change (unknown strategy, no challenger to promote, ...)."""


@dataclass(frozen=True)
class RouterState:
    strategy: str
    champion: str
    challenger: str | None = None
    canary_weight: float = 0.1
    previous_champions: tuple[str, ...] = ()
    updated_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def validate(self) -> "RouterState":
        if self.strategy not in STRATEGIES:
            raise RouterError(f"strategy {self.strategy!r} is not one of {STRATEGIES}")
        if not 0.0 <= self.canary_weight <= 1.0:
            raise RouterError(f"canary_weight {self.canary_weight} is outside [0, 1]")
        if self.challenger == self.champion:
            raise RouterError(f"{self.champion} cannot be champion and challenger at once")
        return self

    def weights(self) -> dict[str, float]:
        """Share of primary traffic per version."""
        if self.strategy == "canary" and self.challenger:
            return {self.champion: 1.0 - self.canary_weight, self.challenger: self.canary_weight}
        return {self.champion: 1.0}


@dataclass(frozen=True)
class Route:
    primary: str
    arm: Literal["primary", "canary"]
    shadows: tuple[str, ...] = ()


def bucket(customer_id: str) -> float:
    """A stable number in [0, 1) for a customer (salted SHA-256, not Python's hash())."""
    digest = hashlib.sha256(f"{HASH_SALT}:{customer_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def route(state: RouterState, customer_id: str) -> Route:
    """Where one request goes. Pure: the same state and customer give the same route."""
    if state.strategy in ("shadow", "blue_green") and state.challenger:
        return Route(primary=state.champion, arm="primary", shadows=(state.challenger,))
    if state.strategy == "canary" and state.challenger:
        if bucket(customer_id) < state.canary_weight:
            return Route(primary=state.challenger, arm="canary")
        return Route(primary=state.champion, arm="primary")
    return Route(primary=state.champion, arm="primary")


class RouterStore:
    """Router state persisted as JSON (atomic replace) plus an append-only audit log (JSONL)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.state_path = directory / "router_state.json"
        self.audit_path = directory / "router_audit.jsonl"
        self._lock = threading.Lock()

    def load(self) -> RouterState | None:
        if not self.state_path.is_file():
            return None
        try:
            data = json.loads(self.state_path.read_text())
            data["previous_champions"] = tuple(data.get("previous_champions", ()))
            return RouterState(**data).validate()
        except (ValueError, TypeError) as exc:
            raise RouterError(f"router state {self.state_path} is corrupt: {exc}") from exc

    def save(
        self, state: RouterState, *, action: str, actor: str, detail: dict[str, Any]
    ) -> RouterState:
        state = replace(state, updated_at=datetime.now(UTC).isoformat()).validate()
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.state_path.with_suffix(f".{os.getpid()}.tmp")
            payload = asdict(state)
            payload["previous_champions"] = list(state.previous_champions)
            tmp.write_text(json.dumps(payload, indent=1))
            os.replace(tmp, self.state_path)
            entry = {
                "at": state.updated_at,
                "action": action,
                "actor": actor,
                **detail,
                "state": payload,
            }
            with self.audit_path.open("a") as audit:
                audit.write(json.dumps(entry) + "\n")
        return state

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_path.is_file():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line]


def promote(state: RouterState) -> RouterState:
    """The challenger becomes champion (blue-green switch / end of a canary)."""
    if not state.challenger:
        raise RouterError("there is no challenger to promote")
    return replace(
        state,
        champion=state.challenger,
        challenger=None,
        previous_champions=_pushed(state.previous_champions, state.champion),
    )


def _pushed(history: tuple[str, ...], version: str) -> tuple[str, ...]:
    """``history`` with ``version`` on top, the oldest dropped past the registry's limit."""
    return (*history, version)[-CHAMPION_HISTORY_LIMIT:]


def rollback(state: RouterState) -> RouterState:
    """Stop a running canary, or else undo the last promotion.

    A canary with traffic on the challenger is the most recent change, so it is what a rollback
    stops: the challenger goes back to shadow and the champion keeps all traffic (an earlier
    promotion stands). Otherwise the previous champion answers again and the demoted version
    stays loaded as the challenger, in shadow, with no traffic.
    """
    if state.strategy == "canary" and state.challenger and state.canary_weight > 0:
        return replace(state, strategy="shadow")
    if state.previous_champions:
        previous = state.previous_champions[-1]
        return replace(
            state,
            champion=previous,
            challenger=state.champion,
            previous_champions=state.previous_champions[:-1],
            strategy="shadow" if state.strategy == "canary" else state.strategy,
        )
    raise RouterError("there is no previous champion to roll back to and no canary to stop")


def reconcile(
    state: RouterState, champion: str | None, challenger: str | None
) -> tuple[RouterState, tuple[str, ...]]:
    """``state`` (restored at start-up) brought in line with the registry's aliases, and what
    changed, one phrase per change; no changes means ``state`` is served exactly as stored.

    The registry says which versions serve (its aliases move while serving is down: a training
    run registers a challenger, ``churn models promote`` / ``rollback`` move the champion); the
    router state says how traffic is split. So:

    * A different registry champion wins. If it is one of ``previous_champions``, the registry
      rolled back to it: the champions after it are dropped from the history, as the router's
      own rollback pops them. Otherwise it was promoted: the stored champion is kept on
      ``previous_champions`` for a rollback, as the router's promote records it.
    * A challenger that is new, different or serving under a new champion is served in shadow
      with no canary weight: it gets no traffic until the rollout's next decision starts it.
    * A challenger whose alias is gone is dropped, and with it any canary weight.
    * Without a registry champion there is nothing to reconcile against: the state stands.
    """
    if champion is None:
        return state, ()
    changes: list[str] = []
    reconciled = state
    if champion != state.champion:
        history = state.previous_champions
        if champion in history:
            kept = history[: len(history) - 1 - history[::-1].index(champion)]
            reconciled = replace(reconciled, champion=champion, previous_champions=kept)
            changes.append(f"champion {state.champion} -> {champion} (rolled back in the registry)")
        else:
            reconciled = replace(
                reconciled, champion=champion, previous_champions=_pushed(history, state.champion)
            )
            changes.append(
                f"champion {state.champion} -> {champion} (promoted in the registry; "
                f"{state.champion} kept for rollback)"
            )
    wanted = None if challenger == champion else challenger
    if wanted is None and state.challenger is not None:
        if state.challenger != champion:
            changes.append(f"challenger {state.challenger} dropped (no challenger alias)")
        reconciled = replace(reconciled, challenger=None)
        if reconciled.strategy == "canary":
            reconciled = replace(reconciled, strategy="shadow", canary_weight=0.0)
    elif wanted is not None and (wanted != state.challenger or champion != state.champion):
        reconciled = replace(reconciled, challenger=wanted, strategy="shadow", canary_weight=0.0)
        changes.append(
            f"challenger {wanted} served in shadow, no traffic (was {state.challenger or 'none'})"
        )
    if reconciled.strategy != state.strategy:
        weight = f" at {state.canary_weight:g}" if state.strategy == "canary" else ""
        changes.append(f"strategy {state.strategy}{weight} -> {reconciled.strategy}")
    return reconciled.validate(), tuple(changes)


__all__ += ["promote", "rollback"]
