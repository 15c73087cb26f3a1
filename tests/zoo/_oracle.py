"""Shared helpers of the zoo: an independent hook-based oracle, a trainer helper, and comparisons.

The oracle sees the same run as the recorder, with nothing but ``register_forward_hook`` on modules,
``Tensor.register_hook`` on their outputs, the loss given to ``on_before_backward`` and the parameters'
``.grad`` at ``on_before_optimizer_step``; what :func:`comgra_callbacks.open_run` returns must equal it.

Everything is keyed by the *batch number* of the fit (0, 1, 2, ... over all epochs), and :func:`step_of` maps
a batch to the step under which the run recorded it (``run.steps``), so the tests do not depend on how the
step column is numbered.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import networkx as nx
import numpy as np
import torch
from torch import nn

from comgra_callbacks import ComgraCallback, open_run
from tests.conftest import quiet_trainer

STATS = ("mean", "std", "abs_mean", "min", "max", "l2")


def flat_outputs(output: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a module's output named as the contract says: ``""`` for one tensor, ``":0"``,
    ``":1.0"`` for (nested) tuples; ``None`` entries are skipped, a single tensor left gets ``""``."""
    found: dict[str, torch.Tensor] = {}

    def walk(value: Any, name: str, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            found[name] = value
        elif isinstance(value, (tuple, list)) and depth < 2:
            for i, item in enumerate(value):
                walk(item, f"{name}.{i}" if name else f":{i}", depth + 1)

    walk(output, prefix, 0)
    if len(found) == 1:
        return {"": next(iter(found.values()))}
    return found


class Calls:
    """What one module produced on one batch: ``values[i][suffix]`` and ``grads[i][suffix]`` per call ``i``."""

    def __init__(self) -> None:
        self.values: list[dict[str, torch.Tensor]] = []
        self.grads: list[dict[str, torch.Tensor]] = []


class ModuleOracle:
    """Forward hooks on chosen modules of ``model`` (all named modules when ``names`` is None).

    Values are detached copies taken when the module returns; gradients are those autograd hands to a hook
    on each output tensor (the last one received: the real backward comes after any extra ``autograd.grad``).
    """

    def __init__(self, names: Iterable[str] | None = None) -> None:
        self.names = None if names is None else list(names)
        self.batches: list[dict[str, Calls]] = []
        self._handles: list[Any] = []

    def attach(self, model: nn.Module) -> None:
        calls: dict[str, Calls] = {}
        self.batches.append(calls)
        for name, module in model.named_modules():
            if name and (self.names is None or name in self.names):
                self._handles.append(module.register_forward_hook(self._hook(calls, name)))

    @staticmethod
    def _hook(calls: dict[str, Calls], name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            entry = calls.setdefault(name, Calls())
            tensors = flat_outputs(output)
            entry.values.append({s: t.detach().float().clone() for s, t in tensors.items()})
            grads: dict[str, torch.Tensor] = {}
            entry.grads.append(grads)
            for suffix, t in tensors.items():
                if t.requires_grad:
                    t.register_hook(lambda g, s=suffix: grads.__setitem__(s, g.detach().float().clone()))

        return hook

    def detach(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def value(self, batch: int, module: str, suffix: str = "", call: int = 0) -> torch.Tensor:
        return self.batches[batch][module].values[call][suffix]

    def grad(self, batch: int, module: str, suffix: str = "", call: int = 0) -> torch.Tensor:
        return self.batches[batch][module].grads[call][suffix]


class LightningOracle(pl.Callback):
    """The oracle for a Lightning fit with automatic optimization: module outputs and their gradients, the
    loss, the parameters before the batch, their gradients at ``on_before_optimizer_step`` and their
    updates (after the batch minus before). Put it after the ``ComgraCallback``."""

    def __init__(self, modules: Iterable[str] | None = None, buffers: Iterable[str] = ()) -> None:
        self.modules = ModuleOracle(modules)
        self.buffer_names = list(buffers)
        self.batch = -1
        self.losses: list[float] = []
        self.before: list[dict[str, torch.Tensor]] = []
        self.param_grads: list[dict[str, torch.Tensor]] = []
        self.updates: list[dict[str, torch.Tensor]] = []
        self.buffers: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.batch += 1
        self.modules.attach(pl_module)
        self.before.append({n: p.detach().float().clone() for n, p in pl_module.named_parameters()})
        self.param_grads.append({})
        self.buffers.append({})

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if len(self.losses) == self.batch:
            self.losses.append(float(loss.detach()))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = self.param_grads[self.batch]
        if not grads:
            grads.update({n: p.grad.detach().float().clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.modules.detach()
        before = self.before[self.batch]
        self.updates.append({n: p.detach().float() - before[n] for n, p in pl_module.named_parameters()})
        named = dict(pl_module.named_buffers())
        self.buffers[self.batch].update({n: named[n].detach().float().clone() for n in self.buffer_names})

    def value(self, batch: int, module: str, suffix: str = "", call: int = 0) -> torch.Tensor:
        return self.modules.value(batch, module, suffix, call)

    def grad(self, batch: int, module: str, suffix: str = "", call: int = 0) -> torch.Tensor:
        return self.modules.grad(batch, module, suffix, call)


def fit(
    module: pl.LightningModule,
    loader: Any,
    tmp: Path,
    *,
    oracle: pl.Callback | None = None,
    run_name: str = "zoo",
    max_steps: int = 3,
    trainer_kw: dict[str, Any] | None = None,
    **callback_kw: Any,
) -> Any:
    """Train ``module`` with a ``ComgraCallback`` (and the oracle after it) on a quiet CPU trainer; return
    the opened run."""
    callback_kw.setdefault("flush_secs", 0.1)
    cb = ComgraCallback(str(tmp / "runs"), run_name=run_name, **callback_kw)
    callbacks: list[Any] = [cb] if oracle is None else [cb, oracle]
    trainer = quiet_trainer(callbacks, tmp, max_steps=max_steps, **(trainer_kw or {}))
    trainer.fit(module, loader)
    return open_run(tmp / "runs" / run_name)


def step_of(run: Any, batch: int, step_type: str = "train") -> int:
    """The step under which the run recorded training batch number ``batch`` (single-epoch fits)."""
    steps = run.steps[run.steps["step_type"] == step_type]
    found = steps[steps["batch_idx"] == batch]["step"].tolist()
    assert len(found) == 1, f"expected one {step_type} record of batch {batch}, got steps {found}; run.steps:\n{run.steps}"
    return int(found[0])


def kinds(run: Any) -> dict[str, str]:
    return {name: attrs.get("kind") for name, attrs in run.graph.nodes(data=True)}


def assert_nodes(run: Any, expected: dict[str, str | None]) -> None:
    """Every expected node is in the run (with the kind given, unless None)."""
    found = kinds(run)
    missing = [n for n in expected if n not in found]
    assert not missing, f"nodes missing: {missing}; the run has {sorted(found)}"
    wrong = {n: (found[n], k) for n, k in expected.items() if k is not None and found[n] != k}
    assert not wrong, f"node kinds (recorded, expected): {wrong}"


def assert_path(run: Any, src: str, dst: str) -> None:
    assert src in run.graph and dst in run.graph, f"{src!r} or {dst!r} not in the graph: {sorted(run.graph.nodes)}"
    assert nx.has_path(run.graph, src, dst), f"the graph has no path {src!r} -> {dst!r}; edges: {sorted(run.graph.edges)}"


def assert_full(run: Any, node: str, step: int, expected: torch.Tensor, *, view: str = "value", iteration: int | None = None,
                rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """The full tensor stored for ``node`` (recorded with ``detail`` "full") equals ``expected``."""
    got = run.samples(node, step, view=view, iteration=iteration)
    want = expected.detach().float().numpy()
    assert got.shape == want.shape, f"{node} {view} at step {step}: shape {got.shape}, expected {want.shape}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{node} {view} at step {step}")


def torch_stats(t: torch.Tensor) -> dict[str, float]:
    x = t.detach().double().reshape(-1)
    return {
        "mean": x.mean().item(),
        "std": x.std().item() if x.numel() > 1 else 0.0,
        "abs_mean": x.abs().mean().item(),
        "min": x.min().item(),
        "max": x.max().item(),
        "l2": x.norm().item(),
    }


def assert_stats(run: Any, node: str, step: int, expected: torch.Tensor, *, view: str = "value", iteration: int | None = None,
                 rel: float = 2e-4, abs_: float = 2e-6) -> None:
    """The batch statistics stored for ``node`` at ``step`` are those of ``expected``."""
    row = run.stats(node, view=view, iteration=iteration).loc[step]
    assert int(row["numel"]) == expected.numel(), f"{node} {view} at {step}: numel {row['numel']}, expected {expected.numel()}"
    scale = max(1.0, float(expected.detach().double().abs().max()))
    for stat, want in torch_stats(expected).items():
        got = float(row[stat])
        assert math.isclose(got, want, rel_tol=rel, abs_tol=abs_ * scale), f"{node} {view} at {step}: {stat} recorded {got}, expected {want}"


def channel_stats(t: torch.Tensor, axis: int) -> dict[str, np.ndarray]:
    """Per-neuron statistics with neuron = index along ``axis``, over every other axis."""
    x = t.detach().double().movedim(axis, -1).reshape(-1, t.shape[axis])
    return {"mean": x.mean(0).numpy(), "std": x.std(0).numpy(), "abs_mean": x.abs().mean(0).numpy()}


def assert_neurons(run: Any, node: str, step: int, expected: torch.Tensor, axis: int, *, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    frame = run.neurons(node, step)
    assert len(frame) == expected.shape[axis], f"{node}: {len(frame)} neuron rows, expected {expected.shape[axis]} (axis {axis} of {tuple(expected.shape)})"
    for stat, want in channel_stats(expected, axis).items():
        np.testing.assert_allclose(frame[stat].to_numpy(), want, rtol=rtol, atol=atol, err_msg=f"{node} neurons {stat} at {step}")
