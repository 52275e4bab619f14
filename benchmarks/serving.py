"""Serving overhead: plain MLServer XGBoost runtime vs our router path, over REST and gRPC.

    .venv/bin/python benchmarks/serving.py [--concurrency 4] [--seconds 8] [--warmup 2]
        [--rate 300] [--rate-seconds 30] [--rounds 3] [--transport both|REST|gRPC]

One run trains a small registry (v1 champion, v2 challenger) in a temp dir, starts an embedded
Kafka broker, and serves the SAME v1 booster three ways on this machine:

- plain: ``mlserver start`` with MLServer's own ``mlserver_xgboost.XGBoostModel`` loading
  ``v1/model.ubj``. Its input is the already-transformed float32 row (one FP32 tensor of shape
  [1, n_features], made by our ``FeatureTransformer`` before the run), so it measures the bare
  model behind MLServer only.
- ours, champion alone: the real ``churn serve`` process on a registry without a challenger,
  model ``churn-router``. Its input is one named tensor per raw feature (``content_type: pd``),
  so it measures validation + transform + routing + scoring + mirroring to Kafka.
- ours, with shadow: the same with v2 as challenger under the default strategy (shadow: v1
  answers, v2 is scored off the request path and mirrored too).

Closed loop: six cases (plain, ours alone, ours with shadow; REST then gRPC), each with
``--concurrency`` client threads (one keep-alive ``requests.Session`` or one gRPC channel per
thread) sending single-record requests for ``--warmup`` seconds (discarded) and then
``--seconds`` seconds (measured). Fixed rate (open loop): plain and ours alone, REST and gRPC,
get ``--rate`` requests per second for ``--rate-seconds`` each, sent on schedule whatever the
answers do; a latency runs from the moment its request was due.

Both phases run in ``--rounds`` interleaved rounds: every case once per round (a fixed-rate case
``--rate-seconds / --rounds`` at a time), so a slow spell of the machine falls on plain and ours
alike rather than on whichever case ran then. Each case's figures pool its rounds: requests,
errors (non-200 / RpcError), req/s, p50 and p99, and the server's CPU per request; then the
ours/plain ratios, with the lowest and highest ratio of a single round beside the pooled one. The
client threads share the machine's cores with the servers, so compare ratios, not absolute
numbers across machines. The client freezes its heap out of the garbage collector before the
cases, so a collection of its own objects never pauses its threads.
"""

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402
from mlserver.grpc import dataplane_pb2 as pb  # noqa: E402
from mlserver.grpc import dataplane_pb2_grpc  # noqa: E402

from churn_assets.broker import EmbeddedBroker  # noqa: E402
from churn_assets.config import load_settings  # noqa: E402
from churn_assets.kafka import ensure_topics  # noqa: E402
from churn_assets.model import BOOSTER_FILE, load_model  # noqa: E402
from churn_assets.registry import ModelRegistry  # noqa: E402
from churn_assets.schemas import FEATURE_NAMES  # noqa: E402
from churn_assets.simulator import sample_customers  # noqa: E402
from tests.conftest import write_config  # noqa: E402
from tests.serving_fixtures import (  # noqa: E402
    RunningServer,
    build_registry,
    free_port,
    start_server,
)

PLAIN_MODEL = "xgb-plain"
OURS_MODEL = "churn-router"
REQUEST_TIMEOUT_S = 30.0


# --- request payloads (built once, before any timing) -----------------------------------------


def customer_rows(n: int, seed: int = 11) -> list[dict[str, Any]]:
    frame = sample_customers(n, seed=seed)
    rows = frame[["customer_id", *FEATURE_NAMES]].to_dict("records")
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in rows]


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "BYTES"
    if isinstance(value, int) and not isinstance(value, bool):
        return "INT64"
    return "FP64"


def ours_rest_body(row: dict[str, Any]) -> bytes:
    inputs = []
    for name in ("customer_id", *FEATURE_NAMES):
        value = row[name]
        tensor: dict[str, Any] = {"name": name, "shape": [1], "datatype": _kind(value)}
        tensor["data"] = [value]
        if tensor["datatype"] == "BYTES":
            tensor["parameters"] = {"content_type": "str"}
        inputs.append(tensor)
    return json.dumps({"inputs": inputs, "parameters": {"content_type": "pd"}}).encode()


def ours_grpc_request(row: dict[str, Any]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=OURS_MODEL)
    request.parameters["content_type"].string_param = "pd"
    for name in ("customer_id", *FEATURE_NAMES):
        value = row[name]
        tensor = request.inputs.add(name=name, shape=[1], datatype=_kind(value))
        if tensor.datatype == "BYTES":
            tensor.parameters["content_type"].string_param = "str"
            tensor.contents.bytes_contents.append(value.encode())
        elif tensor.datatype == "INT64":
            tensor.contents.int64_contents.append(value)
        else:
            tensor.contents.fp64_contents.append(value)
    return request


def plain_rest_body(vector: np.ndarray) -> bytes:
    tensor = {
        "name": "input-0",
        "shape": [1, len(vector)],
        "datatype": "FP32",
        "data": [float(v) for v in vector],
    }
    return json.dumps({"inputs": [tensor]}).encode()


def plain_grpc_request(vector: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=PLAIN_MODEL)
    tensor = request.inputs.add(name="input-0", shape=[1, len(vector)], datatype="FP32")
    tensor.contents.fp32_contents.extend(float(v) for v in vector)
    return request


# --- servers --------------------------------------------------------------------------------


def start_plain(model_file: Path, root: Path, timeout_s: float = 90) -> RunningServer:
    """``mlserver start`` on a model dir holding ``model_file`` and MLServer's XGBoost runtime."""
    model_dir = root / PLAIN_MODEL
    model_dir.mkdir(parents=True)
    shutil.copyfile(model_file, model_dir / "model.ubj")  # a well-known name in mlserver-xgboost
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": PLAIN_MODEL,
                "implementation": "mlserver_xgboost.XGBoostModel",
                "parameters": {"uri": "./model.ubj"},
            }
        )
    )
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    (root / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": http_port,
                "grpc_port": grpc_port,
                "metrics_port": metrics_port,
                "parallel_workers": 0,
                # MLServer defaults to debug=True (an access-log line per request); our server
                # runs with debug=False, so the baseline does too.
                "debug": False,
            }
        )
    )
    log = root / "mlserver.log"
    mlserver_bin = Path(sys.executable).parent / "mlserver"
    with log.open("a") as handle:
        process = subprocess.Popen(
            [str(mlserver_bin), "start", str(root)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    server = RunningServer(process, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlserver exited early:\n{log.read_text()[-4000:]}")
        try:
            url = f"{server.http}/v2/models/{PLAIN_MODEL}/ready"
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"mlserver not ready in {timeout_s}s:\n{log.read_text()[-4000:]}")


# --- load generator -------------------------------------------------------------------------


@dataclass
class CaseResult:
    name: str
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    elapsed_s: float = 0.0
    sent: int = 0  # every request, warm-up included
    server_cpu_s: float = 0.0  # the server process's CPU time over the whole case

    def add(self, other: "CaseResult") -> None:
        """Pool another round of the same case into this one."""
        self.latencies_s += other.latencies_s
        self.errors += other.errors
        self.first_error = self.first_error or other.first_error
        self.elapsed_s += other.elapsed_s
        self.sent += other.sent
        self.server_cpu_s += other.server_cpu_s

    @property
    def cpu_ms_per_request(self) -> float:
        return self.server_cpu_s * 1000 / self.sent if self.sent else float("nan")

    @property
    def requests(self) -> int:
        return len(self.latencies_s) + self.errors

    @property
    def throughput(self) -> float:
        return len(self.latencies_s) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_s), q)) * 1000


# A worker's sender: called with a payload index, returns None on success or an error text.
Sender = Callable[[int], str | None]


def rest_sender(url: str, bodies: list[bytes]) -> Callable[[], tuple[Sender, Callable]]:
    def make() -> tuple[Sender, Callable]:
        session = requests.Session()
        headers = {"Content-Type": "application/json"}

        def send(i: int) -> str | None:
            try:
                response = session.post(
                    url, data=bodies[i], headers=headers, timeout=REQUEST_TIMEOUT_S
                )
            except requests.RequestException as exc:
                return f"{type(exc).__name__}: {exc}"
            if response.status_code != 200:
                return f"HTTP {response.status_code}: {response.text[:300]}"
            return None

        return send, session.close

    return make


def grpc_sender(
    address: str, messages: list[pb.ModelInferRequest]
) -> Callable[[], tuple[Sender, Callable]]:
    def make() -> tuple[Sender, Callable]:
        channel = grpc.insecure_channel(address)
        stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)

        def send(i: int) -> str | None:
            try:
                stub.ModelInfer(messages[i], timeout=REQUEST_TIMEOUT_S)
            except grpc.RpcError as exc:
                return f"{exc.code()}: {exc.details()}"
            return None

        return send, channel.close

    return make


def run_case(
    name: str,
    make_sender: Callable[[], tuple[Sender, Callable]],
    n_payloads: int,
    concurrency: int,
    warmup_s: float,
    seconds: float,
) -> CaseResult:
    """Closed loop: each thread sends, waits for the answer, sends the next one."""
    result = CaseResult(name)
    lock = threading.Lock()
    ready = threading.Barrier(concurrency + 1)
    times: dict[str, float] = {}
    last_finish = [0.0]

    def worker(index: int) -> None:
        try:
            send, close = make_sender()
        except Exception as exc:
            with lock:
                result.first_error = result.first_error or f"client setup: {exc!r}"
            ready.abort()
            return
        latencies: list[float] = []
        errors = sent = 0
        first_error: str | None = None
        finish = 0.0
        i = index * 7919  # each thread walks the payloads from a different place
        try:
            ready.wait()
            measure_from, measure_to = times["measure_from"], times["measure_to"]
            while True:
                started = time.perf_counter()
                if started >= measure_to:
                    break
                error = send(i % n_payloads)
                ended = time.perf_counter()
                i += 1
                sent += 1
                if started < measure_from:
                    continue  # warm-up
                finish = max(finish, ended)
                if error is None:
                    latencies.append(ended - started)
                else:
                    errors += 1
                    first_error = first_error or error
        finally:
            close()
            with lock:
                result.latencies_s.extend(latencies)
                result.errors += errors
                result.sent += sent
                result.first_error = result.first_error or first_error
                last_finish[0] = max(last_finish[0], finish)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for thread in threads:
        thread.start()
    now = time.perf_counter()
    times["measure_from"] = now + warmup_s
    times["measure_to"] = now + warmup_s + seconds
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        raise RuntimeError(f"{name}: a client could not start: {result.first_error}") from None
    for thread in threads:
        thread.join(timeout=warmup_s + seconds + REQUEST_TIMEOUT_S + 10)
    result.elapsed_s = max(last_finish[0] - times["measure_from"], 0.0)
    return result


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(server: RunningServer, case: Callable[[], CaseResult]) -> CaseResult:
    """``case()``, with the server's CPU time over it."""
    before = process_cpu_s(server.process.pid)
    result = case()
    result.server_cpu_s = process_cpu_s(server.process.pid) - before
    return result


# --- sanity check and report ----------------------------------------------------------------


def check_same_model(plain: RunningServer, ours: Any, vector: np.ndarray, row: dict) -> str:
    """Both servers answer one row; the probabilities must agree (same booster)."""
    plain_reply = requests.post(
        f"{plain.http}/v2/models/{PLAIN_MODEL}/infer", data=plain_rest_body(vector), timeout=30
    )
    ours_reply = requests.post(
        f"{ours.http}/v2/models/{OURS_MODEL}/infer", data=ours_rest_body(row), timeout=30
    )
    if plain_reply.status_code != 200 or ours_reply.status_code != 200:
        raise RuntimeError(
            f"sanity request failed: plain {plain_reply.status_code} {plain_reply.text[:300]} / "
            f"ours {ours_reply.status_code} {ours_reply.text[:300]}"
        )
    plain_p = float(plain_reply.json()["outputs"][0]["data"][0])
    outputs = {o["name"]: o["data"] for o in ours_reply.json()["outputs"]}
    ours_p = float(outputs["probability"][0])
    version = outputs.get("model_version", ["?"])[0]
    agree = "agree" if abs(plain_p - ours_p) < 1e-5 else "DISAGREE"
    return f"sanity: plain p={plain_p:.6f}, ours p={ours_p:.6f} (answered by {version}): {agree}"


def run_fixed_rate(
    name: str,
    make_sender: Callable[[], tuple[Sender, Callable]],
    n_payloads: int,
    rate: float,
    seconds: float,
    workers: int = 32,
) -> CaseResult:
    """Open loop: requests are sent at ``rate`` per second whatever the answers do, by a pool
    of ``workers`` threads. A request's latency runs from the moment it was due, so time spent
    waiting for a free worker (the server falling behind) counts, as it would for a client."""
    result = CaseResult(name)
    local = threading.local()
    lock = threading.Lock()
    closers: list[Callable] = []

    def send_due(i: int, due: float) -> None:
        if not hasattr(local, "send"):
            local.send, close = make_sender()
            with lock:
                closers.append(close)
        error = local.send(i % n_payloads)
        ended = time.perf_counter()
        with lock:
            result.sent += 1
            if error is None:
                result.latencies_s.append(ended - due)
            else:
                result.errors += 1
                result.first_error = result.first_error or error

    total = int(rate * seconds)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        start = time.perf_counter() + 0.5
        futures = []
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(send_due, i * 7919, due))
        for future in futures:
            future.result(timeout=REQUEST_TIMEOUT_S + seconds)
        result.elapsed_s = time.perf_counter() - start
    for close in closers:
        close()
    return result


def _ratio(a: float, b: float) -> str:
    return f"{a / b:>10.2f}" if b and np.isfinite(a) and np.isfinite(b) else f"{'n/a':>10}"


def run_rounds(
    cases: dict[str, Callable[[], CaseResult]], rounds: int
) -> tuple[dict[str, CaseResult], dict[str, list[CaseResult]]]:
    """Every case once per round, rounds one after another: each case's pooled result and its
    rounds' results."""
    pooled = {name: CaseResult(name) for name in cases}
    each: dict[str, list[CaseResult]] = {name: [] for name in cases}
    for number in range(rounds):
        for name, case in cases.items():
            result = case()
            pooled[name].add(result)
            each[name].append(result)
            print(
                f"  round {number + 1}/{rounds} {name}: {result.throughput:.0f} req/s, "
                f"p99 {result.percentile_ms(99):.2f} ms",
                flush=True,
            )
    return pooled, each


def _round_ratios(
    ours: list[CaseResult], plain: list[CaseResult], figure: Callable[[CaseResult], float]
) -> str:
    """The lowest and highest ours/plain ratio of one round, as ``low-high``."""
    ratios = [figure(o) / figure(p) for o, p in zip(ours, plain, strict=True) if figure(p)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "n/a"


def print_report(
    results: dict[str, CaseResult],
    fixed: dict[str, CaseResult],
    transports: list[str],
    rounds: dict[str, list[CaseResult]],
) -> None:
    width = max(len(name) for name in (*results, *fixed)) + 2
    header = (
        f"{'requests':>10}{'errors':>8}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'server CPU ms/req':>19}"
    )
    print(f"closed loop\n{'case':<{width}}{header}")
    for result in results.values():
        print(
            f"{result.name:<{width}}{result.requests:>10}{result.errors:>8}"
            f"{result.throughput:>10.1f}{result.percentile_ms(50):>10.2f}"
            f"{result.percentile_ms(99):>10.2f}{result.cpu_ms_per_request:>19.3f}"
        )
    print(
        f"\n{'ours/plain':<{width}}{'req/s':>10}{'p50':>10}{'p99':>10}{'CPU/req':>10}"
        f"{'req/s by round':>16}"
    )
    for transport in transports:
        plain = results[f"plain {transport}"]
        for arm in ("champion alone", "with shadow"):
            ours = results[f"ours {transport} {arm}"]
            spread = _round_ratios(rounds[ours.name], rounds[plain.name], lambda r: r.throughput)
            print(
                f"{transport + ' ' + arm:<{width}}{_ratio(ours.throughput, plain.throughput)}"
                f"{_ratio(ours.percentile_ms(50), plain.percentile_ms(50))}"
                f"{_ratio(ours.percentile_ms(99), plain.percentile_ms(99))}"
                f"{_ratio(ours.cpu_ms_per_request, plain.cpu_ms_per_request)}{spread:>16}"
            )
    if fixed:
        print(f"\nfixed rate (open loop)\n{'case':<{width}}{header}")
        for result in fixed.values():
            print(
                f"{result.name:<{width}}{result.requests:>10}{result.errors:>8}"
                f"{result.throughput:>10.1f}{result.percentile_ms(50):>10.2f}"
                f"{result.percentile_ms(99):>10.2f}{result.cpu_ms_per_request:>19.3f}"
            )
        print(f"\n{'ours/plain':<{width}}{'p50':>10}{'p99':>10}{'p99 by round':>16}")
        for transport in transports:
            plain, ours = fixed[f"plain {transport} fixed"], fixed[f"ours {transport} fixed"]
            spread = _round_ratios(
                rounds[ours.name], rounds[plain.name], lambda r: r.percentile_ms(99)
            )
            print(
                f"{transport:<{width}}{_ratio(ours.percentile_ms(50), plain.percentile_ms(50))}"
                f"{_ratio(ours.percentile_ms(99), plain.percentile_ms(99))}{spread:>16}"
            )
    for result in (*results.values(), *fixed.values()):
        if result.errors:
            print(f"ERRORS in {result.name}: {result.errors}, first: {result.first_error}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured s per case")
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded s per case")
    parser.add_argument("--rows", type=int, default=500, help="distinct customers to cycle")
    parser.add_argument("--rate", type=float, default=300.0, help="fixed-rate phase, req/s")
    parser.add_argument(
        "--rate-seconds", type=float, default=30.0, help="fixed-rate phase length; 0 skips it"
    )
    parser.add_argument(
        "--transport",
        choices=("both", "REST", "gRPC"),
        default="both",
        help="measure REST, gRPC or both (default both)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds of every case (default 3); a fixed-rate case runs "
        "--rate-seconds / --rounds per round",
    )
    args = parser.parse_args()
    transports = ["REST", "gRPC"] if args.transport == "both" else [args.transport]
    if args.concurrency < 1 or args.seconds <= 0 or args.warmup < 0 or args.rows < 1:
        parser.error("--concurrency and --rows must be >= 1, --seconds > 0, --warmup >= 0")
    if args.rate <= 0 or args.rate_seconds < 0:
        parser.error("--rate must be > 0 and --rate-seconds >= 0")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        # Two serving set-ups on one registry's artefacts: v1 champion alone, and v1 champion
        # with v2 shadowed (the default strategy); each has its own data dir (router state).
        shadow_config = write_config(root / "shadow")
        settings = load_settings(shadow_config)
        print("training the registry (v1 champion, v2 challenger)...", flush=True)
        build_registry(settings.registry_dir)
        v1 = load_model(ModelRegistry(settings.registry_dir), "v1")
        rows = customer_rows(args.rows)
        matrix = v1.transformer.transform_records(rows)  # float32, one row per customer
        plain_bodies = [plain_rest_body(v) for v in matrix]
        plain_messages = [plain_grpc_request(v) for v in matrix]
        ours_bodies = [ours_rest_body(r) for r in rows]
        ours_messages = [ours_grpc_request(r) for r in rows]

        broker = EmbeddedBroker(settings.run_dir)
        servers: dict[str, RunningServer] = {}
        try:
            address = broker.start().bootstrap_servers
            ensure_topics(settings)
            # The alone set-up mirrors to the same broker, named as an external cluster.
            alone_config = write_config(root / "alone", kafka={"bootstrap_servers": address})
            alone_settings = load_settings(alone_config)
            shutil.copytree(settings.registry_dir, alone_settings.registry_dir)
            ModelRegistry(alone_settings.registry_dir).clear_alias("challenger")
            for name, config in (("alone", alone_config), ("shadow", shadow_config)):
                started = time.perf_counter()
                servers[name] = start_server(config, root / f"serve-{name}.log")
                print(f"ours ({name}) ready in {time.perf_counter() - started:.1f} s")
            started = time.perf_counter()
            servers["plain"] = start_plain(
                settings.registry_dir / "v1" / BOOSTER_FILE, root / "mlserver-plain"
            )
            print(f"plain ready in {time.perf_counter() - started:.1f} s")
            plain, alone, shadow = servers["plain"], servers["alone"], servers["shadow"]
            print(
                f"\nSame v1 booster ({matrix.shape[1]} model columns), single-record requests, "
                f"{args.concurrency} threads, {args.warmup:g} s warm-up + {args.seconds:g} s "
                "per case, client on the same machine.\n"
                "  plain = MLServer XGBoostModel, input = pre-transformed FP32 row "
                "(bare model only)\n"
                "  ours  = churn-router: named raw features -> validation + transform + route "
                "+ v1 score + Kafka mirror (with shadow: + v2 scored off the request path)"
            )
            for server in (alone, shadow):
                print(check_same_model(plain, server, matrix[0], rows[0]))
            print(flush=True)

            cases = {
                "plain REST": (
                    plain,
                    rest_sender(f"{plain.http}/v2/models/{PLAIN_MODEL}/infer", plain_bodies),
                ),
                "ours REST champion alone": (
                    alone,
                    rest_sender(f"{alone.http}/v2/models/{OURS_MODEL}/infer", ours_bodies),
                ),
                "ours REST with shadow": (
                    shadow,
                    rest_sender(f"{shadow.http}/v2/models/{OURS_MODEL}/infer", ours_bodies),
                ),
                "plain gRPC": (plain, grpc_sender(plain.grpc, plain_messages)),
                "ours gRPC champion alone": (alone, grpc_sender(alone.grpc, ours_messages)),
                "ours gRPC with shadow": (shadow, grpc_sender(shadow.grpc, ours_messages)),
            }
            # The client's own heap (the trained registry, payloads, libraries) is frozen out
            # of the garbage collector: a full collection of it paused every client thread for
            # about 125 ms, which an open loop counts against whichever server it fell on.
            gc.collect()
            gc.freeze()
            closed_loop = {
                name: partial(
                    measured,
                    server,
                    partial(
                        run_case,
                        name,
                        make_sender,
                        len(rows),
                        args.concurrency,
                        args.warmup,
                        args.seconds,
                    ),
                )
                for name, (server, make_sender) in cases.items()
                if name.split()[1] in transports
            }
            print(f"closed loop: {args.rounds} rounds of {args.warmup:g} + {args.seconds:g} s")
            results, rounds = run_rounds(closed_loop, args.rounds)
            fixed = {}
            if args.rate_seconds:
                open_loop = {
                    "plain REST fixed": cases["plain REST"],
                    "ours REST fixed": cases["ours REST champion alone"],
                    "plain gRPC fixed": cases["plain gRPC"],
                    "ours gRPC fixed": cases["ours gRPC champion alone"],
                }
                slice_s = args.rate_seconds / args.rounds
                fixed_rate = {
                    name: partial(
                        measured,
                        server,
                        partial(run_fixed_rate, name, make_sender, len(rows), args.rate, slice_s),
                    )
                    for name, (server, make_sender) in open_loop.items()
                    if name.split()[1] in transports
                }
                print(
                    f"fixed rate: {args.rate:g} req/s for {args.rate_seconds:g} s per case, "
                    f"in {args.rounds} rounds of {slice_s:g} s"
                )
                fixed, fixed_rounds = run_rounds(fixed_rate, args.rounds)
                rounds |= fixed_rounds
            print(flush=True)
            print_report(results, fixed, transports, rounds)
            for name, server in servers.items():
                if server.process.poll() is not None:
                    print(f"WARNING: {name} server exited during the run; log: {server.log}")
        finally:
            for server in servers.values():
                server.stop()
            broker.stop()


if __name__ == "__main__":
    main()
