"""What the recorder hands a sink: a sink of one's own (one that does not take deferred updates) gets every
update as the difference itself, taken before the next optimizer step changes the parameter."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from comgra_callbacks.recording.pending import PendingStep
from comgra_callbacks.recording.process_writer import ProcessWriter
from comgra_callbacks.recording.recorder import Recorder, RecorderConfig
from comgra_callbacks.store.background import BackgroundWriter


class KeepingSink:
    """A sink of one's own: keeps the steps it is given (it reads their tensors later, as a user's might)."""

    def __init__(self) -> None:
        self.steps: list[PendingStep] = []
        self.error = None

    def submit(self, step: Any) -> bool:
        self.steps.append(step)
        return True

    def op(self, name: str, *args: Any) -> bool:
        return True

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, status: str, error: str | None = None, timeout: float | None = 600.0) -> None:
        pass


def test_a_sink_of_ones_own_gets_updates_as_differences() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sink = KeepingSink()
    recorder = Recorder(RecorderConfig(neurons=False, n_samples=0), sink)
    recorder.attach(model)
    expected = []
    for step in range(3):
        x = torch.randn(5, 3)
        recorder.begin_step(step=step, batch=x)
        loss = model(x).pow(2).mean()
        recorder.before_backward(loss)
        opt.zero_grad()
        loss.backward()
        recorder.before_optimizer_step()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        expected.append({n: p.detach() - before[n] for n, p in model.named_parameters()})
        assert recorder.end_step()
    recorder.close("finished")
    for step, kept in enumerate(sink.steps):
        updates = {s.key.node: s for s in kept.snapshots if s.key.view == "update"}
        assert sorted(updates) == sorted(expected[step])
        for name, snap in updates.items():
            assert not snap.deferred
            torch.testing.assert_close(snap.tensor, expected[step][name])  # not the weight after later steps


def test_the_writers_of_the_package_take_deferred_updates() -> None:
    assert ProcessWriter.deferred_updates and BackgroundWriter.deferred_updates
