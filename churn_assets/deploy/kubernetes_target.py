"""Seldon resources on Kubernetes as a deployment target, created or patched through the
``kubernetes`` client's ``CustomObjectsApi``.

Patches are JSON merge patches of the rendered manifests; they set an Experiment's
``spec.mirror`` to null when the rendered one has none (a merge patch keeps absent keys, and a
left-over mirror would keep shadowing a rolled-back challenger). The target creates and patches
but never deletes.
"""

from typing import Any, Literal

import urllib3

from churn_assets.deploy.crd import validate_manifest
from churn_assets.deploy.model import Deployment, DeploymentError
from churn_assets.deploy.seldon import (
    SELDON_V1_API,
    SELDON_V2_API,
    render_seldon_deployment,
    render_seldon_v2,
)

__all__ = ["KubernetesSeldonTarget"]

_PLURALS = {"SeldonDeployment": "seldondeployments", "Model": "models", "Experiment": "experiments"}


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
