"""Lightning's own demo model, ``lightning.pytorch.demos.Transformer`` (encoder-decoder, post-norm), made tiny.

The demo's ``LightningTransformer.training_step`` is used as it ships (``nll_loss`` on log-probabilities);
only its model is replaced by a small one. The embedding is called twice per batch (inputs, then targets):
two iterations of one node.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.demos import LightningTransformer, Transformer

from ._oracle import LightningOracle, assert_full, assert_nodes, assert_path, fit, step_of

BATCHES, VOCAB, T = 3, 24, 6
ATTENTION = ("model.transformer.encoder.layers.0.self_attn", "model.transformer.decoder.layers.0.self_attn",
             "model.transformer.decoder.layers.0.multihead_attn")


class OfflineDemo(LightningTransformer):
    """The demo module without its WikiText-2 download (``prepare_data``); the data comes from the test."""

    def prepare_data(self) -> None:
        pass


def tiny_demo() -> LightningTransformer:
    module = OfflineDemo(vocab_size=VOCAB)
    torch.manual_seed(0)
    module.model = Transformer(vocab_size=VOCAB, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.1)
    return module


def token_pairs(n_batches: int = BATCHES, batch_size: int = 3) -> Any:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (n_batches * batch_size, T + 1), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=batch_size)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LightningOracle]:
    oracle = LightningOracle()
    run = fit(tiny_demo(), token_pairs(), tmp_path_factory.mktemp("demo"), oracle=oracle, max_steps=BATCHES, detail={"*": "full"})
    return run, oracle


def test_leaf_nodes_and_graph(demo_run: tuple[Any, LightningOracle]) -> None:
    run, _ = demo_run
    assert_nodes(run, {"input": "input", "target": "target", "model.embedding": None, "model.decoder": None, "loss": "loss",
                       "model.transformer.encoder.layers.0.linear1": None, "model.transformer.decoder.norm": None})
    assert run.iterations("model.embedding") == [0, 1]  # the source, then the (shifted) target tokens
    assert ("input", "model.embedding") in run.graph.edges
    assert ("target", "model.embedding") in run.graph.edges
    assert_path(run, "input", "loss")
    assert_path(run, "model.embedding", "model.decoder")
    assert_path(run, "model.decoder.weight", "loss")


def test_attention_outputs_are_nodes(demo_run: tuple[Any, LightningOracle]) -> None:
    run, _ = demo_run
    assert_nodes(run, dict.fromkeys(ATTENTION))
    assert_path(run, "model.embedding", ATTENTION[0])
    assert_path(run, ATTENTION[0], ATTENTION[2])  # the encoder's output is the cross-attention's memory
    assert_path(run, ATTENTION[2], "loss")


def test_log_probabilities_are_the_output(demo_run: tuple[Any, LightningOracle]) -> None:
    run, oracle = demo_run
    # the demo's Transformer returns log_softmax(decoder(...)).view(-1, V): a new tensor, consumed by the loss
    assert_nodes(run, {"model": "output"})
    for batch in range(BATCHES):
        assert_full(run, "model", step_of(run, batch), oracle.value(batch, "model"))


@pytest.mark.parametrize("node", ["model.transformer.encoder.layers.0.linear2", "model.transformer.decoder.layers.0.norm2",
                                  "model.transformer.decoder.norm", "model.decoder"])
def test_leaf_values_and_gradients_match(demo_run: tuple[Any, LightningOracle], node: str) -> None:
    run, oracle = demo_run
    for batch in range(BATCHES):
        step = step_of(run, batch)
        assert_full(run, node, step, oracle.value(batch, node))
        assert_full(run, node, step, oracle.grad(batch, node), view="grad", rtol=1e-4, atol=1e-7)


def test_both_embedding_calls_match(demo_run: tuple[Any, LightningOracle]) -> None:
    run, oracle = demo_run
    for batch in range(BATCHES):
        step = step_of(run, batch)
        for call in (0, 1):
            assert_full(run, "model.embedding", step, oracle.value(batch, "model.embedding", call=call), iteration=call)
            assert_full(run, "model.embedding", step, oracle.grad(batch, "model.embedding", call=call), view="grad",
                        iteration=call, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("node", ATTENTION)
def test_attention_values_and_gradients_match(demo_run: tuple[Any, LightningOracle], node: str) -> None:
    run, oracle = demo_run
    for batch in range(BATCHES):
        step = step_of(run, batch)
        assert_full(run, node, step, oracle.value(batch, node))
        assert_full(run, node, step, oracle.grad(batch, node), view="grad", rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["model.embedding.weight", "model.transformer.decoder.layers.0.multihead_attn.in_proj_weight",
                                  "model.decoder.bias"])
def test_parameters_gradients_and_updates_match(demo_run: tuple[Any, LightningOracle], name: str) -> None:
    run, oracle = demo_run
    for batch in range(BATCHES):
        step = step_of(run, batch)
        assert_full(run, name, step, oracle.before[batch][name])
        assert_full(run, name, step, oracle.param_grads[batch][name], view="grad", rtol=1e-4, atol=1e-7)
        assert_full(run, name, step, oracle.updates[batch][name], view="update", rtol=1e-4, atol=1e-7)
    loss = run.stats("loss")["mean"]
    assert [loss[step_of(run, b)] for b in range(BATCHES)] == pytest.approx(oracle.losses, rel=1e-5)
