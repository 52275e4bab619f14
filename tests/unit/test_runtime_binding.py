"""Runtimes carry their own serving plane: no process-wide plane to install or leak."""

import asyncio

import pytest
from mlserver.errors import MLServerError
from mlserver.settings import ModelParameters, ModelSettings

from serving.runtime import (
    BoundModelSettings,
    ExplainerRuntime,
    RouterRuntime,
    VersionRuntime,
    runtimes_for,
)

pytestmark = pytest.mark.unit


class Plane:
    """Stands in for a ServingPlane: loading a version only records it."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def load(self, version: str) -> None:
        self.loaded.append(version)


def settings(cls, **parameters) -> ModelSettings:
    return ModelSettings(name="churn", implementation=cls, parameters=ModelParameters(**parameters))


def test_each_plane_gets_its_own_runtime_classes():
    first, second = Plane(), Plane()
    mine, theirs = runtimes_for(first), runtimes_for(second)
    asyncio.run(mine.version(settings(mine.version, version="v1")).load())
    asyncio.run(theirs.version(settings(theirs.version, version="v7")).load())
    assert (first.loaded, second.loaded) == (["v1"], ["v7"])
    assert issubclass(mine.router, RouterRuntime) and mine.router.plane is first
    assert issubclass(theirs.explainer, ExplainerRuntime) and theirs.explainer.plane is second
    assert RouterRuntime.plane is None  # binding never touches the classes themselves


@pytest.mark.parametrize("cls", [RouterRuntime, VersionRuntime, ExplainerRuntime])
def test_a_runtime_without_a_plane_refuses_to_load_saying_so(cls):
    runtime = cls(settings(cls, version="v1"))
    with pytest.raises(MLServerError, match="not bound to a serving plane") as raised:
        asyncio.run(runtime.load())
    assert raised.value.status_code == 503


def test_bound_settings_hand_mlserver_the_bound_class_not_its_import_path():
    plane = Plane()
    runtimes = runtimes_for(plane)
    made = BoundModelSettings.of(runtimes.router, name="churn-router")
    # MLServer keeps the import path, which names the unbound class ...
    assert made.implementation_ == "serving.runtime.RouterRuntime"
    # ... and instantiates what ``implementation`` gives: the bound one, copies included.
    for settings_ in (made, made.model_copy(), made.model_copy(deep=True)):
        assert settings_.implementation is runtimes.router
        assert settings_.implementation.plane is plane
