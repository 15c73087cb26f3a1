"""notebooks/grokking.ipynb runs from top to bottom (FAST: a short run) and shows the progress measures,
the phases and the post-hoc Fourier analysis it promises."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "grokking.ipynb"


def _outputs(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow
def test_grokking_notebook_runs_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAST", "1")  # the kernel inherits the environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = _outputs(nb)
    assert "Run('grokking', status='finished', records=15, nodes=11)" in text
    for column in ("test_acc", "wnorm.total", "fourier.top1_share", "restricted", "excluded"):
        assert column in text
    assert "memorisation" in text and "circuit formation" in text and "cleanup" in text
    gap = float(re.search(r"largest difference ([0-9.e+-]+)", text).group(1))  # type: ignore[union-attr]
    assert gap < 1e-6, "derive() on the recorded weights must reproduce the measure taken on the live model"


def test_committed_outputs_come_from_the_full_run() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    text = _outputs(nb)
    assert "3000 steps in" in text and "records=150" in text, "execute the notebook fully (FAST unset) before committing"
    assert "cleanup" in text
