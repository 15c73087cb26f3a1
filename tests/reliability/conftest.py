"""A tiny real training recorded once per session; each test damages its own copy of the run."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import classification_loader, quiet_trainer


def train_tiny(root: Path, run_name: str, *, node_name: str = "hidden", module_type: Any = None, step_type: Any = None, scalar_name: str = "train_loss") -> Path:
    """Train a 2-layer MLP for 6 steps with ComgraCallback (train and validation records, a ``record()``-ed
    node, a logged scalar); ``module_type`` renames the model's class, ``step_type`` decides step types."""
    import lightning.pytorch as pl
    import torch
    from torch import nn

    from comgra_callbacks import ComgraCallback, note, record

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.net[1](self.net[0](x))
            record(node_name, h)
            return self.net[2](h)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log(scalar_name, loss)
            if batch_idx == 1:
                note(f"a note about {node_name}")
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    if module_type is not None:
        Tiny.__name__ = Tiny.__qualname__ = module_type
    options: dict[str, Any] = dict(run_name=run_name, every_n_steps=1, flush_secs=0.1, val_batches=1)
    if step_type is not None:
        options["step_type"] = step_type
    callback = ComgraCallback(str(root), **options)
    trainer = quiet_trainer([callback], root, max_steps=6, val_check_interval=3, limit_val_batches=1)
    trainer.fit(Tiny(), classification_loader(n_batches=6), classification_loader(n_batches=1, seed=1))
    return root / run_name


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine run: train and validation records, a ``record()``-ed node, logged scalars."""
    return train_tiny(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture
def damaged(tiny_run: Path, tmp_path: Path) -> Callable[[], Path]:
    """``damaged()``: a fresh copy of the tiny run under ``tmp_path/runs`` to damage."""

    def copy() -> Path:
        target = tmp_path / "runs" / "tiny"
        shutil.copytree(tiny_run, target, symlinks=True)
        return target

    return copy


@pytest.fixture
def dashboard_for() -> Callable[..., Any]:
    """Build every view of one session on a root, without a browser or a server."""
    from comgra_callbacks.dashboard.app import Dashboard
    from comgra_callbacks.dashboard.data import Catalog
    from comgra_callbacks.dashboard.options import DashboardOptions

    def make(root: Path, **options: Any) -> Any:
        return Dashboard(Catalog(root), DashboardOptions(str(root), **options))

    return make
