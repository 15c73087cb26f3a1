"""The notebooks run top to bottom in a real Jupyter kernel (nbclient), in a temporary directory."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import REPO


@pytest.mark.slow
def test_hf_trainer_notebook_runs(tmp_path: Path) -> None:
    nb = nbformat.read(REPO / "notebooks" / "hf_trainer.ipynb", as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = ["".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", [])) for cell in nb.cells if cell.cell_type == "code"]
    assert "Run('tiny-bert', status='finished', records=5" in outputs[2]
    assert "'input': ['batch.input_ids', 'batch.attention_mask']" in outputs[3]
    assert (tmp_path / "comgra_runs" / "tiny-bert" / "meta.json").is_file()
