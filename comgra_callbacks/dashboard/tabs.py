"""The further tabs: Network (module tree and parameter counts), Scalars (loss curves) and Notes.

>>> import pandas as pd
>>> modules = pd.DataFrame(
...     {"type": ["Net", "Linear", "Linear"], "parent": [None, "", ""], "depth": [0, 1, 1], "params": [0, 10, 5],
...      "params_total": [15, 10, 5], "trainable_total": [15, 10, 5]},
...     index=pd.Index(["", "a", "b"], name="name"))
>>> module_table(modules)[["module", "params_total", "share_%"]]
    module  params_total  share_%
0  (model)            15    100.0
1     ├─ a            10     66.7
2     └─ b             5     33.3
"""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
from panel.viewable import Viewer

from comgra_callbacks.dashboard import plots, safe
from comgra_callbacks.dashboard.state import Selection, nearest


def module_table(modules: pd.DataFrame) -> pd.DataFrame:
    """The module tree as rows in tree order, names drawn as a tree, with each module's share of the model."""
    if modules.empty:
        return pd.DataFrame(columns=["module", "name", "type", "depth", "params", "params_total", "trainable_total", "share_%"])
    children: dict[str, list[str]] = {}
    for name, parent in zip(modules.index, modules["parent"], strict=True):
        if name != "":
            children.setdefault("" if parent is None or (isinstance(parent, float) and np.isnan(parent)) else str(parent), []).append(name)
    total = float(modules.loc[""]["params_total"]) if "" in modules.index else float(modules["params"].sum())
    rows: list[dict[str, Any]] = []

    def walk(name: str, prefix: str, last: bool, top: bool) -> None:
        row = modules.loc[name]
        branch = "" if top else ("└─ " if last else "├─ ")
        label = "(model)" if name == "" else name.rsplit(".", 1)[-1] if not top else name
        rows.append(
            {
                "module": prefix + branch + label,
                "name": name,
                "type": row["type"],
                "depth": int(row["depth"]),
                "params": int(row["params"]),
                "params_total": int(row["params_total"]),
                "trainable_total": int(row["trainable_total"]),
                "share_%": round(100.0 * float(row["params_total"]) / total, 1) if total else 0.0,
            }
        )
        kids = children.get(name, [])
        for i, kid in enumerate(kids):
            walk(kid, prefix + ("" if top else ("   " if last else "│  ")), i == len(kids) - 1, False)

    roots = [""] if "" in modules.index else [n for n in modules.index if modules.loc[n]["depth"] == min(modules["depth"])]
    for root in roots:
        walk(root, "", True, True)
    return pd.DataFrame(rows)


class NetworkView(Viewer):
    """The module tree with parameter counts: hierarchical (tree order, indented), sortable, filterable by depth."""

    def __init__(self, selection: Selection, **params: Any) -> None:
        super().__init__(**params)
        self.selection = selection
        self.depth = pn.widgets.IntSlider(label="Show modules down to depth", start=0, end=1, value=1, width=260)
        self.summary = pn.pane.Markdown("", margin=(0, 10))
        self.table = pn.widgets.Tabulator(
            pd.DataFrame(), disabled=True, show_index=False, sizing_mode="stretch_width", height=600, layout="fit_data_stretch",
            formatters={"share_%": {"type": "progress", "max": 100, "legend": True}},
        )
        self.frame = pd.DataFrame()
        selection.param.watch(self.refresh, ["run"])
        self.depth.param.watch(self._filter, ["value"])
        self.refresh()

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(self.summary, self.depth, self.table, sizing_mode="stretch_width")

    def refresh(self, *_: Any) -> None:
        data = self.selection.data
        if data is None:
            return
        self.frame = module_table(data.run.modules)
        if self.frame.empty:
            self.summary.object = "This run has no module tree (it was not recorded from an `nn.Module`)."
            self.table.value = self.frame
            return
        top = self.frame.iloc[0]
        self.summary.object = f"**{safe.text(top['type'])}**: {top['params_total']:,} parameters ({top['trainable_total']:,} trainable) in {len(self.frame)} modules."
        deepest = int(self.frame["depth"].max())
        self.depth.param.update(end=max(deepest, 1), value=min(max(int(self.depth.value or 0), 2), max(deepest, 1)))
        self._filter()

    def _filter(self, *_: Any) -> None:
        if not self.frame.empty:
            self.table.value = self.frame[self.frame["depth"] <= self.depth.value].reset_index(drop=True)


class ScalarsView(Viewer):
    """Logged scalars over steps (Lightning's logged metrics), with the current step marked."""

    def __init__(self, selection: Selection, **params: Any) -> None:
        super().__init__(**params)
        self.selection = selection
        self.names = pn.widgets.MultiChoice(label="Scalars", options=[], value=[], width=500)
        self.plot = pn.pane.HoloViews(linked_axes=False, sizing_mode="stretch_width")
        self.logy = pn.widgets.Checkbox(label="log scale", value=False)
        selection.param.watch(self.refresh, ["run", "revision"])
        selection.param.watch(self._draw, ["step"])
        self.names.param.watch(self._draw, ["value"])
        self.logy.param.watch(self._draw, ["value"])
        self.refresh()

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(pn.Row(self.names, self.logy), self.plot, sizing_mode="stretch_width")

    def refresh(self, *_: Any) -> None:
        data = self.selection.data
        if data is None:
            return
        names = sorted(set(data.run.scalars["name"]))
        chosen = [n for n in self.names.value if n in names] or [n for n in names if "loss" in n] or names[:3]
        # MultiChoice renders its labels as HTML: the labels are escaped, the values stay the names.
        self.names.param.update(options={safe.label(n): n for n in names}, value=chosen)
        self._draw()

    def _draw(self, *_: Any) -> None:
        data = self.selection.data
        if data is None:
            return
        scalars = data.run.scalars
        if scalars.empty:
            self.plot.object = plots.message("No scalars were logged in this run (log_scalars=True stores Lightning's logged metrics).", width=900)
            return
        curves = [
            hv.Curve(group.sort_values("step"), "step", ("value", "value"), label=name)
            for name, group in scalars[scalars["name"].isin(self.names.value)].groupby("name")
        ]
        if not curves:
            self.plot.object = plots.message("Choose scalars to plot.", width=900)
            return
        overlay = hv.Overlay(curves) * plots.step_marker(self.selection.step)
        self.plot.object = overlay.opts(hv.opts.Curve(tools=["hover"]), hv.opts.Overlay(height=420, responsive=True, logy=self.logy.value, legend_position="top_right", title="logged scalars"))


class NotesView(Viewer):
    """Notes recorded during training, with their steps; clicking a note goes to its step."""

    def __init__(self, selection: Selection, **params: Any) -> None:
        super().__init__(**params)
        self.selection = selection
        self.table = pn.widgets.Tabulator(pd.DataFrame(), disabled=True, show_index=False, sizing_mode="stretch_width", height=500, layout="fit_data_stretch")
        self.message = pn.pane.Markdown("", margin=(0, 10))
        self.table.on_click(self._clicked)
        selection.param.watch(self.refresh, ["run", "revision"])
        self.refresh()

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(self.message, self.table, sizing_mode="stretch_width")

    def refresh(self, *_: Any) -> None:
        data = self.selection.data
        if data is None:
            return
        notes = data.run.notes.copy()
        if notes.empty:
            self.message.object = "No notes in this run."
        else:
            self.message.object = f"{len(notes)} notes. Click one to go to its step."
            notes["time"] = pd.to_datetime(notes["time"], unit="s", utc=True, errors="coerce").dt.strftime("%Y-%m-%d %H:%M:%S")
        self.table.value = notes.reset_index(drop=True)

    def _clicked(self, event: Any) -> None:
        steps = self.selection.steps
        if event.row is None or not steps:
            return
        step = self.table.value.iloc[event.row]["step"]
        self.selection.step = nearest(steps, int(step))
