"""``kafka_landing_sensor``: launches a landing run for each data topic that has new messages, or
dead letters that never reached the dead-letter topic."""

import json
from pathlib import Path

import dagster as dg
import duckdb

from churn_assets.assets.landing import landing_asset_key
from churn_assets.kafka import has_new_data, topic_log
from churn_assets.resources import PlatformResource
from churn_assets.schemas import DATA_TOPICS
from churn_assets.warehouse import ReadModelMissing, read_model_table

__all__ = ["kafka_landing_sensor"]


def _unconfirmed_dead_letters(read_models_dir: Path) -> dict[str, str]:
    """Per topic, a fingerprint (count and newest) of its dead letters not yet confirmed on the
    dead-letter topic, from the published ``dead_letters`` read model (never the live warehouse),
    read through one open file (:func:`read_model_table`)."""
    try:
        dead_letters = read_model_table(read_models_dir, "dead_letters")
    except ReadModelMissing:
        return {}
    if "published_at" not in dead_letters.column_names:
        return {}  # published before the outbox; the next landing run migrates and republishes
    con = duckdb.connect()
    try:
        con.register("dead_letters", dead_letters)
        rows = con.execute(
            "SELECT kafka_topic, count(*), max(landed_at)::VARCHAR FROM dead_letters "
            "WHERE published_at IS NULL GROUP BY kafka_topic"
        ).fetchall()
    finally:
        con.close()
    return {topic: f"{count}:{newest}" for topic, count, newest in rows}


@dg.sensor(
    name="kafka_landing_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[landing_asset_key(topic) for topic in DATA_TOPICS],
    description=(
        "Requests a landing run for every data topic whose partitions hold messages past the "
        "landing consumer group's committed offsets. Run keys come from the log's epoch and the "
        "broker's watermarks, so the same backlog never launches two runs. A topic without new "
        "messages whose dead letters are not confirmed on the dead-letter topic (the last run "
        "could not deliver them) gets one run per such state, which republishes them."
    ),
)
def kafka_landing_sensor(
    context: dg.SensorEvaluationContext, platform: PlatformResource
) -> dg.SensorResult:
    settings = platform.settings()
    cursor = json.loads(context.cursor) if context.cursor else {}
    pending = _unconfirmed_dead_letters(settings.read_models_dir)
    requests = []
    for topic in DATA_TOPICS:
        news = has_new_data(settings, topic)
        if news:
            marks = ",".join(f"{p}:{w}" for p, w in sorted(news.items()))
            # The log's epoch keeps a restarted broker's new log (offsets from 0 again) from
            # repeating an earlier run key, which Dagster would skip.
            run_key = f"{topic}@{topic_log(settings, topic).epoch}@{marks}"
            cursor[topic] = marks
        elif topic in pending:
            run_key = f"{topic}@dead-letters-unconfirmed@{pending[topic]}"
        else:
            continue
        requests.append(
            dg.RunRequest(
                run_key=run_key,
                asset_selection=[landing_asset_key(topic)],
                tags={"churn/kafka_topic": topic},
            )
        )
    if not requests:
        return dg.SensorResult(skip_reason="no new messages on the data topics")
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor, sort_keys=True))
