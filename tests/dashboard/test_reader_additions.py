"""The reads added to the reader for the dashboard, checked against the per-node reads they replace.

(``range_stats`` moved to ``comgra_callbacks.analysis``; its tests to tests/analysis/test_compare.py.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from comgra_callbacks import open_run


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


@pytest.mark.parametrize("node,kwargs", [("layers.1.weight", {}), ("attn", {"role": "pos2"}), ("block", {"iteration": 0}), ("block", {}), ("loss", {"step_type": "ablation"})])
def test_node_stats_equals_stats_per_view(runs_root, node, kwargs):
    root, _ = runs_root
    run = open_run(root / "grok")
    every = run.node_stats(node, **kwargs)
    assert list(every) == run.views(node)
    for view, frame in every.items():
        pd.testing.assert_frame_equal(frame, run.stats(node, view=view, **kwargs))
