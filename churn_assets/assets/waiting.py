"""Assets whose input does not exist yet wait instead of failing.

At start-up nothing has been landed, served or trained yet; an asset asked to run on nothing
(``live_performance`` before any prediction exists) is not broken, it is early. Such assets are
declared with ``output_required=False`` and, when their input is missing, call :func:`wait_for`
and yield nothing: the step succeeds without a materialisation, Dagster skips whatever depends on
the asset in the same run (and its checks), and the asset's history shows an observation saying
what it waits for. Missing data that is a real fault (a malformed table, too little history to
train on) still fails loudly.
"""

import dagster as dg

__all__ = ["WAITING_FOR", "wait_for"]

# The metadata key of the observation a waiting asset records.
WAITING_FOR = "waiting_for"


def wait_for(context: dg.AssetExecutionContext, what: str) -> None:
    """Record on the asset that it waits for ``what`` (an observation and a log line), for an
    asset that then yields nothing."""
    message = f"waiting for {what}"
    context.log_event(
        dg.AssetObservation(
            asset_key=context.asset_key,
            description=message,
            metadata={WAITING_FOR: what},
        )
    )
    context.log.info(f"{context.asset_key.to_user_string()}: {message}; nothing to do yet")
