"""The dashboard on a real run with an intervention and a tracked circuit: the graph coloured by the circuit,
the Compare tab pairing the intervention with the normal record of the same step, the history overlay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def circuit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MLP trained 12 steps, recorded every 2nd step, ablated on every 4th, its hidden layer tracked."""
    import torch

    from comgra_callbacks import Ablate, CircuitTracking, ComgraCallback, Every
    from tests.conftest import classification_loader, make_mlp_module, quiet_trainer

    root = tmp_path_factory.mktemp("circuit")
    g = torch.Generator().manual_seed(5)
    tracking = CircuitTracking(torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g), ["net.0", "net.1"])
    cb = ComgraCallback(
        str(root), run_name="mlp", every_n_steps=2, flush_secs=0.2, circuit_tracking=tracking,
        interventions={"ablate": Ablate("net.0", units=[0, 1])}, intervention_schedule=Every(4),
    )
    module = make_mlp_module()
    module.forward = lambda x: module.net(x)  # the circuit's pair goes through the network
    quiet_trainer([cb], root, max_steps=12).fit(module, classification_loader(n_batches=12))
    return root


def test_the_graph_is_coloured_by_the_circuit_at_the_selected_step(circuit_root, dashboard_for):
    from comgra_callbacks import open_run
    from comgra_callbacks.analysis import tracked_circuit
    from comgra_callbacks.dashboard.graph_view import NO_CIRCUIT

    dash = dashboard_for(circuit_root)
    assert dash.selection.step_type == "train"  # the normal records open first, though step 0's intervention was written first
    graph = dash.graph
    assert graph.param.circuit.objects == [NO_CIRCUIT, "circuit"] and graph.circuit == NO_CIRCUIT
    assert graph.circuit_boxes.data["name"] == []  # nothing painted until asked
    graph.circuit = "circuit"
    painted = dict(zip(graph.circuit_boxes.data["name"], graph.circuit_boxes.data["effect"]))
    assert set(painted) == {"net.0", "net.1"}
    scores = open_run(circuit_root / "mlp").circuit_scores()
    dash.selection.step = 6
    expected = tracked_circuit(scores, 6)
    assert expected.attrs["step"] == 6
    painted = dict(zip(graph.circuit_boxes.data["name"], graph.circuit_boxes.data["effect"]))
    for node in ("net.0", "net.1"):
        assert painted[node] == pytest.approx(expected[expected["node"] == node]["effect"].max())
    # the hover text and the selected node's line list its best units, best first
    best = expected[expected["node"] == "net.1"].iloc[0]
    units = dict(zip(graph.circuit_boxes.data["name"], graph.circuit_boxes.data["units"]))
    assert units["net.1"].startswith(f"{int(best['unit'])} (")
    dash.selection.node = "net.1"
    step = dash.selection.step
    assert "Best units of **net.1**" in graph.circuit_info.object and f"evaluated step **{tracked_circuit(scores, step).attrs['step']}**" in graph.circuit_info.object
    # another step, other scores; none: the paint goes
    dash.selection.step = 0
    assert "evaluated step **0**" in graph.circuit_info.object
    graph.circuit = NO_CIRCUIT
    assert graph.circuit_boxes.data["name"] == [] and graph.circuit_info.object == ""


def test_step_type_mode_pairs_the_intervention_with_the_normal_record_of_its_step(circuit_root, dashboard_for):
    from comgra_callbacks import open_run

    run = open_run(circuit_root / "mlp")
    dash = dashboard_for(circuit_root)
    dash.show_tab("Compare")
    dash.comparison.param.update(mode="step types", type_a="train", type_b="ablate")
    ranking = dash.compare.ranking
    assert isinstance(ranking, pd.DataFrame)
    assert "the 3 steps where both step types have a record" in dash.compare.summary.object
    # "train" is recorded at 0, 2, ..., 10; "ablate" at 0, 4, 8: side A averages only 0, 4, 8
    expected_a = run.stats("net.0", step_type="train").loc[[0, 4, 8], "abs_mean"].mean()
    expected_b = run.stats("net.0", step_type="ablate").loc[[0, 4, 8], "abs_mean"].mean()
    assert ranking.loc["net.0", "a"] == pytest.approx(expected_a, rel=1e-5)
    assert ranking.loc["net.0", "b"] == pytest.approx(expected_b, rel=1e-5)
    assert set(ranking["records_a"]) == {3} and set(ranking["records_b"]) == {3}
    all_train = run.stats("net.0", step_type="train")["abs_mean"].mean()
    assert ranking.loc["net.0", "a"] != pytest.approx(all_train, rel=1e-5)
    # gradients too: the intervention's effect on every node's gradient
    dash.selection.view = "grad"
    grads = dash.compare.ranking
    assert grads.loc["net.2.weight", "b"] == pytest.approx(run.stats("net.2.weight", view="grad", step_type="ablate").loc[[0, 4, 8], "abs_mean"].mean(), rel=1e-5)
    assert grads.loc["net.2.weight", "change"] != 0


def test_the_history_plot_overlays_another_step_type(circuit_root, dashboard_for):
    from comgra_callbacks import open_run

    dash = dashboard_for(circuit_root)
    dash.selection.param.update(step_type="train", node="net.0")
    tensor = dash.tensor
    assert list(tensor.overlay.options) == ["none", "ablate"]
    assert tensor.overlay_src.data["x"] == []
    tensor.overlay.value = "ablate"
    expected = open_run(circuit_root / "mlp").stats("net.0", step_type="ablate")[dash.selection.statistic]
    np.testing.assert_array_equal(tensor.overlay_src.data["x"], expected.index.to_numpy())
    np.testing.assert_allclose(tensor.overlay_src.data["y"], expected.to_numpy())
    assert "red: ablate" in tensor.history.figure.title.text
    assert len(tensor.history.src.data["x"]) == 6  # the normal records stay
    dash.selection.statistic = "mean"  # follows the statistic
    np.testing.assert_allclose(tensor.overlay_src.data["y"], open_run(circuit_root / "mlp").stats("net.0", step_type="ablate")["mean"].to_numpy())
    tensor.overlay.value = "none"
    assert len(tensor.overlay_src.data["x"]) == 0
