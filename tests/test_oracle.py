"""Oracle tests: what open_run returns equals what plain PyTorch hooks see in the same seeded run.

An independent callback captures the same tensors with ``register_forward_hook``, ``retain_grad`` and
``torch.autograd.grad`` and computes the statistics directly with torch; the recorded values must match.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from comgra_callbacks import ComgraCallback, open_run, record
from comgra_callbacks.recording.parts import REDUCE_ENV
from tests.conftest import classification_loader, quiet_trainer

N_SAMPLES = 3


def torch_stats(t: torch.Tensor) -> dict[str, float]:
    x = t.detach().double().reshape(-1)
    return {
        "mean": x.mean().item(),
        "std": x.std().item() if x.numel() > 1 else 0.0,
        "abs_mean": x.abs().mean().item(),
        "min": x.min().item(),
        "max": x.max().item(),
        "l2": x.norm().item(),
        "zero_frac": (x == 0).double().mean().item(),
        "numel": float(x.numel()),
        "nan_count": 0.0,
        "inf_count": 0.0,
    }


class TwoLossModel(pl.LightningModule):
    """An MLP with two heads and two recorded losses; the total is their sum."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5))
        self.head_a = nn.Linear(5, 3)
        self.head_b = nn.Linear(5, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.body(x)
        loss_a = nn.functional.cross_entropy(self.head_a(h), y)
        loss_b = (self.head_b(h) ** 2).mean()
        record("loss_a", loss_a, kind="loss")
        record("loss_b", loss_b, kind="loss")
        return loss_a + 0.5 * loss_b

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=0.05)


class Oracle(pl.Callback):
    """Captures module outputs, their gradients (total and per loss) and parameters, independently.

    Gradients come from ``torch.autograd.grad`` (``retain_grad`` would accumulate the extra backward passes
    that per-loss gradients need, ours and the oracle's)."""

    def __init__(self, modules: list[str]) -> None:
        self.modules = modules
        self.values: dict[tuple[int, str], torch.Tensor] = {}
        self.grads: dict[tuple[int, str, str], torch.Tensor] = {}
        self.params_before: dict[tuple[int, str], torch.Tensor] = {}
        self.param_grads: dict[tuple[int, str], torch.Tensor] = {}
        self.updates: dict[tuple[int, str], torch.Tensor] = {}
        self._live: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self._live = {}
        for name, p in module.named_parameters():
            self.params_before[(step, name)] = p.detach().clone()
        for name, sub in module.named_modules():
            if name in self.modules:
                self._handles.append(sub.register_forward_hook(self._hook(step, name)))

    def _hook(self, step: int, name: str) -> Any:
        def hook(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
            self._live[name] = out
            self.values[(step, name)] = out.detach().clone()

        return hook

    def on_before_backward(self, trainer: pl.Trainer, module: pl.LightningModule, loss: torch.Tensor) -> None:
        step = trainer.global_step
        live = list(self._live.items())
        totals = torch.autograd.grad(loss, [t for _, t in live], retain_graph=True, allow_unused=True)
        for (name, _), g in zip(live, totals):
            if g is not None:
                self.grads[(step, name, "grad")] = g.detach().clone()
        for loss_name in ("loss_a", "loss_b"):
            target = self._losses(module, loss_name)
            if target is None:
                continue
            params = [p for _, p in module.named_parameters()]
            grads = torch.autograd.grad(target, [t for _, t in live] + params, retain_graph=True, allow_unused=True)
            for (name, _), g in zip(live, grads):
                if g is not None:
                    self.grads[(step, name, f"grad:{loss_name}")] = g.detach().clone()
            for (pname, _), g in zip(module.named_parameters(), grads[len(live) :]):
                if g is not None:
                    self.grads[(step, pname, f"grad:{loss_name}")] = g.detach().clone()

    def _losses(self, module: pl.LightningModule, name: str) -> torch.Tensor | None:
        from comgra_callbacks.recording import context

        for recorder in context.active_recorders():
            step = recorder._step
            if step is not None:
                for loss_name, tensor in step.losses:
                    if loss_name == name:
                        return tensor
        return None

    def on_after_backward(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        step = trainer.global_step
        for name, p in module.named_parameters():
            if p.grad is not None:
                self.param_grads[(step, name)] = p.grad.detach().clone()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step - 1
        for name, p in module.named_parameters():
            self.updates[(step, name)] = p.detach() - self.params_before[(step, name)]
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._live = {}


def assert_stats_match(recorded: Any, expected: dict[str, float], what: str) -> None:
    for stat, value in expected.items():
        got = float(recorded[stat])
        assert math.isclose(got, value, rel_tol=2e-4, abs_tol=2e-6), f"{what}: {stat} recorded {got}, expected {value}"


@pytest.fixture(scope="module", params=["writer", "training"], ids=["reduced-in-writer", "reduced-on-training-thread"])
def oracle_run(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> tuple[Any, Oracle]:
    """Both places the statistics are computed (parts.reduce_in_writer), held to the same oracle."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(REDUCE_ENV, request.param)
        return _oracle_run(tmp_path_factory)


def _oracle_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Oracle]:
    tmp = tmp_path_factory.mktemp("oracle")
    oracle = Oracle(["body.0", "body.1", "body.2", "head_a", "head_b"])
    # The oracle comes after ComgraCallback so that it finds the recorder's losses while the step records.
    cb = ComgraCallback(str(tmp / "runs"), run_name="oracle", n_samples=N_SAMPLES, detail={"body.*": "samples"})
    trainer = quiet_trainer([cb, oracle], tmp, max_steps=5)
    trainer.fit(TwoLossModel(), classification_loader(n_batches=5))
    return open_run(tmp / "runs" / "oracle"), oracle


def test_every_step_is_recorded_and_finished(oracle_run: tuple[Any, Oracle]) -> None:
    run, _ = oracle_run
    assert run.status == "finished"
    assert run.steps["step"].tolist() == [0, 1, 2, 3, 4]
    assert set(run.steps["step_type"]) == {"train"}


@pytest.mark.parametrize("node", ["body.0", "body.1", "body.2", "head_a", "head_b"])
def test_activation_values_match(oracle_run: tuple[Any, Oracle], node: str) -> None:
    run, oracle = oracle_run
    stats = run.stats(node)
    for step in range(5):
        expected = oracle.values[(step, node)]
        assert_stats_match(stats.loc[step], torch_stats(expected), f"{node} value at step {step}")
        np.testing.assert_allclose(run.samples(node, step), expected[:N_SAMPLES].numpy(), rtol=1e-6)
        neurons = run.neurons(node, step)
        x = expected.double()
        np.testing.assert_allclose(neurons["mean"], x.mean(0).numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(neurons["std"], x.std(0).numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(neurons["abs_mean"], x.abs().mean(0).numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("node", ["body.0", "body.2", "head_a", "head_b"])
def test_total_gradients_match(oracle_run: tuple[Any, Oracle], node: str) -> None:
    run, oracle = oracle_run
    stats = run.stats(node, view="grad")
    for step in range(5):
        expected = oracle.grads[(step, node, "grad")]
        assert_stats_match(stats.loc[step], torch_stats(expected), f"{node} grad at step {step}")
        np.testing.assert_allclose(run.samples(node, step, view="grad"), expected[:N_SAMPLES].numpy(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("loss", ["loss_a", "loss_b"])
@pytest.mark.parametrize("node", ["body.0", "head_a", "head_b", "body.0.weight", "head_b.bias"])
def test_per_loss_gradients_match(oracle_run: tuple[Any, Oracle], node: str, loss: str) -> None:
    run, oracle = oracle_run
    view = f"grad:{loss}"
    present = [step for step in range(5) if (step, node, view) in oracle.grads]
    if not present:  # head_a does not feed loss_b (and vice versa): then no view either
        assert view not in run.views(node)
        return
    stats = run.stats(node, view=view)
    for step in present:
        assert_stats_match(stats.loc[step], torch_stats(oracle.grads[(step, node, view)]), f"{node} {view} at {step}")


def test_unrelated_loss_has_no_gradient_view(oracle_run: tuple[Any, Oracle]) -> None:
    run, _ = oracle_run
    assert "grad:loss_a" in run.views("head_a")
    assert "grad:loss_b" not in run.views("head_a")
    assert "grad:loss_a" not in run.views("head_b")


@pytest.mark.parametrize("name", ["body.0.weight", "body.2.bias", "head_a.weight"])
def test_parameters_values_grads_and_updates_match(oracle_run: tuple[Any, Oracle], name: str) -> None:
    run, oracle = oracle_run
    values, grads, updates = run.stats(name), run.stats(name, view="grad"), run.stats(name, view="update")
    for step in range(5):
        before = oracle.params_before[(step, name)]
        assert_stats_match(values.loc[step], torch_stats(before), f"{name} value at {step}")
        assert_stats_match(grads.loc[step], torch_stats(oracle.param_grads[(step, name)]), f"{name} grad at {step}")
        update = oracle.updates[(step, name)]
        assert_stats_match(updates.loc[step], torch_stats(update), f"{name} update at {step}")
        ratio = update.double().norm().item() / before.double().norm().item()
        assert math.isclose(updates.loc[step, "update_ratio"], ratio, rel_tol=1e-4)
        # per output unit: row i of the weight is neuron i
        neurons = run.neurons(name, step)
        rows = before.double().reshape(before.shape[0], -1)
        np.testing.assert_allclose(neurons["mean"], rows.mean(1).numpy(), rtol=1e-4, atol=1e-7)


def test_loss_and_recorded_losses(oracle_run: tuple[Any, Oracle]) -> None:
    run, _ = oracle_run
    total = run.stats("loss")
    a, b = run.stats("loss_a"), run.stats("loss_b")
    np.testing.assert_allclose(total["mean"], a["mean"] + 0.5 * b["mean"], rtol=1e-5)
    assert run.graph.nodes["loss"]["kind"] == "loss"
    assert run.samples("loss", 0).shape == ()


def test_inputs_and_integer_targets(oracle_run: tuple[Any, Oracle]) -> None:
    run, _ = oracle_run
    loader = classification_loader(n_batches=5)
    for step, (x, y) in enumerate(loader):
        np.testing.assert_allclose(run.samples("input", step), x[:N_SAMPLES].numpy(), rtol=1e-6)
        targets = run.samples("target", step)
        assert targets.dtype == np.int64
        np.testing.assert_array_equal(targets, y[:N_SAMPLES].numpy())
        assert_stats_match(run.stats("target").loc[step], torch_stats(y.double()), f"target at {step}")
    assert run.views("target") == ["value"]  # integers have no gradient
