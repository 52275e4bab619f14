"""Deployment targets: apply rollout decisions to the local serving process or to Seldon on k8s.

A rollout ``Decision`` (``churn_assets.rollout``) says where traffic should be; ``deployment_for``
turns it into a ``Deployment`` (which version is champion, which is challenger, how much primary
traffic the challenger gets, whether it is only shadowed) and a ``DeploymentTarget`` applies that:

* ``LocalServingTarget`` calls the serving process's admin API (``PUT /router/policy``,
  ``POST /router/promote-v2``, ``POST /router/rollback``) after reading ``GET /router/metrics``.
* ``KubernetesSeldonTarget`` creates or patches Seldon resources with the ``kubernetes`` client:
  a Seldon Core v1 ``SeldonDeployment`` (``kind="v1"``) or Seldon Core 2 ``Model`` objects plus an
  ``Experiment`` (``kind="v2"``), rendered by ``render_seldon_deployment`` / ``render_seldon_v2``.

Design choices worth knowing:

* **Strategies.** ``Deployment.strategy`` is ``shadow``, ``canary``, ``blue_green`` (the
  challenger is deployed and warm but answers nothing) or ``single`` (only the champion is served:
  idle, promoted and rolled-back rollouts).
* **Seldon predictors and models are named by version** (``v2``, ``churn-v2``), never by role or
  colour, so a version keeps its pods from shadow through canary to promotion; in blue-green the
  "blue" predictor is the champion's and the "green" one the challenger's (label
  ``churn.io/role``: ``champion`` / ``challenger``). Blue-green-ready renders green with
  traffic 0 so it is warm before the switch; promoted and rolled-back rollouts render only the
  live version.
* **Seldon Core 2** always gets an Experiment (one candidate with weight 100 when only one version
  is live) rather than none: create-or-patch never deletes, so a left-over canary Experiment would
  otherwise keep sending traffic to a rolled-back challenger. Patches set ``spec.mirror`` to null
  when the rendered Experiment has none, for the same reason (a JSON merge patch keeps absent keys).
* **Retries.** Only transient connection failures are retried, a bounded number of times. A
  ``POST`` (promote, rollback: not idempotent) is retried only when the connection was never
  established, so a request the server may have processed is never sent twice.
* ``validate_against_crd`` checks a manifest against the CRD's ``openAPIV3Schema`` with jsonschema;
  Kubernetes-specific keywords (``x-kubernetes-*``) are ignored, as jsonschema ignores unknown
  keywords. The CRDs live in ``<repo>/../shared/schemas/seldon`` (``seldon_schema_dir``).

The module never imports Dagster; a Dagster resource wraps a target.
"""

import functools
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import jsonschema
import requests
import urllib3
import yaml

from churn_assets.config import REPO_ROOT
from churn_assets.rollout import Decision, Phase, RolloutPolicy, RolloutState, traffic_share

__all__ = [
    "CRD_FILES",
    "SELDON_CAPABILITY",
    "STRATEGIES",
    "Deployment",
    "DeploymentError",
    "DeploymentTarget",
    "KubernetesSeldonTarget",
    "LocalServingTarget",
    "deployment_for",
    "render_seldon_deployment",
    "render_seldon_v2",
    "seldon_schema_dir",
    "validate_against_crd",
    "validate_manifest",
]

log = logging.getLogger(__name__)

Strategy = Literal["shadow", "canary", "blue_green", "single"]
STRATEGIES: tuple[str, ...] = ("shadow", "canary", "blue_green", "single")

SELDON_V1_API = "machinelearning.seldon.io/v1"
SELDON_V2_API = "mlops.seldon.io/v1alpha1"
CRD_FILES: dict[str, str] = {
    "SeldonDeployment": "machinelearning.seldon.io_seldondeployments.v1.18.2.yaml",
    "Model": "mlops.seldon.io_models.yaml",
    "Experiment": "mlops.seldon.io_experiments.yaml",
}
# The Seldon Core 2 capability of servers that run the churn serving image.
SELDON_CAPABILITY = "churn-platform"
_PLURALS = {"SeldonDeployment": "seldondeployments", "Model": "models", "Experiment": "experiments"}


class DeploymentError(RuntimeError):
    """A deployment could not be rendered, validated or applied; the message says why."""


@dataclass(frozen=True)
class Deployment:
    """Where primary traffic should go: the desired state a target applies.

    ``challenger_traffic`` is the challenger's share of primary traffic in [0, 1]; it is positive
    only for a canary. ``shadow`` means the challenger scores a mirror of every request.
    """

    strategy: str
    champion: str
    challenger: str | None
    challenger_traffic: float
    shadow: bool

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise DeploymentError(f"strategy {self.strategy!r} is not one of {STRATEGIES}")
        if not self.champion:
            raise DeploymentError("a deployment needs a champion version")
        traffic = self.challenger_traffic
        if isinstance(traffic, bool) or not isinstance(traffic, int | float):
            raise DeploymentError(f"challenger_traffic must be a number, got {traffic!r}")
        if not math.isfinite(traffic) or not 0.0 <= traffic <= 1.0:
            raise DeploymentError(f"challenger_traffic {traffic!r} is outside [0, 1]")
        if self.strategy == "single":
            if self.challenger is not None or traffic or self.shadow:
                raise DeploymentError("a 'single' deployment has no challenger, traffic or shadow")
            return
        if not self.challenger or self.challenger == self.champion:
            raise DeploymentError(
                f"strategy {self.strategy!r} needs a challenger other than {self.champion!r}"
            )
        if self.shadow != (self.strategy == "shadow"):
            raise DeploymentError("shadow=True goes with strategy 'shadow' and only with it")
        if self.strategy == "canary" and traffic <= 0.0:
            raise DeploymentError(f"a canary needs challenger_traffic > 0, got {traffic}")
        if self.strategy != "canary" and traffic:
            raise DeploymentError(f"strategy {self.strategy!r} sends the challenger no traffic")

    @property
    def live_versions(self) -> tuple[str, ...]:
        """The versions that must be deployed: the champion, then any challenger."""
        return (self.champion,) if self.challenger is None else (self.champion, self.challenger)


def deployment_for(
    source: Decision | RolloutState, policy: RolloutPolicy | None = None
) -> Deployment:
    """The deployment a rollout decision (its ``next_state`` and ``traffic``) or state asks for.

    A bare ``RolloutState`` in the canary phase needs ``policy`` to know the step's traffic.
    """
    if isinstance(source, Decision):
        state, traffic = source.next_state, source.traffic
    elif isinstance(source, RolloutState):
        state = source
        if state.phase is Phase.CANARY and policy is None:
            raise DeploymentError("a canary state needs the rollout policy to know its traffic")
        traffic = traffic_share(state, policy) if policy is not None else 0.0
    else:
        raise DeploymentError(f"expected a rollout Decision or RolloutState, got {source!r}")
    phase = state.phase
    if phase is Phase.SHADOW:
        return Deployment("shadow", state.champion, state.challenger, 0.0, shadow=True)
    if phase is Phase.CANARY:
        return Deployment("canary", state.champion, state.challenger, float(traffic), shadow=False)
    if phase is Phase.BLUE_GREEN_READY:
        return Deployment("blue_green", state.champion, state.challenger, 0.0, shadow=False)
    # IDLE, PROMOTED (the rollout state already names the new champion), ROLLED_BACK.
    return Deployment("single", state.champion, None, 0.0, shadow=False)


@runtime_checkable
class DeploymentTarget(Protocol):
    """Something that serves model versions and can be told where traffic goes."""

    def apply(self, deployment: Deployment) -> dict[str, Any]:
        """Make the target serve ``deployment``; return what was done."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-safe facts about the target (no secrets)."""
        ...


# --------------------------------------------------------------------------- local serving


def _never_connected(exc: requests.RequestException) -> bool:
    """Whether the request certainly never reached the server (safe to resend a POST)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(exc, requests.ConnectionError):
        reason = exc.args[0] if exc.args else None
        reason = getattr(reason, "reason", reason)
        return isinstance(reason, urllib3.exceptions.NewConnectionError)
    return False


class LocalServingTarget:
    """The local serving process's admin API (``docs/SERVING.md``).

    ``apply`` reads the router state, then promotes (the deployment's champion is the served
    challenger), rolls back (it is the previous champion) and sets the policy (strategy, challenger,
    canary weight). A deployment of a single version removes any challenger the router still
    serves or shadows (``remove_challenger``), so a rolled-back version gets no more traffic.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        timeout_s: float = 10,
        retries: int = 2,
        backoff_s: float = 0.5,
    ) -> None:
        if not token:
            raise DeploymentError("the serving admin API needs a token (CHURN_ADMIN_TOKEN)")
        if retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise DeploymentError("retries and backoff_s must be >= 0 and timeout_s > 0")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    def describe(self) -> dict[str, Any]:
        """The URL and limits; never the token."""
        return {
            "target": "local-serving",
            "base_url": self.base_url,
            "timeout_s": self.timeout_s,
            "retries": self.retries,
        }

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = f"{self.base_url}{path}"
        headers = {"Authorization": f"Bearer {self._token}"} if method != "GET" else {}
        idempotent = method in ("GET", "PUT")
        for attempt in range(self.retries + 1):
            try:
                response = requests.request(
                    method, url, json=body, headers=headers, timeout=self.timeout_s
                )
                break
            except (requests.ConnectionError, requests.Timeout) as exc:
                retryable = idempotent or _never_connected(exc)
                if not retryable or attempt == self.retries:
                    raise DeploymentError(
                        f"{method} {url} failed after {attempt + 1} attempt(s): {exc}"
                    ) from exc
                log.warning("%s %s failed (%s); retrying", method, url, exc)
                time.sleep(self.backoff_s * 2**attempt)
        if not 200 <= response.status_code < 300:
            raise DeploymentError(
                f"{method} {url} answered HTTP {response.status_code}: {response.text[:500]}"
            )
        try:
            return response.json()
        except ValueError as exc:
            detail = response.text[:200]
            raise DeploymentError(f"{method} {url} answered non-JSON: {detail}") from exc

    def router_state(self) -> dict[str, Any]:
        """The router's state from ``GET /router/metrics``."""
        return self._call("GET", "/router/metrics")["state"]

    def apply(self, deployment: Deployment) -> dict[str, Any]:
        """Bring the router to ``deployment``; returns the calls made and the final state.

        A different champion is reached by promoting the served challenger, by rolling back to
        the previous champion (stopping a running canary first, which a rollback would
        otherwise stop instead), or, for any other registered version, by loading it as the
        challenger and promoting it. The final router state is checked against the deployment.
        """
        state = self.router_state()
        calls: list[str] = []
        if deployment.champion != state["champion"]:
            previous = state.get("previous_champions") or []
            if deployment.champion == state.get("challenger"):
                self._call("POST", "/router/promote-v2")
                calls.append("promote")
            elif previous and deployment.champion == previous[-1]:
                if state.get("strategy") == "canary" and state.get("challenger"):
                    self._call(
                        "PUT", "/router/policy", {"strategy": "shadow", "canary_weight": 0.0}
                    )
                    calls.append("policy")
                self._call("POST", "/router/rollback")
                calls.append("rollback")
            else:
                self._call(
                    "PUT",
                    "/router/policy",
                    {"strategy": "shadow", "canary_weight": 0.0, "challenger": deployment.champion},
                )
                self._call("POST", "/router/promote-v2")
                calls += ["policy", "promote"]
        if deployment.challenger is not None:
            policy = {
                "strategy": deployment.strategy,
                "canary_weight": deployment.challenger_traffic,
                "challenger": deployment.challenger,
            }
            self._call("PUT", "/router/policy", policy)
            calls.append("policy")
        else:
            # A single version: whatever challenger the router still serves or shadows (a
            # rolled-back canary or shadow, or the version a rollback demoted) is dropped.
            current = self.router_state() if calls else state
            if current.get("challenger"):
                self._call(
                    "PUT",
                    "/router/policy",
                    {"strategy": "shadow", "canary_weight": 0.0, "remove_challenger": True},
                )
                calls.append("policy")
        final = self.router_state()
        if final.get("champion") != deployment.champion or (
            final.get("challenger") != deployment.challenger
        ):
            raise DeploymentError(
                f"the router serves champion {final.get('champion')} / challenger "
                f"{final.get('challenger')} after {calls}, not {deployment.champion} / "
                f"{deployment.challenger}"
            )
        return {"target": "local-serving", "calls": calls, "state": final}


# --------------------------------------------------------------------------- Seldon rendering


def _percent(share: float) -> int:
    return int(round(share * 100))


def _role(deployment: Deployment, version: str) -> str:
    return "champion" if version == deployment.champion else "challenger"


def _labels(deployment: Deployment, name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/part-of": "churn-platform",
        "churn.io/strategy": deployment.strategy,
    }


def _probe(path: str) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http", "scheme": "HTTP"},
        "initialDelaySeconds": 10,
        "periodSeconds": 10,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
    }


# Per serving container: a request is ~1 ms of CPU, the process ~400 MB (MLServer + XGBoost).
RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "250m", "memory": "512Mi"},
    "limits": {"cpu": "1", "memory": "1Gi"},
}
MIN_REPLICAS, MAX_REPLICAS, TARGET_CPU_PERCENT = 1, 4, 70

# What each predictor pod needs to produce the rollout's evidence: the production profile
# (Kafka over SASL_SSL, so every answer is mirrored to ml.predictions), the SASL password from
# the Secret Strimzi writes for the KafkaUser, and the cluster CA the profile names.
PRODUCTION_CONFIG = "/opt/churn/config/config.production.yaml"
KAFKA_USER_SECRET = "churn-platform"
KAFKA_CA_SECRET = "churn-kafka-cluster-ca-cert"
KAFKA_CA_DIR = "/etc/churn/kafka-ca"
ARM_ENV = "CHURN_SERVING__ARM"


def _arm(deployment: Deployment, version: str) -> str:
    """The rollout arm a version's pods serve: ``primary`` for the champion; the challenger's
    is ``canary`` while it answers a share of traffic, else ``shadow`` (Seldon mirrors every
    request to it: shadow, and blue-green's warm green)."""
    if version == deployment.champion:
        return "primary"
    return "canary" if deployment.strategy == "canary" else "shadow"


def _evidence_env(deployment: Deployment, version: str) -> list[dict[str, Any]]:
    return [
        {"name": "CHURN_MODEL_VERSION", "value": version},
        {"name": ARM_ENV, "value": _arm(deployment, version)},
        {"name": "CHURN_CONFIG", "value": PRODUCTION_CONFIG},
        {
            "name": "CHURN_KAFKA__SASL_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": KAFKA_USER_SECRET, "key": "password"}},
        },
    ]


def _predictor(
    deployment: Deployment,
    version: str,
    *,
    name: str,
    image: str,
    model_uri_prefix: str,
    traffic: int | None,
    shadow: bool = False,
) -> dict[str, Any]:
    """One predictor per version, named by it, with an image-based MODEL graph node, probes on
    the V2 health endpoints, resources and a CPU autoscaler (``hpaSpec``). Its pods know their
    version and arm (``CHURN_MODEL_VERSION``, ``CHURN_SERVING__ARM``), so their
    ``predictions_total`` / ``prediction_latency_seconds`` carry both, and they mirror every
    answer to ``ml.predictions`` (the production profile's Kafka, its password and CA)."""
    container = f"{name}-{version}"
    predictor: dict[str, Any] = {
        "name": version,
        "labels": {"churn.io/version": version, "churn.io/role": _role(deployment, version)},
        "replicas": MIN_REPLICAS,
        "componentSpecs": [
            {
                "spec": {
                    "containers": [
                        {
                            "name": container,
                            "image": image,
                            "env": _evidence_env(deployment, version),
                            "resources": RESOURCES,
                            "readinessProbe": _probe("/v2/health/ready"),
                            "livenessProbe": _probe("/v2/health/live"),
                            "volumeMounts": [
                                {"name": "kafka-ca", "mountPath": KAFKA_CA_DIR, "readOnly": True}
                            ],
                        }
                    ],
                    "volumes": [
                        {
                            "name": "kafka-ca",
                            "secret": {
                                "secretName": KAFKA_CA_SECRET,
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                            },
                        }
                    ],
                },
                "hpaSpec": {
                    "minReplicas": MIN_REPLICAS,
                    "maxReplicas": MAX_REPLICAS,
                    "metrics": [
                        {
                            "type": "Resource",
                            "resource": {
                                "name": "cpu",
                                "targetAverageUtilization": TARGET_CPU_PERCENT,
                            },
                        }
                    ],
                },
            }
        ],
        "graph": {
            "name": container,
            "type": "MODEL",
            "modelUri": f"{model_uri_prefix.rstrip('/')}/{version}",
            "children": [],
        },
    }
    if traffic is not None:
        predictor["traffic"] = traffic
    if shadow:
        predictor["shadow"] = True
    return predictor


def render_seldon_deployment(
    deployment: Deployment,
    *,
    name: str = "churn",
    namespace: str = "churn",
    image: str = "churn-platform/serving:latest",
    model_uri_prefix: str = "s3://churn-models",
) -> dict[str, Any]:
    """A Seldon Core v1 ``SeldonDeployment`` (``protocol: v2``) for ``deployment``.

    shadow: champion 100 + challenger ``shadow: true``; canary: champion ``100 - w`` + challenger
    ``w``; blue-green-ready: blue (champion) 100 + green (challenger) 0 with ``shadow: true``,
    deployed, warm and judged on a mirror of every request, as the local router keeps green;
    single: the champion alone with 100.
    """
    predictor = functools.partial(
        _predictor, deployment, name=name, image=image, model_uri_prefix=model_uri_prefix
    )
    champion, challenger = deployment.champion, deployment.challenger
    if deployment.strategy == "single" or challenger is None:
        predictors = [predictor(champion, traffic=100)]
    elif deployment.strategy == "shadow":
        predictors = [
            predictor(champion, traffic=100),
            predictor(challenger, traffic=None, shadow=True),
        ]
    elif deployment.strategy == "blue_green":
        predictors = [
            predictor(champion, traffic=100),
            predictor(challenger, traffic=0, shadow=True),
        ]
    else:
        weight = _percent(deployment.challenger_traffic)
        predictors = [
            predictor(champion, traffic=100 - weight),
            predictor(challenger, traffic=weight),
        ]
    return {
        "apiVersion": SELDON_V1_API,
        "kind": "SeldonDeployment",
        "metadata": {"name": name, "namespace": namespace, "labels": _labels(deployment, name)},
        "spec": {"name": name, "protocol": "v2", "predictors": predictors},
    }


def render_seldon_v2(
    deployment: Deployment,
    *,
    name: str = "churn",
    namespace: str = "churn",
    model_uri_prefix: str = "s3://churn-models",
    requirements: Iterable[str] = (SELDON_CAPABILITY,),
) -> list[dict[str, Any]]:
    """Seldon Core 2 objects: one ``Model`` per live version, then an ``Experiment``.

    canary: candidates champion ``100 - w`` and challenger ``w``; shadow: champion 100 plus a
    100 % mirror to the challenger; blue-green-ready: champion 100 and the same mirror to green;
    single: the champion 100. ``default`` is always the champion. ``requirements`` are the server
    capabilities the models need: :data:`SELDON_CAPABILITY`, which only a ``Server`` running the
    churn serving image offers (``k8s/seldon/v2/server.yaml``), so no stock MLServer server,
    which lacks the churn runtime, is ever picked.
    """
    labels = _labels(deployment, name)
    models = [
        {
            "apiVersion": SELDON_V2_API,
            "kind": "Model",
            "metadata": {
                "name": f"{name}-{version}",
                "namespace": namespace,
                "labels": labels | {"churn.io/version": version},
            },
            "spec": {
                "storageUri": f"{model_uri_prefix.rstrip('/')}/{version}",
                "requirements": list(requirements),
                "replicas": MIN_REPLICAS,
                "minReplicas": MIN_REPLICAS,
                "maxReplicas": MAX_REPLICAS,
            },
        }
        for version in deployment.live_versions
    ]
    champion = f"{name}-{deployment.champion}"
    spec: dict[str, Any] = {"default": champion}
    if deployment.strategy == "canary" and deployment.challenger:
        weight = _percent(deployment.challenger_traffic)
        spec["candidates"] = [
            {"name": champion, "weight": 100 - weight},
            {"name": f"{name}-{deployment.challenger}", "weight": weight},
        ]
    else:
        spec["candidates"] = [{"name": champion, "weight": 100}]
        if deployment.strategy in ("shadow", "blue_green") and deployment.challenger:
            spec["mirror"] = {"name": f"{name}-{deployment.challenger}", "percent": 100}
    experiment = {
        "apiVersion": SELDON_V2_API,
        "kind": "Experiment",
        "metadata": {"name": f"{name}-rollout", "namespace": namespace, "labels": labels},
        "spec": spec,
    }
    return [*models, experiment]


# --------------------------------------------------------------------------- CRD validation


def seldon_schema_dir() -> Path:
    """``<repo>/../shared/schemas/seldon``; fails loudly when it is missing."""
    path = REPO_ROOT.parent / "shared" / "schemas" / "seldon"
    if not path.is_dir():
        raise DeploymentError(
            f"Seldon CRD schemas not found at {path}: clone the shared/ repository beside "
            f"{REPO_ROOT.name}/"
        )
    return path


@functools.lru_cache(maxsize=8)
def _load_crd(path: Path) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with path.open() as handle:
            return yaml.load(handle, Loader=loader)
    except OSError as exc:
        raise DeploymentError(f"cannot read CRD {path}: {exc}") from exc


def validate_against_crd(obj: dict[str, Any], crd_path: Path) -> None:
    """Validate ``obj`` against the CRD's ``openAPIV3Schema`` for its ``apiVersion``.

    Raises ``DeploymentError`` listing every error (path: message).
    """
    crd = _load_crd(Path(crd_path))
    names, group = crd["spec"]["names"], crd["spec"]["group"]
    api_group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    if obj.get("kind") != names["kind"] or api_group != group:
        raise DeploymentError(
            f"{obj.get('apiVersion')}/{obj.get('kind')} does not match CRD "
            f"{group}/{names['kind']} ({crd_path})"
        )
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        raise DeploymentError(f"CRD {crd_path} has no version {version!r}: {sorted(versions)}")
    schema = versions[version].get("schema", {}).get("openAPIV3Schema")
    if schema is None:
        raise DeploymentError(f"CRD {crd_path} version {version} has no openAPIV3Schema")
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [
            f"  {'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in errors
        ]
        name = obj.get("metadata", {}).get("name")
        raise DeploymentError(
            f"{obj['kind']} {name!r} does not match {Path(crd_path).name}:\n" + "\n".join(lines)
        )


def validate_manifest(obj: dict[str, Any], schema_dir: Path | None = None) -> None:
    """Validate a Seldon manifest against the CRD for its kind (``seldon_schema_dir`` default)."""
    kind = obj.get("kind")
    if kind not in CRD_FILES:
        raise DeploymentError(f"no CRD known for kind {kind!r}; known: {sorted(CRD_FILES)}")
    validate_against_crd(obj, (schema_dir or seldon_schema_dir()) / CRD_FILES[kind])


# --------------------------------------------------------------------------- Kubernetes target


class KubernetesSeldonTarget:
    """Seldon resources on Kubernetes, created or patched with ``CustomObjectsApi``.

    ``kind="v1"`` applies a ``SeldonDeployment``; ``"v2"`` Seldon Core 2 ``Model``s and an
    ``Experiment``. Without ``api_client`` the configuration comes from the in-cluster service
    account or else the kubeconfig (``KUBECONFIG``); no cluster gives a ``DeploymentError``.
    ``validate=True`` checks manifests against the CRDs in ``seldon_schema_dir`` first (the API
    server validates them anyway). ``render_options`` go to the render functions.
    """

    def __init__(
        self,
        namespace: str,
        api_client: Any | None = None,
        kind: Literal["v1", "v2"] = "v1",
        *,
        name: str = "churn",
        request_timeout_s: float = 10.0,
        validate: bool = False,
        render_options: dict[str, Any] | None = None,
    ) -> None:
        if kind not in ("v1", "v2"):
            raise DeploymentError(f"kind {kind!r} is not 'v1' or 'v2'")
        self.namespace = namespace
        self.kind = kind
        self.name = name
        self.request_timeout_s = request_timeout_s
        self.validate = validate
        self.render_options = dict(render_options or {})
        self._api_client = api_client

    def describe(self) -> dict[str, Any]:
        """Namespace, Seldon generation and API group."""
        return {
            "target": "kubernetes-seldon",
            "namespace": self.namespace,
            "kind": self.kind,
            "api_version": SELDON_V1_API if self.kind == "v1" else SELDON_V2_API,
            "name": self.name,
        }

    def render(self, deployment: Deployment) -> list[dict[str, Any]]:
        """The manifests ``apply`` sends."""
        options = {"name": self.name, "namespace": self.namespace, **self.render_options}
        if self.kind == "v1":
            return [render_seldon_deployment(deployment, **options)]
        options.pop("image", None)
        return render_seldon_v2(deployment, **options)

    def _client(self) -> Any:
        if self._api_client is not None:
            return self._api_client
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException as in_cluster:
            try:
                config.load_kube_config(client_configuration=configuration)
            except (ConfigException, OSError, TypeError, ValueError) as exc:
                raise DeploymentError(
                    f"no Kubernetes cluster reachable: not in a cluster ({in_cluster}) and no "
                    f"usable kubeconfig ({exc})"
                ) from None
        configuration.retries = 1
        self._api_client = client.ApiClient(configuration)
        return self._api_client

    def apply(self, deployment: Deployment) -> dict[str, Any]:
        """Create or patch every rendered manifest; returns the applied names and actions."""
        manifests = self.render(deployment)
        if self.validate:
            for manifest in manifests:
                validate_manifest(manifest)
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api = client.CustomObjectsApi(self._client())
        applied = []
        for manifest in manifests:
            group, _, version = manifest["apiVersion"].rpartition("/")
            plural = _PLURALS[manifest["kind"]]
            name = manifest["metadata"]["name"]
            where = {"group": group, "version": version, "namespace": self.namespace}
            where["plural"] = plural
            patch = _merge_patch(manifest)
            action = "patched"
            try:
                try:
                    api.patch_namespaced_custom_object(
                        name=name, body=patch, _request_timeout=self.request_timeout_s, **where
                    )
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                    api.create_namespaced_custom_object(
                        body=manifest, _request_timeout=self.request_timeout_s, **where
                    )
                    action = "created"
            except ApiException as exc:
                raise DeploymentError(
                    f"{manifest['kind']} {self.namespace}/{name}: HTTP {exc.status} "
                    f"{exc.reason}: {str(exc.body)[:500]}"
                ) from None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise DeploymentError(f"no Kubernetes cluster reachable: {exc}") from None
            applied.append({"kind": manifest["kind"], "name": name, "action": action})
        return {"target": "kubernetes-seldon", "namespace": self.namespace, "applied": applied}


def _merge_patch(manifest: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch that also removes an Experiment's mirror the manifest leaves out."""
    patch = {**manifest, "spec": dict(manifest["spec"])}
    if manifest["kind"] == "Experiment":
        patch["spec"].setdefault("mirror", None)
    return patch
