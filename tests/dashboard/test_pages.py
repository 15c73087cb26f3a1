"""What the page says when there is nothing (or something wrong) to show, and the custom tab."""

from __future__ import annotations

import textwrap

import panel as pn
import pytest

from comgra_callbacks.dashboard import app
from comgra_callbacks.dashboard.custom import load_custom
from comgra_callbacks.dashboard.options import DashboardOptions
from comgra_callbacks.errors import ConfigError


def _texts(page) -> str:
    """Every Markdown / Alert text on a page."""
    found = []
    for obj in page.select(lambda o: isinstance(o, pn.pane.Markdown | pn.pane.Alert)):
        found.append(str(obj.object))
    return "\n".join(found)


def test_a_path_that_does_not_exist(tmp_path):
    page = app.build_app(DashboardOptions(str(tmp_path / "nope")))
    text = _texts(page)
    assert "does not exist" in text and "nope" in text and "Traceback" not in text


def test_a_root_without_runs(tmp_path):
    text = _texts(app.build_app(DashboardOptions(str(tmp_path))))
    assert "No runs under" in text and "looks again" in text


def test_a_run_of_an_unknown_format_version(bad_version_root):
    text = _texts(app.build_app(DashboardOptions(str(bad_version_root))))
    assert "No run could be opened" in text and "store format 9.0" in text and "upgrade comgra-callbacks" in text
    single = _texts(app.build_app(DashboardOptions(str(bad_version_root / "from_the_future"))))
    assert "store format 9.0" in single


def test_good_runs_are_shown_and_bad_ones_listed(runs_root, bad_version_root, tmp_path):
    root, _ = runs_root
    import shutil

    shutil.copytree(root / "grok", tmp_path / "grok")
    shutil.copytree(bad_version_root / "from_the_future", tmp_path / "from_the_future")
    page = app.build_app(DashboardOptions(str(tmp_path)))
    text = _texts(page)
    assert "Some runs could not be opened" in text and "from_the_future" in text
    assert page.select(pn.Tabs), "the dashboard itself is shown"


def test_one_run_as_the_target(runs_root):
    root, _ = runs_root
    page = app.build_app(DashboardOptions(str(root / "grok")))
    selects = [w for w in page.select(pn.widgets.Select) if w.label == "Run"]
    assert list(selects[0].options) == ["grok"]


def test_wrong_app_arguments_are_shown_on_the_page(monkeypatch):
    monkeypatch.setattr("sys.argv", ["app.py"])
    text = _texts(app.serve_page())
    assert "the following arguments are required: ROOT" in text
    monkeypatch.setattr("sys.argv", ["app.py", "x", "--storage-options", "{bad"])
    assert "expected a JSON object" in _texts(app.serve_page())


def test_the_fourier_example(runs_root, dashboard_for):
    root, _ = runs_root
    dash = dashboard_for(root, custom="fourier")
    assert dash.tab_names[-1] == "Fourier"
    dash.selection.param.update(run="grok", node="layers.0.weight", step=30)
    assert not dash.custom.body.objects, "nothing runs while the tab is hidden"
    dash.show_tab("Fourier")
    text = _texts(dash.custom.body)
    assert "Fourier spectrum** of raw values, shape (16, 16)" in text and dash.custom.error is None
    dash.selection.node = "layers.1"  # no raw values: falls back to the per-neuron means
    assert "per-neuron means" in _texts(dash.custom.body)


def test_a_custom_view_gets_the_selection_and_its_errors_are_shown(runs_root, dashboard_for, tmp_path):
    root, _ = runs_root
    plugin = tmp_path / "mine.py"
    plugin.write_text(textwrap.dedent('''
        TITLE = "Mine"
        def view(selection, run):
            if selection.node == "loss":
                raise ValueError("no loss here")
            return f"{run.name} {selection.node} {selection.step} {selection.view} {selection.role}"
    '''))
    dash = dashboard_for(root, custom=str(plugin))
    dash.selection.run = "grok"
    dash.show_tab("Mine")
    dash.selection.param.update(node="attn", step=12)
    dash.selection.role = "pos1"
    assert _texts(dash.custom.body) == "grok attn 12 value pos1"
    dash.selection.node = "loss"
    assert dash.custom.error == "ValueError: no loss here"
    assert "raised **ValueError: no loss here**" in _texts(dash.custom.body)


def test_bad_custom_files(tmp_path):
    with pytest.raises(ConfigError, match=r"no such file\). Shipped examples: \['fourier'\]"):
        load_custom(tmp_path / "missing.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match=r"defines no function `view`; it defines \['x'\]"):
        load_custom(tmp_path / "empty.py")
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    with pytest.raises(ConfigError, match=r"failed to import: ModuleNotFoundError"):
        load_custom(tmp_path / "broken.py")


def test_a_bad_custom_file_is_shown_on_the_page(runs_root, dashboard_for):
    root, _ = runs_root
    dash = dashboard_for(root, custom="/nowhere/view.py")
    assert dash.custom is None and "no such file" in _texts(dash.panel())


def test_a_root_created_after_the_server_started(tmp_path):
    from comgra_callbacks.dashboard.data import Catalog
    from comgra_callbacks.dashboard.synthetic import write_run

    catalog = Catalog(tmp_path / "later")
    assert "does not exist (yet)" in catalog.problem and catalog.can_list and not catalog.runs
    assert catalog.refresh_list() is False
    write_run(tmp_path / "later", "first", records=3)
    assert catalog.refresh_list() is True and catalog.names == ["first"] and catalog.problem is None


def test_an_unusable_url_is_not_polled():
    from comgra_callbacks.dashboard.data import Catalog

    catalog = Catalog("nosuchscheme://bucket/runs")
    assert not catalog.can_list and catalog.problem
