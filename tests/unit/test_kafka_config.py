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


def test_every_step_and_check_shares_the_warehouse_pool():
    """DuckDB lets one process at a time open the warehouse file. An asset check outside the
    pool (the transformer-parity check once was) reads the file while another run's step
    writes it and fails with "Conflicting lock"."""
    from churn_assets.assets.landing import WAREHOUSE_POOL
    from churn_assets.definitions import defs

    repository = defs.get_repository_def()
    nodes = {
        node.name: node.pool
        for assets in repository.assets_defs_by_key.values()
        for node in [assets.node_def]
    }
    nodes |= {
        checks.node_def.name: checks.node_def.pool
        for checks in repository.asset_checks_defs_by_key.values()
    }
    assert any("transformer_parity" in name for name in nodes)
    outside = sorted(name for name, pool in nodes.items() if pool != WAREHOUSE_POOL)
    assert outside == []
