"""Every view built on fixture stores without a browser: what each shows for a selection."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd
import pytest

from comgra_callbacks import open_run
from comgra_callbacks.dashboard import layout as lay
from comgra_callbacks.dashboard.selectors import handle_key


def _elements(obj, kind):
    """Elements of type ``kind`` inside a pane's object (overlays and DynamicMaps opened)."""
    if isinstance(obj, hv.DynamicMap):
        obj = obj[()] if not obj.streams else obj.clone()[()]
    if isinstance(obj, hv.Overlay):
        return [el for el in obj if isinstance(el, kind)]
    return [obj] if isinstance(obj, kind) else []


def test_tensor_panel_shows_the_selected_nodes_values(runs_root, dashboard_for):
    root, _ = runs_root
    dash = dashboard_for(root)
    sel, run = dash.selection, open_run(root / "grok")
    sel.run = "grok"
    sel.step = 40
    sel.node = "layers.2"
    table = dash.tensor.table.object
    assert list(table.columns) == ["▸ value", "grad"]
    expected = run.stats("layers.2", step_type="train").loc[40]
    np.testing.assert_allclose(table.loc[expected.index, "▸ value"].to_numpy(), expected.to_numpy(), rtol=1e-6)
    assert "### layers.2" in dash.tensor.header.object and "step **40**" in dash.tensor.header.object
    history = dash.tensor.history
    assert history.src.data["y"].tolist() == pytest.approx(run.stats("layers.2", step_type="train")["abs_mean"].tolist())
    assert history.marker.location == 40 and history.marker.visible
    sel.view = "grad"
    assert list(dash.tensor.table.object.columns) == ["value", "▸ grad"]


def test_parameters_show_value_gradient_update_and_ratio(runs_root, dashboard_for):
    root, _ = runs_root
    dash = dashboard_for(root)
    dash.selection.param.update(run="grok", node="layers.1.weight", step=20)
    table = dash.tensor.table.object
    assert list(table.columns) == ["▸ value", "grad", "update"]
    assert np.isnan(table.loc["update_ratio", "grad"]) and table.loc["update_ratio", "update"] > 0
    assert dash.tensor.ratio.box.visible and dash.tensor.values_figure is dash.tensor.band
    reference = open_run(root / "grok").stats("layers.1.weight", view="update", step_type="train")["update_ratio"]
    assert dash.tensor.ratio.src.data["y"].tolist() == pytest.approx(reference.tolist())
    dash.selection.node = "layers.1"
    assert not dash.tensor.ratio.box.visible


def test_per_neuron_and_sample_details(runs_root, dashboard_for):
    root, _ = runs_root
    dash = dashboard_for(root)
    sel, run = dash.selection, open_run(root / "grok")
    sel.param.update(run="grok", node="attn", step=30)
    sel.role = "pos1"
    sel.detail = "neurons"
    neurons = run.neurons("attn", 30, role="pos1", step_type="train")
    assert dash.tensor.values_figure is dash.tensor.bars
    assert dash.tensor.bars.src.data["top"].tolist() == pytest.approx(neurons["abs_mean"].tolist())
    assert dash.tensor.histogram.src.data["top"].sum() == len(neurons) == 16
    sel.detail = "sample"
    samples = run.samples("attn", 30, role="pos1", step_type="train")
    assert sel.n_samples == len(samples) and list(dash.selectors.sample.options.values()) == list(range(len(samples)))
    assert list(dash.selectors.sample.options)[3] == "3 · batch 3"  # the first samples: batch positions 0, 1, ...
    dash.selectors.sample.value = 3
    assert dash.tensor.values_figure is dash.tensor.sample_map
    np.testing.assert_allclose(dash.tensor.data.matrix, samples[3][None, :])
    np.testing.assert_allclose(dash.tensor.sample_map.src.data["image"][0], samples[3][None, :])
    assert dash.tensor.histogram.src.data["top"].sum() == samples.shape[1]
    assert "sample 3 of 8" in dash.tensor.note.object


def test_a_missing_detail_is_explained(runs_root, dashboard_for):
    root, _ = runs_root
    dash = dashboard_for(root)
    dash.selection.param.update(run="grok", node="layers.1", detail="sample")
    shown = dash.tensor.values_figure
    assert shown is dash.tensor.sample_map and "has no samples at step" in shown.message_text.replace("\n", " ")
    assert len(shown.src.data["image"]) == 0


def test_a_whole_parameter_is_a_matrix(runs_root, dashboard_for):
    root, _ = runs_root
    dash = dashboard_for(root)
    dash.selection.param.update(run="grok", node="layers.0.weight", detail="sample", step=10)
    assert dash.tensor.data.matrix.shape == (16, 16)
    assert "the whole tensor" in dash.tensor.note.object


def test_clicking_a_graph_node_selects_it(runs_root, dashboard_for):
    root, spec = runs_root
    dash = dashboard_for(root)
    dash.selection.run = "grok"
    graph = dash.graph
    assert set(graph.layout.boxes) == set(spec["grok"].nodes)
    box = graph.layout.boxes["layers.1"]
    graph._on_tap(box.x + 0.2, box.y - 0.1)
    assert dash.selection.node == "layers.1"
    assert "### layers.1" in dash.tensor.header.object
    assert graph.selected_box == "layers.1"
    arrows = len(graph.layout.inputs("layers.1")) + len(graph.layout.outputs("layers.1"))
    assert len(graph.edges.data["x0"]) == len(graph.heads.data["x"]) == arrows == 4
    assert sorted(graph.edges.data["color"]).count("#2b8a3e") == 3, "three inputs, one output"
    graph._on_tap(-50, -50)  # far from every box: nothing happens
    assert dash.selection.node == "layers.1"


def test_the_graph_follows_the_step_type(runs_root, dashboard_for):
    root, _ = runs_root
    dash = dashboard_for(root)
    dash.selection.run = "grok"
    assert ("attn", "block") in dash.graph.layout.edges
    dash.selection.step_type = "ablation"
    assert ("attn", "block") not in dash.graph.layout.edges and ("layers.0", "block") in dash.graph.layout.edges


def test_layers_run_from_inputs_to_losses(runs_root, dashboard_for):
    root, _ = runs_root
    layout = dashboard_for(root).graph.layout
    layer = {name: box.layer for name, box in layout.boxes.items()}
    assert layer["x"] == 0 and layer["loss"] == layer["aux_loss"] == layout.n_layers - 1
    assert all(layer[src] < layer[dst] for src, dst in layout.edges)
    assert layer["layers.2.weight"] == layer["layers.2"] - 1, "parameters sit just before their consumer"


def test_a_big_graph_is_grouped_and_opens_on_click(big_root, dashboard_for):
    dash = dashboard_for(big_root)
    graph, sel = dash.graph, dash.selection
    n_nodes = len(sel.param.node.objects)
    assert n_nodes > 100
    assert len(graph.layout.boxes) <= 40 and any(b.is_group for b in graph.layout.boxes.values())
    group = next(b for b in graph.layout.boxes.values() if b.is_group)
    before = sel.node
    graph.select_box(group.name)
    assert group.name in graph.expanded and group.name not in graph.layout.boxes
    assert sel.node == before, "opening a group does not change the selection"
    hidden = next(n for n, owner in graph.layout.owner.items() if owner != n)
    sel.node = hidden  # chosen from the node list: its group opens
    assert graph.layout.owner[hidden] == hidden and hidden in graph.layout.boxes
    graph.grouping = "none"
    assert len(graph.layout.boxes) == n_nodes


def test_arrow_keys_move_through_the_graph_and_the_steps(runs_root, dashboard_for):
    root, _ = runs_root
    dash = dashboard_for(root)
    sel = dash.selection
    sel.param.update(run="grok", node="layers.1", step=20)
    handle_key(sel, dash.graph.move, "ArrowRight|0|1")
    assert sel.node == "layers.2"
    handle_key(sel, dash.graph.move, "ArrowLeft|0|2")
    assert sel.node == "layers.1"
    handle_key(sel, dash.graph.move, "ArrowRight|1|3")
    assert sel.step == 21
    handle_key(sel, dash.graph.move, "PageUp||4")
    assert sel.step == 20
    before = sel.node
    handle_key(sel, dash.graph.move, "ArrowDown|0|5")
    same_layer = {b.name for b in dash.graph.layout.boxes.values() if b.layer == dash.graph.layout.boxes[before].layer}
    assert sel.node in same_layer


def test_comparison_ranks_the_nodes_that_changed(runs_root, dashboard_for):
    root, spec = runs_root
    dash = dashboard_for(root)
    dash.selection.param.update(run="grok", node="layers.1", statistic="abs_mean")
    assert dash.compare.ranking is None, "nothing is computed while the tab is hidden"
    dash.show_tab("Compare")
    ranking = dash.compare.ranking
    assert set(ranking.index[:2]) == spec["grok"].changed
    assert ranking.loc["layers.1", "relative"] > 2.0 and abs(ranking.loc["x", "relative"]) < 0.3
    node_table = dash.compare.node_table
    assert node_table.loc["abs_mean", "B"] == pytest.approx(ranking.loc["layers.1", "b"])
    row = list(dash.compare.table.value["node"]).index("attn")
    dash.compare._clicked(type("Click", (), {"row": row})())
    assert dash.selection.node == "attn" and dash.graph.selected_box == "attn"


@pytest.mark.parametrize("mode", ["steps", "step types", "runs"])
def test_comparison_modes(runs_root, dashboard_for, mode):
    root, _ = runs_root
    dash = dashboard_for(root)
    dash.selection.run = "grok"
    dash.show_tab("Compare")
    dash.comparison.mode = mode
    ranking = dash.compare.ranking
    assert isinstance(ranking, pd.DataFrame) and len(ranking) == 19
    if mode == "steps":
        assert set(ranking["records_a"]) == {1}
    if mode == "runs":
        assert "crashed" in dash.compare.summary.object


def test_comparison_with_an_empty_side_says_so(runs_root, dashboard_for):
    root, _ = runs_root
    dash = dashboard_for(root)
    dash.selection.run = "grok"
    dash.show_tab("Compare")
    dash.comparison.param.update(mode="runs", run_b="empty")
    assert "no records" in dash.compare.summary.object
    assert list(dash.compare.table.value.columns) == ["message"]


def test_network_tab_lists_modules_with_parameter_counts(real_root, dashboard_for):
    dash = dashboard_for(real_root)
    table = dash.network.table.value
    assert list(table["name"][:4]) == ["", "net", "net.0", "net.1"]
    assert table.loc[table["name"] == "net.0", "params_total"].item() == 4 * 8 + 8
    assert table.loc[0, "params_total"] == 4 * 8 + 8 + 8 * 3 + 3
    dash.network.depth.value = 1
    assert list(dash.network.table.value["name"]) == ["", "net"]


def test_scalars_and_notes(runs_root, dashboard_for):
    root, spec = runs_root
    dash = dashboard_for(root)
    dash.selection.run = "grok"
    assert dash.scalars.names.value == ["loss"] and list(dash.scalars.names.options.values()) == ["acc", "loss"]  # labels escaped, values the names
    curves = _elements(dash.scalars.plot.object, hv.Curve)
    assert len(curves) == 1 and curves[0].dimension_values(1)[0] == pytest.approx(2.0) and curves[0].vdims[0].name == "loss"
    notes = dash.notes.table.value
    assert list(notes["text"]) == ["training started", "phase change: odd layers scale up"]
    dash.notes._clicked(type("Click", (), {"row": 1})())
    assert dash.selection.step == spec["grok"].phase_step
    dash.selection.run = "empty"
    assert isinstance(dash.scalars.plot.object, hv.Text)


def test_the_real_run(real_root, dashboard_for):
    dash = dashboard_for(real_root)
    sel = dash.selection
    run = open_run(real_root / "tiny")
    assert sel.steps == [0, 2, 4, 6, 8, 10]
    sel.node = "per_class"
    assert sel.param.role.objects == ["class0", "class1"]
    sel.role = "class1"
    sel.step = 6
    table = dash.tensor.table.object
    expected = run.stats("per_class", role="class1").loc[6]
    np.testing.assert_allclose(table.loc[expected.index, "▸ value"].to_numpy(), expected.to_numpy(), rtol=1e-6)
    sel.node = "net.0.weight"
    assert "update" in sel.param.view.objects
    kinds = {box.kind for box in dash.graph.layout.boxes.values()}
    assert {"input", "target", "parameter", "loss"} <= kinds


def test_layout_helpers():
    assert lay.short_label("a" * 30).startswith("…") and len(lay.short_label("a.b.c.d.e.f.g.h.i.j.k.l")) <= 22


def test_selector_widgets_follow_every_node(runs_root, dashboard_for):
    """Each node's views, roles and iterations are offered by the widgets, and only the selectors that apply show."""
    root, _ = runs_root
    dash = dashboard_for(root)
    sel, bar = dash.selection, dash.selectors
    for node in sel.param.node.objects:
        sel.node = node
        assert list(bar.view.options) == sel.param.view.objects == open_run(root / "grok").views(node)
        assert bar.role.visible == (len(sel.param.role.objects) > 1) == (node == "attn")
        assert bar.iteration.visible == (node == "block")
        assert not bar.sample.visible
    sel.detail = "sample"
    assert bar.sample.visible


def test_a_node_without_data_is_explained(tmp_path, dashboard_for, host_record):
    from comgra_callbacks.store.storage import open_root
    from comgra_callbacks.store.writer import RunWriter

    writer = RunWriter(open_root(tmp_path).run("r"))
    nodes = {"h": {"kind": "intermediate", "roles": [None], "iterations": 1}, "ghost": {"kind": "output", "roles": [None], "iterations": 1}}
    writer.write_graph({"nodes": nodes, "graphs": {"train": {"nodes": ["h", "ghost"], "edges": [["h", "ghost", "autograd"]]}}})
    writer.append([host_record(0, 1.0)])
    writer.close("finished")
    dash = dashboard_for(tmp_path)
    assert dash.selection.node == "h", "the first node with data opens, not the output without any"
    dash.graph.select_box("ghost")
    assert dash.selection.node == "ghost" and "has no recorded data" in dash.tensor.table_note.object
    assert "has no recorded data" in dash.tensor.history.message_text.replace("\n", " ")
