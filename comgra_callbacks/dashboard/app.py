"""The dashboard app: composes the state and the views; nothing else lives here.

Serve it with Panel (``--address 127.0.0.1`` keeps it on this machine; ``--args`` comes last)::

    panel serve "$(python -c 'import comgra_callbacks.dashboard.app as m; print(m.__file__)')" \\
        --address 127.0.0.1 --args comgra_runs [--custom FILE] [--storage-options JSON]

or with the console command, which binds 127.0.0.1 by default::

    comgra-callbacks serve comgra_runs [--port 5006]
"""

from __future__ import annotations

import sys
from typing import Any

import holoviews as hv
import panel as pn

from comgra_callbacks.dashboard import safe
from comgra_callbacks.dashboard.anomaly_view import AnomalyView
from comgra_callbacks.dashboard.attribution_view import AttributionView
from comgra_callbacks.dashboard.compare_view import CompareView
from comgra_callbacks.dashboard.custom import CustomView, load_custom
from comgra_callbacks.dashboard.data import Catalog, shared_catalog
from comgra_callbacks.dashboard.graph_view import GraphView
from comgra_callbacks.dashboard.options import DashboardOptions, parse_app_args
from comgra_callbacks.dashboard.selectors import KeyListener, SelectorBar, handle_key
from comgra_callbacks.dashboard.state import Comparison, Selection
from comgra_callbacks.dashboard.tabs import NetworkView, NotesView, ScalarsView
from comgra_callbacks.dashboard.tensor_view import TensorView
from comgra_callbacks.errors import ComgraError

TITLE = "comgra_callbacks"
TAB_NAMES = ("Main", "Compare", "Anomalies", "Network", "Scalars", "Notes")


class Dashboard:
    """Every view of one browser session, wired to one :class:`Selection` (tests build it without a browser)."""

    def __init__(self, catalog: Catalog, options: DashboardOptions) -> None:
        self.catalog = catalog
        self.options = options
        self.selection = Selection(catalog)
        self.comparison = Comparison(self.selection)
        self.selectors = SelectorBar(self.selection)
        self.graph = GraphView(self.selection)
        self.tensor = TensorView(self.selection)
        self.compare = CompareView(self.selection, self.comparison)
        self.anomalies = AnomalyView(self.selection)
        self.attribution = AttributionView(self.selection)
        self.network = NetworkView(self.selection)
        self.scalars = ScalarsView(self.selection)
        self.notes = NotesView(self.selection)
        self.custom: CustomView | None = None
        self.custom_error: str | None = None
        if options.custom:
            try:
                self.custom = CustomView(self.selection, load_custom(options.custom))
            except ComgraError as exc:
                self.custom_error = str(exc)
        self.keys = KeyListener(width=0, height=0, margin=0)
        self.keys.param.watch(lambda e: handle_key(self.selection, self.graph.move, e.new), ["key"])
        tabs: list[tuple[str, Any]] = [
            ("Main", pn.Column(self.selectors, self.graph, self.tensor, sizing_mode="stretch_width")),
            ("Compare", self.compare),
            ("Anomalies", self.anomalies),
            ("Attribution", self.attribution),
            ("Network", self.network),
            ("Scalars", self.scalars),
            ("Notes", self.notes),
        ]
        if self.custom is not None:
            tabs.append((self.custom.plugin.title, self.custom))
        self.tab_names = [name for name, _ in tabs]
        self.tabs = pn.Tabs(*tabs, dynamic=True, sizing_mode="stretch_width")
        self.tabs.param.watch(self._on_tab, ["active"])

    def _on_tab(self, event: Any) -> None:
        name = self.tab_names[event.new] if event.new < len(self.tab_names) else ""
        self.compare.activate(name == "Compare")
        self.anomalies.activate(name == "Anomalies")
        self.attribution.activate(name == "Attribution")
        if self.custom is not None:
            self.custom.activate(name == self.custom.plugin.title)

    def show_tab(self, name: str) -> None:
        self.tabs.active = self.tab_names.index(name)

    def panel(self) -> pn.viewable.Viewable:
        header = pn.pane.Markdown(f"## {TITLE} · {safe.code(self.catalog.target)}", margin=(0, 10))
        parts: list[Any] = [header, self.keys]
        if self.custom_error:
            parts.append(pn.pane.Alert(safe.text(self.custom_error), alert_type="warning"))
        if self.catalog.skipped:
            skipped = "".join(f"\n- **{safe.text(name)}**: {safe.text(msg)}" for name, msg in self.catalog.skipped.items())
            parts.append(pn.pane.Alert(f"Some runs could not be opened; the others are shown.{skipped}", alert_type="warning"))
        return pn.Column(*parts, self.tabs, sizing_mode="stretch_width")


def problem_page(catalog: Catalog, options: DashboardOptions) -> pn.viewable.Viewable:
    """The page when there is nothing to show yet; it turns into the dashboard when a run appears."""
    alert = pn.pane.Alert(safe.text(catalog.problem or ""), alert_type="warning" if catalog.can_list else "danger")
    page = pn.Column(pn.pane.Markdown(f"## {TITLE} · {safe.code(options.target)}", margin=(0, 10)), alert, sizing_mode="stretch_width")

    def look_again() -> None:
        if catalog.refresh_list() and catalog.runs:
            if callback is not None:
                callback.stop()
            dashboard = Dashboard(catalog, options)
            page.objects = [dashboard.panel()]
            start_polling(dashboard.selection.poll, options)
        elif catalog.problem:
            alert.object = safe.text(catalog.problem)

    callback = start_polling(look_again, options) if catalog.can_list else None
    return page


def start_polling(poll: Any, options: DashboardOptions) -> Any:
    """Call ``poll`` every ``options.poll_secs`` while the page is open (only in a served session)."""
    if not options.poll_secs or pn.state.curdoc is None:
        return None
    return pn.state.add_periodic_callback(poll, period=int(options.poll_secs * 1000))


def build_app(options: DashboardOptions) -> pn.viewable.Viewable:
    """The page for one browser session."""
    hv.extension("bokeh", logo=False)
    pn.extension("tabulator", notifications=False)
    catalog = shared_catalog(options.target, options.storage_options)
    if not catalog.runs:
        return problem_page(catalog, options)
    dashboard = Dashboard(catalog, options)
    start_polling(dashboard.selection.poll, options)
    return dashboard.panel()


def error_page(message: str) -> pn.viewable.Viewable:
    return pn.Column(pn.pane.Markdown(f"## {TITLE}"), pn.pane.Alert(safe.text(message), alert_type="danger"))


def serve_page() -> pn.viewable.Viewable:
    """Entry point of ``panel serve app.py --args ...``: options from ``sys.argv``, problems on the page."""
    try:
        return build_app(parse_app_args(sys.argv[1:]))
    except ComgraError as exc:
        return error_page(str(exc))


if pn.state.served:
    serve_page().servable(title=TITLE)
