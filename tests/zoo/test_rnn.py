"""LSTM and GRU sequence classifiers: tuple outputs (``lstm:0``, ``lstm:1.0``), values, gradients, neurons."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from ._oracle import LightningOracle, assert_full, assert_neurons, assert_nodes, assert_path, fit, step_of

BATCHES, VOCAB, T = 3, 20, 7


class SequenceModel(pl.LightningModule):
    """``ids (B, T) -> embed (B, T, 16) -> rnn (B, T, 24) -> head on the last position (B, 5)``."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(16, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(ids))
        return self.head(out[:, -1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, y = batch
        return nn.functional.cross_entropy(self(ids), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.01)


def sequences(n_batches: int = BATCHES, batch_size: int = 4) -> Any:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (n_batches * batch_size, T), generator=g)
    y = torch.randint(0, 5, (n_batches * batch_size,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, y), batch_size=batch_size)


@pytest.fixture(scope="module", params=["lstm", "gru"])
def rnn_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, LightningOracle]:
    cell = request.param
    oracle = LightningOracle()
    run = fit(SequenceModel(cell), sequences(), tmp_path_factory.mktemp(cell), oracle=oracle, max_steps=BATCHES, detail={"*": "full"})
    return cell, run, oracle


def _state_suffixes(cell: str) -> list[str]:
    return [":1.0", ":1.1"] if cell == "lstm" else [":1"]  # LSTM: (out, (h, c)); GRU: (out, h)


def test_nodes_and_graph(rnn_run: tuple[str, Any, LightningOracle]) -> None:
    cell, run, _ = rnn_run
    expected: dict[str, str | None] = {"input": "input", "target": "target", "embed": None, "rnn:0": None, "head": "output", "loss": "loss"}
    expected.update({f"rnn{s}": None for s in _state_suffixes(cell)})
    assert_nodes(run, expected)
    assert ("input", "embed") in run.graph.edges  # integer ids: connected to the module that consumes them
    assert_path(run, "input", "loss")
    assert_path(run, "rnn.weight_hh_l1", "loss")
    assert run.steps["batch_idx"].tolist() == list(range(BATCHES))


def test_values_match(rnn_run: tuple[str, Any, LightningOracle]) -> None:
    cell, run, oracle = rnn_run
    for batch in range(BATCHES):
        step = step_of(run, batch)
        assert_full(run, "embed", step, oracle.value(batch, "embed"))
        for suffix in [":0", *_state_suffixes(cell)]:
            assert_full(run, f"rnn{suffix}", step, oracle.value(batch, "rnn", suffix))
        assert_full(run, "head", step, oracle.value(batch, "head"))


def test_gradients_match(rnn_run: tuple[str, Any, LightningOracle]) -> None:
    _, run, oracle = rnn_run
    for batch in range(BATCHES):
        step = step_of(run, batch)
        for node, module, suffix in (("embed", "embed", ""), ("rnn:0", "rnn", ":0"), ("head", "head", "")):
            assert_full(run, node, step, oracle.grad(batch, module, suffix), view="grad", rtol=1e-4, atol=1e-7)


def test_sequence_neurons_are_the_last_axis(rnn_run: tuple[str, Any, LightningOracle]) -> None:
    _, run, oracle = rnn_run
    assert_neurons(run, "rnn:0", step_of(run, 1), oracle.value(1, "rnn", ":0"), axis=-1)  # (B, T, H): H rows


@pytest.mark.parametrize("name", ["embed.weight", "rnn.weight_ih_l0", "rnn.bias_hh_l1", "head.weight"])
def test_parameters_gradients_and_updates_match(rnn_run: tuple[str, Any, LightningOracle], name: str) -> None:
    _, run, oracle = rnn_run
    for batch in range(BATCHES):
        step = step_of(run, batch)
        assert_full(run, name, step, oracle.before[batch][name])
        assert_full(run, name, step, oracle.param_grads[batch][name], view="grad", rtol=1e-4, atol=1e-7)
        assert_full(run, name, step, oracle.updates[batch][name], view="update", rtol=1e-4, atol=1e-7)
    assert run.stats("loss")["mean"][step_of(run, 0)] == pytest.approx(oracle.losses[0], rel=1e-5)
