"""``kafka_landing_sensor``: launches a landing run for each data topic that has new messages."""

import json

import dagster as dg

from churn_assets.assets.landing import landing_asset_key
from churn_assets.kafka import has_new_data, topic_log
from churn_assets.resources import PlatformResource
from churn_assets.schemas import DATA_TOPICS

__all__ = ["kafka_landing_sensor"]


@dg.sensor(
    name="kafka_landing_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[landing_asset_key(topic) for topic in DATA_TOPICS],
    description=(
        "Requests a landing run for every data topic whose partitions hold messages past the "
        "landing consumer group's committed offsets. Run keys come from the log's epoch and the "
        "broker's watermarks, so the same backlog never launches two runs."
    ),
)
def kafka_landing_sensor(
    context: dg.SensorEvaluationContext, platform: PlatformResource
) -> dg.SensorResult:
    settings = platform.settings()
    cursor = json.loads(context.cursor) if context.cursor else {}
    requests = []
    for topic in DATA_TOPICS:
        news = has_new_data(settings, topic)
        if not news:
            continue
        marks = ",".join(f"{p}:{w}" for p, w in sorted(news.items()))
        # The log's epoch keeps a restarted broker's new log (offsets from 0 again) from
        # repeating an earlier run key, which Dagster would skip.
        run_key = f"{topic}@{topic_log(settings, topic).epoch}@{marks}"
        cursor[topic] = marks
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
