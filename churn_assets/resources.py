"""Dagster resources: the platform settings and what is built from them."""

import os

import dagster as dg

from churn_assets.config import Settings, load_settings
from churn_assets.deploy import DeploymentError, DeploymentTarget

__all__ = ["DeploymentTargetResource", "PlatformResource"]


class PlatformResource(dg.ConfigurableResource):
    """Platform settings for assets and sensors.

    ``config_path`` empty means ``$CHURN_CONFIG`` or ``config/config.yaml``; the file is read when
    a run or sensor tick needs it, never at import time.
    """

    config_path: str = ""

    def settings(self) -> Settings:
        return load_settings(self.config_path or None)


class DeploymentTargetResource(dg.ConfigurableResource):
    """Where rollout decisions are applied: one interface, chosen by ``rollout.target``.

    * ``local``: the serving process's admin API at ``serving.host``/``serving.http_port``, with
      the admin token from ``CHURN_ADMIN_TOKEN`` (environment only);
    * ``seldon_v1`` / ``seldon_v2``: a SeldonDeployment, or Seldon Core 2 Models and an
      Experiment, in ``rollout.kubernetes_namespace`` through the ``kubernetes`` client
      (in-cluster service account, else ``KUBECONFIG``); manifests are validated against the
      Seldon CRDs first when they are available.

    ``kind`` (empty: ``rollout.target``) overrides the setting, e.g. per run in the launchpad.
    """

    kind: str = ""

    def target(self, settings: Settings) -> DeploymentTarget:
        from churn_assets.deploy import (
            KubernetesSeldonTarget,
            LocalServingTarget,
            seldon_schema_dir,
        )
        from churn_assets.rollout_control import serving_url

        kind = self.kind or settings.rollout.target
        if kind == "local":
            token = os.environ.get("CHURN_ADMIN_TOKEN", "")
            if not token:
                raise DeploymentError(
                    "rollout.target is 'local' but CHURN_ADMIN_TOKEN is not set: the rollout "
                    "drives the serving admin API, which needs the same token as `churn serve`"
                )
            return LocalServingTarget(serving_url(settings), token)
        if kind in ("seldon_v1", "seldon_v2"):
            try:
                validate = seldon_schema_dir().is_dir()
            except DeploymentError:
                validate = False
            return KubernetesSeldonTarget(
                settings.rollout.kubernetes_namespace,
                kind="v1" if kind == "seldon_v1" else "v2",
                name=settings.rollout.seldon_name,
                validate=validate,
            )
        raise DeploymentError(f"unknown deployment target {kind!r}: local, seldon_v1, seldon_v2")
