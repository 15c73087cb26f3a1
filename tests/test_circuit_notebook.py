"""notebooks/circuit_discovery.ipynb runs from top to bottom and prints the tables it promises."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "circuit_discovery.ipynb"


@pytest.mark.slow
def test_circuit_notebook_runs(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "mean [95% bootstrap interval] over 20 resamples of 100 pairs" in outputs
    for column in ("logit difference", "discovery time (ms)", "unit sparsity", "edge sparsity"):
        assert column in outputs
    assert "circle (8 vs 3)" in outputs and "straight line (4 vs 9)" in outputs
    assert "Run('digits_l1', status='finished', records=20" in outputs
    assert "exact circuit effect" in outputs
    # the same pair tracked by the callback during training agrees with the models rebuilt from the store
    assert "(1280, 5) ['step', 'node', 'unit', 'score', 'effect']" in outputs
    assert "best unit equal to the one found from the stored parameters at 100% of the steps" in outputs
