"""Shared fixtures: tiny seeded models, data, and a quiet real Lightning Trainer."""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
torch.set_num_threads(1)


def quiet_trainer(callbacks: list[Any], tmp: Path, **kw: Any) -> Any:
    """A real Lightning Trainer without logger, checkpoints, progress bar or summary, on the CPU."""
    import lightning.pytorch as pl

    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp),
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    defaults.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pl.Trainer(callbacks=callbacks, **defaults)


def classification_loader(n_batches: int = 6, batch_size: int = 8, n_in: int = 6, n_classes: int = 3, seed: int = 0) -> Any:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch_size, n_in, generator=g)
    y = torch.randint(0, n_classes, (n_batches * batch_size,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def make_mlp_module(n_in: int = 6, hidden: int = 5, n_out: int = 3, seed: int = 0, lr: float = 0.05) -> Any:
    import lightning.pytorch as pl

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=lr)

    return MLP()


@pytest.fixture
def runs_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "runs"
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_leftover_recorders() -> Iterator[None]:
    """Every test must leave no active recorder and no pending connect() edges behind."""
    from comgra_callbacks.recording import context

    yield
    leftover = context.active_recorders()
    for recorder in leftover:
        recorder.close("failed", "left open by a test")
    context.clear_connections()
    assert not leftover, f"a test left {len(leftover)} recorder(s) active"
