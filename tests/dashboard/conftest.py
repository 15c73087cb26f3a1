"""Fixture stores for the dashboard tests: synthetic runs (fast; edge cases) and one tiny real training run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from comgra_callbacks.dashboard.synthetic import SyntheticSpec, write_bad_version, write_run
from comgra_callbacks.store.storage import open_root
from comgra_callbacks.store.writer import RunWriter


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, SyntheticSpec]]:
    """A root with a finished run ("grok", a phase change at 60 %), a failed run and an empty run."""
    root = tmp_path_factory.mktemp("runs")
    specs = {"crashed": write_run(root, "crashed", records=30, layers=4, status="failed", seed=1)}
    time.sleep(0.01)
    specs["grok"] = write_run(root, "grok", records=120, layers=4)  # the newest run with records: opened first
    RunWriter(open_root(root).run("empty"))  # opened, never written to: status "running", no records
    return root, specs


@pytest.fixture(scope="session")
def bad_version_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("future")
    write_bad_version(root, "from_the_future", "9.0")
    return root


@pytest.fixture(scope="session")
def big_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose graph has 100+ nodes (starts grouped by module prefix)."""
    root = tmp_path_factory.mktemp("big")
    write_run(root, "deep", records=12, layers=40, ablation_every=0)
    return root


@pytest.fixture(scope="session")
def real_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model really trained with ComgraCallback, with a record()-ed node in two roles."""
    import lightning.pytorch as pl
    import torch
    from torch import nn

    from comgra_callbacks import ComgraCallback, record

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            out = self.net(x)
            for k in range(2):
                record("per_class", out[:, k], role=f"class{k}")
            loss = nn.functional.cross_entropy(out, y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    root = tmp_path_factory.mktemp("real")
    callback = ComgraCallback(str(root), run_name="tiny", every_n_steps=2, flush_secs=0.2)
    trainer = pl.Trainer(
        max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", callbacks=[callback], log_every_n_steps=2,
    )
    trainer.fit(Tiny(), loader)
    return root


@pytest.fixture
def dashboard_for():
    """Build every view of one session on a root, without a browser or a server."""
    from comgra_callbacks.dashboard.app import Dashboard
    from comgra_callbacks.dashboard.data import Catalog
    from comgra_callbacks.dashboard.options import DashboardOptions

    def make(root: Path, **options: object) -> Dashboard:
        return Dashboard(Catalog(root), DashboardOptions(str(root), **options))  # type: ignore[arg-type]

    return make


@pytest.fixture
def host_record():
    """``host_record(step, value)``: a record of one node ``h`` whose value is ``value`` (for live runs)."""
    import numpy as np

    from comgra_callbacks.store.format import SeriesKey
    from comgra_callbacks.store.writer import HostEntry, HostRecord

    def make(step: int, value: float) -> HostRecord:
        stats = np.full(11, np.nan, dtype=np.float32)
        stats[:10] = [value, 0, abs(value), value, value, abs(value), 0, 0, 0, 1]
        return HostRecord(step, "train", 0, step, time.time(), "every", [HostEntry(SeriesKey("h", None, 0, "value"), stats)])

    return make
