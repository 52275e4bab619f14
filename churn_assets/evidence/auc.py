"""Which AUC a canary is judged on: realised when both arms have enough labels, else estimated.

Both evidence sources have AUC rows per version, arm and kind (the router source from the
monitoring read model, the warehouse source from its own SQL); this picks the pair the canary
compares and turns it into :class:`~churn_assets.rollout.CanaryEvidence` fields.
"""

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["auc_fields", "auc_pair"]


def auc_pair(
    rows: Iterable[Mapping[str, Any]], champion: str, challenger: str, min_labelled: int
) -> dict[str, Any]:
    """Champion (primary arm) and challenger (canary arm) AUC rows of one kind: realised when
    both have ``min_labelled`` labels, else estimated; ``{}`` when there is neither."""
    by_key = {(r["model_version"], r["arm"], r["kind"]): r for r in rows}
    for kind in ("realised", "estimated"):
        champ = by_key.get((champion, "primary", kind))
        chall = by_key.get((challenger, "canary", kind))
        if kind == "realised" and not (
            champ
            and chall
            and champ["labelled"] >= min_labelled
            and chall["labelled"] >= min_labelled
        ):
            continue
        return {"kind": kind, "champion": champ, "challenger": chall}
    return {}


def auc_fields(pair: Mapping[str, Any]) -> dict[str, Any]:
    """The AUC fields of :class:`~churn_assets.rollout.CanaryEvidence` for an :func:`auc_pair`."""
    kind = pair.get("kind", "estimated")
    champ, chall = pair.get("champion"), pair.get("challenger")

    def rows_behind(row: Mapping[str, Any] | None) -> int:
        if row is None:
            return 0
        return int(row["labelled"] if kind == "realised" else row.get("rows", 0))

    def positives(row: Mapping[str, Any] | None) -> float | None:
        if row is None or row.get("positives") is None:
            return None
        return min(float(row["positives"]), float(rows_behind(row)))

    def auc(row: Mapping[str, Any] | None) -> float | None:
        return None if row is None or row.get("roc_auc") is None else float(row["roc_auc"])

    return {
        "champion_auc": auc(champ),
        "challenger_auc": auc(chall),
        "champion_labelled": rows_behind(champ),
        "challenger_labelled": rows_behind(chall),
        "auc_kind": kind,
        "champion_positives": positives(champ),
        "challenger_positives": positives(chall),
    }
