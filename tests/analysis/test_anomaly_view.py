"""The Anomalies tab on a real run with a planted ×1000 sample: built without a browser, then in one."""

from __future__ import annotations

import pytest

from comgra_callbacks.dashboard.anomaly_view import CALM, NO_DATA
from tests.analysis._planted import Plant, train

PLANT = Plant("block.lin", step=3, sample=2, how="scale")


@pytest.fixture(scope="module")
def planted_root(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("anomaly_view")
    train(root, "scaled", plant=PLANT, steps=6)
    return root


@pytest.fixture
def dashboard(planted_root):
    from comgra_callbacks.dashboard.app import Dashboard
    from comgra_callbacks.dashboard.data import Catalog
    from comgra_callbacks.dashboard.options import DashboardOptions

    return Dashboard(Catalog(planted_root), DashboardOptions(str(planted_root)))


def test_the_tab_colours_the_planted_node_and_marks_the_origin(dashboard):
    dash = dashboard
    view = dash.anomalies
    dash.selection.step = PLANT.step
    assert view.frame is None, "nothing is computed while the tab is hidden"
    dash.show_tab("Anomalies")
    assert view.frame is not None and list(view.frame.loc[view.frame["origin"], "node"]) == [PLANT.node]
    assert view.color_of(PLANT.node) not in (CALM, NO_DATA)
    assert view.color_of("embed") == CALM and view.color_of("mid.weight") == CALM
    assert len(view.origins.data["left"]) == 1
    assert "origin: **block.lin**" in view.summary.object
    dash.selection.step = PLANT.step - 1
    assert view.color_of(PLANT.node) == CALM and not view.origins.data["left"]
    view.sample.value = str((PLANT.sample + 1) % 4)
    dash.selection.step = PLANT.step
    assert view.color_of(PLANT.node) == CALM, "another sample is not an outlier"
    view.sample.value = str(PLANT.sample)
    assert view.color_of(PLANT.node) not in (CALM, NO_DATA)


def test_the_correlate_table_and_a_click_on_it(dashboard):
    dash = dashboard
    dash.show_tab("Anomalies")
    view = dash.anomalies
    assert view.target.value == "loss"
    table = view.table.value
    assert list(table.columns) == ["node", "view", "statistic", "rho", "p_value", "n"] and len(table)
    node = table.iloc[2]["node"]
    view._correlation_clicked(type("Click", (), {"row": 2})())
    assert dash.selection.node == node


def test_kept_records_list_says_when_there_are_none(dashboard):
    dashboard.show_tab("Anomalies")
    assert list(dashboard.anomalies.kept.value.columns) == ["message"]


def test_the_sample_selector_shows_the_batch_position(dashboard):
    sel = dashboard.selection
    sel.param.update(node="block.lin", step=PLANT.step)
    sel.detail = "sample"
    assert list(dashboard.selectors.sample.options)[:2] == ["0 · batch 0", "1 · batch 1"]


def test_the_compare_tab_ranks_by_spread_too(dashboard):
    dash = dashboard
    dash.selection.param.update(statistic="abs_mean")
    dash.show_tab("Compare")
    dash.comparison.mode = "ranges"
    dash.comparison.rank_by = "spread"
    ranking = dash.compare.ranking
    assert "score" in ranking.columns and ranking["score"].abs().dropna().is_monotonic_decreasing
    dash.comparison.rank_by = "absolute"
    assert dash.compare.ranking["change"].abs().dropna().is_monotonic_decreasing
