import dagster as dg
import pytest
import yaml

from churn_assets.config import REPO_ROOT, load_settings
from churn_assets.kafka import KafkaConfigError, client_config

pytestmark = pytest.mark.unit


def test_external_cluster_with_sasl_ssl(monkeypatch, config_factory):
    monkeypatch.setenv("CHURN_KAFKA__SASL_PASSWORD", "s3cret")
    settings = load_settings(
        config_factory(
            kafka={
                "bootstrap_servers": "b-1.example:9096,b-2.example:9096",
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": "churn",
                "ssl_ca_location": "/etc/ssl/ca.pem",
            }
        )
    )
    assert client_config(settings) == {
        "bootstrap.servers": "b-1.example:9096,b-2.example:9096",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "churn",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ssl/ca.pem",
    }


def test_sasl_without_password_is_refused(config_factory):
    settings = load_settings(
        config_factory(
            kafka={
                "bootstrap_servers": "b-1.example:9096",
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "PLAIN",
                "sasl_username": "churn",
            }
        )
    )
    with pytest.raises(KafkaConfigError, match="CHURN_KAFKA__SASL_PASSWORD"):
        client_config(settings)


def test_instance_config_limits_the_warehouse_pool_to_one(tmp_path):
    (tmp_path / "dagster.yaml").write_text((REPO_ROOT / "config" / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
    assert yaml.safe_load((REPO_ROOT / "config" / "dagster.yaml").read_text())["concurrency"]
