"""ComgraCallback configured through LightningCLI: the shipped YAML file, command-line flags, bad values.

The parsing tests build the real CLI in-process (``run=False``); the end-to-end tests run the example script
in a subprocess, in a temporary directory, exactly as the documentation says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from comgra_callbacks import ComgraCallback, open_run, open_runs

from .conftest import REPO, explain, run_python

CONFIG = REPO / "configs" / "comgra.yaml"
FLAG = "--trainer.callbacks.init_args."


def build_callback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> ComgraCallback:
    from lightning.pytorch.cli import LightningCLI

    from comgra_callbacks.examples.lightning_cli import PointsDataModule, TinyClassifier

    monkeypatch.chdir(tmp_path)  # the CLI may write next to the working directory
    monkeypatch.setattr("sys.argv", ["lightning_cli"])  # pytest's own arguments are not the CLI's
    cli = LightningCLI(TinyClassifier, PointsDataModule, run=False, args=["--trainer.logger=false", *args])
    [callback] = [c for c in cli.trainer.callbacks if isinstance(c, ComgraCallback)]
    return callback


def test_yaml_block_builds_the_callback_with_every_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"][0]
    assert block["class_path"] == "comgra_callbacks.ComgraCallback"
    cb = build_callback(tmp_path, monkeypatch, f"--config={CONFIG}")
    policy = cb.options.policy
    for name, value in block["init_args"].items():
        if name == "run_name":
            assert value is None and cb.run_name  # a generated name
        elif name == "schedule":  # null: every_n_steps decides
            assert value is None and repr(policy.schedules["*"]) == f"Every({block['init_args']['every_n_steps']})"
        elif name in ("step_type", "arm_every"):
            assert getattr(policy, name) == value, name
        elif name == "triggers":
            assert value is None and policy.triggers == []
        elif name == "samples":
            assert value == "first" and repr(cb.options.samples) == "First()"
        else:
            assert getattr(cb.options, name) == value, name


def test_flags_build_the_callback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cb = build_callback(
        tmp_path,
        monkeypatch,
        "--trainer.callbacks+=comgra_callbacks.ComgraCallback",
        f"{FLAG}root=s3://bucket/runs",
        f"{FLAG}every_n_steps=5",
        f"{FLAG}modules=net.*",
        f"{FLAG}parameters=[net.0.weight, net.2.*]",
        f"{FLAG}storage_options={{endpoint_url: 'http://127.0.0.1:9', key: k, secret: s}}",
        f"{FLAG}batch_fn=tests.integrations.test_lightning_cli.name_batch",
        f"{FLAG}on_write_error=raise",
        f"{FLAG}ranks=all",
    )
    o = cb.options
    assert (o.root, o.every_n_steps, o.on_write_error, o.ranks) == ("s3://bucket/runs", 5, "raise", "all")
    assert o.modules == "net.*" and o.parameters == ["net.0.weight", "net.2.*"]
    assert o.storage_options == {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}
    assert o.batch_fn is name_batch


def name_batch(batch: Any) -> dict[str, Any]:
    """A batch_fn given to the CLI by its import path."""
    x, y = batch
    return {"points": x, "target": y}


def test_config_and_flags_combine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cb = build_callback(tmp_path, monkeypatch, f"--config={CONFIG}", f"{FLAG}every_n_steps=3", f"{FLAG}root=elsewhere")
    assert (cb.options.every_n_steps, cb.options.root, cb.options.n_samples) == (3, "elsewhere", 4)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("every_n_steps=0", r"`ComgraCallback\(every_n_steps=\.\.\.\)`: expected a positive int, got 0\."),
        ("run_name=../escape", r"`ComgraCallback\(run_name=\.\.\.\)`: expected letters, digits"),
        ("flush_secs=-1", r"`ComgraCallback\(flush_secs=\.\.\.\)`: expected a positive number, got -1"),
    ],
)
def test_bad_values_from_the_command_line_name_the_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_callback(tmp_path, monkeypatch, "--trainer.callbacks+=comgra_callbacks.ComgraCallback", FLAG + flag)


def test_a_choice_outside_the_literal_is_rejected_by_the_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_callback(tmp_path, monkeypatch, "--trainer.callbacks+=comgra_callbacks.ComgraCallback", f"{FLAG}ranks=some")
    assert "Expected a typing.Literal['zero', 'all']. Got value: some" in capsys.readouterr().err


@pytest.mark.slow
def test_example_script_with_the_shipped_config(tmp_path: Path) -> None:
    proc = run_python(
        ["-m", "comgra_callbacks.examples.lightning_cli", "fit", "--config", str(CONFIG), "--trainer.max_steps=20"], cwd=tmp_path
    )
    assert proc.returncode == 0, explain(proc)
    [run] = open_runs(tmp_path / "comgra_runs")
    assert run.status == "finished" and list(run.steps["step"]) == [0, 10]
    assert {"input", "target", "net.0", "net.2", "confidence", "loss"} <= set(run.nodes)
    assert {k: run.meta["hparams"][k] for k in ("n_in", "hidden", "n_classes", "lr")} == {"n_in": 8, "hidden": 16, "n_classes": 4, "lr": 0.1}


@pytest.mark.slow
def test_example_script_with_flags_only(tmp_path: Path) -> None:
    proc = run_python(
        [
            "-m", "comgra_callbacks.examples.lightning_cli", "fit", "--trainer.max_steps=4",
            "--trainer.callbacks+=comgra_callbacks.ComgraCallback",
            f"{FLAG}root={tmp_path / 'flag_runs'}", f"{FLAG}run_name=from-flags", f"{FLAG}every_n_steps=2",
            f"{FLAG}modules=[net.0]",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, explain(proc)
    run = open_run(tmp_path / "flag_runs" / "from-flags")
    assert list(run.steps["step"]) == [0, 2]
    assert "net.0" in run.nodes and "net.2" not in run.nodes
    saved = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text())
    assert saved["trainer"]["callbacks"][0]["init_args"]["modules"] == ["net.0"]
