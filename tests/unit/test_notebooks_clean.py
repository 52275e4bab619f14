"""Committed notebooks: valid, without outputs, and saying up front what they need."""

import json

import nbformat
import pytest

from churn_assets.config import REPO_ROOT

pytestmark = pytest.mark.unit

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
EXPECTED = (
    "01_data_exploration.ipynb",
    "02_model_evaluation_explainability.ipynb",
    "03_drift_investigation.ipynb",
    "04_shadow_canary_analysis.ipynb",
)
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def test_the_four_notebooks_are_committed():
    assert [path.name for path in NOTEBOOKS] == list(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_has_no_outputs_or_execution_counts(path):
    notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(notebook)
    dirty = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts"
    assert "widgets" not in notebook.metadata, f"{path.name} carries widget state"
    # The raw JSON as well: no output payloads hiding in attachments or stray fields.
    raw = json.loads(path.read_text())
    assert all(c.get("outputs", []) == [] for c in raw["cells"] if c["cell_type"] == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_states_its_inputs_first_and_runs_on_the_project_kernel(path):
    notebook = nbformat.read(path, as_version=4)
    first = notebook.cells[0]
    assert first.cell_type == "markdown"
    assert "**Before you run it.**" in first.source
    assert "CHURN_CONFIG" in first.source
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    summaries = [c for c in notebook.cells if "summary" in c.metadata.get("tags", [])]
    assert len(summaries) == 1 and summaries[0] is notebook.cells[-1], (
        f"{path.name}: the last cell is the one tagged 'summary' that the tests read"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_reads_read_models_never_the_live_warehouse(path):
    notebook = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
    forbidden_uses = (
        "duckdb.connect",
        "import connect",
        "warehouse_path",
        "import dagster",
        "churn_assets.assets",
    )
    for forbidden in forbidden_uses:
        assert forbidden not in code, f"{path.name} uses {forbidden!r}"
    assert "load_settings()" in code  # config from $CHURN_CONFIG, never a hard-coded path
