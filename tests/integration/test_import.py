"""`churn import` of a telco-layout CSV through a real broker into the warehouse: malformed rows
in the rejects file, the rest landed with canonical values, a second import landing nothing."""

import subprocess

import pytest
import yaml

from churn_assets.warehouse import connect
from tests.unit.test_importer import HEADER, MAPPING, ROWS

pytestmark = [pytest.mark.integration]


def run(argv, **kwargs):
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kwargs)


def landed(settings, table):
    with connect(settings.warehouse_path, read_only=True) as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_import_lands_valid_rows_once_and_rejects_the_rest(broker_settings, churn_cli, tmp_path):
    export = tmp_path / "telco.csv"
    export.write_text(HEADER + "\n".join(ROWS) + "\n")
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(yaml.safe_dump(MAPPING))

    first = run([*churn_cli, "import", str(export), "--mapping", str(mapping)])
    assert first.returncode == 0, first.stderr
    assert "9 rows, 5 valid, 4 rejected" in first.stderr
    assert "produced 5 customer events and 5 outcomes" in first.stdout
    rejects = (tmp_path / "telco.rejects.csv").read_text().splitlines()
    assert rejects[0] == "row,column,reason" and len(rejects) == 5
    assert run([*churn_cli, "land"]).returncode == 0
    assert landed(broker_settings, "landed_customer_events") == 5
    assert landed(broker_settings, "landed_feedback") == 5
    with connect(broker_settings.warehouse_path, read_only=True) as con:
        contracts = {
            r[0] for r in con.execute("SELECT contract_type FROM landed_customer_events").fetchall()
        }
    assert contracts == {"month-to-month", "one_year", "two_year"}

    again = run([*churn_cli, "import", str(export), "--mapping", str(mapping)])
    assert again.returncode == 0, again.stderr
    landing = run([*churn_cli, "land"])
    assert landing.returncode == 0, landing.stderr
    assert landed(broker_settings, "landed_customer_events") == 5
    assert landed(broker_settings, "landed_feedback") == 5
    assert "replayed (already landed, not inserted) 5" in landing.stdout


def test_a_mapping_error_is_one_line(broker_settings, churn_cli, tmp_path):
    export = tmp_path / "telco.csv"
    export.write_text(HEADER + ROWS[0] + "\n")
    result = run([*churn_cli, "import", str(export), "--id-column", "id", "--as-of", "2026-06-30"])
    assert result.returncode == 1
    assert "Error: the export has no customer id column 'id'" in result.stderr
    assert "Traceback" not in result.stderr
