"""Tiny real Lightning trainings with one planted anomaly: a NaN or a ×1000 value in one sample of one tensor
(its value or its gradient) at one step, or a recorded tensor that drives the loss."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from comgra_callbacks import ComgraCallback, open_run, record
from comgra_callbacks.store.reader import Run
from tests.conftest import classification_loader, quiet_trainer

BATCH = 16


@dataclass(frozen=True)
class Plant:
    """What is planted where: ``how`` is ``"nan"`` or ``"scale"`` (×1000); ``grad`` plants it in the gradient."""

    node: str
    step: int
    sample: int
    how: str
    grad: bool = False


class Block(nn.Module):
    """Returns its last child's output: the recorder keeps ``block`` and ``block.act`` as two names of one tensor."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x))


class Planted(pl.LightningModule):
    def __init__(self, plant: Plant | None = None, drive: list[float] | None = None, per_sample: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 16)
        self.block = Block(16)
        self.mid = nn.Linear(16, 16)
        self.relu = nn.ReLU()
        self.head = nn.Linear(16, 3)
        self.plant = plant
        self.drive = drive
        self.per_sample = per_sample
        if plant is not None:
            self.get_submodule(plant.node).register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        plant = self.plant
        assert plant is not None
        if self.global_step != plant.step or not self.training:
            return None
        p = plant.sample

        def poison(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            if plant.how == "nan":
                t[p, 3] = float("nan")
            else:
                t[p] = t[p] * 1000.0
            return t

        if plant.grad:
            output.register_hook(poison)  # before the recorder's own hook: it sees the planted gradient
            return None
        return poison(output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.mid(self.block(self.embed(x)))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = nn.functional.cross_entropy(out, y)
        if self.per_sample:  # what a TopK sample selector ranks by
            record("per_sample_loss", nn.functional.cross_entropy(out, y, reduction="none"))
        if self.drive is not None:
            gain = record("gain", torch.full((x.shape[0], 1), self.drive[self.global_step]))
            loss = loss + gain.mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.02)


def train(
    root: Path, name: str, *, plant: Plant | None = None, drive: list[float] | None = None, steps: int = 8, per_sample: bool = False, **options: Any
) -> Run:
    """Record every step (unless ``options`` say otherwise) with samples at every node (``detail={"*": "samples"}``)."""
    callback = ComgraCallback(str(root), run_name=name, detail={"*": "samples"}, n_samples=4, flush_secs=0.2, **options)
    trainer = quiet_trainer([callback], root, max_steps=steps)
    trainer.fit(Planted(plant, drive, per_sample), classification_loader(n_batches=steps, batch_size=BATCH, n_in=6, n_classes=3))
    return open_run(root / name)
