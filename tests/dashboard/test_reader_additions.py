"""The reads added to the reader for the dashboard, checked against the per-node reads they replace."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from comgra_callbacks import StepNotFoundError, open_run
from comgra_callbacks.dashboard.synthetic import write_run
from comgra_callbacks.store.writer import StoreLayout


def test_entry_stats_matches_each_views_history(runs_root):
    root, _ = runs_root
    run = open_run(root / "grok")
    step = int(run.steps["step"].iloc[7])
    for node in ("layers.0.weight", "attn", "block", "loss"):
        table = run.entry_stats(node, step, step_type="train")
        assert list(table.index) == run.views(node)
        for view in run.views(node):
            expected = run.stats(node, view=view, step_type="train").loc[step]
            np.testing.assert_allclose(table.loc[view, expected.index].to_numpy(), expected.to_numpy(), rtol=1e-6)


def test_entry_stats_of_a_role_and_an_iteration(runs_root):
    root, _ = runs_root
    run = open_run(root / "grok")
    step = int(run.steps["step"].iloc[3])
    by_role = run.entry_stats("attn", step, role="pos2", step_type="train")
    expected = run.stats("attn", view="grad", role="pos2", step_type="train").loc[step]
    np.testing.assert_allclose(by_role.loc["grad", expected.index].to_numpy(), expected.to_numpy(), rtol=1e-6)
    first = run.entry_stats("block", step, iteration=0, step_type="train")
    assert first.loc["value", "mean"] == pytest.approx(run.stats("block", iteration=0, step_type="train").loc[step, "mean"])
    assert first.loc["value", "mean"] != pytest.approx(run.entry_stats("block", step, step_type="train").loc["value", "mean"])


@pytest.mark.parametrize("view", ["value", "grad", "update"])
def test_range_stats_is_the_mean_of_each_nodes_history(tmp_path, view):
    # Small chunks: the range spans several blocks of rows and starts and ends inside one.
    write_run(tmp_path, "r", records=90, layers=3, layout=StoreLayout(stats_rows=16, stats_series=8))
    run = open_run(tmp_path / "r")
    frame = run.range_stats(13, 71, view=view, step_type="train")
    nodes = [n for n in run.nodes if view in run.views(n)]
    assert list(frame.index) == nodes
    for node in nodes:
        history = run.stats(node, view=view, step_type="train").loc[13:71]
        np.testing.assert_allclose(frame.loc[node, history.columns].to_numpy(), history.mean().to_numpy(), rtol=1e-5)
        assert frame.loc[node, "records"] == len(history)


def test_range_stats_of_one_step_equals_step_stats(runs_root):
    root, _ = runs_root
    run = open_run(root / "grok")
    step = int(run.steps["step"].iloc[-1])  # an "ablation" step: step_type=None would mean "train" (issue 8)
    one = run.range_stats(step, step, view="grad", step_type="ablation")
    reference = run.step_stats(step, view="grad", step_type="ablation")
    pd.testing.assert_frame_equal(one[reference.columns[:-1]], reference[reference.columns[:-1]], check_names=False)


def test_range_stats_without_records_names_the_range(runs_root):
    root, _ = runs_root
    run = open_run(root / "grok")
    with pytest.raises(StepNotFoundError, match=r"no record of step type 'ablation' with 5000 <= step <= 6000"):
        run.range_stats(5000, 6000, step_type="ablation")


@pytest.mark.parametrize("node,kwargs", [("layers.1.weight", {}), ("attn", {"role": "pos2"}), ("block", {"iteration": 0}), ("block", {}), ("loss", {"step_type": "ablation"})])
def test_node_stats_equals_stats_per_view(runs_root, node, kwargs):
    root, _ = runs_root
    run = open_run(root / "grok")
    every = run.node_stats(node, **kwargs)
    assert list(every) == run.views(node)
    for view, frame in every.items():
        pd.testing.assert_frame_equal(frame, run.stats(node, view=view, **kwargs))
