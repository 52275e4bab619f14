"""Helpers shared by the ``churn`` command modules (no command lives here)."""

import click

from churn_assets.config import ConfigError, Settings, load_settings

__all__ = ["embedded_broker", "fail", "settings_of"]


def settings_of(ctx: click.Context) -> Settings:
    """The command's validated settings, loaded once per invocation."""
    obj = ctx.ensure_object(dict)
    settings = obj.get("settings")
    if settings is None:
        try:
            settings = load_settings(obj.get("config_path"))
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        obj["settings"] = settings
    return settings


def fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


def embedded_broker(settings: Settings, port: int | None = None):
    """The embedded broker of ``settings``; an error when an external cluster is configured."""
    from churn_assets.broker import EmbeddedBroker

    if not settings.kafka.uses_embedded_broker:
        raise click.ClickException(
            f"kafka.bootstrap_servers is set ({settings.kafka.bootstrap_servers}); the embedded "
            "broker is only used when it is null"
        )
    embedded = settings.kafka.embedded
    return EmbeddedBroker(
        settings.run_dir,
        port=embedded.port if port is None else port,
        startup_timeout_s=embedded.startup_timeout_s,
    )
