import pytest

from churn_assets.config import REPO_ROOT, ConfigError, Settings, load_settings

pytestmark = pytest.mark.unit


def test_repository_config_loads_with_product_keys():
    settings = load_settings()
    assert settings.router.strategy == "shadow"
    assert settings.monitoring.drift_detection.threshold == 0.05
    assert settings.monitoring.outlier_detection.contamination == 0.01
    assert settings.retraining.schedule == "0 2 * * 0"
    assert settings.kafka.uses_embedded_broker
    assert settings.warehouse_path.is_absolute()


def test_environment_overrides_the_file(monkeypatch, config_factory):
    monkeypatch.setenv("CHURN_ROUTER__CANARY_WEIGHT", "0.3")
    monkeypatch.setenv("CHURN_KAFKA__BOOTSTRAP_SERVERS", "kafka-1:9092")
    settings = load_settings(config_factory())
    assert settings.router.canary_weight == 0.3
    assert settings.kafka.bootstrap_servers == "kafka-1:9092"
    assert not settings.kafka.uses_embedded_broker


def test_wrong_type_names_key_value_and_allowed(config_factory):
    path = config_factory(retraining={"min_samples": "lots"})
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "retraining.min_samples" in message
    assert "'lots'" in message
    assert "valid integer" in message


def test_out_of_range_value(config_factory):
    with pytest.raises(ConfigError, match=r"router.canary_weight' = 1.5.*less than or equal to 1"):
        load_settings(config_factory(router={"canary_weight": 1.5}))


def test_bad_choice_lists_allowed_values(config_factory):
    with pytest.raises(ConfigError) as info:
        load_settings(config_factory(router={"strategy": "yolo"}))
    assert "router.strategy' = 'yolo'" in str(info.value)
    assert "'shadow', 'canary' or 'blue_green'" in str(info.value)


def test_unknown_key_lists_allowed_keys(config_factory):
    with pytest.raises(ConfigError) as info:
        load_settings(config_factory(router={"canary_wieght": 0.2}))
    message = str(info.value)
    assert "unknown key 'router.canary_wieght'" in message
    assert "allowed keys here: canary_weight, strategy" in message


def test_unknown_section(config_factory):
    with pytest.raises(ConfigError, match="unknown key 'routing'"):
        load_settings(config_factory(routing={"strategy": "shadow"}))


def test_bad_environment_value_names_the_variable(monkeypatch, config_factory):
    monkeypatch.setenv("CHURN_MONITORING__DRIFT_DETECTION__THRESHOLD", "2")
    with pytest.raises(ConfigError) as info:
        load_settings(config_factory())
    message = str(info.value)
    assert "monitoring.drift_detection.threshold" in message
    assert "CHURN_MONITORING__DRIFT_DETECTION__THRESHOLD" in message


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        load_settings(missing)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("router: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_settings(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_settings(path)


def test_canary_steps_must_increase(config_factory):
    with pytest.raises(ConfigError, match="strictly increasing"):
        load_settings(config_factory(rollout={"canary_steps": [0.5, 0.25]}))


def test_bad_cron(config_factory):
    with pytest.raises(ConfigError, match="five-field cron"):
        load_settings(config_factory(retraining={"schedule": "weekly"}))


def test_relative_storage_paths_resolve_against_the_project(tmp_path):
    config_dir = tmp_path / "proj" / "config"
    config_dir.mkdir(parents=True)
    (config_dir / "config.yaml").write_text("storage:\n  warehouse_path: data/w.duckdb\n")
    settings = load_settings(config_dir / "config.yaml")
    assert settings.warehouse_path == (tmp_path / "proj" / "data" / "w.duckdb").resolve()


def test_secret_is_not_in_the_file_or_repr(monkeypatch, config_factory):
    monkeypatch.setenv("CHURN_KAFKA__SASL_PASSWORD", "hunter2")
    settings = load_settings(config_factory())
    assert settings.kafka.sasl_password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings)


def test_the_model_defaults_are_config_yaml_so_partial_profiles_inherit_it():
    shipped = load_settings(REPO_ROOT / "config" / "config.yaml")
    defaults = Settings(base_dir=shipped.base_dir)
    assert shipped.model_dump() == defaults.model_dump()


def test_the_time_compressed_profile_loads_and_compresses():
    compressed = load_settings(REPO_ROOT / "config" / "compressed.yaml")
    shipped = load_settings(REPO_ROOT / "config" / "config.yaml")
    assert compressed.rollout.min_step_minutes < shipped.rollout.min_step_minutes
    assert compressed.rollout.min_shadow_requests < shipped.rollout.min_shadow_requests
    assert compressed.retraining.hold_minutes == 0
    assert compressed.retraining.cooldown_minutes < shipped.retraining.cooldown_minutes
    assert compressed.simulator.scenario == "covariate_drift"
    assert compressed.storage == shipped.storage and compressed.data_dir == shipped.data_dir


def test_the_default_feature_contract_is_the_repository_file(config_factory):
    settings = load_settings(config_factory())
    assert settings.contract_path == REPO_ROOT / "config" / "features.yaml"
    assert settings.contract.names[0] == "customer_tenure"


def test_a_bad_feature_contract_stops_loading_naming_the_feature(tmp_path, config_factory):
    contract = tmp_path / "my-features.yaml"
    contract.write_text(
        "format: 1\nfeatures:\n"
        "  - {name: tenure, kind: integer, min: 0}\n"
        "  - {name: plan, kind: category, categories: {basic: [Starter], pro: [starter]}}\n"
    )
    path = config_factory(features={"contract": str(contract)})
    with pytest.raises(ConfigError, match="feature 'plan': 'starter' would spell both"):
        load_settings(path)
    contract.write_text("format: 1\nfeatures:\n  - {name: tenure, kind: integer, min: 0}\n")
    assert load_settings(path).contract.names == ("tenure",)
    with pytest.raises(ConfigError, match="feature contract not found"):
        load_settings(config_factory(features={"contract": str(tmp_path / "none.yaml")}))
