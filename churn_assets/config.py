"""Validated platform settings: ``config/config.yaml`` plus ``CHURN_*`` environment overrides.

Settings are loaded once per process with :func:`load_settings`. Precedence, highest first:
keyword overrides passed by code, environment variables (``CHURN_<SECTION>__<KEY>``), the YAML
file. A missing file, malformed YAML, an unknown key or a bad value raises :class:`ConfigError`
whose message names the key, the value and what is allowed.
"""

import functools
import os
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

__all__ = [
    "ConfigError",
    "Settings",
    "load_settings",
    "default_config_path",
    "REPO_ROOT",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONTRACT = REPO_ROOT / "config" / "features.yaml"

if TYPE_CHECKING:
    from churn_assets.contract import Contract
ENV_PREFIX = "CHURN_"
ENV_DELIMITER = "__"
CONFIG_ENV_VAR = "CHURN_CONFIG"


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouterSettings(_Section):
    strategy: Literal["shadow", "canary", "blue_green"] = "shadow"
    canary_weight: float = Field(0.1, ge=0.0, le=1.0)


class DriftDetectionSettings(_Section):
    enabled: bool = True
    threshold: float = Field(0.05, gt=0.0, lt=1.0)
    correction: Literal["fdr", "bonferroni"] = "fdr"
    mmd_sample: int = Field(1000, ge=50, le=5000)


class OutlierDetectionSettings(_Section):
    enabled: bool = True
    contamination: float = Field(0.01, gt=0.0, lt=0.5)


class MonitoringSettings(_Section):
    drift_detection: DriftDetectionSettings = DriftDetectionSettings()
    outlier_detection: OutlierDetectionSettings = OutlierDetectionSettings()
    live_window_days: float = Field(1.0, gt=0, le=365)
    min_labelled_rows: int = Field(200, ge=1)


class RetrainingSettings(_Section):
    enabled: bool = True
    schedule: str = "0 2 * * 0"
    min_samples: int = Field(1000, ge=1)
    performance_threshold: float = Field(0.75, gt=0.0, le=1.0)
    hold_minutes: float = Field(30.0, ge=0, le=7 * 24 * 60)
    cooldown_minutes: float = Field(360.0, ge=0, le=30 * 24 * 60)

    @field_validator("schedule")
    @classmethod
    def _five_field_cron(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError("must be a five-field cron expression such as '0 2 * * 0'")
        return value


class EmbeddedBrokerSettings(_Section):
    port: int = Field(0, ge=0, le=65535)
    startup_timeout_s: float = Field(20.0, gt=0)


class KafkaSettings(_Section):
    bootstrap_servers: str | None = None
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    partitions: int = Field(3, ge=1, le=1024)
    replication_factor: int = Field(1, ge=1, le=16)
    consumer_group: str = Field("churn-landing", min_length=1)
    embedded: EmbeddedBrokerSettings = EmbeddedBrokerSettings()

    @property
    def uses_embedded_broker(self) -> bool:
        return not self.bootstrap_servers


class StorageSettings(_Section):
    data_dir: Path = Path("data")
    warehouse_path: Path = Path("data/warehouse.duckdb")
    read_models_dir: Path = Path("data/read_models")
    registry_dir: Path = Path("data/models")


class LandingSettings(_Section):
    batch_max_messages: int = Field(20_000, ge=1, le=1_000_000)
    batch_max_seconds: float = Field(2.0, gt=0, le=600)
    drain_max_seconds: float = Field(300.0, gt=0)


class SimulatorSettings(_Section):
    seed: int = 42
    customers: int = Field(10_000, ge=1, le=10_000_000)
    days: int = Field(90, ge=1, le=3650)
    start_date: date = date(2026, 1, 1)
    scenario: Literal["none", "covariate_drift", "concept_drift", "outlier_burst"] = "none"
    scenario_start_day: int = Field(30, ge=0)


class XGBoostSettings(_Section):
    max_depth: int = Field(3, ge=1, le=16)
    learning_rate: float = Field(0.05, gt=0, le=1)
    n_estimators: int = Field(600, ge=1, le=10_000)
    min_child_weight: float = Field(5.0, ge=0)
    subsample: float = Field(0.8, gt=0, le=1)
    colsample_bytree: float = Field(0.8, gt=0, le=1)
    reg_lambda: float = Field(1.0, ge=0)
    early_stopping_rounds: int = Field(40, ge=1)


class GateSettings(_Section):
    max_auc_drop_vs_champion: float = Field(0.01, ge=0, le=1)
    max_calibration_error: float = Field(0.05, gt=0, le=1)
    min_training_rows: int = Field(2000, ge=1)


class TrainingSettings(_Section):
    horizon_days: int = Field(14, ge=1, le=365)
    snapshot_step_days: int = Field(3, ge=1, le=90)
    label_grace_days: int = Field(10, ge=0, le=90)
    seed: int = 42
    n_threads: int = Field(2, ge=1, le=256)
    device: Literal["cpu", "cuda"] = "cpu"
    balance_classes: bool = False
    search_trials: int = Field(0, ge=0, le=200)
    xgboost: XGBoostSettings = XGBoostSettings()
    gates: GateSettings = GateSettings()


class ServingSettings(_Section):
    host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=1, le=65535)
    grpc_port: int = Field(8081, ge=1, le=65535)
    url: str | None = Field(None, pattern=r"^https?://[^\s/]+(:[0-9]+)?/?$")
    max_request_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="largest request body (REST, answered 413) or message (gRPC, "
        "RESOURCE_EXHAUSTED) serving reads",
    )
    # A Seldon predictor serves one version on one arm of the rollout; its rendered pod sets
    # this so its metrics and mirrored predictions carry that arm. null = the router's own arms.
    arm: Literal["primary", "canary", "shadow"] | None = None


class PrometheusSettings(_Section):
    """Where the rollout's ``prometheus`` evidence source reads the serving metrics."""

    url: str | None = Field(None, pattern=r"^https?://[^\s/]+(:[0-9]+)?(/[^\s]*)?$")
    job: str = Field("churn-serving", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    timeout_s: float = Field(5.0, gt=0, le=120)
    retries: int = Field(2, ge=0, le=10)


class RolloutSettings(_Section):
    strategy: Literal["canary", "blue_green"] = "canary"
    canary_steps: list[float] = [0.1, 0.25, 0.5, 0.75, 1.0]
    min_shadow_requests: int = Field(500, ge=1)
    min_agreement: float = Field(0.9, ge=0, le=1)
    max_score_ks: float = Field(0.2, ge=0, le=1)
    max_latency_overhead_ms: float = Field(50.0, ge=0)
    max_error_rate: float = Field(0.01, gt=0, lt=1)
    max_p99_latency_ms: float = Field(250.0, gt=0)
    min_canary_requests: int = Field(200, ge=1)
    min_step_minutes: float = Field(30.0, ge=0)
    max_auc_drop: float = Field(0.02, ge=0, le=1)
    alpha: float = Field(0.05, gt=0, lt=1)
    target: Literal["local", "seldon_v1", "seldon_v2"] = "local"
    evidence: Literal["router", "prometheus"] = "router"
    kubernetes_namespace: str = Field("churn", min_length=1)
    seldon_name: str = Field("churn", min_length=1)

    @field_validator("canary_steps")
    @classmethod
    def _increasing_fractions(cls, steps: list[float]) -> list[float]:
        if not steps:
            raise ValueError("must list at least one canary step")
        if any(not 0.0 < s <= 1.0 for s in steps):
            raise ValueError("every step must be a traffic share in (0, 1]")
        if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError("steps must be strictly increasing")
        return steps


class DagsterSettings(_Section):
    webserver_port: int = Field(3000, ge=1, le=65535)
    url: str | None = Field(None, pattern=r"^https?://[^\s/]+(:[0-9]+)?/?$")


class DashboardSettings(_Section):
    port: int = Field(5006, ge=1, le=65535)


class FeaturesSettings(_Section):
    # The feature contract (docs/YOUR_DATA.md); null = the platform's default contract,
    # config/features.yaml in the repository. A relative path hangs off the project root.
    contract: Path | None = None


class Settings(BaseSettings):
    """All platform settings. Construct with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        extra="forbid",
        frozen=True,
    )

    router: RouterSettings = RouterSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    retraining: RetrainingSettings = RetrainingSettings()
    kafka: KafkaSettings = KafkaSettings()
    storage: StorageSettings = StorageSettings()
    landing: LandingSettings = LandingSettings()
    simulator: SimulatorSettings = SimulatorSettings()
    training: TrainingSettings = TrainingSettings()
    serving: ServingSettings = ServingSettings()
    prometheus: PrometheusSettings = PrometheusSettings()
    rollout: RolloutSettings = RolloutSettings()
    dagster: DagsterSettings = DagsterSettings()
    dashboard: DashboardSettings = DashboardSettings()
    features: FeaturesSettings = FeaturesSettings()
    # Directory that relative storage paths resolve against (the config file's project root).
    base_dir: Path = REPO_ROOT

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init data; the environment must win over it.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _evidence_has_a_source(self) -> "Settings":
        if self.rollout.evidence == "prometheus" and not self.prometheus.url:
            raise ValueError(
                "rollout.evidence is 'prometheus' but prometheus.url is not set: name the "
                "Prometheus server the rollout reads (e.g. http://prometheus:9090)"
            )
        return self

    def resolve(self, path: Path) -> Path:
        """An absolute path for a storage setting (relative ones hang off ``base_dir``)."""
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.storage.data_dir)

    @property
    def warehouse_path(self) -> Path:
        return self.resolve(self.storage.warehouse_path)

    @property
    def read_models_dir(self) -> Path:
        return self.resolve(self.storage.read_models_dir)

    @property
    def registry_dir(self) -> Path:
        return self.resolve(self.storage.registry_dir)

    @property
    def contract_path(self) -> Path:
        configured = self.features.contract
        return DEFAULT_CONTRACT if configured is None else self.resolve(configured)

    @property
    def contract(self) -> "Contract":
        """The feature contract (read once per file version)."""
        return _contract(self.contract_path)

    @property
    def run_dir(self) -> Path:
        """Where process state (the embedded broker's pid and address) is kept."""
        return self.data_dir / "run"


@functools.lru_cache(maxsize=8)
def _contract_at(path: Path, mtime_ns: int) -> "Contract":
    from churn_assets.contract import load_contract

    return load_contract(path)


def _contract(path: Path) -> "Contract":
    from churn_assets.contract import ContractError

    try:
        mtime_ns = path.stat().st_mtime_ns
    except FileNotFoundError:
        raise ConfigError(f"feature contract not found: {path} (features.contract)") from None
    try:
        return _contract_at(path, mtime_ns)
    except ContractError as exc:
        raise ConfigError(str(exc)) from None


def default_config_path() -> Path:
    """``$CHURN_CONFIG`` if set, else ``config/config.yaml`` in the repository."""
    configured = os.environ.get(CONFIG_ENV_VAR)
    return Path(configured) if configured else REPO_ROOT / "config" / "config.yaml"


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path} "
            f"(create it from config/config.yaml or point {CONFIG_ENV_VAR} at one)"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections at the top level, "
            f"got {type(data).__name__}"
        )
    return data


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section that ``loc`` (minus its last part) points into."""
    current: Any = model
    for part in loc[:-1]:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        current = annotation
    return sorted(name for name in current.model_fields if name != "base_dir")


def _describe(exc: ValidationError, source: Path) -> str:
    lines = [f"invalid configuration ({source}):"]
    for error in exc.errors():
        loc = tuple(error["loc"])
        if not loc:  # a rule across sections: its message names the keys
            lines.append(f"  - {error['msg'].removeprefix('Value error, ')}")
            continue
        key = ".".join(str(part) for part in loc)
        env_name = ENV_PREFIX + ENV_DELIMITER.join(str(p).upper() for p in loc)
        origin = f" (from environment variable {env_name})" if env_name in os.environ else ""
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(Settings, loc)) or "none"
            lines.append(f"  - unknown key '{key}'{origin}; allowed keys here: {allowed}")
            continue
        value = error.get("input")
        shown = "<missing>" if error["type"] == "missing" else repr(value)
        lines.append(f"  - key '{key}' = {shown}{origin}: {error['msg']}")
    return "\n".join(lines)


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Load and validate settings from ``path`` (default: :func:`default_config_path`).

    ``overrides`` are top-level sections (e.g. ``kafka={...}``) merged over the file, used by
    tests and the CLI; the environment still wins over the file but not over ``overrides``.
    """
    source = Path(path) if path is not None else default_config_path()
    data = _read_yaml(source)
    if "base_dir" in data:
        raise ConfigError(f"invalid configuration ({source}): 'base_dir' is not a config key")
    data["base_dir"] = source.resolve().parent.parent
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    if overrides:
        merged = settings.model_dump()
        for section, values in overrides.items():
            if isinstance(values, dict) and isinstance(merged.get(section), dict):
                merged[section] = {**merged[section], **values}
            else:
                merged[section] = values
        try:
            settings = Settings.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, source)) from None
    _contract(settings.contract_path)  # a bad contract stops every start here, naming the feature
    return settings
