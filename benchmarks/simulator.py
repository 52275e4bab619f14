"""Simulator throughput to the embedded broker, against raw produce of the same bytes.

    .venv/bin/python benchmarks/simulator.py [--customers 5000] [--days 60]

Runs `produce_simulation` (generate, validate against the schema, produce) to a private embedded
broker, then produces the identical pre-encoded messages with no generation or validation as the
baseline, in the same run. Prints events/s for both and their ratio.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from churn_assets.broker import EmbeddedBroker  # noqa: E402
from churn_assets.config import load_settings  # noqa: E402
from churn_assets.kafka import ensure_topics, make_producer  # noqa: E402
from churn_assets.schemas import encode_message  # noqa: E402
from churn_assets.simulator import SimulationConfig, Simulator, produce_simulation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=5_000)
    parser.add_argument("--days", type=int, default=60)
    args = parser.parse_args()
    config = SimulationConfig(customers=args.customers, days=args.days)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config" / "config.yaml"
        path.parent.mkdir()
        path.write_text(f"storage:\n  data_dir: {tmp}/data\n")
        settings = load_settings(path)
        broker = EmbeddedBroker(settings.run_dir)
        broker.start()
        try:
            ensure_topics(settings)
            started = time.perf_counter()
            summary = produce_simulation(make_producer(settings), Simulator(config))
            simulate_s = time.perf_counter() - started
            events = summary.customer_events + summary.feedback_events

            encoded = [
                (topic, key.encode(), encode_message(topic, payload))
                for _, day in Simulator(config).events()
                for topic, key, payload in day
            ]
            producer = make_producer(settings)
            started = time.perf_counter()
            for topic, key, value in encoded:
                while True:
                    try:
                        producer.produce(topic, key=key, value=value)
                        break
                    except BufferError:
                        producer.poll(0.05)
            if producer.flush(60):
                raise SystemExit("raw produce did not finish")
            raw_s = time.perf_counter() - started
        finally:
            broker.stop()
    print(f"events              {events}")
    print(f"simulate+produce    {events / simulate_s:12,.0f} events/s  ({simulate_s:.2f}s)")
    print(f"raw produce         {len(encoded) / raw_s:12,.0f} events/s  ({raw_s:.2f}s)")
    print(f"simulate / raw      {(events / simulate_s) / (len(encoded) / raw_s):12.3f}")


if __name__ == "__main__":
    main()
