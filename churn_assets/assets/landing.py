"""Landing assets: one per data topic, each a thin wrapper around the core ``Lander``."""

from typing import TYPE_CHECKING

import dagster as dg

from churn_assets.landing import Lander, LandingReport
from churn_assets.resources import PlatformResource
from churn_assets.schemas import DATA_TOPICS, Topics
from churn_assets.warehouse import LANDING_TABLES

if TYPE_CHECKING:  # the type Dagster takes for a metadata value, not re-exported by ``dagster``
    from dagster._core.definitions.metadata import RawMetadataValue

__all__ = ["WAREHOUSE_POOL", "landing_assets", "landing_asset_key"]

WAREHOUSE_POOL = "duckdb_warehouse"


def landing_asset_key(topic: str) -> dg.AssetKey:
    return dg.AssetKey(LANDING_TABLES[topic])


def _metadata(
    report: LandingReport, counts: dict[str, int], table: str
) -> dict[str, "RawMetadataValue"]:
    return {
        "rows_landed": dg.MetadataValue.int(report.rows_landed),
        "kafka_epoch": dg.MetadataValue.text(report.kafka_epoch or "none"),
        "replayed": dg.MetadataValue.int(report.replayed),
        "replayed_total": dg.MetadataValue.int(report.replayed_total),
        "dead_lettered": dg.MetadataValue.int(report.dead_lettered),
        "dead_letters_republished": dg.MetadataValue.int(report.dead_letters_republished),
        "dead_letters_published": dg.MetadataValue.int(report.dead_letters_published),
        "dead_letters_pending": dg.MetadataValue.int(report.dead_letters_pending),
        "batches": dg.MetadataValue.int(report.batches),
        "offset_ranges": dg.MetadataValue.text(report.describe_ranges()),
        "reached_end_of_topic": dg.MetadataValue.bool(report.reached_eof),
        "kafka_commit_failures": dg.MetadataValue.int(report.kafka_commit_failures),
        "duration_s": dg.MetadataValue.float(round(report.duration_s, 3)),
        "read_model_rows_written": dg.MetadataValue.int(report.read_model_rows_written),
        "read_model_parts": dg.MetadataValue.int(report.read_model_parts),
        "dagster/row_count": dg.MetadataValue.int(counts[table]),
        "dead_letters_total": dg.MetadataValue.int(counts["dead_letters"]),
    }


def _build_landing_asset(topic: str) -> dg.AssetsDefinition:
    table = LANDING_TABLES[topic]

    @dg.asset(
        name=table,
        group_name="landing",
        kinds={"kafka", "duckdb"},
        pool=WAREHOUSE_POOL,
        description=(
            f"Messages of Kafka topic `{topic}`, validated against their schema (customer events "
            "and prediction features against the configured feature contract) and landed into "
            f"DuckDB table `{table}` with an exactly-once effect (offsets stored in the same "
            "transaction; a message whose own id has landed already is counted as a replay, "
            "not inserted; invalid messages go to `dead_letters` with the reason and, at least "
            "once, to the dead-letter topic)."
        ),
        metadata={"kafka_topic": topic, "table": table},
    )
    def _landing(
        context: dg.AssetExecutionContext, platform: PlatformResource
    ) -> dg.MaterializeResult:
        settings = platform.settings()

        def progress(report: LandingReport) -> None:
            context.log.info(
                f"{topic}: batch {report.batches}: {report.rows_landed} rows landed, "
                f"{report.replayed} replayed, {report.dead_lettered} dead-lettered so far"
            )

        report = Lander(settings, topic, on_batch=progress).run()
        counts = report.published
        context.log.info(
            f"{topic}: landed {report.rows_landed} rows, {report.replayed} replayed (not "
            f"inserted), {report.dead_lettered} dead letters, offsets {report.describe_ranges()}"
        )
        if report.dead_letters_pending:
            context.log.warning(
                f"{topic}: {report.dead_letters_pending} dead letters are not confirmed on the "
                "dead-letter topic yet; the next landing run republishes them"
            )
        metadata = _metadata(report, counts, table)
        if topic != Topics.FEEDBACK:
            # Customer events (and prediction features) were validated against this contract.
            metadata["feature_contract"] = dg.MetadataValue.text(str(settings.contract_path))
            metadata["contract_digest"] = dg.MetadataValue.text(settings.contract.digest)
        return dg.MaterializeResult(metadata=metadata)

    return _landing


landing_assets = [_build_landing_asset(topic) for topic in DATA_TOPICS]
