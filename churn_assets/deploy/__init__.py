"""Deployment targets: apply rollout decisions to the local serving process or to Seldon on k8s.

A rollout ``Decision`` (``churn_assets.rollout``) says where traffic should be; ``deployment_for``
turns it into a ``Deployment`` and a ``DeploymentTarget`` applies it. One module per concern:

* :mod:`~churn_assets.deploy.model`: ``Deployment``, ``deployment_for``, the
  ``DeploymentTarget`` protocol and ``DeploymentError``;
* :mod:`~churn_assets.deploy.local`: ``LocalServingTarget``, the serving process's admin API
  (``PUT /router/policy``, ``POST /router/promote-v2``, ``POST /router/rollback``) over HTTP;
* :mod:`~churn_assets.deploy.seldon`: the Seldon renderers, ``render_seldon_deployment`` (Core v1
  ``SeldonDeployment``, ``protocol: v2``) and ``render_seldon_v2`` (Core 2 ``Model``s and an
  ``Experiment``);
* :mod:`~churn_assets.deploy.crd`: validation against the Seldon CRDs;
* :mod:`~churn_assets.deploy.kubernetes_target`: ``KubernetesSeldonTarget``, which creates or
  patches the rendered resources with the ``kubernetes`` client.

The package never imports Dagster; a Dagster resource wraps a target.
"""

from churn_assets.deploy.crd import (
    CRD_FILES,
    seldon_schema_dir,
    validate_against_crd,
    validate_manifest,
)
from churn_assets.deploy.kubernetes_target import KubernetesSeldonTarget
from churn_assets.deploy.local import LocalServingTarget
from churn_assets.deploy.model import (
    STRATEGIES,
    Deployment,
    DeploymentError,
    DeploymentTarget,
    deployment_for,
)
from churn_assets.deploy.seldon import (
    SELDON_CAPABILITY,
    render_seldon_deployment,
    render_seldon_v2,
)

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
