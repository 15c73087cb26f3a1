"""``analysis.phases`` finds planted change points; ``analysis.fourier`` and ``analysis.derive`` work on the
full tensors of a run really recorded by a Lightning Trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from comgra_callbacks import ConfigError, open_run
from comgra_callbacks.analysis import derive, fourier, phases, spectrum
from comgra_callbacks.errors import StepNotFoundError, StoreError
from comgra_callbacks.measures import FourierSparsity, evaluate

P, HIDDEN, FREQ = 13, 6, 4


# ------------------------------------------------------------------------------------------- phases
def test_phases_finds_the_planted_change_points_of_a_piecewise_series() -> None:
    steps = np.arange(0, 1200, 10)
    level = np.r_[np.full(40, 0.3), np.full(30, 0.9), np.full(50, 0.6)]
    found = phases(pd.Series(level, index=steps), fit="constant")
    assert found["first_step"].tolist() == [0, 400, 700] and found["last_step"].tolist() == [390, 690, 1190]
    assert found["mean"].round(6).tolist() == [0.3, 0.9, 0.6] and found.index.name == "phase"
    assert found.attrs["change_points"] == [400, 700]
    ramp = pd.Series(np.r_[np.full(30, 0.3), np.linspace(0.3, 1.0, 32)[1:-1], np.full(60, 1.0)], index=steps)
    lines = phases(ramp)  # a plateau, a rise and a plateau: three lines
    assert lines["first_step"].tolist() == [0, 300, 600] and lines["slope"].iloc[1] > 0
    assert phases(ramp, n=3).equals(lines) and len(phases(ramp, n=2)) == 2


def test_phases_of_a_noisy_series_within_tolerance_and_deterministic() -> None:
    rng = np.random.default_rng(3)
    truth = np.r_[np.full(50, 1.0), np.full(40, 2.5), np.full(60, 1.5)]
    noisy = truth + rng.normal(0, 0.25, truth.size)
    found = phases(noisy, fit="constant")
    assert len(found) == 3
    assert abs(found["first_step"].iloc[1] - 50) <= 2 and abs(found["first_step"].iloc[2] - 90) <= 2
    assert found.equals(phases(noisy, fit="constant"))
    flat = phases(rng.normal(0, 1, 200))  # noise alone: one phase
    assert len(flat) == 1 and flat["points"].iloc[0] == 200


def test_phases_bins_a_long_series_and_checks_its_arguments() -> None:
    long = pd.Series(np.r_[np.zeros(3000), np.ones(2000)], index=np.arange(5000) * 2)
    found = phases(long, fit="constant")
    assert len(found) == 2 and abs(found["first_step"].iloc[1] - 6000) <= 10
    with pytest.raises(ConfigError, match=r"`phases\(fit=...\)`: expected 'linear' or 'constant', got 'cubic'"):
        phases(long, fit="cubic")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"`phases\(n=...\)`: expected a positive int or None, got 0"):
        phases(long, n=0)
    with pytest.raises(ConfigError, match=r"`phases\(n=5\)`: expected at least n \* min_size = 15 points, got 4"):
        phases([1.0, 2.0, 3.0, 4.0], n=5)
    with pytest.raises(TypeError, match=r"expected one series, got a DataFrame"):
        phases(pd.DataFrame({"a": [1.0]}))


# ------------------------------------------------------------------------------ a run with a wave
def planted_embedding() -> np.ndarray:
    tokens = np.arange(P)[:, None]
    phase = np.linspace(0, 2.5, HIDDEN)[None, :]
    return np.cos(2 * math.pi * FREQ * tokens / P + phase)  # (P, HIDDEN): one frequency in every column


@pytest.fixture(scope="module")
def wave_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A model whose embedding is a planted wave, trained 6 steps (lr 0: it stays a wave), parameters in full."""
    import lightning.pytorch as pl
    import torch
    from torch import nn

    from comgra_callbacks import ComgraCallback
    from tests.conftest import quiet_trainer

    class Embed(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(P, HIDDEN)
            self.head = nn.Linear(HIDDEN, P)
            with torch.no_grad():
                self.embed.weight.copy_(torch.tensor(planted_embedding()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(x))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.head.parameters(), lr=0.1)

    x = torch.arange(P).repeat(4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x + 1) % P), batch_size=P)
    root = tmp_path_factory.mktemp("wave")
    module = Embed()
    cb = ComgraCallback(str(root), run_name="wave", every_n_steps=2, detail={"*.weight": "full"}, measures={"fs": FourierSparsity("embed.weight")})
    quiet_trainer([cb], root, max_steps=6).fit(module, loader)
    return root / "wave"


def test_fourier_of_a_recorded_planted_frequency_matrix(wave_run: Path) -> None:
    run = open_run(wave_run)
    s = fourier(run, "embed.weight", 2)
    assert s.key[0] == FREQ and s.key_share == pytest.approx(1.0, abs=1e-6) and s.gini > 0.8
    assert s.power.shape == (HIDDEN, P // 2) and list(s.power.columns) == list(range(1, P // 2 + 1))
    assert (s.top1_frequency == FREQ).all() and s.top1_share.min() > 0.999
    # the same numbers as the measure taken on the live model during training (one definition of the math)
    assert s.summary() == pytest.approx({k[3:]: v for k, v in run.measures.loc[2].items() if k.startswith("fs.")}, rel=1e-5)
    product = fourier(run, lambda e, w: e @ w.T, 4, nodes=["embed.weight", "head.weight"])
    assert product.power.shape[0] == P  # (P tokens, P outputs): one row per output unit
    noise = spectrum(np.random.default_rng(0).normal(size=(P, HIDDEN)))
    assert noise.gini < s.gini and noise.top1_share.mean() < 0.7
    with pytest.raises(StepNotFoundError, match=r"`fourier`: node 'embed' has no full tensor at step 2 .*HINT: record it with ComgraCallback\(detail=\{'embed': 'full'\}\)"):
        fourier(run, "embed", 2)  # the embedding's output: recorded as statistics only
    with pytest.raises(ConfigError, match=r"`fourier\(nodes=...\)`: expected a list of node names"):
        fourier(run, lambda e: e, 2)


def test_derive_round_trip_stores_a_measure_that_survives_reopening(wave_run: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "wave"
    shutil.copytree(wave_run, copy)
    run = open_run(copy)
    before = run.measures.copy()
    derived = derive(run, "ew", lambda e, w: {"norm": float((e @ w.T).std()), "top": spectrum(e).summary()["top1_share"]}, nodes=["embed.weight", "head.weight"])
    assert derived.index.tolist() == [0, 2, 4] and list(derived.columns) == ["ew.norm", "ew.top"]
    again = open_run(copy).measures
    for step in (0, 2, 4):
        e, w = run.samples("embed.weight", step), run.samples("head.weight", step)
        assert again.loc[step, "ew.norm"] == pytest.approx(float((e.astype(np.float64) @ w.T.astype(np.float64)).std()), rel=1e-6)
    pd.testing.assert_frame_equal(again[before.columns], before)  # the training's measures are untouched
    assert open_run(copy).steps.equals(run.steps) and json.loads((copy / "meta.json").read_text())["status"] == "finished"
    with pytest.raises(ConfigError, match=r"`derive\(name='ew'\)`: the run has that measure already"):
        derive(run, "ew", lambda e: 1.0, nodes=["embed.weight"])
    derive(run, "ew", lambda e: {"norm": 7.0}, nodes=["embed.weight"], overwrite=True)
    assert (open_run(copy).measures["ew.norm"] == 7.0).all()
    with pytest.raises(StepNotFoundError, match=r"`derive\('x'\)`: node 'embed' has no full tensor at any record .*HINT: ComgraCallback\(detail=\{'embed': 'full'\}\)"):
        derive(run, "x", lambda e: 1.0, nodes=["embed"])


def test_derive_drops_torn_rows_and_refuses_a_live_run(wave_run: Path, tmp_path: Path) -> None:
    import shutil

    import zarr

    copy = tmp_path / "torn"
    shutil.copytree(wave_run, copy)
    run = open_run(copy)
    committed = run.manifest.scalars_len
    scalars = zarr.open_array(str(copy / "scalars"), mode="r+")
    scalars.resize((committed + 5, 3))
    scalars[committed:] = 99.0  # a crash after writing rows, before the manifest: nobody reads them
    derive(run, "one", lambda e: 1.0, nodes=["embed.weight"])
    reopened = open_run(copy)
    assert reopened.manifest.scalars_len == committed + 3 and (reopened.measures["one"] == 1.0).all()
    assert not (reopened.measures == 99.0).any().any()
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "status": "running"}))
    with pytest.raises(StoreError, match=r"is being written \(status 'running', last commit \d+ s ago\)"):
        derive(open_run(copy), "two", lambda e: 1.0, nodes=["embed.weight"])


def test_fourier_sparsity_measure_uses_the_shared_spectrum() -> None:
    import torch

    matrix = planted_embedding()
    values = evaluate({"f": FourierSparsity(lambda m: torch.tensor(matrix), axis=0)}, torch.nn.Linear(1, 1))
    assert {k[2:]: v for k, v in values.items()} == pytest.approx(spectrum(matrix).summary())
