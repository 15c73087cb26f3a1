"""Train a tiny model with ``LightningCLI`` and record it with :class:`~comgra_callbacks.ComgraCallback`.

    python -m comgra_callbacks.examples.lightning_cli fit --config configs/comgra.yaml --trainer.max_steps=20

The callback comes from the YAML file (``trainer.callbacks``), or from flags alone::

    python -m comgra_callbacks.examples.lightning_cli fit --trainer.max_steps=20 \\
        --trainer.callbacks+=comgra_callbacks.ComgraCallback \\
        --trainer.callbacks.init_args.root=comgra_runs --trainer.callbacks.init_args.every_n_steps=5

The task: classify 8-dimensional points by which of ``n_classes`` fixed random directions they are closest to.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import nn

from comgra_callbacks import record


class TinyClassifier(LightningModule):
    """A two-layer MLP: ``(B, n_in) -> (B, hidden) -> (B, n_classes)``.

    Args:
        n_in: input features. hidden: hidden units. n_classes: output classes. lr: SGD learning rate.
    """

    def __init__(self, n_in: int = 8, hidden: int = 16, n_classes: int = 4, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, n_classes)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        record("confidence", logits.softmax(-1).amax(-1))  # (B,): any tensor can be recorded by name
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class PointsDataModule(LightningDataModule):
    """Random points labelled by their nearest of ``n_classes`` fixed directions (seeded, made in memory).

    Args:
        n_samples: dataset size. batch_size: batch size. n_in / n_classes: must match the model. seed: data seed.
    """

    def __init__(self, n_samples: int = 512, batch_size: int = 32, n_in: int = 8, n_classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.n_samples, self.batch_size, self.n_in, self.n_classes, self.seed = n_samples, batch_size, n_in, n_classes, seed

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        directions = torch.randn(self.n_classes, self.n_in, generator=g)
        x = torch.randn(self.n_samples, self.n_in, generator=g)  # (N, n_in)
        y = (x @ directions.T).argmax(-1)  # (N,)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=self.batch_size, shuffle=True, generator=g)


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args=None``: the command line)."""
    return LightningCLI(TinyClassifier, PointsDataModule, args=args)


if __name__ == "__main__":
    main()
