"""A drain pauses the cyclic garbage collector and gives it back as it found it."""

import gc

import pytest

from churn_assets.landing import _no_cyclic_gc

pytestmark = pytest.mark.unit


@pytest.fixture
def restore_gc():
    enabled = gc.isenabled()
    yield
    if enabled:
        gc.enable()
    else:
        gc.disable()


def test_paused_during_and_resumed_after(restore_gc):
    gc.enable()
    with _no_cyclic_gc():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_resumed_after_a_failing_drain(restore_gc):
    gc.enable()
    with pytest.raises(RuntimeError, match="drain failed"), _no_cyclic_gc():
        raise RuntimeError("drain failed")
    assert gc.isenabled()


def test_left_off_when_it_was_off(restore_gc):
    gc.disable()
    with _no_cyclic_gc():
        assert not gc.isenabled()
    assert not gc.isenabled()
