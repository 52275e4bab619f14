"""Landing throughput against the raw confluent-kafka consume rate, same broker, same run.

    .venv/bin/python benchmarks/landing.py [--messages 200000] [--batch 5000]

Starts a private embedded broker, produces simulated customer events, then times
(1) a bare consumer reading every message to partition EOF and (2) the real Lander
(decode, validate, Arrow, DuckDB transaction with offsets) draining the same topic.
Prints both rates and their ratio.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import KafkaError, TopicPartition  # noqa: E402

from churn_assets.broker import EmbeddedBroker  # noqa: E402
from churn_assets.config import load_settings  # noqa: E402
from churn_assets.kafka import ensure_topics, make_consumer, make_producer, topic_partitions  # noqa: E402
from churn_assets.landing import Lander  # noqa: E402
from churn_assets.schemas import Topics, encode_message  # noqa: E402
from churn_assets.simulator import SimulationConfig, Simulator  # noqa: E402


def produce(settings, count: int) -> None:
    producer = make_producer(settings)
    simulator = Simulator(SimulationConfig(seed=1, customers=max(count // 100, 100), days=10_000))
    sent = 0
    for _, events in simulator.events():
        for topic, key, payload in events:
            if topic != Topics.CUSTOMERS:
                continue
            value = encode_message(topic, payload)
            while True:
                try:
                    producer.produce(topic, key=key.encode(), value=value)
                    break
                except BufferError:
                    producer.poll(0.05)
            sent += 1
            if sent == count:
                if producer.flush(120):
                    raise RuntimeError("produce did not finish")
                return


def raw_consume(settings) -> tuple[int, float]:
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5_000, help="landing batch size")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config" / "config.yaml"
        config.parent.mkdir()
        config.write_text(
            f"storage:\n  data_dir: {tmp}/data\n  warehouse_path: {tmp}/data/w.duckdb\n"
            f"landing:\n  batch_max_messages: {args.batch}\n  batch_max_seconds: 5\n"
        )
        settings = load_settings(config)
        broker = EmbeddedBroker(settings.run_dir)
        broker.start()
        try:
            ensure_topics(settings)
            started = time.perf_counter()
            produce(settings, args.messages)
            produce_s = time.perf_counter() - started
            raw_count, raw_s = raw_consume(settings)
            report = Lander(settings, Topics.CUSTOMERS).run()
        finally:
            broker.stop()
    if raw_count != args.messages or report.rows_landed != args.messages:
        raise SystemExit(
            f"counts differ: produced {args.messages}, raw {raw_count}, landed {report.rows_landed}"
        )
    raw_rate = raw_count / raw_s
    land_rate = report.rows_landed / report.duration_s
    print(f"messages            {args.messages}")
    print(f"produce (validated) {args.messages / produce_s:12,.0f} msg/s")
    print(f"raw consume         {raw_rate:12,.0f} msg/s  ({raw_s:.2f}s)")
    print(
        f"landing             {land_rate:12,.0f} msg/s  ({report.duration_s:.2f}s, "
        f"{report.batches} batches of <= {args.batch})"
    )
    print(f"landing / raw       {land_rate / raw_rate:12.3f}")


if __name__ == "__main__":
    main()
