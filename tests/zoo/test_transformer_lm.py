"""A causal language model on ``nn.TransformerEncoder``: embeddings, attention and block outputs, logits, loss.

Pre-norm layers (``norm_first=True``), so that a layer's output is a new tensor (the residual sum) and not the
output of its last child. ``nn.MultiheadAttention`` is not a leaf and its ``out_proj`` is never called as a
module: only a capture beyond leaf modules sees the attention output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from ._oracle import LightningOracle, assert_full, assert_nodes, assert_path, fit, step_of

BATCHES, VOCAB, T, D = 3, 32, 8, 32
LAYERS = ("encoder.layers.0", "encoder.layers.1")
ATTENTION = tuple(f"{layer}.self_attn" for layer in LAYERS)


class TinyLM(pl.LightningModule):
    """``ids (B, T) -> embed (B, T, D) -> 2 pre-norm layers -> norm -> head (B, T, VOCAB)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.pos = nn.Parameter(torch.randn(T, D) * 0.02)
        layer = nn.TransformerEncoderLayer(D, nhead=2, dim_feedforward=64, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        h = self.encoder(self.embed(ids) + self.pos, mask=mask, is_causal=True)
        return self.head(self.norm(h))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, targets = batch
        return nn.functional.cross_entropy(self(ids).reshape(-1, VOCAB), targets.reshape(-1))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def token_batches(n_batches: int = BATCHES, batch_size: int = 4) -> Any:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (n_batches * batch_size, T + 1), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=batch_size)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LightningOracle]:
    oracle = LightningOracle()
    run = fit(TinyLM(), token_batches(), tmp_path_factory.mktemp("lm"), oracle=oracle, max_steps=BATCHES, detail={"*": "full"})
    return run, oracle


def test_leaf_nodes_and_graph(lm_run: tuple[Any, LightningOracle]) -> None:
    run, _ = lm_run
    assert_nodes(run, {"input": "input", "target": "target", "embed": None, "encoder.layers.0.linear1": None,
                       "encoder.layers.1.norm2": None, "head": "output", "loss": "loss"})
    assert ("input", "embed") in run.graph.edges
    assert_path(run, "input", "loss")
    assert_path(run, "target", "loss")
    assert_path(run, "embed", "head")
    assert_path(run, "pos", "loss")


def test_attention_and_block_outputs_are_nodes(lm_run: tuple[Any, LightningOracle]) -> None:
    run, _ = lm_run
    assert_nodes(run, dict.fromkeys(ATTENTION + LAYERS))
    assert_path(run, "embed", "encoder.layers.0.self_attn")
    assert_path(run, "encoder.layers.0.self_attn", "encoder.layers.0")
    assert_path(run, "encoder.layers.0", "encoder.layers.1.self_attn")
    assert_path(run, "encoder.layers.1", "head")
    assert "encoder.layers.0.self_attn.out_proj" not in run.nodes  # never called as a module
    assert "encoder" not in run.nodes  # its output is the last layer's output: it adds nothing


def test_leaves_is_the_old_capture(tmp_path: Path) -> None:
    run = fit(TinyLM(), token_batches(n_batches=1), tmp_path, max_steps=1, modules="leaves")
    assert "encoder.layers.0.linear1" in run.nodes and "head" in run.nodes
    assert not [n for n in ATTENTION + LAYERS if n in run.nodes]


def test_plus_glob_adds_to_the_default(tmp_path: Path) -> None:
    oracle = LightningOracle(modules=["encoder", "encoder.layers.1"])
    run = fit(TinyLM(), token_batches(n_batches=1), tmp_path, oracle=oracle, max_steps=1, modules=["+encoder"],
              detail={"encoder": "full"})
    assert "encoder" in run.nodes
    assert not [n for n in ATTENTION + LAYERS + ("embed", "head") if n not in run.nodes]  # the default is still there
    assert_full(run, "encoder", step_of(run, 0), oracle.value(0, "encoder"))


@pytest.mark.parametrize("node", ["embed", "encoder.layers.0.linear1", "encoder.layers.0.dropout", "encoder.layers.1.norm1", "norm", "head"])
def test_leaf_values_and_gradients_match(lm_run: tuple[Any, LightningOracle], node: str) -> None:
    run, oracle = lm_run
    for batch in range(BATCHES):
        step = step_of(run, batch)
        assert_full(run, node, step, oracle.value(batch, node))
        assert_full(run, node, step, oracle.grad(batch, node), view="grad", rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("node", ATTENTION + LAYERS)
def test_attention_and_block_values_and_gradients_match(lm_run: tuple[Any, LightningOracle], node: str) -> None:
    run, oracle = lm_run
    for batch in range(BATCHES):
        step = step_of(run, batch)
        assert_full(run, node, step, oracle.value(batch, node))  # MultiheadAttention returns (out, None): no suffix
        assert_full(run, node, step, oracle.grad(batch, node), view="grad", rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["embed.weight", "pos", "encoder.layers.0.self_attn.in_proj_weight",
                                  "encoder.layers.1.self_attn.out_proj.weight", "head.bias"])
def test_parameters_gradients_and_updates_match(lm_run: tuple[Any, LightningOracle], name: str) -> None:
    run, oracle = lm_run
    for batch in range(BATCHES):
        step = step_of(run, batch)
        assert_full(run, name, step, oracle.before[batch][name])
        assert_full(run, name, step, oracle.param_grads[batch][name], view="grad", rtol=1e-4, atol=1e-7)
        assert_full(run, name, step, oracle.updates[batch][name], view="update", rtol=1e-4, atol=1e-7)


def test_loss_matches(lm_run: tuple[Any, LightningOracle]) -> None:
    run, oracle = lm_run
    loss = run.stats("loss")["mean"]
    assert [loss[step_of(run, b)] for b in range(BATCHES)] == pytest.approx(oracle.losses, rel=1e-5)


class DictBatchLM(TinyLM):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch["ids"]).reshape(-1, VOCAB), batch["labels"].reshape(-1))


def test_dict_batches_are_named_by_key(tmp_path: Path) -> None:
    ids, labels = next(iter(token_batches(n_batches=1)))
    loader = torch.utils.data.DataLoader([{"ids": i, "labels": t} for i, t in zip(ids, labels)], batch_size=4)
    run = fit(DictBatchLM(), loader, tmp_path, max_steps=1, detail={"batch.*": "full"})
    assert_nodes(run, {"batch.ids": "input", "batch.labels": "target", "loss": "loss"})
    assert ("batch.ids", "embed") in run.graph.edges
    assert_path(run, "batch.labels", "loss")
    assert_full(run, "batch.ids", step_of(run, 0), ids)
