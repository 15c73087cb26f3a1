"""``self.net = torch.compile(self.net)``: trains, records, names without ``_orig_mod``, values equal eager.

The oracle is an eager twin (same seed, same data) watched by plain hooks; the compiled run must record the
same values within tolerance. The ``aot_eager`` backend runs what matters for hooks (Dynamo's tracing and
AOTAutograd) without the C++ compilation of inductor, which alone costs ~20 s on two cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from tests.conftest import quiet_trainer

from ._oracle import LightningOracle, assert_full, assert_path, fit, step_of

pytestmark = pytest.mark.slow
BATCHES = 3
LAYERS = ("net.0", "net.1", "net.2", "net.3", "net.4")


class Classifier(pl.LightningModule):
    def __init__(self, compile_backend: str | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net: nn.Module = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        if compile_backend is not None:
            self.net = torch.compile(self.net, backend=compile_backend)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def points() -> Any:
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(BATCHES * 8, 6, generator=g), torch.randint(0, 3, (BATCHES * 8,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LightningOracle]:
    tmp = tmp_path_factory.mktemp("compile")
    eager = LightningOracle()
    quiet_trainer([eager], tmp, max_steps=BATCHES).fit(Classifier(None), points())
    torch._dynamo.reset()
    try:
        run = fit(Classifier("aot_eager"), points(), tmp, max_steps=BATCHES, detail={"*": "full"})
    finally:
        torch._dynamo.reset()
    return run, eager


def test_names_have_no_orig_mod(compiled: tuple[Any, LightningOracle]) -> None:
    run, _ = compiled
    assert run.status == "finished" and run.steps["batch_idx"].tolist() == list(range(BATCHES))
    assert not [n for n in run.nodes if "_orig_mod" in n], run.nodes
    for node in (*LAYERS, "net.0.weight", "net.4.bias", "input", "target", "loss"):
        assert node in run.nodes, f"{node!r} missing: {run.nodes}"


def test_module_tree_matches_the_node_names(compiled: tuple[Any, LightningOracle]) -> None:
    run, _ = compiled
    tree = set(run.modules.index)
    modules = {attrs.get("module") for _, attrs in run.graph.nodes(data=True)} - {None}
    assert "net.0" in modules
    assert modules <= tree, f"node modules missing from run.modules: {sorted(modules - tree)}; the tree has {sorted(tree)}"


def test_graph_connects_input_to_loss(compiled: tuple[Any, LightningOracle]) -> None:
    run, _ = compiled
    assert_path(run, "input", "loss")
    assert_path(run, "net.0.weight", "loss")
    assert_path(run, "net.0", "net.4")


@pytest.mark.parametrize("node", LAYERS)
def test_values_and_gradients_equal_eager(compiled: tuple[Any, LightningOracle], node: str) -> None:
    run, eager = compiled
    eager_name = node  # the eager twin has the same dotted names
    for batch in range(BATCHES):
        step = step_of(run, batch)
        assert_full(run, node, step, eager.value(batch, eager_name), rtol=1e-4, atol=1e-5)
        assert_full(run, node, step, eager.grad(batch, eager_name), view="grad", rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["net.0.weight", "net.2.bias", "net.4.weight"])
def test_parameters_gradients_and_updates_equal_eager(compiled: tuple[Any, LightningOracle], name: str) -> None:
    run, eager = compiled
    for batch in range(BATCHES):
        step = step_of(run, batch)
        assert_full(run, name, step, eager.before[batch][name], rtol=1e-4, atol=1e-5)
        assert_full(run, name, step, eager.param_grads[batch][name], view="grad", rtol=1e-4, atol=1e-6)
        assert_full(run, name, step, eager.updates[batch][name], view="update", rtol=1e-4, atol=1e-6)
    loss = run.stats("loss")["mean"]
    assert [loss[step_of(run, b)] for b in range(BATCHES)] == pytest.approx(eager.losses, rel=1e-5)


def test_unrecorded_steps_between_recorded_ones(tmp_path: Path) -> None:
    """Hooks come and go (every other batch): the compiled model keeps training and recording right."""
    eager = LightningOracle()
    quiet_trainer([eager], tmp_path / "eager", max_steps=4).fit(Classifier(None), _four_batches())
    torch._dynamo.reset()
    try:
        run = fit(Classifier("aot_eager"), _four_batches(), tmp_path, max_steps=4, every_n_steps=2, detail={"net.2": "full"})
    finally:
        torch._dynamo.reset()
    assert run.steps["batch_idx"].tolist() == [0, 2]
    for batch in (0, 2):
        assert_full(run, "net.2", step_of(run, batch), eager.value(batch, "net.2"), rtol=1e-4, atol=1e-5)


def _four_batches() -> Any:
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
