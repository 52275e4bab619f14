"""The serving plane serves the contract its champion was trained with: request models, column
checks, the mirrored event, and a challenger that the served requests cannot feed refused."""

import logging
from pathlib import Path

import pytest

from churn_assets.config import load_settings
from churn_assets.registry import ModelRegistry
from churn_assets.schemas import DEFAULT_CONTRACT, Topics, decode_message
from serving.errors import InvalidInput, ServingError
from serving.plane import ServingPlane
from serving.requests import request_models, validate_columns, validate_records
from tests.conftest import write_config
from tests.serving_fixtures import (
    DOCUMENTED_REQUEST,
    EXTENDED_REQUEST,
    contract_model,
    extended_contract,
    register_model,
)

pytestmark = pytest.mark.unit

EXTENDED = extended_contract()


@pytest.fixture(scope="module")
def models():
    return {
        "default": contract_model(DEFAULT_CONTRACT, seed=1),
        "extended": contract_model(EXTENDED, seed=2),
    }


class Mirror:
    """Captures the encoded events the plane hands the mirror to produce."""

    def __init__(self) -> None:
        self.values: list[bytes] = []

    def publish_encoded(self, key: str, value: bytes) -> bool:
        self.values.append(value)
        return True

    def close(self) -> None:
        pass


def plane_with(tmp_path: Path, models, champion: str, challenger: str | None = None, **kw):
    settings = load_settings(write_config(tmp_path))
    registry = ModelRegistry(settings.registry_dir)
    versions = {"champion": register_model(registry, models[champion], "champion")}
    if challenger is not None:
        versions["challenger"] = register_model(registry, models[challenger], "challenger")
    return ServingPlane(settings, **kw), registry, versions


def record(contract=EXTENDED, **changes):
    row = {k: v for k, v in EXTENDED_REQUEST.items() if k in contract.names}
    row.update(changes)
    return {k: v for k, v in row.items() if v is not ...}


def test_the_plane_serves_its_champions_contract_and_mirrors_with_it(tmp_path, models):
    mirror = Mirror()
    plane, _, _ = plane_with(tmp_path, models, "extended", mirror=mirror)
    try:
        assert plane.contract == EXTENDED
        assert set(plane.requests.single.model_fields) == {
            "customer_id",
            "request_id",
            *EXTENDED.names,
        }
        [prediction] = plane.predict([record(customer_id="c-1")])
        assert 0 < prediction.probability < 1
        event = decode_message(Topics.PREDICTIONS, mirror.values[0], EXTENDED)
        assert event.features.tech_support == "no_internet"
        assert event.features.senior_citizen is True
        with pytest.raises(InvalidInput) as info:
            plane.predict([record(tech_support=...)])
        assert info.value.status_code == 422
        assert info.value.errors[0]["loc"] == [0, "tech_support"]
        assert "tech_support" in str(info.value)
    finally:
        plane.close()


def test_an_incompatible_challenger_is_left_out_at_start(tmp_path, models, caplog):
    """The champion knows eight features; a challenger trained on ten cannot be fed by the
    requests it serves: logged with what it lacks, not served, recorded in the audit."""
    with caplog.at_level(logging.WARNING, logger="serving.plane"):
        plane, registry, versions = plane_with(tmp_path, models, "default", "extended")
    try:
        assert plane.state.challenger is None
        warning = next(r.getMessage() for r in caplog.records if "not served" in r.getMessage())
        assert versions["challenger"] in warning
        assert "senior_citizen" in warning and "tech_support" in warning
        assert "senior_citizen" in plane.store.audit()[-1]["changes"][0]
        assert registry.aliases()["challenger"] == versions["challenger"]  # the registry's own
    finally:
        plane.close()


def test_a_router_change_to_an_incompatible_version_is_refused_with_409(tmp_path, models):
    plane, registry, versions = plane_with(tmp_path, models, "default")
    try:
        extended = register_model(registry, models["extended"])
        before = plane.state
        with pytest.raises(ServingError) as info:
            plane.set_policy(strategy="canary", canary_weight=0.5, challenger=extended, actor="t")
        assert info.value.status_code == 409
        message = str(info.value)
        assert extended in message and "senior_citizen" in message and "tech_support" in message
        assert plane.state == before and "challenger" not in registry.aliases()
        with pytest.raises(ServingError) as info:
            plane.explain(record(DEFAULT_CONTRACT), version=extended)
        assert info.value.status_code == 409 and "tech_support" in str(info.value)
        # A version that needs fewer inputs than the requests carry is served.
        compatible = register_model(registry, models["default"])
        state = plane.set_policy(
            strategy="shadow", canary_weight=None, challenger=compatible, actor="t"
        )
        assert state.challenger == compatible
    finally:
        plane.close()


def test_a_champion_on_fewer_inputs_takes_requests_of_the_served_contract(tmp_path, models):
    """Served contract: the extended champion's. A default-contract challenger in canary reads
    only the inputs it knows from the same records."""
    plane, registry, _ = plane_with(tmp_path, models, "extended")
    try:
        default = register_model(registry, models["default"])
        plane.set_policy(strategy="canary", canary_weight=1.0, challenger=default, actor="t")
        [prediction] = plane.predict([record(customer_id="c-2")])
        assert prediction.model_version == default and prediction.arm == "canary"
        # Its own V2 model validates against its own contract.
        assert plane.predict_version(default, [record(DEFAULT_CONTRACT)]).shape == (1,)
    finally:
        plane.close()


def test_validate_columns_names_rows_and_whole_columns():
    columns = {
        "customer_id": ["a", "b"],
        **{name: [record()[name]] * 2 for name in EXTENDED.names if name != "tech_support"},
    }
    columns["senior_citizen"] = [True, 1]
    with pytest.raises(InvalidInput) as info:
        validate_columns(columns, EXTENDED)
    locs = [error["loc"] for error in info.value.errors]
    assert locs == [["inputs", "tech_support"], [1, "senior_citizen"]], info.value.errors
    columns["tech_support"] = ["YES", "no internet service"]
    columns["senior_citizen"] = [True, False]
    batch = validate_columns(columns, EXTENDED)
    assert [f["tech_support"] for f in batch.features] == ["yes", "no_internet"]
    assert batch.customer_ids == ["a", "b"] and batch.request_ids == [None, None]
    assert batch.features[0]["customer_tenure"] == 24
    assert batch.features == validate_records(batch.rows(), EXTENDED).features


@pytest.mark.parametrize("contract", [DEFAULT_CONTRACT, EXTENDED], ids=["default", "extended"])
def test_the_documented_example_is_a_valid_request(contract):
    models = request_models(contract)
    example = models.single.model_validate(models.example)
    assert set(example.model_fields_set) == set(contract.names)
    assert models.batch.model_validate({"instances": [models.example]})


def test_the_default_contracts_example_is_the_documented_crm_request():
    assert request_models(DEFAULT_CONTRACT).example == DOCUMENTED_REQUEST
