"""Fixture runs for the analysis tests: synthetic (fast) and tiny real trainings with planted anomalies."""

from __future__ import annotations

from pathlib import Path

import pytest

from comgra_callbacks.dashboard.synthetic import SyntheticSpec, write_run


@pytest.fixture(scope="session")
def grok(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticSpec]:
    """The dashboard tests' synthetic run: 120 records, odd layers scale ×4 at 60 %."""
    root = tmp_path_factory.mktemp("grok")
    return root / "grok", write_run(root, "grok", records=120, layers=4)
