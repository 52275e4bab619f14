"""Dagster resources: the platform settings and what is built from them."""

import dagster as dg

from churn_assets.config import Settings, load_settings

__all__ = ["PlatformResource"]


class PlatformResource(dg.ConfigurableResource):
    """Platform settings for assets and sensors.

    ``config_path`` empty means ``$CHURN_CONFIG`` or ``config/config.yaml``; the file is read when
    a run or sensor tick needs it, never at import time.
    """

    config_path: str = ""

    def settings(self) -> Settings:
        return load_settings(self.config_path or None)
