"""The small GPT-like language model shared by ``transformer_bench.py`` and ``compile_bench.py``: pre-norm
``nn.TransformerEncoderLayer``s (d_model 128, 4 heads, ff 512, no dropout), sequence 64, batch 16,
vocabulary 512, AdamW (lr 1e-3), next-token cross-entropy on fixed random tokens (seeded)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

VOCAB, SEQ, BATCH, D_MODEL, HEADS, FF = 512, 64, 16, 128, 4, 512


class LM(pl.LightningModule):
    """``layers`` encoder layers between an embedding and a vocabulary head; ``compile`` compiles the network
    once with the default backend (inductor)."""

    def __init__(self, layers: int = 4, *, compile: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, dropout=0.0, batch_first=True, norm_first=True)
        self.net = nn.Sequential(nn.Embedding(VOCAB, D_MODEL), nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), nn.Linear(D_MODEL, VOCAB))
        if compile:
            self.net = torch.compile(self.net)  # type: ignore[assignment]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x).reshape(-1, VOCAB), y.reshape(-1))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def data(steps: int, seed: int = 1) -> Any:
    """``steps`` batches of random tokens; the target is the input shifted by one position."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (steps * BATCH, SEQ), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.roll(x, -1, dims=1)), batch_size=BATCH)
