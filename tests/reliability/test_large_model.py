"""Any model is recordable with the defaults: a step larger than the writer's buffer goes in parts (or, for a
tensor larger than half the buffer, as results computed on the training side), with one warning whose hint
works. "Large" is relative to ``max_queue_mb``; one test uses a real 27 M-parameter model."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from comgra_callbacks import ComgraCallback, open_run
from tests.conftest import quiet_trainer

pytestmark = pytest.mark.slow  # each test starts a writer process


class Wide(pl.LightningModule):
    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        self.seen: dict[int, dict[str, torch.Tensor]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen[self.global_step] = {n: p.detach().clone() for n, p in self.named_parameters() if n.endswith("weight")}
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def train(tmp: Path, model: Wide, run: str, steps: int, **options: Any) -> tuple[list[str], Any]:
    n_in, n_out = model.net[0].in_features, model.net[-1].out_features
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8 * steps, n_in, generator=g), torch.randint(0, n_out, (8 * steps,), generator=g))
    comgra = ComgraCallback(str(tmp / "runs"), run_name=run, log_scalars=False, **options)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_trainer([comgra], tmp, max_steps=steps).fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    return [str(w.message) for w in seen if str(w.message).startswith("comgra")], open_run(tmp / "runs" / run)


@pytest.mark.timeout(120)
def test_a_step_larger_than_the_buffer_is_recorded_with_one_warning_whose_hint_works(tmp_path: Path) -> None:
    model = Wide([64, 256, 256, 8])  # ~1.1 MiB per step of values, gradients and updates: more than 1 MiB
    messages, run = train(tmp_path, model, "small-buffer", 5, max_queue_mb=1)
    assert run.steps["step"].tolist() == list(range(5)) and run.status == "finished"
    split = [m for m in messages if "it is sent in parts" in m]
    assert len(split) == 1, messages  # once, not every step
    for step in (0, 4):  # what the writer joined from the parts is the step's own tensors
        weight = model.seen[step]["net.2.weight"]
        assert run.stats("net.2.weight").loc[step, "mean"] == pytest.approx(weight.mean().item(), rel=1e-4)
        assert run.neurons("net.2.weight", step).shape == (256, 4)
    ratio = run.stats("net.2.weight", view="update")["update_ratio"]
    assert np.isfinite(ratio).all() and (ratio > 0).all()  # the weight and its update may travel in different parts
    hint = int(re.search(r"HINT: max_queue_mb=(\d+) sends it at once", split[0]).group(1))  # type: ignore[union-attr]
    messages, run = train(tmp_path, Wide([64, 256, 256, 8]), "hinted", 5, max_queue_mb=hint)
    assert not [m for m in messages if "in parts" in m], messages  # (a 2 MiB buffer may still make training wait)
    assert run.steps["step"].tolist() == list(range(5))


@pytest.mark.timeout(120)
def test_a_tensor_larger_than_half_the_buffer_travels_as_results(tmp_path: Path) -> None:
    model = Wide([64, 4096, 8])  # net.0.weight and its gradient and update: 1 MiB each, in a 1 MiB buffer
    messages, run = train(tmp_path, model, "big-tensor", 3, max_queue_mb=1)
    assert run.steps["step"].tolist() == [0, 1, 2]
    weight = model.seen[1]["net.0.weight"]
    assert run.stats("net.0.weight").loc[1, "std"] == pytest.approx(weight.std().item(), rel=1e-4)
    assert run.neurons("net.0.weight", 1).shape == (4096, 4)
    assert run.stats("net.0.weight", view="update").loc[1, "update_ratio"] > 0
    reduced = [m for m in messages if "do not fit half the writer's buffer" in m]
    assert len(reduced) == 1 and "computed on the training thread" in reduced[0] and "HINT: max_queue_mb=4 " in reduced[0], messages


@pytest.mark.timeout(180)
def test_a_27m_parameter_model_is_recorded_with_the_defaults(tmp_path: Path) -> None:
    model = Wide([1024, 4096, 4096, 1536])  # 27.3 M parameters: 313 MiB a step, more than the 256 MiB default
    assert sum(p.numel() for p in model.parameters()) > 27_000_000
    messages, run = train(tmp_path, model, "27m", 2)
    assert run.steps["step"].tolist() == [0, 1] and run.status == "finished"
    weight = model.seen[1]["net.2.weight"]
    assert run.stats("net.2.weight").loc[1, "mean"] == pytest.approx(weight.mean().item(), rel=1e-3, abs=1e-7)
    assert len([m for m in messages if "it is sent in parts" in m and "HINT: max_queue_mb=314" in m]) == 1
