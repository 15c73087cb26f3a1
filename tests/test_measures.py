"""Measures recorded with the run: evaluated before the step's forward pass, in eval mode, stored as
``run.measures``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from comgra_callbacks import ComgraCallback, ConfigError, ConfigTypeError, Every, open_run
from comgra_callbacks.measures import Accuracy, FourierSparsity, Loss, WeightNorm, evaluate
from tests.conftest import classification_loader, make_mlp_module, quiet_trainer


class Snapshots(pl.Callback):
    """The oracle: the model's parameters at every batch start (after ComgraCallback's own batch start)."""

    def __init__(self) -> None:
        self.params: dict[int, dict[str, torch.Tensor]] = {}
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.params[trainer.global_step] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.modes.append(module.training)


def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    return torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)


def test_measures_see_the_model_of_the_step_they_are_stamped_with(tmp_path: Path) -> None:
    x, y = held_out()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    measures = {
        "acc": Accuracy((x, y)),
        "loss": Loss(data),
        "wnorm": WeightNorm("net.*.weight"),
        "fourier": FourierSparsity("net.0.weight", axis=1),
        "custom": lambda model, trainer: {"step": trainer.global_step, "training": float(model.training)},
    }
    oracle = Snapshots()
    module = make_mlp_module()
    cb = ComgraCallback(str(tmp_path), run_name="m", every_n_steps=2, measures=measures)
    quiet_trainer([cb, oracle], tmp_path, max_steps=6).fit(module, classification_loader())
    run = open_run(tmp_path / "m")
    frame = run.measures
    assert frame.index.tolist() == [0, 2, 4] and frame.index.name == "step"
    assert "measure/acc" not in set(run.scalars["name"]) and not any(c.startswith("measure/") for c in frame.columns)
    twin = make_mlp_module()
    for step in (0, 2, 4):
        twin.load_state_dict(oracle.params[step])
        twin.eval()
        with torch.no_grad():
            logits = twin(x)
            assert frame.loc[step, "acc"] == pytest.approx(float((logits.argmax(-1) == y).float().mean()))
            assert frame.loc[step, "loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-5)
        weights = [v for k, v in oracle.params[step].items() if k.endswith("weight")]
        assert frame.loc[step, "wnorm.total"] == pytest.approx(sum(float(w.double().pow(2).sum()) for w in weights), rel=1e-9)
        assert frame.loc[step, "wnorm.net.0.weight"] == pytest.approx(float(oracle.params[step]["net.0.weight"].double().pow(2).sum()))
        assert 0 <= frame.loc[step, "fourier.gini"] <= 1 and 0 < frame.loc[step, "fourier.top1_share"] <= 1
        assert frame.loc[step, "custom.step"] == step and frame.loc[step, "custom.training"] == 0.0  # in eval mode
    assert oracle.modes == [True] * 6 and module.training  # the model's mode is put back
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())


def test_measure_schedule_and_errors(tmp_path: Path) -> None:
    cb = ComgraCallback(str(tmp_path), run_name="own", every_n_steps=100, measures={"w": WeightNorm()}, measure_schedule=Every(3))
    quiet_trainer([cb], tmp_path, max_steps=7).fit(make_mlp_module(), classification_loader(n_batches=8))
    run = open_run(tmp_path / "own")
    assert run.measures.index.tolist() == [0, 3, 6] and run.steps["step"].tolist() == [0]
    with pytest.raises(ConfigTypeError, match=r"`ComgraCallback\(measures=...\)`: expected a callable model -> float for 'x', got 3"):
        ComgraCallback(str(tmp_path), measures={"x": 3})
    with pytest.raises(ConfigError, match=r"`ComgraCallback\(measure_schedule=...\)`: expected measures= too"):
        ComgraCallback(str(tmp_path), measure_schedule=Every(2))
    with pytest.raises(ConfigError, match=r"`FourierSparsity\(axis=...\)`: expected 0 or 1"):
        FourierSparsity("w", axis=2)


def test_fourier_sparsity_finds_a_planted_frequency() -> None:
    p = 17
    tokens = torch.arange(p, dtype=torch.float64)
    planted = torch.stack([torch.cos(2 * math.pi * 5 * tokens / p + phase) for phase in torch.linspace(0, 3, 8)], dim=1)
    noise = torch.randn(p, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    class Holder(nn.Module):
        def __init__(self, m: torch.Tensor) -> None:
            super().__init__()
            self.embed = nn.Parameter(m)

    clean = evaluate({"f": FourierSparsity("embed")}, Holder(planted))
    noisy = evaluate({"f": FourierSparsity("embed")}, Holder(noise))
    assert clean["f.key.0"] == 5.0 and clean["f.top1_share"] == pytest.approx(1.0) and clean["f.key_share"] == pytest.approx(1.0)
    assert noisy["f.top1_share"] < 0.6 and noisy["f.gini"] < clean["f.gini"]
