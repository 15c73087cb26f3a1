"""A GAN with manual optimization: two optimizers, two ``manual_backward`` calls per batch.

The oracle lives in the LightningModule itself: right before each ``opt.step()`` it copies the gradients of
that optimizer's parameters and the parameters, and right after it the parameters again. The discriminator's
``.grad`` at the end of the batch is *not* what its optimizer applied (the generator's backward goes through
the discriminator and adds to it): only a recorder that takes each optimizer's gradients at its own step
gets them right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import networkx as nx
import pytest
import torch
from torch import nn

from ._oracle import LightningOracle, assert_full, fit, kinds, step_of

BATCHES, Z, X = 4, 4, 6


class GAN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.G = nn.Sequential(nn.Linear(Z, 16), nn.ReLU(), nn.Linear(16, X))
        self.D = nn.Sequential(nn.Linear(X, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.noise = torch.Generator().manual_seed(1)
        # the oracle, per batch
        self.losses: list[dict[str, float]] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.before: list[dict[str, torch.Tensor]] = []
        self.updates: list[dict[str, torch.Tensor]] = []

    def _step(self, opt: Any, part: nn.Module, prefix: str) -> None:
        named = [(f"{prefix}.{n}", p) for n, p in part.named_parameters()]
        self.grads[-1].update({n: p.grad.detach().clone() for n, p in named})
        self.before[-1].update({n: p.detach().clone() for n, p in named})
        opt.step()
        self.updates[-1].update({n: p.detach() - self.before[-1][n] for n, p in named})

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        self.losses.append({})
        self.grads.append({})
        self.before.append({})
        self.updates.append({})
        bce = nn.functional.binary_cross_entropy_with_logits
        z = torch.randn(batch.shape[0], Z, generator=self.noise)
        fake = self.G(z)

        d_real, d_fake = self.D(batch), self.D(fake.detach())
        d_loss = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        self._step(opt_d, self.D, "D")

        g_out = self.D(fake)
        g_loss = bce(g_out, torch.ones_like(g_out))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        self._step(opt_g, self.G, "G")
        self.losses[-1].update(d_loss=float(d_loss.detach()), g_loss=float(g_loss.detach()))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.G.parameters(), lr=1e-2), torch.optim.SGD(self.D.parameters(), lr=0.1, momentum=0.5)


def real_data(n_batches: int = BATCHES, batch_size: int = 8) -> Any:
    x = torch.randn(n_batches * batch_size, X, generator=torch.Generator().manual_seed(2)) * 0.5 + 1.0
    return torch.utils.data.DataLoader(x, batch_size=batch_size)  # batches are plain tensors: node "input"


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, GAN, LightningOracle]:
    """The run, the GAN (its own oracle of gradients and updates) and a hook oracle of module outputs."""
    gan = GAN()
    hooks = LightningOracle(modules=["G.2", "D.0", "D.2"])
    run = fit(gan, real_data(), tmp_path_factory.mktemp("gan"), oracle=hooks, max_steps=2 * BATCHES,
              detail={"G.*": "full", "D.*": "full"})
    return run, gan, hooks


def loss_nodes(run: Any) -> list[str]:
    return [n for n, k in kinds(run).items() if k == "loss"]


def test_one_record_per_batch(gan_run: tuple[Any, GAN, LightningOracle]) -> None:
    run, gan, _ = gan_run
    assert run.status == "finished"
    assert len(gan.losses) == BATCHES
    assert run.steps["batch_idx"].tolist() == list(range(BATCHES))
    assert run.steps["step"].is_unique


def test_both_losses_are_recorded_under_their_own_names(gan_run: tuple[Any, GAN, LightningOracle]) -> None:
    run, gan, _ = gan_run
    names = loss_nodes(run)
    assert len(names) == 2, f"expected two loss nodes (one per backward), got {names}"
    series = {name: run.stats(name)["mean"] for name in names}
    first = {name: float(s[step_of(run, 0)]) for name, s in series.items()}
    d_name = min(names, key=lambda n: abs(first[n] - gan.losses[0]["d_loss"]))
    g_name = next(n for n in names if n != d_name)
    for batch in range(BATCHES):
        step = step_of(run, batch)
        assert series[d_name][step] == pytest.approx(gan.losses[batch]["d_loss"], rel=1e-5), f"{d_name} at batch {batch}"
        assert series[g_name][step] == pytest.approx(gan.losses[batch]["g_loss"], rel=1e-5), f"{g_name} at batch {batch}"


@pytest.mark.parametrize("name", ["D.0.weight", "D.2.bias", "G.0.weight", "G.2.bias"])
def test_each_gradient_is_the_one_its_optimizer_applied(gan_run: tuple[Any, GAN, LightningOracle], name: str) -> None:
    run, gan, _ = gan_run
    for batch in range(BATCHES):
        assert_full(run, name, step_of(run, batch), gan.grads[batch][name], view="grad", rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["D.0.weight", "D.2.bias", "G.0.weight", "G.2.bias"])
def test_each_update_is_its_own_step(gan_run: tuple[Any, GAN, LightningOracle], name: str) -> None:
    run, gan, _ = gan_run
    for batch in range(BATCHES):
        step = step_of(run, batch)
        assert_full(run, name, step, gan.before[batch][name])
        assert_full(run, name, step, gan.updates[batch][name], view="update", rtol=1e-5, atol=1e-7)


def test_graph_of_both_networks(gan_run: tuple[Any, GAN, LightningOracle]) -> None:
    run, _, _ = gan_run
    found = kinds(run)
    for node in ("input", "G.0", "G.2", "D.0", "D.2"):
        assert node in found, f"{node!r} missing: {sorted(found)}"
    edges = set(run.graph.edges)
    assert ("input", "D.0") in edges and ("G.2", "D.0") in edges
    losses = loss_nodes(run)
    assert len(losses) == 2, f"expected two loss nodes, got {losses}"
    assert all(nx.has_path(run.graph, "D.2", loss) for loss in losses)
    assert any(nx.has_path(run.graph, "G.0", loss) for loss in losses)  # the generator's loss
    assert all(nx.has_path(run.graph, "input", loss) for loss in losses)  # real data -> D -> both losses


@pytest.mark.parametrize(("node", "calls"), [("D.0", 3), ("D.2", 3), ("G.2", 1)])
def test_module_values_and_gradients_of_every_call_match(gan_run: tuple[Any, GAN, LightningOracle], node: str, calls: int) -> None:
    """D runs on real data, on ``fake.detach()`` (both backpropagated by d_loss) and on ``fake`` (by g_loss)."""
    run, _, hooks = gan_run
    assert run.iterations(node) == list(range(calls))
    for batch in range(BATCHES):
        step = step_of(run, batch)
        for call in range(calls):
            assert_full(run, node, step, hooks.value(batch, node, call=call), iteration=call)
            assert_full(run, node, step, hooks.grad(batch, node, call=call), view="grad", iteration=call, rtol=1e-5, atol=1e-7)


def test_schedule_counts_batches(tmp_path: Path) -> None:
    run = fit(GAN(), real_data(n_batches=6), tmp_path, max_steps=12, every_n_steps=2)
    assert run.steps["batch_idx"].tolist() == [0, 2, 4]


def test_per_loss_grads_off_records_the_same_gradients(tmp_path: Path) -> None:
    gan = GAN()
    run = fit(gan, real_data(n_batches=2), tmp_path, max_steps=4, per_loss_grads=False, detail={"G.*": "full", "D.*": "full"})
    assert run.steps["batch_idx"].tolist() == [0, 1]
    for batch in range(2):
        assert_full(run, "D.0.weight", step_of(run, batch), gan.grads[batch]["D.0.weight"], view="grad", rtol=1e-5, atol=1e-7)


def test_the_oracle_can_tell_the_applied_gradient_from_the_final_one(gan_run: tuple[Any, GAN, LightningOracle]) -> None:
    """After the generator's backward, D's ``.grad`` also holds g_loss's gradient: not what opt_d applied."""
    _, gan, _ = gan_run
    assert not torch.allclose(gan.D[0].weight.grad, gan.grads[-1]["D.0.weight"])
