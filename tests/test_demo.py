"""`make demo` trains the demo model and prints how to open the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from comgra_callbacks import open_run
from comgra_callbacks.demo import main


def test_demo_records_a_run_and_says_how_to_open_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(tmp_path), "--steps", "60", "--run-name", "demo", "--no-serve"]) == 0
    out = capsys.readouterr().out
    assert f"into {tmp_path / 'demo'}" in out and "open_run(" in out and "comgra-callbacks serve" in out
    run = open_run(tmp_path / "demo")
    assert run.status == "finished"
    assert run.step_types == ["train", "val"]
    assert run.steps[run.steps["step_type"] == "train"]["step"].tolist() == list(range(0, 60, 5))
    assert run.roles("token_embedding") == ["a", "b"]
    assert run.views("embed.weight") == ["value", "grad", "grad:task_loss", "grad:weight_penalty", "update"]
    assert run.graph.edges["target", "task_loss"]["source"] == "manual"
    assert run.samples("input", 0).dtype.kind == "i"
    assert {"train_loss", "val_loss"} <= set(run.scalars["name"])
