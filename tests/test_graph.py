"""Dependency graphs derived from autograd, on the architectures the issue names."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from comgra_callbacks import ComgraCallback, connect, open_run, record
from comgra_callbacks.recording.recorder import Recorder, RecorderConfig
from comgra_callbacks.store.background import BackgroundWriter
from comgra_callbacks.store.storage import open_root
from comgra_callbacks.store.writer import RunWriter
from tests.conftest import classification_loader, make_mlp_module, quiet_trainer


def record_steps(
    root: Path,
    model: nn.Module,
    step_fn: Callable[[], torch.Tensor],
    *,
    steps: int = 1,
    config: RecorderConfig | None = None,
    name: str = "run",
) -> Any:
    """Drive the framework-free recorder by hand for ``steps`` optimizer steps; return the opened run."""
    writer = BackgroundWriter(RunWriter(open_root(root).run(name)))
    recorder = Recorder(config or RecorderConfig(), writer)
    recorder.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    try:
        for step in range(steps):
            recorder.begin_step(step=step)
            loss = step_fn()
            recorder.before_backward(loss)
            optimizer.zero_grad()
            loss.backward()
            recorder.before_optimizer_step()
            optimizer.step()
            recorder.end_step()
    finally:
        recorder.close("finished")
    return open_run(root / name)


def edges(run: Any) -> set[tuple[str, str]]:
    return set(run.graph.edges())


def test_mlp_through_lightning(tmp_path: Path) -> None:
    cb = ComgraCallback(str(tmp_path / "runs"), run_name="mlp")
    quiet_trainer([cb], tmp_path, max_steps=2).fit(make_mlp_module(), classification_loader())
    run = open_run(tmp_path / "runs" / "mlp")
    assert edges(run) == {
        ("input", "net.0"),
        ("net.0.weight", "net.0"),
        ("net.0.bias", "net.0"),
        ("net.0", "net.1"),
        ("net.1", "net.2"),
        ("net.2.weight", "net.2"),
        ("net.2.bias", "net.2"),
        ("net.2", "loss"),
        ("target", "loss"),
    }
    kinds = {n: d["kind"] for n, d in run.graph.nodes(data=True)}
    assert kinds == {
        "input": "input",
        "target": "target",
        "net.0": "intermediate",
        "net.1": "intermediate",
        "net.2": "output",
        "loss": "loss",
        "net.0.weight": "parameter",
        "net.0.bias": "parameter",
        "net.2.weight": "parameter",
        "net.2.bias": "parameter",
    }
    assert run.graph.edges["input", "net.0"]["source"] == "module"
    assert run.graph.edges["net.0", "net.1"]["source"] == "autograd"
    assert run.graph.nodes["net.0"]["shape"] == [8, 5]
    assert run.graph.nodes["net.0"]["module"] == "net.0"
    # topological order: inputs first, loss last
    order = run.nodes
    assert order.index("input") < order.index("net.0") < order.index("net.2") < order.index("loss")


def test_residual_block(tmp_path: Path) -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.act = nn.ReLU()
            self.outer = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inner(x)
            return record("block_out", self.outer(self.act(h)) + h)

    model = Residual()
    x = torch.randn(3, 4)
    run = record_steps(tmp_path, model, lambda: model(x).pow(2).mean())
    e = edges(run)
    assert {("inner", "act"), ("act", "outer"), ("outer", "block_out"), ("inner", "block_out"), ("block_out", "loss")} <= e
    assert ("act", "block_out") not in e  # stops at the nearest recorded tensor


def test_two_losses_and_their_gradient_views(tmp_path: Path) -> None:
    body, head_a, head_b = nn.Linear(3, 3), nn.Linear(3, 1), nn.Linear(3, 1)
    model = nn.ModuleDict({"body": body, "head_a": head_a, "head_b": head_b})
    x = torch.randn(5, 3)

    def step() -> torch.Tensor:
        h = body(x)
        a = record("loss_a", head_a(h).mean(), kind="loss")
        b = record("loss_b", head_b(h).abs().mean(), kind="loss")
        return a + b

    run = record_steps(tmp_path, model, step)
    e = edges(run)
    assert {("body", "head_a"), ("body", "head_b"), ("head_a", "loss_a"), ("head_b", "loss_b"), ("loss_a", "loss"), ("loss_b", "loss")} <= e
    assert set(run.views("body")) == {"value", "grad", "grad:loss_a", "grad:loss_b"}
    assert set(run.views("head_b.weight")) == {"value", "grad", "grad:loss_b", "update"}
    assert run.graph.nodes["head_a"]["kind"] == "output"


def test_embedding_of_integer_tokens(tmp_path: Path) -> None:
    emb, out = nn.Embedding(10, 4), nn.Linear(4, 10)
    model = nn.Sequential(emb, out)
    tokens = torch.randint(0, 10, (2, 6))

    def step() -> torch.Tensor:
        record("tokens", tokens, kind="input")
        logits = model(tokens)
        return nn.functional.cross_entropy(logits.reshape(-1, 10), tokens.reshape(-1))

    run = record_steps(tmp_path, model, step)
    e = edges(run)
    assert ("tokens", "0") in e and run.graph.edges["tokens", "0"]["source"] == "module"
    assert ("0.weight", "0") in e and ("0", "1") in e
    assert run.views("tokens") == ["value"]
    assert run.samples("tokens", 0).dtype.kind == "i"


def test_module_used_twice_in_one_forward(tmp_path: Path) -> None:
    shared = nn.Linear(3, 3)
    model = nn.ModuleDict({"shared": shared})
    x = torch.randn(4, 3)
    run = record_steps(tmp_path, model, lambda: shared(torch.tanh(shared(x))).sum())
    assert run.iterations("shared") == [0, 1]
    assert run.graph.nodes["shared"]["iterations"] == 2
    assert ("shared", "shared") in edges(run)  # the first call feeds the second
    first, last = run.stats("shared", iteration=0), run.stats("shared")
    assert not first.equals(last)
    assert last.equals(run.stats("shared", iteration=1))


def test_recurrent_loop_records_iterations(tmp_path: Path) -> None:
    cell = nn.RNNCell(2, 3)
    model = nn.ModuleDict({"cell": cell})
    xs = torch.randn(5, 4, 2)  # (T, B, F)

    def step() -> torch.Tensor:
        h = torch.zeros(4, 3)
        for t in range(xs.shape[0]):
            h = record("h", cell(xs[t], h))
        return h.pow(2).mean()

    config = RecorderConfig(modules=[])  # only the explicit record() calls
    run = record_steps(tmp_path, model, step, config=config)
    assert run.iterations("h") == [0, 1, 2, 3, 4]
    e = edges(run)
    assert ("h", "h") in e and ("cell.weight_hh", "h") in e and ("h", "loss") in e
    by_iteration = [run.stats("h", iteration=i).loc[0, "mean"] for i in range(5)]
    assert len(set(by_iteration)) == 5
    assert run.stats("h").loc[0, "mean"] == by_iteration[-1]


def test_chain_of_2000_layers_between_two_recorded_tensors(tmp_path: Path) -> None:
    weight = nn.Parameter(torch.ones(3))
    model = nn.Module()
    model.weight = weight
    x = torch.randn(2, 3)
    depth = 2000
    assert depth > sys.getrecursionlimit() // 2

    def step() -> torch.Tensor:
        h = record("start", x * weight)
        for _ in range(depth):
            h = h * 0.999 + 0.001
        return record("end", h).sum()

    run = record_steps(tmp_path, model, step)
    assert {("weight", "start"), ("start", "end"), ("end", "loss")} <= edges(run)
    assert ("weight", "end") not in edges(run)


def test_connect_adds_edges_autograd_cannot_see(tmp_path: Path) -> None:
    lin = nn.Linear(3, 3)
    model = nn.ModuleDict({"lin": lin})
    x = torch.randn(2, 3)
    connect("memory", "lin")  # before the recorder exists: kept for it

    def step() -> torch.Tensor:
        memory = record("memory", lin(x).detach())
        return lin(memory).sum()

    run = record_steps(tmp_path, model, step)
    assert run.graph.edges["memory", "lin"]["source"] in ("manual", "module")
    assert ("lin", "memory") not in edges(run)  # the detach cut it


def test_graph_per_step_type_is_kept(tmp_path: Path) -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    model = nn.ModuleDict({"a": a, "b": b})
    x = torch.randn(3, 2)
    writer = BackgroundWriter(RunWriter(open_root(tmp_path).run("types")))
    recorder = Recorder(RecorderConfig(), writer)
    recorder.attach(model)
    try:
        for step, step_type, fn in [(0, "short", lambda: a(x).sum()), (1, "long", lambda: b(a(x)).sum())]:
            recorder.begin_step(step=step, step_type=step_type)
            loss = fn()
            recorder.before_backward(loss)
            loss.backward()
            recorder.end_step()
    finally:
        recorder.close("finished")
    run = open_run(tmp_path / "types")
    assert ("a", "b") not in set(run.graph_for("short").edges())
    assert ("a", "b") in set(run.graph_for("long").edges())
    assert run.graph.edges["a", "b"]["step_types"] == ["long"]
    with pytest.raises(KeyError, match="no graph for step type 'val'"):
        run.graph_for("val")
