"""notebooks/attribution.ipynb runs from top to bottom in its short form and prints the tables it promises."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "attribution.ipynb"


@pytest.mark.slow
def test_attribution_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMGRA_FAST", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(NOTEBOOK.parents[1]), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "training windows of 16 tokens" in outputs
    assert "Run('lm', status='finished', records=60" in outputs and "contributions at 60 steps" in outputs
    for column in ("update_norm", "shared token", "flips to token", "outlier updates", "activation alone"):
        assert column in outputs
