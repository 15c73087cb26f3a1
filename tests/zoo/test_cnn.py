"""A CNN with BatchNorm, Dropout and residual blocks: values, gradients, per-channel neurons, buffers, val."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from comgra_callbacks import ComgraCallback, open_run, record
from tests.conftest import quiet_trainer

from ._oracle import (
    LightningOracle,
    assert_full,
    assert_neurons,
    assert_nodes,
    assert_path,
    fit,
    kinds,
    step_of,
)

BATCHES = 4


class ResBlock(nn.Module):
    """``x + body(x)``: the block's output is a new tensor, not the output of its last child."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.Dropout(0.1),
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return x + self.body(x)


class CNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(ResBlock(8), ResBlock(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, 4)
        return self.head(self.drop(self.flatten(self.pool(self.blocks(self.stem(x))))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        per_sample = nn.functional.cross_entropy(self(x), y, reduction="none")
        record("per_sample_loss", per_sample)
        loss = per_sample.mean()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def images(n_batches: int = BATCHES, batch_size: int = 6, seed: int = 0) -> Any:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch_size, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (n_batches * batch_size,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LightningOracle]:
    tmp = tmp_path_factory.mktemp("cnn")
    oracle = LightningOracle()
    run = fit(CNN(), images(), tmp, oracle=oracle, max_steps=BATCHES, detail={"*": "full"})
    return run, oracle


def test_every_batch_is_recorded(cnn_run: tuple[Any, LightningOracle]) -> None:
    run, _ = cnn_run
    assert run.status == "finished"
    assert run.steps["batch_idx"].tolist() == list(range(BATCHES))
    assert set(run.steps["step_type"]) == {"train"}


def test_expected_nodes_and_graph(cnn_run: tuple[Any, LightningOracle]) -> None:
    run, _ = cnn_run
    assert_nodes(run, {"input": "input", "target": "target", "stem.0": None, "stem.1": None, "blocks.0.body.0": None,
                       "blocks.1.body.5": None, "drop": None, "head": None, "loss": "loss", "per_sample_loss": None})
    assert ("input", "stem.0") in run.graph.edges
    assert ("stem.0.weight", "stem.0") in run.graph.edges
    assert_path(run, "input", "loss")
    assert_path(run, "target", "loss")
    assert_path(run, "blocks.1.body.5.weight", "loss")


def test_record_does_not_take_over_the_output_kind(cnn_run: tuple[Any, LightningOracle]) -> None:
    run, _ = cnn_run
    found = kinds(run)
    assert found["head"] == "output", f"the logits should stay the model's output, got kinds {found}"
    assert found["per_sample_loss"] != "output"


@pytest.mark.parametrize("node", ["stem.0", "stem.1", "stem.2", "blocks.0.body.1", "blocks.0.body.3", "blocks.1.body.5", "pool", "drop", "head"])
def test_values_match(cnn_run: tuple[Any, LightningOracle], node: str) -> None:
    run, oracle = cnn_run
    for batch in range(BATCHES):
        assert_full(run, node, step_of(run, batch), oracle.value(batch, node))


@pytest.mark.parametrize("node", ["stem.0", "blocks.0.body.1", "blocks.1.body.4", "drop", "head"])
def test_gradients_match(cnn_run: tuple[Any, LightningOracle], node: str) -> None:
    run, oracle = cnn_run
    for batch in range(BATCHES):
        assert_full(run, node, step_of(run, batch), oracle.grad(batch, node), view="grad", rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("node", ["blocks.0", "blocks.1"])
def test_residual_block_outputs_are_captured(cnn_run: tuple[Any, LightningOracle], node: str) -> None:
    run, oracle = cnn_run
    assert node in run.nodes, f"the residual block {node!r} is not captured by default; nodes: {run.nodes}"
    for batch in range(BATCHES):
        step = step_of(run, batch)
        assert_full(run, node, step, oracle.value(batch, node))
        assert_full(run, node, step, oracle.grad(batch, node), view="grad", rtol=1e-4, atol=1e-7)
    assert_path(run, node, "loss")


@pytest.mark.parametrize("node", ["stem.0", "stem.1", "blocks.1.body.4"])
def test_conv_and_batchnorm_neurons_are_channels(cnn_run: tuple[Any, LightningOracle], node: str) -> None:
    run, oracle = cnn_run
    for batch in (0, BATCHES - 1):
        assert_neurons(run, node, step_of(run, batch), oracle.value(batch, node), axis=1)


def test_linear_neurons_are_features(cnn_run: tuple[Any, LightningOracle]) -> None:
    run, oracle = cnn_run
    assert_neurons(run, "head", step_of(run, 0), oracle.value(0, "head"), axis=-1)


@pytest.mark.parametrize("name", ["stem.0.weight", "stem.0.bias", "stem.1.weight", "blocks.1.body.4.weight", "head.bias"])
def test_parameters_gradients_and_updates_match(cnn_run: tuple[Any, LightningOracle], name: str) -> None:
    run, oracle = cnn_run
    for batch in range(BATCHES):
        step = step_of(run, batch)
        assert_full(run, name, step, oracle.before[batch][name])
        assert_full(run, name, step, oracle.param_grads[batch][name], view="grad", rtol=1e-4, atol=1e-7)
        assert_full(run, name, step, oracle.updates[batch][name], view="update", rtol=1e-4, atol=1e-7)


def test_loss_matches(cnn_run: tuple[Any, LightningOracle]) -> None:
    run, oracle = cnn_run
    loss = run.stats("loss")["mean"]
    for batch in range(BATCHES):
        assert loss[step_of(run, batch)] == pytest.approx(oracle.losses[batch], rel=1e-5)


def test_scalars_hold_the_loss_of_every_batch_at_its_step(cnn_run: tuple[Any, LightningOracle]) -> None:
    run, oracle = cnn_run
    scalars = run.scalars
    for name in ("loss", "train_loss"):
        series = scalars[scalars["name"] == name].set_index("step")["value"]
        for batch in range(BATCHES):
            step = step_of(run, batch)
            assert step in series.index, f"scalar {name!r} has no value at step {step} (batch {batch}); it has steps {list(series.index)}"
            assert series[step] == pytest.approx(oracle.losses[batch], rel=1e-5), f"scalar {name!r} at step {step} is not the loss of batch {batch}"


def test_containers_returning_their_last_childs_output_add_nothing(cnn_run: tuple[Any, LightningOracle]) -> None:
    run, _ = cnn_run
    assert not [n for n in ("stem", "blocks", "blocks.0.body", "blocks.1.body") if n in run.nodes], run.nodes


def test_scalars_cover_batches_that_are_not_recorded(tmp_path: Path) -> None:
    oracle = LightningOracle(modules=[])
    run = fit(CNN(), images(), tmp_path, oracle=oracle, max_steps=BATCHES, every_n_steps=2)
    assert run.steps["batch_idx"].tolist() == [0, 2]
    series = run.scalars[run.scalars["name"] == "loss"].set_index("step")["value"]
    assert series.to_dict() == pytest.approx(dict(enumerate(oracle.losses)), rel=1e-5)


def test_buffers_record_batchnorm_running_means(tmp_path: Path) -> None:
    names = ["stem.1.running_mean", "blocks.0.body.1.running_mean"]
    oracle = LightningOracle(modules=[], buffers=names)
    run = fit(CNN(), images(n_batches=2), tmp_path, oracle=oracle, max_steps=2, buffers="*running_mean", detail={"*running_mean": "full"})
    assert "stem.1.running_var" not in run.nodes and "stem.1.num_batches_tracked" not in run.nodes
    for name in names:
        assert name in run.nodes, f"buffer {name!r} not recorded; nodes: {run.nodes}"
        for batch in range(2):
            assert_full(run, name, step_of(run, batch), oracle.buffers[batch][name])
    assert not (oracle.buffers[0][names[0]] == oracle.buffers[1][names[0]]).all()  # it moved: the test can tell steps apart


def test_no_buffers_by_default(cnn_run: tuple[Any, LightningOracle]) -> None:
    run, _ = cnn_run
    assert not [n for n in run.nodes if "running_" in n or "num_batches_tracked" in n]


def test_validate_records_val_steps_under_inference_mode(tmp_path: Path) -> None:
    module = CNN()
    cb = ComgraCallback(str(tmp_path / "runs"), run_name="val", val_batches=2, flush_secs=0.1, detail={"stem.0": "full"})
    trainer = quiet_trainer([cb], tmp_path)  # inference_mode=True (the default): validation tensors are inference tensors
    loader = images(n_batches=3)
    trainer.validate(module, loader)
    run = open_run(tmp_path / "runs" / "val")
    assert run.status == "finished"
    val = run.steps[run.steps["step_type"] == "val"]
    assert val["batch_idx"].tolist() == [0, 1]
    # both val batches belong to step 0 (no training yet); the reader answers a step with its last record
    step, last = int(val["step"].iloc[-1]), int(val["batch_idx"].iloc[-1])
    x = list(loader)[last][0]
    module.eval()
    with torch.no_grad():
        expected = module.stem[0](x)
    got = torch.from_numpy(run.samples("stem.0", step, step_type="val"))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert "stem.0" in run.graph_for("val")
