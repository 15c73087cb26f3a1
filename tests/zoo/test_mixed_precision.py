"""``precision="bf16-mixed"`` on the CPU: bfloat16 activations and gradients, float32 master weights.

The oracle hooks see the very bfloat16 tensors the recorder sees, so statistics must agree closely: a
statistic computed *in* bfloat16 (8 bits of mantissa) would be off by ~1e-2 and fail these tolerances.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from ._oracle import LightningOracle, assert_full, assert_neurons, assert_path, assert_stats, fit, step_of

BATCHES = 3
BF16 = ("net.0", "net.2", "head")  # Linear layers run in bfloat16 under CPU autocast


class MixedMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32), nn.LayerNorm(32))
        self.head = nn.Linear(32, 5)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.net(x)), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def points() -> Any:
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(BATCHES * 16, 12, generator=g) * 3.0, torch.randint(0, 5, (BATCHES * 16,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


@pytest.fixture(scope="module", params=["process", "thread"])
def bf16_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LightningOracle]:
    """Both writers: the writer process reduces with numpy, the thread writer with torch (``reduce.py``)."""
    oracle = LightningOracle()
    run = fit(MixedMLP(), points(), tmp_path_factory.mktemp("bf16"), oracle=oracle, max_steps=BATCHES,
              trainer_kw={"precision": "bf16-mixed"}, detail={"*": "full"}, writer=request.param)
    return run, oracle


def test_activations_are_bfloat16_and_read_back_as_float32(bf16_run: tuple[Any, LightningOracle]) -> None:
    run, _ = bf16_run
    assert run.status == "finished" and run.steps["batch_idx"].tolist() == list(range(BATCHES))
    assert run.meta["trainer"]["precision"] == "bf16-mixed"
    for node in BF16:
        assert run.graph.nodes[node]["dtype"] == "bfloat16", run.graph.nodes[node]
        assert run.samples(node, step_of(run, 0)).dtype == np.float32
        assert run.samples(node, step_of(run, 0), view="grad").dtype == np.float32
    assert run.graph.nodes["net.0.weight"]["dtype"] == "float32"  # master weights
    assert_path(run, "input", "loss")


@pytest.mark.parametrize("node", [*BF16, "net.1", "net.3"])
def test_statistics_match(bf16_run: tuple[Any, LightningOracle], node: str) -> None:
    run, oracle = bf16_run
    for batch in range(BATCHES):
        step = step_of(run, batch)
        value = oracle.value(batch, node)  # the module's own output, widened exactly to float32
        assert_stats(run, node, step, value, rel=1e-4, abs_=1e-5)
        assert_neurons(run, node, step, value, axis=-1, rtol=1e-4, atol=1e-5)
        assert_full(run, node, step, value, rtol=0, atol=0)  # bfloat16 -> float32 is exact
        assert_stats(run, node, step, oracle.grad(batch, node), view="grad", rel=1e-3, abs_=1e-6)


@pytest.mark.parametrize("name", ["net.0.weight", "net.3.weight", "head.bias"])
def test_parameters_gradients_and_updates_match(bf16_run: tuple[Any, LightningOracle], name: str) -> None:
    run, oracle = bf16_run
    for batch in range(BATCHES):
        step = step_of(run, batch)
        assert_full(run, name, step, oracle.before[batch][name])
        assert_full(run, name, step, oracle.param_grads[batch][name], view="grad", rtol=1e-4, atol=1e-7)
        assert_full(run, name, step, oracle.updates[batch][name], view="update", rtol=1e-4, atol=1e-7)
    loss = run.stats("loss")["mean"]
    assert [loss[step_of(run, b)] for b in range(BATCHES)] == pytest.approx(oracle.losses, rel=1e-5)


def test_float16_with_a_gradient_scaler_records_unscaled_losses_and_gradients(tmp_path: Any) -> None:
    """``16-mixed`` multiplies the loss by the scaler's scale before backward (on_before_backward sees it
    scaled), so activation gradients are scaled too; the recorder divides both back."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scale = 1024.0
    oracle = LightningOracle()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10_000))
    run = fit(MixedMLP(), points(), tmp_path, oracle=oracle, max_steps=BATCHES, trainer_kw={"plugins": [plugin]}, detail={"*": "full"})
    loss = run.stats("loss")["mean"]
    scalars = run.scalars[run.scalars["name"] == "loss"].set_index("step")["value"]
    for batch in range(BATCHES):
        step = step_of(run, batch)
        assert loss[step] == pytest.approx(oracle.losses[batch] / scale, rel=1e-5)  # the oracle saw it scaled
        assert scalars[step] == pytest.approx(oracle.losses[batch] / scale, rel=1e-5)
        for node in ("net.0", "head"):
            assert_stats(run, node, step, oracle.grad(batch, node) / scale, view="grad", rel=1e-3, abs_=1e-8)
        # parameter gradients are unscaled by Lightning before on_before_optimizer_step: recorded as they are
        assert_full(run, "head.weight", step, oracle.param_grads[batch]["head.weight"], view="grad", rtol=1e-4, atol=1e-7)
