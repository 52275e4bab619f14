"""A Kubernetes API client that records requests instead of sending them (no API server here)."""

from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

__all__ = ["RecordingApiClient"]


class RecordingApiClient(kubernetes.client.ApiClient):
    """Records the HTTP requests the real ``CustomObjectsApi`` builds, with no API server.

    A fake is used only because no Kubernetes API server can run on these machines; everything
    above the transport (KubernetesSeldonTarget, the generated CustomObjectsApi) is the real code.
    Objects not created yet answer 404 to a PATCH, as an API server does. ``objects`` holds each
    object as the requests left it (a create's body, then every merge patch's keys replaced).
    """

    VERBS = {"GET": "get", "POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}

    def __init__(self) -> None:
        super().__init__(kubernetes.client.Configuration())
        self.calls: list[tuple[str, str, str, str]] = []
        self.existing: set[tuple[str, str, str]] = set()
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}

    def call_api(self, resource_path, method, path_params=None, *args, **kwargs):
        params = dict(path_params or {})
        group, plural = params["group"], params["plural"]
        self.calls.append((group, plural, self.VERBS[method], params.get("namespace", "")))
        body = kwargs.get("body") if "body" in kwargs else (args[3] if len(args) > 3 else None)
        key = (group, plural, params.get("name") or body["metadata"]["name"])
        if method == "PATCH" and key not in self.existing:
            raise ApiException(status=404, reason="Not Found")
        self.existing.add(key)
        if body is not None:
            self.objects[key] = _merged(self.objects.get(key, {}), body)
        return {}

    def close(self) -> None:
        """Nothing to close: no pool was opened."""


def _merged(current: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) applied to ``current``."""
    merged = dict(current)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged
