"""``Recorder.end_forward``: the step keeps its first forward pass and that pass's gradients; later forward
passes of the same step (micro-batches of gradient accumulation) leave no trace; parameters still come from
the optimizer step. Checked against plain torch hooks on the same run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from comgra_callbacks import open_run, record
from comgra_callbacks.recording.recorder import Recorder, RecorderConfig
from comgra_callbacks.store.background import BackgroundWriter
from comgra_callbacks.store.storage import open_root
from comgra_callbacks.store.writer import RunWriter


def _hooked(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def test_end_forward_records_the_first_micro_batch_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x1, x2 = torch.randn(5, 3), torch.randn(5, 3)
    seen: list[torch.Tensor] = []  # oracle: outputs of module "0" and their gradients, one per forward
    grads: list[torch.Tensor] = []

    def oracle(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen.append(out.detach().clone())
        out.register_hook(lambda g: grads.append(g.detach().clone()))

    handle = model[0].register_forward_hook(oracle)
    location = open_root(tmp_path).run("r")
    recorder = Recorder(RecorderConfig(n_samples=5, detail={"*": "samples"}), BackgroundWriter(RunWriter(location)))
    try:
        recorder.attach(model)
        recorder.begin_step(step=0, batch=x1)
        out1 = model(x1)
        first_out = out1.detach().clone()
        record("doubled", out1 * 2)
        loss1 = out1.pow(2).mean()
        recorder.before_backward(loss1)
        recorder.end_forward()
        assert _hooked(model) == ["0"]  # the recorder's module hooks are gone; the oracle's stays
        assert recorder.recording  # the step is still open
        loss1.backward()
        out2 = model(x2)  # the second micro-batch: no capture
        record("doubled", out2 * 2)
        out2.pow(2).mean().backward()
        param_grad = model[2].weight.grad.detach().clone()
        recorder.before_optimizer_step()
        opt.step()
        recorder.end_step()
    finally:
        handle.remove()
        recorder.close("finished")
    assert _hooked(model) == []
    run = open_run(tmp_path / "r")
    assert run.iterations("0") == [0] and run.iterations("doubled") == [0]
    np.testing.assert_allclose(run.samples("0", 0), seen[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(run.samples("doubled", 0), 2 * first_out.numpy(), rtol=1e-6)
    np.testing.assert_allclose(run.samples("input", 0), x1.numpy(), rtol=1e-6)
    first_grad_l2 = float(grads[0].norm())
    assert abs(float(grads[1].norm()) - first_grad_l2) > 1e-4  # the two micro-batches differ
    assert np.isclose(run.stats("0", view="grad")["l2"].iloc[0], first_grad_l2, rtol=1e-5)
    # parameter gradients are those at the optimizer step: accumulated over both micro-batches
    assert np.isclose(run.stats("2.weight", view="grad")["l2"].iloc[0], float(param_grad.norm()), rtol=1e-5)
