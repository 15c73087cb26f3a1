"""compare / range_stats / compare_nodes: moved from the reader and the dashboard with their tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from comgra_callbacks import ConfigError, StepNotFoundError, analysis, open_run
from comgra_callbacks.dashboard.synthetic import write_run
from comgra_callbacks.store.writer import StoreLayout


@pytest.mark.parametrize("view", ["value", "grad", "update"])
def test_range_stats_is_the_mean_of_each_nodes_history(tmp_path, view):
    # Small chunks: the range spans several blocks of rows and starts and ends inside one.
    write_run(tmp_path, "r", records=90, layers=3, layout=StoreLayout(stats_rows=16, stats_series=8))
    run = open_run(tmp_path / "r")
    frame = analysis.range_stats(run, 13, 71, view=view, step_type="train")
    nodes = [n for n in run.nodes if view in run.views(n)]
    assert list(frame.index) == nodes
    for node in nodes:
        history = run.stats(node, view=view, step_type="train").loc[13:71]
        np.testing.assert_allclose(frame.loc[node, history.columns].to_numpy(), history.mean().to_numpy(), rtol=1e-5)
        assert frame.loc[node, "records"] == len(history)


def test_range_stats_of_one_step_equals_step_stats(grok):
    run = open_run(grok[0])
    step, step_type = int(run.steps["step"].iloc[-1]), str(run.steps["step_type"].iloc[-1])
    one = analysis.range_stats(run, step, step, view="grad", step_type=step_type)
    reference = run.step_stats(step, view="grad", step_type=step_type)
    pd.testing.assert_frame_equal(one[reference.columns[:-1]], reference[reference.columns[:-1]], check_names=False, check_dtype=False)  # a mean over records is float64


def test_range_stats_without_records_names_the_range(grok):
    run = open_run(grok[0])
    with pytest.raises(StepNotFoundError, match=r"no record of step type 'ablation' with 5000 <= step <= 6000"):
        analysis.range_stats(run, 5000, 6000, step_type="ablation")


def test_stats_blocks_are_the_records_in_the_range(tmp_path):
    write_run(tmp_path, "r", records=40, layers=2, layout=StoreLayout(stats_rows=8, stats_series=8))
    run = open_run(tmp_path / "r")
    nodes, blocks = run.stats_blocks(5, 30, view="value", step_type="train")
    records = np.concatenate([r for r, _ in blocks])
    steps = run.steps.loc[records]
    assert set(steps["step_type"]) == {"train"} and steps["step"].between(5, 30).all()
    assert len(records) == ((run.steps["step"].between(5, 30)) & (run.steps["step_type"] == "train")).sum()
    _, blocks = run.stats_blocks(5, 30, view="value", step_type="train")
    first_records, values = next(iter(blocks))
    step = int(run.steps.at[int(first_records[0]), "step"])
    expected = run.step_stats(step, view="value").loc[nodes, "mean"].to_numpy()
    np.testing.assert_allclose(values[0, :, 0], expected, rtol=1e-6)


def test_compare_nodes_ranks_by_relative_change_as_the_dashboard_did(grok):
    root, spec = grok
    run = open_run(root)
    phase = spec.phase_step
    a = analysis.range_stats(run, 0, phase - 1, step_type="train")
    b = analysis.range_stats(run, phase, spec.steps[-1], step_type="train")
    ranking = analysis.compare_nodes(a, b, "abs_mean")
    assert set(ranking.index[:2]) == spec.changed
    assert ranking.loc["layers.1", "relative"] > 2.0 and abs(ranking.loc["x", "relative"]) < 0.3
    assert list(ranking.columns) == ["a", "b", "change", "relative", "records_a", "records_b"]
    by_change = analysis.compare_nodes(a, b, "abs_mean", rank_by="change")
    assert by_change["change"].abs().is_monotonic_decreasing
    pd.testing.assert_frame_equal(analysis.compare_nodes(a, b, "abs_mean", rank_by="absolute"), by_change)  # the dashboard's name


def test_compare_gives_the_dashboards_numbers_and_ranks_by_spread(grok):
    root, spec = grok
    run = open_run(root)
    phase, last = spec.phase_step, spec.steps[-1]
    frame = analysis.compare(run, (0, phase - 1), (phase, last))
    before = analysis.compare_nodes(
        analysis.range_stats(run, 0, phase - 1), analysis.range_stats(run, phase, last), "abs_mean"
    )
    pd.testing.assert_frame_equal(frame.loc[before.index, before.columns], before)
    assert set(frame.index[:2]) == spec.changed
    assert frame["score"].abs().is_monotonic_decreasing
    history = run.stats("layers.1", view="value")["abs_mean"]
    assert frame.loc["layers.1", "spread"] == pytest.approx(history.std(), rel=1e-5)
    assert frame.loc["layers.1", "score"] == pytest.approx(frame.loc["layers.1", "change"] / history.std())
    assert "spread" in frame.attrs["ranked_by"]


def test_compare_sides_step_range_and_step_type(grok):
    root, spec = grok
    run = open_run(root)
    steps = analysis.compare(run, spec.steps[3], spec.steps[100], statistic="l2")
    assert set(steps["records_a"]) == {1} and set(steps["records_b"]) == {1}
    types = analysis.compare(run, "train", "ablation", view="grad")
    n_ablation = spec.step_types.count("ablation")
    assert types.loc["layers.0", "records_b"] == n_ablation
    other = analysis.compare(run, (0, 50), (0, 50), run_b=run)
    assert (other["change"] == 0).all()


def test_a_bias_starting_at_zero_does_not_rank_first(tmp_path):
    """The issue's example: by relative change a bias near 0 ranks first; by change / spread it does not."""
    from comgra_callbacks.store import format as fmt
    from comgra_callbacks.store.format import SeriesKey
    from comgra_callbacks.store.storage import open_root
    from comgra_callbacks.store.writer import HostEntry, HostRecord, RunWriter

    rng = np.random.default_rng(0)
    writer = RunWriter(open_root(tmp_path).run("bias"))
    writer.start_segment(0)
    records = []
    for step in range(40):
        values = {
            "bias": 1e-4 * step + 1e-5 * rng.standard_normal(),  # drifts away from 0, tiny in absolute terms
            "noisy": 1.0 + 0.3 * rng.standard_normal(),  # moves a lot, no trend
            "layer": 1.0 + (0.5 if step >= 20 else 0.0) + 0.02 * rng.standard_normal(),  # the real change
        }
        entries = []
        for node, v in values.items():
            stats = np.full(len(fmt.STAT_NAMES), np.nan, dtype=np.float32)
            stats[:10] = [v, 0.1, abs(v), v, v, abs(v), 0, 0, 0, 4]
            entries.append(HostEntry(SeriesKey(node, None, 0, "value"), stats))
        records.append(HostRecord(step, "train", 0, step, 0.0, "every", entries))
    writer.append(records)
    writer.commit()
    writer.close("finished", None)
    run = open_run(tmp_path / "bias")
    frame = analysis.compare(run, (0, 19), (20, 39), statistic="mean")
    assert frame.index[0] == "layer"
    assert frame["relative"].abs().idxmax() == "bias", "what the old ranking put first"


def test_compare_says_what_is_wrong(grok):
    run = open_run(grok[0])
    with pytest.raises(ConfigError, match=r"`statistic`: expected one of .* got 'median'"):
        analysis.compare(run, 0, 1, statistic="median")
    with pytest.raises(ConfigError, match=r"expected a step \(int\), a \(first, last\) range"):
        analysis.compare(run, 1.5, 1)
    with pytest.raises(ConfigError, match=r"rank_by=.*got 'size'"):
        analysis.compare_nodes(pd.DataFrame(), pd.DataFrame(), "mean", rank_by="size")
