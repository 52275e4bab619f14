"""Seldon manifests for a deployment: a Core v1 ``SeldonDeployment``, or Core 2 ``Model``s and an
``Experiment``.

* **Predictors and models are named by version** (``v2``, ``churn-v2``), never by role or
  colour, so a version keeps its pods from shadow through canary to promotion; in blue-green the
  "blue" predictor is the champion's and the "green" one the challenger's (label
  ``churn.io/role``: ``champion`` / ``challenger``). Blue-green-ready renders green with
  traffic 0 and mirrored, so it is warm and judged before the switch; promoted and rolled-back
  rollouts render only the live version.
* **Every v1 predictor pod produces the rollout's evidence**: it knows its version and arm
  (``CHURN_MODEL_VERSION``, ``CHURN_SERVING__ARM``), so its metrics carry both, and it mirrors
  every answer to ``ml.predictions`` through the production profile's Kafka
  (``churn_assets.evidence`` reads both).
* **Seldon Core 2** always gets an Experiment (one candidate with weight 100 when only one version
  is live) rather than none: create-or-patch never deletes, so a left-over canary Experiment would
  otherwise keep sending traffic to a rolled-back challenger.
* Resources, the autoscaler and the replica bounds live here (``RESOURCES``, ``MIN_REPLICAS``,
  ``MAX_REPLICAS``): the target's merge patches replace whole predictors.
"""

import functools
from collections.abc import Iterable
from typing import Any

from churn_assets.deploy.model import Deployment

__all__ = [
    "ARM_ENV",
    "MAX_REPLICAS",
    "MIN_REPLICAS",
    "RESOURCES",
    "SELDON_CAPABILITY",
    "SELDON_V1_API",
    "SELDON_V2_API",
    "render_seldon_deployment",
    "render_seldon_v2",
]

SELDON_V1_API = "machinelearning.seldon.io/v1"
SELDON_V2_API = "mlops.seldon.io/v1alpha1"
# The Seldon Core 2 capability of servers that run the churn serving image.
SELDON_CAPABILITY = "churn-platform"


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
                # Reaches the churn runtime as parameters.extra: the arm its answers belong to.
                "parameters": [{"name": "arm", "value": _arm(deployment, version)}],
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
