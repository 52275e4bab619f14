"""Model management: registered versions and their metrics, the live router state, the rollout
state and its decision history, the router's admin actions (each behind a confirmation) and
retraining with a reason."""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import panel as pn
import param

from dashboards.pages.common import Context, explanation, heading, stat_cards, table
from dashboards.sources import Unavailable
from dashboards.sources.registry import registry_versions
from dashboards.sources.serving import ADMIN_TOKEN_ENV, ActionResult

__all__ = ["ModelsPage"]


@dataclass(frozen=True)
class _Action:
    key: str
    label: str
    confirm: str
    run: Callable[[], ActionResult]


class ModelsPage(pn.viewable.Viewer):
    """Versions, champion/challenger, rollout and the router's admin actions."""

    canary_weight = param.Number(
        default=0.1, bounds=(0.01, 1.0), step=0.01, doc="Challenger's share under canary."
    )

    def __init__(self, context: Context, **params) -> None:
        params.setdefault("canary_weight", context.settings.router.canary_weight or 0.1)
        super().__init__(**params)
        self.context = context
        self.router = pn.Column(sizing_mode="stretch_width")
        self.message = pn.Column(sizing_mode="stretch_width")
        # One confirmation box, shown and hidden: widgets removed inside their own click
        # callback leave the browser referring to models the server has dropped.
        self.confirm_text = pn.pane.Alert("", alert_type="warning")
        confirm = pn.widgets.Button(
            label="Confirm", color="danger", width=120, css_classes=["confirm-action"]
        )
        cancel = pn.widgets.Button(label="Cancel", width=120, css_classes=["cancel-action"])
        confirm.on_click(lambda _event: self._confirm())
        cancel.on_click(lambda _event: self._cancel())
        self.confirmation = pn.Column(
            self.confirm_text, pn.Row(confirm, cancel), visible=False, sizing_mode="stretch_width"
        )
        self._pending: _Action | None = None
        self._state: dict | None = None
        self.buttons = self._buttons()
        self.audit = pn.Column(sizing_mode="stretch_width")
        self.retrain_reason = pn.widgets.TextInput(
            label="Reason for retraining",
            placeholder="e.g. drift in monthly charges since the price change",
            css_classes=["retrain-reason"],
            sizing_mode="stretch_width",
            max_width=520,
        )
        self.retrain_button = pn.widgets.Button(
            label="Retrain", color="primary", width=150, css_classes=["action-retrain"]
        )
        self.retrain_button.on_click(self._retrain)
        self.retrain_result = pn.Column(sizing_mode="stretch_width")
        if not context.serving.admin_enabled:
            self.retrain_button.disabled = True
            self.retrain_result.objects = [
                pn.pane.Alert(
                    f"Retraining is disabled: {ADMIN_TOKEN_ENV} is not set in the dashboard's "
                    "environment (the serving admin API needs it).",
                    alert_type="info",
                    css_classes=["retrain-result"],
                )
            ]
        self._refresh_router()

    # -- live router state ------------------------------------------------------------------------
    def _refresh_router(self) -> None:
        metrics = self.context.serving.router_metrics()
        if isinstance(metrics, Unavailable):
            self.router.objects = [explanation(metrics)]
            self._state = None
        else:
            state = metrics["state"]
            self._state = state
            weights = ", ".join(f"{v} {w:.0%}" for v, w in sorted(metrics["weights"].items()))
            cards = [
                ("Champion", state["champion"], "answers primary traffic", "good"),
                ("Challenger", state["challenger"] or "—", "shadow / canary / green", ""),
                ("Strategy", state["strategy"], f"canary weight {state['canary_weight']:.0%}", ""),
                ("Traffic", weights, "share of primary requests", ""),
                (
                    "Previous champions",
                    ", ".join(state["previous_champions"]) or "—",
                    "rollback goes to the last",
                    "",
                ),
            ]
            self.router.objects = [
                pn.pane.HTML(
                    stat_cards(cards), sizing_mode="stretch_width", css_classes=["router-state"]
                ),
                pn.pane.Markdown(f"Router updated {state['updated_at'][:19]} UTC.", margin=(0, 10)),
            ]
        self._update_buttons()
        audit = self.context.serving.audit()
        if isinstance(audit, Unavailable):
            self.audit.objects = [explanation(audit)]
        else:
            rows = [
                {
                    "at": entry.get("at", "")[:19],
                    "action": entry.get("action"),
                    "actor": entry.get("actor"),
                    "champion": entry["state"]["champion"],
                    "challenger": entry["state"].get("challenger"),
                    "strategy": entry["state"]["strategy"],
                }
                for entry in reversed(audit[-10:])
            ]
            self.audit.objects = [table(pd.DataFrame(rows))] if rows else []

    # -- actions ----------------------------------------------------------------------------------
    def _actions(self) -> dict[str, _Action]:
        serving = self.context.serving
        state = self._state or {}
        challenger = state.get("challenger") or "the challenger"
        champion = state.get("champion") or "the champion"
        previous = (state.get("previous_champions") or ["—"])[-1]
        weight = self.canary_weight
        return {
            "shadow": _Action(
                "shadow",
                "Shadow",
                f"Shadow {challenger}: {champion} answers every request and "
                f"{challenger} is scored beside it.",
                lambda: serving.set_policy("shadow"),
            ),
            "canary": _Action(
                "canary",
                "Canary",
                f"Send {weight:.0%} of customers to {challenger}?",
                lambda: serving.set_policy("canary", canary_weight=weight),
            ),
            "blue_green": _Action(
                "blue_green",
                "Blue-green",
                f"Blue-green: {champion} (blue) answers everything while {challenger} (green) "
                "waits for the switch.",
                lambda: serving.set_policy("blue_green"),
            ),
            "promote": _Action(
                "promote",
                "Promote / switch",
                f"Promote {challenger} to champion? All primary traffic moves to it at once.",
                serving.promote,
            ),
            "rollback": _Action(
                "rollback",
                "Roll back",
                f"Roll back to {previous}? The current champion {champion} becomes the "
                "challenger (a running canary becomes a shadow).",
                serving.rollback,
            ),
        }

    def _buttons(self) -> dict[str, pn.widgets.Button]:
        types = {"promote": "success", "rollback": "danger"}
        buttons = {}
        for key, action in self._actions().items():
            button = pn.widgets.Button(
                label=action.label,
                color=types.get(key, "primary"),
                width=150,
                css_classes=[f"action-{key}"],
            )
            button.on_click(lambda _event, key=key: self._ask(key))
            buttons[key] = button
        return buttons

    def _update_buttons(self) -> None:
        admin = self.context.serving.admin_enabled and self._state is not None
        state = self._state or {}
        for key, button in self.buttons.items():
            allowed = admin
            if key in ("shadow", "canary", "blue_green", "promote"):
                allowed = allowed and bool(state.get("challenger"))
            if key == "rollback":
                allowed = allowed and (
                    bool(state.get("previous_champions")) or state.get("strategy") == "canary"
                )
            button.disabled = not allowed

    def _ask(self, key: str) -> None:
        self._pending = self._actions()[key]
        self.confirm_text.object = (
            f"**Confirm {self._pending.label.lower()}**: {self._pending.confirm}"
        )
        self.confirmation.visible = True

    def _cancel(self) -> None:
        self._pending = None
        self.confirmation.visible = False

    def _confirm(self) -> None:
        action, self._pending = self._pending, None
        self.confirmation.visible = False
        if action is None:
            return
        result = action.run()
        kind = "success" if result.ok else "danger"
        text = f"{action.label}: {result.message}"
        self.message.objects = [pn.pane.Alert(text, alert_type=kind, css_classes=["action-result"])]
        self._refresh_router()

    # -- retraining -------------------------------------------------------------------------------
    async def _retrain(self, _event=None) -> None:
        """Launch the retraining job through the serving admin API, off the event loop (the
        launch takes seconds; other sessions keep being served meanwhile)."""
        reason = self.retrain_reason.value_input.strip()
        if not reason:
            self._show_retrain("Give a reason for retraining first.", "warning")
            return
        self.retrain_button.disabled = True
        self._show_retrain(f"Launching the retraining job ({reason!r})…", "info")
        try:
            result = await asyncio.to_thread(self.context.serving.retrain, reason)
        finally:
            self.retrain_button.disabled = False
        if result.ok:
            self._show_retrain(
                f"Retraining launched: {result.message}, reason {reason!r}.", "success"
            )
        else:
            self._show_retrain(f"Retraining not launched: {result.message}", "danger")

    def _show_retrain(self, text: str, kind: str) -> None:
        self.retrain_result.objects = [
            pn.pane.Alert(text, alert_type=kind, css_classes=["retrain-result", f"retrain-{kind}"])
        ]

    # -- registry and rollout read models ---------------------------------------------------------
    def _versions(self):
        versions = registry_versions(self.context.settings)
        return explanation(versions) if isinstance(versions, Unavailable) else table(versions)

    def _rollout(self):
        state = self.context.read_models.rollout_state()
        if isinstance(state, Unavailable):
            return explanation(state)
        step = state.get("step_index", -1)
        steps = self.context.settings.rollout.canary_steps
        updated = str(state.get("updated_at") or "—")[:19]
        step_text = (
            f"step {step + 1} of {len(steps)} ({steps[step]:.0%})"
            if 0 <= step < len(steps)
            else "—"
        )
        cards = [
            ("Phase", str(state["phase"]).replace("_", " "), f"updated {updated}", ""),
            ("Champion", state["champion"], "", ""),
            ("Challenger", state.get("challenger") or "—", "", ""),
            ("Canary step", step_text, "", ""),
        ]
        return pn.pane.HTML(stat_cards(cards), sizing_mode="stretch_width")

    def _decisions(self):
        decisions = self.context.read_models.rollout_decisions()
        if isinstance(decisions, Unavailable):
            return explanation(decisions)
        shown = pd.DataFrame(
            {
                "decided at": decisions["decided_at"].dt.strftime("%Y-%m-%d %H:%M"),
                "action": decisions["action"],
                "phase": decisions["phase_from"] + " → " + decisions["phase_to"],
                "champion": decisions["champion"],
                "challenger": decisions["challenger"].fillna("—"),
                "traffic": decisions["traffic"].map(lambda t: f"{t:.0%}"),
                "applied": decisions["applied"].map({True: "yes", False: "no"}),
                "reasons": ["; ".join(r) for r in decisions["reasons"]],
            }
        )
        return table(shown, wrap_last=True)

    def __panel__(self):
        admin_note = (
            pn.pane.Markdown(
                "Admin actions call the serving admin API with the dashboard's "
                f"`{ADMIN_TOKEN_ENV}`.",
                margin=(0, 10),
            )
            if self.context.serving.admin_enabled
            else pn.pane.Alert(
                f"Admin actions are disabled: start the dashboard with `{ADMIN_TOKEN_ENV}` set "
                "(the same token as the serving process).",
                alert_type="info",
            )
        )
        weight = pn.widgets.FloatSlider.from_param(
            self.param.canary_weight, label="Canary weight", width=240
        )
        return pn.Column(
            heading("Model management", 2),
            heading("Live router"),
            self.router,
            heading("Actions"),
            admin_note,
            weight,
            pn.FlexBox(*self.buttons.values(), flex_wrap="wrap"),
            self.confirmation,
            self.message,
            heading("Retrain"),
            pn.pane.Markdown(
                "Launches the retraining job in the platform's Dagster instance with your "
                "reason, through the serving admin API (`POST /admin/retrain`); refused while "
                "a rollout is in progress.",
                margin=(0, 10),
            ),
            pn.FlexBox(
                self.retrain_reason,
                self.retrain_button,
                flex_wrap="wrap",
                align_items="flex-end",
                sizing_mode="stretch_width",
            ),
            self.retrain_result,
            heading("Registered versions"),
            self._versions(),
            heading("Rollout"),
            self._rollout(),
            heading("Rollout decisions"),
            self._decisions(),
            heading("Router changes (audit log)"),
            self.audit,
            sizing_mode="stretch_width",
        )
