"""The Panel dashboard: ``app`` (served by ``churn dashboard``), ``pages``, ``charts`` and the
Dagster-free data layer ``data``. See docs/DASHBOARD_GUIDE.md."""
