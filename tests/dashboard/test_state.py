"""The linked selection: every selector combination is reachable and consistent; live runs update."""

from __future__ import annotations

import pytest

from comgra_callbacks.dashboard.data import Catalog, Missing
from comgra_callbacks.dashboard.gather import tensor_data
from comgra_callbacks.dashboard.state import LAST, NO_ROLE, Comparison, Selection
from comgra_callbacks.dashboard.synthetic import write_run
from comgra_callbacks.store.storage import open_root
from comgra_callbacks.store.writer import RunWriter


def test_opening_resolves_every_selector(runs_root):
    root, _ = runs_root
    sel = Selection(Catalog(root))
    assert sel.param.run.objects == ["crashed", "empty", "grok"] and sel.run == "grok", "the newest run with records"
    assert sel.step_type == "train" and sel.param.step_type.objects == ["train", "ablation"]
    assert sel.steps == [s for s in range(120) if s % 10 != 9]
    assert sel.step == 0 and sel.node == "out" and sel.view == "value"
    assert sel.role == NO_ROLE and sel.iteration == LAST
    assert sel.status.startswith("finished · 120 records")


def test_changing_the_node_updates_views_roles_and_iterations(runs_root):
    root, _ = runs_root
    sel = Selection(Catalog(root), run="grok")
    sel.node = "layers.0.weight"
    assert sel.param.view.objects == ["value", "grad", "grad:aux_loss", "update"]
    sel.view = "update"
    sel.node = "attn"
    assert sel.view == "value", "a view the new node lacks falls back to value"
    assert sel.param.role.objects == ["pos0", "pos1", "pos2"] and sel.role == "pos0"
    sel.role = "pos2"
    assert sel.role_value == "pos2"
    sel.node = "block"
    assert sel.role == NO_ROLE and sel.param.iteration.objects == [LAST, "0", "1"]
    sel.iteration = "0"
    assert sel.iteration_value == 0
    sel.node = "loss"
    assert sel.iteration == LAST and sel.param.iteration.objects == [LAST]


def test_changing_the_step_type_keeps_the_nearest_step(runs_root):
    root, _ = runs_root
    sel = Selection(Catalog(root), run="grok")
    sel.step = 50
    sel.step_type = "ablation"
    assert sel.steps == list(range(9, 120, 10))
    assert sel.step == 49
    sel.move_step(+1)
    assert sel.step == 59
    sel.move_step(-100)
    assert sel.step == 9
    sel.move_step(+100)
    assert sel.step == 119


def test_every_selector_combination_is_reachable(runs_root):
    """Each value offered by a selector can be chosen and gives data (or a message), never an error."""
    root, _ = runs_root
    sel = Selection(Catalog(root))
    seen = 0
    for run in list(sel.param.run.objects):
        sel.run = run
        for step_type in list(sel.param.step_type.objects):
            sel.step_type = step_type
            steps = list(sel.steps)
            for node in list(sel.param.node.objects):
                sel.node = node
                for view in list(sel.param.view.objects):
                    sel.view = view
                    for role in list(sel.param.role.objects):
                        sel.role = role
                        for iteration in list(sel.param.iteration.objects):
                            sel.iteration = iteration
                            for detail in ("statistics", "neurons", "sample"):
                                sel.detail = detail
                                for step in {steps[0], steps[-1]} if steps else {0}:
                                    sel.step = step
                                    assert (sel.run, sel.node, sel.view, sel.role, sel.iteration) == (run, node, view, role, iteration)
                                    data = tensor_data(sel.data, sel.snapshot())
                                    seen += 1
                                    if not steps:
                                        assert isinstance(data.table, Missing)
                                        continue
                                    assert not isinstance(data.history, Missing)
                                    assert view in data.table.index
    assert seen > 1000


def test_an_empty_run_selects_without_steps(runs_root):
    root, _ = runs_root
    sel = Selection(Catalog(root), run="empty")
    assert sel.steps == [] and sel.step_type is None and sel.node is None
    assert sel.status.startswith("running · 0 records")
    sel.move_step(1)  # nothing to move to, no error
    assert sel.step == 0


def test_a_failed_run_says_why(runs_root):
    root, _ = runs_root
    sel = Selection(Catalog(root), run="crashed")
    assert "failed" in sel.status and "RuntimeError: synthetic failure" in sel.status
    assert len(sel.steps) == 27


def test_a_live_run_grows_without_restarting(tmp_path, host_record):
    _record = host_record
    writer = RunWriter(open_root(tmp_path).run("live"))
    writer.write_graph({"nodes": {"h": {"kind": "intermediate", "roles": [None], "iterations": 1}}, "graphs": {}})
    writer.append([_record(0, 1.0), _record(1, 2.0)])
    sel = Selection(Catalog(tmp_path))
    assert sel.steps == [0, 1] and sel.status.startswith("running · 2 records")
    sel.step = 1  # at the last step: the view follows the training
    revision = sel.revision
    assert sel.poll() is False
    writer.append([_record(2, 3.0), _record(3, 4.0)])
    assert sel.poll() is True
    assert sel.steps == [0, 1, 2, 3] and sel.step == 3 and sel.revision == revision + 1
    assert tensor_data(sel.data, sel.snapshot()).history["mean"].tolist() == [1.0, 2.0, 3.0, 4.0]
    write_run(tmp_path, "second", records=5)
    assert sel.poll(force=True) is True and "second" in sel.param.run.objects
    writer.close("finished")
    sel.poll()
    assert sel.status.startswith("finished")


def test_every_session_sees_a_live_runs_new_records(tmp_path, host_record):
    _record = host_record
    """Runs are shared by the sessions of a server: one session's refresh must not hide news from another."""
    writer = RunWriter(open_root(tmp_path).run("live"))
    writer.append([_record(0, 1.0)])
    catalog = Catalog(tmp_path)
    first, second = Selection(catalog), Selection(catalog)
    writer.append([_record(1, 2.0)])
    assert first.poll() is True and second.poll() is True
    assert first.steps == second.steps == [0, 1]
    assert first.poll() is False and second.poll() is False


def test_comparison_defaults_and_sides(runs_root):
    root, _ = runs_root
    sel = Selection(Catalog(root), run="grok")
    cmp = Comparison(sel)
    a, b = cmp.sides()
    assert (a.first, a.last, b.first, b.last) == (0, 34, 83, 118)
    cmp.mode = "steps"
    assert [s.first for s in cmp.sides()] == [0, 118]
    cmp.mode = "step types"
    a, b = cmp.sides()
    assert (a.step_type, b.step_type, a.first, a.last) == ("train", "ablation", 0, 119)
    cmp.mode = "runs"
    a, b = cmp.sides()
    assert (a.run, b.run) == ("grok", "crashed")
    with pytest.raises(ValueError):
        cmp.mode = "weeks"
