"""Landing throughput against the raw confluent-kafka consume rate, same broker, same run.

    .venv/bin/python benchmarks/landing.py [--messages 1000000] [--batch 5000] [--repeats 3]

Starts a private embedded broker and produces simulated customer events (a pool of simulated,
validated events, each produced under a unique event id as pre-encoded bytes, so a million take
seconds), then:

1. times a bare consumer reading every message to partition EOF (the baseline) and the real
   Lander (decode, validate, Arrow, DuckDB transaction with offsets, read-model publish)
   draining the same topic into an empty warehouse; prints both rates and their ratio;
2. times each part of landing alone on the same messages (the floors): consuming them with
   their values, partitions and offsets; decoding them (``decode_batch``); and DuckDB inserting
   the decoded batches, a transaction each with checkpoints deferred as in a drain, into the
   landed table (primary key and business-key index), into a copy with the business-key index
   only and into an index-free copy, closing (checkpointing) included;
3. produces 10,000 more events and times landing them (a) into a copy of that warehouse, which
   holds ``--messages`` rows, and (b) into an empty warehouse whose offsets start at the same
   place; both runs publish their read models. Repeated ``--repeats`` times, interleaved;
   prints the medians and their ratio.
"""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from confluent_kafka import KafkaError, Message, TopicPartition  # noqa: E402

from churn_assets.batch_decode import decode_batch  # noqa: E402
from churn_assets.broker import EmbeddedBroker  # noqa: E402
from churn_assets.config import Settings, load_settings  # noqa: E402
from churn_assets.kafka import ensure_topics, make_consumer, make_producer, topic_partitions  # noqa: E402
from churn_assets.landing import Lander, _drain_settings  # noqa: E402
from churn_assets.schemas import Topics, encode_message  # noqa: E402
from churn_assets.simulator import SimulationConfig, Simulator  # noqa: E402
from churn_assets.warehouse import connect, ensure_schema, read_model_rows  # noqa: E402

POOL = 20_000  # distinct simulated events; produced again under new ids beyond that
INCREMENT = 10_000


def event_pool(size: int) -> list[tuple[bytes, bytes, bytes]]:
    """Validated simulated events split around their event id: (key, before id, after id)."""
    simulator = Simulator(SimulationConfig(seed=1, customers=max(size // 100, 100), days=10_000))
    pool = []
    for _, events in simulator.events():
        for topic, key, payload in events:
            if topic != Topics.CUSTOMERS:
                continue
            value = encode_message(topic, payload)
            marker = f'"event_id":"{payload["event_id"]}"'.encode()
            before, _, after = value.partition(marker)
            pool.append((key.encode(), before + b'"event_id":"', b'"' + after))
            if len(pool) == size:
                return pool
    return pool


def produce(settings: Settings, pool, start: int, count: int) -> None:
    """``count`` events with ids ``bench-<start>`` on, the pool's events in turn."""
    producer = make_producer(settings)
    for n in range(start, start + count):
        key, before, after = pool[n % len(pool)]
        value = before + b"bench-%d" % n + after
        while True:
            try:
                producer.produce(Topics.CUSTOMERS, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(300):
        raise RuntimeError("produce did not finish")


def raw_consume(settings: Settings) -> tuple[int, float]:
    partitions = topic_partitions(settings, Topics.CUSTOMERS)
    consumer = make_consumer(settings, group_id="bench-raw", **{"fetch.wait.max.ms": 100})
    consumer.assign([TopicPartition(Topics.CUSTOMERS, p, 0) for p in partitions])
    count, eof = 0, set()
    started = time.perf_counter()
    while len(eof) < len(partitions):
        for message in consumer.consume(10_000, 0.1):
            error = message.error()
            if error is None:
                count += 1
            elif error.code() == KafkaError._PARTITION_EOF:
                eof.add(message.partition())
            else:
                raise RuntimeError(error)
    elapsed = time.perf_counter() - started
    consumer.close()
    return count, elapsed


def consume_batches(settings: Settings, batch: int, keep: bool) -> tuple[list[tuple], int, float]:
    """Every message's value, partition and offset, in batches of ``batch``, as landing's
    reader takes them; how many, and the seconds it took. Without ``keep`` each batch is dropped
    once taken, as landing drops it once landed (a million values kept cost the allocator more
    than taking them)."""
    partitions = topic_partitions(settings, Topics.CUSTOMERS)
    consumer = make_consumer(settings, group_id="bench-floor", **{"fetch.wait.max.ms": 100})
    consumer.assign([TopicPartition(Topics.CUSTOMERS, p, 0) for p in partitions])
    batches, pending, eof, count = [], [], set(), 0
    started = time.perf_counter()
    while len(eof) < len(partitions):
        messages = consumer.consume(batch, 0.01)
        if not any(map(Message.error, messages)):
            pending.extend(messages)
        else:
            for message in messages:
                error = message.error()
                if error is None:
                    pending.append(message)
                elif error.code() == KafkaError._PARTITION_EOF:
                    eof.add(message.partition())
                else:
                    raise RuntimeError(error)
        while len(pending) >= batch or (pending and len(eof) == len(partitions)):
            taken, pending = pending[:batch], pending[batch:]
            taken_batch = (
                list(map(Message.value, taken)),
                np.fromiter(map(Message.partition, taken), np.int32, len(taken)),
                np.fromiter(map(Message.offset, taken), np.int64, len(taken)),
            )
            count += len(taken)
            if keep:
                batches.append(taken_batch)
    elapsed = time.perf_counter() - started
    consumer.close()
    return batches, count, elapsed


def floors(settings: Settings, batch: int, root: Path) -> list[tuple[str, int, float]]:
    """Each part of landing alone on the topic's messages: (part, messages, seconds)."""
    _, count, consume_s = consume_batches(settings, batch, keep=False)
    batches = consume_batches(settings, batch, keep=True)[0]
    started = time.perf_counter()
    decoded = [
        decode_batch(Topics.CUSTOMERS, values, settings.contract) for values, _, _ in batches
    ]
    decode_s = time.perf_counter() - started
    landed_at = pa.scalar(datetime.now(UTC), pa.timestamp("us", tz="UTC"))
    tables = []
    for (_, partitions, offsets), batch_rows in zip(batches, decoded, strict=True):
        rows, positions = batch_rows.rows, pa.array(batch_rows.positions)
        tables.append(
            rows.append_column("kafka_epoch", pa.repeat(pa.scalar("floor"), len(rows)))
            .append_column("kafka_topic", pa.repeat(pa.scalar(Topics.CUSTOMERS), len(rows)))
            .append_column("kafka_partition", pa.array(partitions).take(positions))
            .append_column("kafka_offset", pa.array(offsets).take(positions))
            .append_column("landed_at", pa.repeat(landed_at, len(rows)))
        )
    parts = [("consume + values", count, consume_s), ("decode", count, decode_s)]
    for part, table in (
        ("insert, landed table", "landed_customer_events"),
        ("insert, id index only", "id_index_only"),
        ("insert, no index", "no_index"),
    ):
        path = root / f"floor-{table}.duckdb"
        with connect(path) as con:
            ensure_schema(con, settings.contract)
            # Copies of the landed table without its constraints; one gets the id's index back.
            con.execute("CREATE TABLE no_index AS FROM landed_customer_events LIMIT 0")
            con.execute("CREATE TABLE id_index_only AS FROM landed_customer_events LIMIT 0")
            con.execute("CREATE UNIQUE INDEX id_index_only_event_id ON id_index_only (event_id)")
            started = time.perf_counter()
            with _drain_settings(con):
                for landed in tables:  # noqa: B007 - read by DuckDB below
                    con.begin()
                    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM landed")
                    con.commit()
        parts.append((part, count, time.perf_counter() - started))
        path.unlink()
    return parts


def write_settings(root: Path, batch: int, bootstrap_from: Settings | None = None) -> Settings:
    config = root / "config" / "config.yaml"
    config.parent.mkdir(parents=True)
    text = (
        f"storage:\n  data_dir: {root}/data\n  warehouse_path: {root}/data/w.duckdb\n"
        f"landing:\n  batch_max_messages: {batch}\n  batch_max_seconds: 5\n"
    )
    if bootstrap_from is not None:  # the first broker: its address is in its run dir
        text += f"kafka:\n  bootstrap_servers: {bootstrap_address(bootstrap_from)}\n"
    config.write_text(text)
    return load_settings(config)


def bootstrap_address(settings: Settings) -> str:
    from churn_assets.kafka import client_config

    return client_config(settings)["bootstrap.servers"]


def land_increment(settings: Settings, seed_from: Settings | None) -> float:
    """Land what is new on the topic into ``settings``' warehouse; an empty warehouse gets the
    offsets of ``seed_from``'s first (so both land the same messages)."""
    if seed_from is not None:
        with connect(seed_from.warehouse_path, read_only=True) as con:
            offsets = con.execute("SELECT * FROM landing_offsets").fetchall()
            columns = [d[0] for d in con.description]
        with connect(settings.warehouse_path) as con:
            ensure_schema(con, settings.contract)
            placeholders = ", ".join("?" * len(columns))
            con.executemany(
                f"INSERT INTO landing_offsets ({', '.join(columns)}) VALUES ({placeholders})",
                offsets,
            )
    report = Lander(settings, Topics.CUSTOMERS).run()
    if report.rows_landed != INCREMENT:
        raise SystemExit(f"landed {report.rows_landed} of the {INCREMENT} new messages")
    return report.duration_s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument(
        "--batch", type=int, default=20_000, help="landing batch size (the config default)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the 10k landings")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = write_settings(root / "main", args.batch)
        broker = EmbeddedBroker(settings.run_dir)
        broker.start()
        try:
            ensure_topics(settings)
            pool = event_pool(min(POOL, args.messages))
            started = time.perf_counter()
            produce(settings, pool, 0, args.messages)
            produce_s = time.perf_counter() - started
            raw_count, raw_s = raw_consume(settings)
            report = Lander(settings, Topics.CUSTOMERS).run()
            if raw_count != args.messages or report.rows_landed != args.messages:
                raise SystemExit(
                    f"counts differ: produced {args.messages}, raw {raw_count}, "
                    f"landed {report.rows_landed}"
                )
            published = read_model_rows(settings.read_models_dir, "landed_customer_events")
            parts = floors(settings, args.batch, root)

            produce(settings, pool, args.messages, INCREMENT)
            into_full: list[float] = []
            into_empty: list[float] = []
            for repeat in range(args.repeats):
                full = write_settings(root / f"full-{repeat}", args.batch, settings)
                shutil.copytree(settings.data_dir, full.data_dir)
                into_full.append(land_increment(full, None))
                empty = write_settings(root / f"empty-{repeat}", args.batch, settings)
                into_empty.append(land_increment(empty, settings))
                for done in (full, empty):
                    shutil.rmtree(done.data_dir)
        finally:
            broker.stop()
    raw_rate = raw_count / raw_s
    land_rate = report.rows_landed / report.duration_s
    print(f"messages            {args.messages}")
    print(f"produce (bytes)     {args.messages / produce_s:12,.0f} msg/s")
    print(f"raw consume         {raw_rate:12,.0f} msg/s  ({raw_s:.2f}s)")
    print(
        f"landing             {land_rate:12,.0f} msg/s  ({report.duration_s:.2f}s, "
        f"{report.batches} batches of <= {args.batch}, read model {published} rows)"
    )
    print(f"landing / raw       {land_rate / raw_rate:12.3f}")
    print("floors: each part alone on the same messages (rate, seconds, share of the landing run)")
    for part, count, seconds in parts:
        print(
            f"  {part:22s}{count / seconds:12,.0f} msg/s  ({seconds:.2f}s, "
            f"{seconds / report.duration_s:.0%})"
        )
    full_s, empty_s = statistics.median(into_full), statistics.median(into_empty)
    print(
        f"{INCREMENT} into {args.messages} rows  {full_s:8.3f}s  (runs: "
        f"{', '.join(f'{s:.3f}' for s in into_full)})"
    )
    print(
        f"{INCREMENT} into empty       {empty_s:8.3f}s  (runs: "
        f"{', '.join(f'{s:.3f}' for s in into_empty)})"
    )
    print(f"into full / empty   {full_s / empty_s:12.3f}")


if __name__ == "__main__":
    main()
