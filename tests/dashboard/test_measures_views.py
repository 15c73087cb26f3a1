"""Measures in the dashboard, built without a browser: the Scalars tab (one axis per unit, log scale, phases
shaded), the Compare tab's phases and measure ranking, and the Fourier view on a product of recorded matrices."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import holoviews as hv
import numpy as np
import panel as pn
import pytest

from comgra_callbacks.dashboard.synthetic import write_run
from comgra_callbacks.dashboard.tabs import unit_of
from comgra_callbacks.store.format import MEASURE_PREFIX
from comgra_callbacks.store.storage import open_root
from comgra_callbacks.store.writer import append_scalars

EVERY = 10


@pytest.fixture(scope="module")
def measured_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic run of 60 records (steps 0, 10, ..., 590) with planted measures: test accuracy flat at
    0.3, a rise over records 20-39, flat at 1.0; a weight norm falling; a loss scalar."""
    root = tmp_path_factory.mktemp("measured")
    write_run(root, "grokm", records=60, layers=2, every=EVERY, ablation_every=0)
    steps = np.arange(60) * EVERY
    acc = np.r_[np.full(20, 0.3), np.linspace(0.4, 0.9, 20), np.full(20, 1.0)]
    rows = [(int(s), MEASURE_PREFIX + "test_acc", float(v)) for s, v in zip(steps, acc)]
    rows += [(int(s), MEASURE_PREFIX + "wnorm.total", float(5000 - 4 * s)) for s in steps]
    rows += [(int(s), MEASURE_PREFIX + "test_loss", float(4 * math.exp(-s / 200) + 0.01)) for s in steps]
    append_scalars(open_root(root).run("grokm"), rows)
    return root


def _elements(obj: Any, kind: type) -> list[Any]:
    return [el for el in obj if isinstance(el, kind)] if isinstance(obj, hv.Overlay) else ([obj] if isinstance(obj, kind) else [])


def test_unit_of_decides_by_name_then_range() -> None:
    assert unit_of("measure/test_acc", [0.5]) == unit_of("measure/fourier.gini", [0.2]) == "fraction"
    assert unit_of("train_loss", [0.3]) == unit_of("measure/excluded_loss", [0.001]) == "loss"
    assert unit_of("measure/restricted", [0.2, 0.9]) == "fraction"  # in [0, 1]: on the fractions' axis
    assert unit_of("measure/wnorm.total", [3000.0]) == unit_of("measure/wnorm.fc1.weight", [2.0]) == "wnorm"


def test_scalars_tab_puts_accuracy_and_loss_on_their_own_axes_and_shades_phases(measured_root: Path, dashboard_for: Any) -> None:
    dash = dashboard_for(measured_root)
    view = dash.scalars
    assert view.names.value == ["loss", "measure/test_acc", "measure/test_loss"]  # logged losses, accuracy and loss measures
    assert view.phases_of.value == "measure/test_acc"
    assert view.phases["first_step"].tolist() == [0, 200, 400]
    overlay = view.plot.object
    curves = {c.label: c for c in _elements(overlay, hv.Curve)}
    assert curves["loss"].vdims[0].name == "loss" and curves["measure/test_acc"].vdims[0].name == "fraction"
    assert len(_elements(overlay, hv.VSpan)) == 3 and "steps 200–390" in view.phase_text.object
    figure = hv.render(overlay)
    axes = {a.axis_label: type(a).__name__ for a in figure.left + figure.right}
    assert axes == {"loss": "LinearAxis", "fraction": "LinearAxis"}  # one axis per unit, no stray one
    view.logy.value = True
    axes = {a.axis_label: type(a).__name__ for a in hv.render(view.plot.object).left + hv.render(view.plot.object).right}
    assert axes == {"loss": "LogAxis", "fraction": "LinearAxis"}  # accuracies stay linear
    view.names.value = ["measure/wnorm.total", "measure/test_loss", "measure/test_acc"]
    units = sorted(c.vdims[0].name for c in _elements(view.plot.object, hv.Curve))
    assert units == ["fraction", "loss", "wnorm"]
    view.phases_of.value = "measure/wnorm.total"
    view.phase_count.value = 2  # a straight line, cut in two by hand
    assert len(view.phases) == 2 and len(_elements(view.plot.object, hv.VSpan)) == 2
    view.phases_of.value = "(none)"
    assert not _elements(view.plot.object, hv.VSpan) and view.phases is None


def test_compare_tab_takes_its_ranges_from_phases_and_ranks_measures(measured_root: Path, dashboard_for: Any) -> None:
    dash = dashboard_for(measured_root)
    dash.show_tab("Compare")
    picker = dash.compare.phase_picker
    picker.series_of.value = "measure/test_acc"
    assert dash.comparison.mode == "ranges"
    assert tuple(dash.comparison.range_a) == (0, 190) and tuple(dash.comparison.range_b) == (400, 590)
    ranking = picker.ranking
    assert ranking.loc["test_acc", "a"] == pytest.approx(0.3) and ranking.loc["test_acc", "b"] == pytest.approx(1.0)
    assert set(ranking.index) == {"test_acc", "wnorm.total", "test_loss"}
    assert ranking.loc["wnorm.total", "change"] == pytest.approx(-4 * (495 - 95))
    assert list(picker.table.value["measure"]) == list(ranking.index)
    assert isinstance(dash.compare.ranking, type(ranking))  # the node ranking ran for the same ranges
    picker.phase_count.value = 2
    assert len(picker.phases) == 2 and tuple(dash.comparison.range_b) == tuple(picker.phases.iloc[1][["first_step", "last_step"]])
    picker.phase_count.value = 3
    picker.phase_a.value = 1  # the middle phase against the last
    assert tuple(dash.comparison.range_a) == (200, 390)


def test_compare_tab_without_measures_says_so(runs_root: Any, dashboard_for: Any) -> None:
    root, _ = runs_root
    dash = dashboard_for(root)
    dash.selection.run = "grok"
    dash.show_tab("Compare")
    assert dash.compare.phase_picker.ranking.empty and "has no measures" in dash.compare.phase_picker.caption.object


# ------------------------------------------------------------------------------ the Fourier view
P, HIDDEN, WIDE, FREQ = 13, 6, 10, 3


@pytest.fixture(scope="module")
def product_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Lightning run whose E · W1ᵀ is a planted wave (W1 = one column of ones), parameters in full."""
    import lightning.pytorch as pl
    import torch
    from torch import nn

    from comgra_callbacks import ComgraCallback
    from tests.conftest import quiet_trainer

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(P, HIDDEN)
            self.fc1 = nn.Linear(HIDDEN, WIDE)
            tokens = torch.arange(P, dtype=torch.float64)[:, None]
            with torch.no_grad():
                self.embed.weight.copy_(torch.cos(2 * math.pi * FREQ * tokens / P) * torch.linspace(1, 2, HIDDEN)[None, :])
                self.fc1.weight.copy_(torch.rand(WIDE, HIDDEN, generator=torch.Generator().manual_seed(0)))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            (x,) = batch
            return self.fc1(self.embed(x)).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    root = tmp_path_factory.mktemp("product")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(P).repeat(2)), batch_size=P)
    cb = ComgraCallback(str(root), run_name="prod", every_n_steps=1, detail={"*.weight": "full"})
    quiet_trainer([cb], root, max_steps=2).fit(Net(), loader)
    return root


def _texts(obj: Any) -> str:
    return "\n".join(str(o.object) for o in obj.select(lambda o: isinstance(o, pn.pane.Markdown | pn.pane.Alert)))


def test_fourier_view_offers_the_product_of_recorded_matrices(product_root: Path, dashboard_for: Any) -> None:
    dash = dashboard_for(product_root, custom="fourier")
    dash.selection.param.update(node="embed.weight", step=1)
    dash.show_tab("Fourier")
    assert dash.custom.error is None
    select = dash.custom.body.select(pn.widgets.Select)[0]
    assert "embed.weight · fc1.weightᵀ" in select.options and "fc1.weight · embed.weightᵀ" in select.options
    assert "raw values, shape (13, 6)" in _texts(dash.custom.body)
    select.value = "embed.weight · fc1.weightᵀ"
    text = _texts(dash.custom.body)
    assert "embed.weight · fc1.weightᵀ, from the full tensors of embed.weight, fc1.weight" in text
    assert f"Strongest frequencies: {FREQ} (100 %)" in text and "mean 1.00" in text
    dash.selection.step = 0  # the choice stays while the step moves
    assert "embed.weight · fc1.weightᵀ" in _texts(dash.custom.body) and dash.custom.error is None


def test_the_history_plot_overlays_a_measure_on_its_own_axis(measured_root: Path, dashboard_for: Any) -> None:
    dash = dashboard_for(measured_root)
    tensor = dash.tensor
    node = next(n for n in dash.selection.data.run.nodes if dash.selection.data.has_data(n))
    dash.selection.node = node
    assert list(tensor.measure.options) == ["none", "test_acc", "test_loss", "wnorm.total"]
    assert tensor.measure_src.data["x"] == [] and not tensor.measure_axis.visible
    tensor.measure.value = "test_acc"
    np.testing.assert_array_equal(tensor.measure_src.data["x"], np.arange(60) * EVERY)
    assert tensor.measure_src.data["y"][0] == pytest.approx(0.3) and tensor.measure_src.data["y"][-1] == pytest.approx(1.0)
    assert tensor.measure_axis.visible and tensor.measure_axis.axis_label == "measure test_acc"
    assert len(tensor.history.src.data["x"]) == 60  # the node's own history stays
    renderer = next(r for r in tensor.history.figure.renderers if r.data_source is tensor.measure_src)
    assert renderer.y_range_name == "measure"  # its own range: accuracy is not squeezed onto the node's scale
    tensor.measure.value = "none"
    assert len(tensor.measure_src.data["x"]) == 0 and not tensor.measure_axis.visible
