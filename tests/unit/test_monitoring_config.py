"""The monitoring configuration: Prometheus, its alert rules, Alertmanager and Grafana.

* ``promtool`` (Debian package ``prometheus``) checks ``config/prometheus/prometheus.yml`` and
  ``alerts.yml`` and runs the rule unit tests in ``alerts_test.yml``; ``amtool`` (Debian package
  ``prometheus-alertmanager``) checks ``config/alertmanager/alertmanager.yml`` and its routing.
  ``scripts/bootstrap.sh`` installs both; a missing tool fails these tests, it never skips them.
* Every metric name in an alert expression or a Grafana panel query must be one the serving
  process exports (``serving/metrics.py``), so a renamed metric cannot silently empty a panel.
* The thresholds in the rules and dashboards mirror ``config/config.yaml``.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from churn_assets.config import REPO_ROOT

pytestmark = pytest.mark.unit

PROMETHEUS_DIR = REPO_ROOT / "config" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTMANAGER = REPO_ROOT / "config" / "alertmanager" / "alertmanager.yml"
GRAFANA_DIR = REPO_ROOT / "config" / "grafana"
DASHBOARDS = {
    "model-performance-overview.json": "Model Performance Overview",
    "drift-detection-metrics.json": "Drift Detection Metrics",
    "traffic-distribution-canary.json": "Traffic Distribution (Canary)",
    "shadow-deployment-analysis.json": "Shadow Deployment Analysis",
}
DATASOURCE_UID = "${DS_PROMETHEUS}"

# The series the serving process exports at GET /metrics (serving/metrics.py).
EXPORTED_METRICS = frozenset(
    {
        "predictions_total",
        "prediction_latency_seconds_bucket",
        "prediction_latency_seconds_sum",
        "prediction_latency_seconds_count",
        "outliers_detected_total",
        "drift_detected_total",
        "router_traffic_weight",
        "mirror_events_total",
        "mirror_dropped_total",
        "drift_p_value",
        "drift_flag",
        "outlier_rate",
        "model_roc_auc",
    }
)
# Series Prometheus writes itself for every scrape target; alerts may use them (ChurnServingDown).
SCRAPE_METRICS = frozenset({"up"})

EXPECTED_ALERTS = {
    "ChurnServingDown",
    "ChurnFeatureDrift",
    "ChurnDriftDetected",
    "ChurnOutlierRateHigh",
    "ChurnPredictionErrorRate",
    "ChurnLatencyP99High",
    "ChurnModelPerformanceLow",
    "ChurnMirrorDropping",
}

# PromQL functions, aggregation operators and keywords: identifiers that are not metric names.
PROMQL_WORDS = frozenset(
    """
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
    clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv exp floor group_over_time histogram_count histogram_fraction
    histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta
    increase irate label_join label_replace last_over_time ln log10 log2 mad_over_time
    max_over_time min_over_time minute month pi predict_linear present_over_time
    quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_by_label
    sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh
    time timestamp vector year
    sum avg min max count group stddev stdvar topk bottomk quantile count_values limitk
    limit_ratio
    by without on ignoring group_left group_right offset bool and or unless atan2 start end
    inf nan
    """.split()
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_VALUES = re.compile(r"\blabel_values\(\s*([^,()]+?)\s*,\s*[A-Za-z_]\w*\s*\)")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*")
_GRAFANA_VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL (or Grafana ``label_values``) expression reads.

    Strings, label matchers, range selectors, grouping label lists and Grafana variables are
    removed first; what is left that is not a PromQL function or keyword names a metric, whether
    it stands before ``{``, ``(`` or ``[`` or alone.
    """
    text = _LABEL_VALUES.sub(r"\1", expr)
    text = _STRING.sub('""', text)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = _LABEL_LIST.sub(r"\1", text)
    text = _GRAFANA_VARIABLE.sub(" ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in PROMQL_WORDS} - {""}


def unknown_metrics(exprs: dict[str, str], allowed: frozenset[str]) -> dict[str, set[str]]:
    """``{where: unknown metric names}`` for the expressions that read a metric not allowed."""
    found = {where: metric_names(expr) - allowed for where, expr in exprs.items()}
    return {where: names for where, names in found.items() if names}


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not on PATH; these tests need it. Run ./scripts/bootstrap.sh (as root it "
            f"installs the Debian package {package!r}) or install {name} yourself.",
            pytrace=False,
        )
    return path


def run_tool(args: list[str | Path], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool("promtool", "prometheus")


@pytest.fixture(scope="module")
def amtool() -> str:
    return require_tool("amtool", "prometheus-alertmanager")


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


@pytest.fixture(scope="module")
def all_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    return {
        name: json.loads((GRAFANA_DIR / "dashboards" / name).read_text()) for name in DASHBOARDS
    }


@pytest.fixture(scope="module")
def churn_config() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """All panels, including those nested in collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_queries(dashboards: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``{"file / panel / refId": expr}`` for every panel query and query variable."""
    queries = {}
    for name, dashboard in dashboards.items():
        for panel in panels_of(dashboard):
            for target in panel.get("targets", []):
                queries[f"{name} / {panel['title']} / {target['refId']}"] = target["expr"]
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                query = variable["query"]
                text = query["query"] if isinstance(query, dict) else query
                queries[f"{name} / ${variable['name']}"] = text
    return queries


# -- promtool ----------------------------------------------------------------------------------


def test_promtool_checks_the_prometheus_config(promtool):
    result = run_tool([promtool, "check", "config", "config/prometheus/prometheus.yml"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_rules(promtool):
    result = run_tool([promtool, "check", "rules", "config/prometheus/alerts.yml"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass(promtool):
    result = run_tool([promtool, "test", "rules", "config/prometheus/alerts_test.yml"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_prometheus_config_scrapes_serving_and_alerts_to_alertmanager():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "churn-serving"
    assert job["metrics_path"] == "/metrics"
    assert job["scrape_interval"] == "15s"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]
    (alertmanager,) = config["alerting"]["alertmanagers"]
    assert alertmanager["static_configs"][0]["targets"] == ["127.0.0.1:9093"]


# -- alert rules -------------------------------------------------------------------------------


def test_every_alert_is_complete(alert_rules):
    assert {rule["alert"] for rule in alert_rules} == EXPECTED_ALERTS
    for rule in alert_rules:
        name = rule["alert"]
        assert rule.get("for"), f"{name} has no 'for'"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert "{{ $value" in annotations["description"], f"{name} does not name the value"


def test_alert_severities(alert_rules):
    severities = {}
    for rule in alert_rules:
        severities.setdefault(rule["alert"], set()).add(rule["labels"]["severity"])
    assert severities["ChurnModelPerformanceLow"] == {"critical", "warning"}
    realised = next(r for r in alert_rules if 'kind="realised"' in r["expr"])
    assert (realised["labels"]["severity"], realised["for"]) == ("critical", "30m")
    assert severities["ChurnFeatureDrift"] == {"warning"}


def test_thresholds_mirror_the_config(alert_rules, churn_config):
    monitoring = churn_config["monitoring"]
    drift = monitoring["drift_detection"]["threshold"]
    outlier_limit = round(3 * monitoring["outlier_detection"]["contamination"], 10)
    auc = churn_config["retraining"]["performance_threshold"]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for rule in alert_rules:
        by_name.setdefault(rule["alert"], []).append(rule)
    outlier_rules = by_name["ChurnOutlierRateHigh"]
    assert {r["labels"]["source"] for r in outlier_rules} == {"report", "live"}
    for rule in outlier_rules:
        assert rule["expr"].rstrip().endswith(f"> {outlier_limit}"), rule["expr"]
    for rule in by_name["ChurnModelPerformanceLow"]:
        assert rule["expr"].rstrip().endswith(f"< {auc}"), rule["expr"]
    assert f"{drift}" in by_name["ChurnFeatureDrift"][0]["annotations"]["description"]


def test_every_alert_is_unit_tested_firing_and_not_firing(alert_rules):
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    firing: dict[str, list[dict[str, str]]] = {}
    quiet: set[str] = set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            if case["exp_alerts"]:
                firing.setdefault(case["alertname"], []).extend(
                    alert["exp_labels"] for alert in case["exp_alerts"]
                )
                for alert in case["exp_alerts"]:
                    assert alert["exp_annotations"].keys() == {"summary", "description"}
            else:
                quiet.add(case["alertname"])
    assert set(firing) == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS
    # each rule (several share an alertname) is seen firing with its own static labels
    for rule in alert_rules:
        assert any(rule["labels"].items() <= labels.items() for labels in firing[rule["alert"]]), (
            f"no firing test for {rule['alert']} {rule['labels']}"
        )


def test_rule_expressions_read_only_exported_metrics(all_rules):
    exprs = {rule.get("alert") or rule["record"]: rule["expr"] for rule in all_rules}
    read = set().union(*(metric_names(e) for e in exprs.values()))
    assert "predictions_total" in read and "prediction_latency_seconds_bucket" in read
    assert unknown_metrics(exprs, EXPORTED_METRICS | SCRAPE_METRICS) == {}


# -- the metric-name checker -------------------------------------------------------------------


def test_metric_name_parser_finds_every_metric_and_nothing_else():
    expr = (
        "histogram_quantile(0.99, sum by (le, version) "
        '(rate(prediction_latency_seconds_bucket{arm=~"$arm", le!="+Inf"}[$__rate_interval])))'
        " / on (version) group_left sum(rate(predictions_total[5m] offset 1h)) > bool 1e-3"
        " or vector(0) and up"
    )
    assert metric_names(expr) == {"prediction_latency_seconds_bucket", "predictions_total", "up"}
    assert metric_names("label_values(drift_p_value, feature)") == {"drift_p_value"}
    assert metric_names("drift_flag") == {"drift_flag"}


def test_metric_name_checker_reports_a_made_up_metric():
    exprs = {
        "made up": 'sum by (version) (rate(churn_made_up_requests_total{arm="x"}[5m]))',
        "bare": "rate(not_a_real_metric[5m]) > 0",
        "fine": "sum(rate(predictions_total[5m]))",
    }
    assert unknown_metrics(exprs, EXPORTED_METRICS) == {
        "made up": {"churn_made_up_requests_total"},
        "bare": {"not_a_real_metric"},
    }


# -- Alertmanager ------------------------------------------------------------------------------


def test_amtool_checks_the_alertmanager_config(amtool):
    result = run_tool([amtool, "check-config", ALERTMANAGER])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=critical", "alertname=ChurnModelPerformanceLow"], "churn-critical"),
        (["severity=warning", "alertname=ChurnFeatureDrift"], "churn-default"),
        (["alertname=Unlabelled"], "churn-default"),
    ],
)
def test_alertmanager_routes_by_severity(amtool, labels, receiver):
    result = run_tool(
        [amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_alertmanager_inhibits_warnings_under_a_critical_alert():
    config = yaml.safe_load(ALERTMANAGER.read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    assert receivers["churn-default"]["webhook_configs"][0]["url"] == (
        "http://127.0.0.1:5001/alerts"
    )
    assert receivers["churn-critical"]["webhook_configs"]
    (inhibit,) = config["inhibit_rules"]
    assert inhibit["source_matchers"] == ['severity = "critical"']
    assert inhibit["target_matchers"] == ['severity = "warning"']
    assert set(inhibit["equal"]) == {"alertname", "version"}


# -- Grafana -----------------------------------------------------------------------------------


def test_dashboards_have_their_titles_and_panels(dashboards):
    assert {name: d["title"] for name, d in dashboards.items()} == DASHBOARDS
    assert sorted(p.name for p in (GRAFANA_DIR / "dashboards").glob("*.json")) == sorted(DASHBOARDS)
    uids = [d["uid"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids)
    for name, dashboard in dashboards.items():
        assert 36 <= dashboard["schemaVersion"] <= 41, name
        panels = [p for p in panels_of(dashboard) if p["type"] != "row"]
        assert len(panels) >= 4, name
        ids = [p["id"] for p in panels_of(dashboard)]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["DS_PROMETHEUS"]["type"] == "datasource", name
        assert variables["DS_PROMETHEUS"]["query"] == "prometheus", name
        for panel in panels:
            assert panel["title"] and panel["targets"], f"{name}: {panel.get('title')}"
            assert panel["datasource"]["uid"] == DATASOURCE_UID, f"{name}: {panel['title']}"
            for target in panel["targets"]:
                assert target["expr"].strip(), f"{name}: {panel['title']}"
                assert target["datasource"]["uid"] == DATASOURCE_UID


def test_dashboard_queries_read_only_exported_metrics(dashboards):
    queries = dashboard_queries(dashboards)
    for name in DASHBOARDS:
        read = set().union(*(metric_names(q) for k, q in queries.items() if k.startswith(name)))
        assert read, f"{name} reads no metric"
    assert unknown_metrics(queries, EXPORTED_METRICS) == {}


def test_dashboards_show_what_the_brief_asks_for(dashboards):
    def exprs(name: str) -> str:
        return "\n".join(
            t["expr"] for p in panels_of(dashboards[name]) for t in p.get("targets", [])
        )

    overview = exprs("model-performance-overview.json")
    assert "model_roc_auc" in overview and "histogram_quantile(0.5," in overview
    assert "histogram_quantile(0.99," in overview and 'status="error"' in overview
    drift = exprs("drift-detection-metrics.json")
    for metric in ("drift_p_value", "drift_flag", "drift_detected_total", "outlier_rate"):
        assert metric in drift
    canary = exprs("traffic-distribution-canary.json")
    assert "router_traffic_weight" in canary and "canary" in canary
    shadow = exprs("shadow-deployment-analysis.json")
    assert "mirror_events_total" in shadow and "mirror_dropped_total" in shadow
    assert "shadow" in shadow


def test_drift_panel_draws_the_configured_threshold(dashboards, churn_config):
    threshold = churn_config["monitoring"]["drift_detection"]["threshold"]
    panel = next(
        p
        for p in panels_of(dashboards["drift-detection-metrics.json"])
        if any("drift_p_value" in t["expr"] for t in p.get("targets", []))
    )
    defaults = panel["fieldConfig"]["defaults"]
    assert threshold in [step["value"] for step in defaults["thresholds"]["steps"]]
    assert defaults["custom"]["thresholdsStyle"]["mode"] != "off"


def test_dashboard_queries_are_valid_promql(promtool, dashboards, tmp_path: Path):
    """Each panel query, Grafana variables filled in, must pass ``promtool check rules``."""
    fill = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
    rules = []
    for index, (where, expr) in enumerate(dashboard_queries(dashboards).items()):
        if expr.startswith("label_values("):
            continue
        text = _GRAFANA_VARIABLE.sub(lambda m: fill.get(m.group(1), ".*"), expr)
        rules.append({"record": f"dashboard:query_{index}", "expr": text})
        rules[-1]["labels"] = {"panel": where}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = run_tool([promtool, "check", "rules", path])
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning():
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources.yml").read_text())
    (source,) = datasources["datasources"]
    assert (source["type"], source["url"]) == ("prometheus", "http://prometheus:9090")
    assert source["isDefault"] is True
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
