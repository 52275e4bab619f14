"""Schemathesis against a live `churn serve`: every operation of its /openapi.json, fuzzed.

Every check schemathesis has runs on every response (no server errors, status codes, content
types, headers and bodies as the schema declares them, invalid input rejected, valid input
accepted, ...), once without a token and once with ``Authorization: Bearer <admin token>``.
Generation is derandomized and bounded, so a run is reproducible and takes a few minutes.
No operation is excluded: the admin ones change router state in the admin run, and answer
what their schema documents in every state they reach (409 when there is nothing to promote;
retraining's 503 while no Dagster can be reached).

The run goes through schemathesis's engine (what ``schemathesis run`` uses) rather than
``schemathesis.pytest.from_fixture(...).parametrize()``: the schema only exists once the server
fixture runs, and schemathesis 4.32's lazy fixture loader reads ``Node._nodeid``, which pytest
9.2 no longer has.
"""

from dataclasses import dataclass

import pytest
import schemathesis
from schemathesis.engine import events, from_schema

from churn_assets.schemas import FEATURE_NAMES
from tests.serving_fixtures import ADMIN_TOKEN, served_with_broker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_EXAMPLES = 25
MODELS = ["churn-router", "churn", "churn-explainer"]
VERSIONS = ["v1", "v2"]  # what build_registry registers
REQUEST_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One process for both runs. The admin run changes router state (policy, promote,
    rollback): operations run in a fixed order, each with derandomized inputs, so the states it
    goes through are the same on every run, and every answer has to conform in any state."""
    with served_with_broker(tmp_path_factory.mktemp("serving-fuzz")) as running:
        yield running


@dataclass(frozen=True)
class Finding:
    """One failed check on one response: what was sent, what came back, which check."""

    operation: str
    check: str
    title: str
    status: int | None
    body: str
    curl: str

    @property
    def kind(self) -> tuple[str, str, str, int | None]:
        return self.operation, self.check, self.title, self.status


def fuzz(server, headers: dict[str, str]) -> tuple[list[Finding], list[str]]:
    """Run schemathesis's engine (what ``schemathesis run`` runs: examples, coverage, fuzzing
    and stateful phases, every check) against ``server``: the failed checks, and the errors
    that kept an operation from being tested."""
    # An explicit config: a schemathesis.toml found in a parent folder never changes the run.
    config = schemathesis.Config.from_dict(
        {
            "headers": headers,
            "request-timeout": REQUEST_TIMEOUT_S,
            "workers": 1,
            # Every distinct failure of an operation, not only its first one.
            "continue-on-failure": True,
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
            },
            # The schema cannot say which models, versions and V2 input names exist: without
            # these, nearly every V2 request would name an unknown model (404) and never reach
            # a runtime. They are mixed in with generated values, not instead of them.
            "dictionaries": {
                "models": {"values": MODELS},
                "versions": {"values": VERSIONS},
                "inputs": {"values": ["customer_id", *FEATURE_NAMES]},
            },
            # Valid under the schema is not always valid for the model: MLServer's generic V2
            # request schema cannot say which inputs (names, datatypes, shapes) a model takes,
            # so a schema-valid infer request may rightly be a 422 naming the input. Everywhere
            # else the default applies (a schema-valid request must not be a 4xx but 401, 403,
            # 404, 409 or 429).
            "operations": [
                {
                    "include-path-regex": r"^/v2/models/.*/infer$",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": ["2xx", "404", "422"],
                        }
                    },
                },
                # Retraining launches a job in Dagster, which this server has none of (its
                # dagster.url is a closed port): once no rollout is pending it answers the 503
                # its schema documents, "Dagster cannot be reached". That 503 only.
                {
                    "include-path-regex": r"^/admin/retrain$",
                    "checks": {
                        "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}
                    },
                },
            ],
            "parameters": {
                "path.model_name": {"dictionary": "models", "probability": 0.8},
                "path.model_version": {"dictionary": "versions", "probability": 0.8},
                "query.model_version": {"dictionary": "versions", "probability": 0.5},
                "query.version": {"dictionary": "versions", "probability": 0.5},
                "body.challenger": {"dictionary": "versions", "probability": 0.5},
                "body.inputs[*].name": {"dictionary": "inputs", "probability": 0.8},
            },
        }
    )
    schema = schemathesis.openapi.from_url(
        f"{server.http}/openapi.json", config=config, timeout=REQUEST_TIMEOUT_S
    )
    findings: list[Finding] = []
    errors: list[str] = []
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            findings += _findings(event.recorder)
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            raise event.exception
        elif isinstance(event, events.EngineFinished):
            errors += [f"{f.operation}: {f.title}: {f.message}" for f in event.failures]
    return findings, errors


def _findings(recorder) -> list[Finding]:
    found = []
    for parent_id, checks in recorder.checks.items():
        for check in checks:
            if check.failure_info is None:
                continue
            failure = check.failure_info.failure
            case_id = failure.case_id or parent_id
            interaction = recorder.interactions.get(case_id)
            response = interaction.response if interaction is not None else None
            found.append(
                Finding(
                    operation=failure.operation or recorder.label,
                    check=check.name,
                    title=failure.title,
                    status=None if response is None else response.status_code,
                    body=""
                    if response is None
                    else response.content[:300].decode(errors="replace"),
                    curl=recorder.cases[case_id].value.as_curl_command(),
                )
            )
    return found


def summary(findings: list[Finding]) -> str:
    """One line per kind of failure (operation, check, title, status) with how often it was seen,
    and its shortest request."""
    kinds: dict[tuple, list[Finding]] = {}
    for finding in findings:
        kinds.setdefault(finding.kind, []).append(finding)
    lines = []
    for (operation, check, title, status), seen in sorted(kinds.items(), key=str):
        example = min(seen, key=lambda f: len(f.curl))
        lines.append(
            f"{operation} [{check}] {title} -> {status} {example.body[:160]!r} (x{len(seen)})\n"
            f"    {example.curl[:600]}"
        )
    return "\n".join(lines)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}],
    ids=["anonymous", "admin"],
)
def test_every_operation_conforms_to_its_schema(server, headers):
    findings, errors = fuzz(server, headers)
    assert not errors, "\n".join(errors)
    assert not findings, f"{len(findings)} failed checks:\n{summary(findings)}"
