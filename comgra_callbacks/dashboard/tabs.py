"""The further tabs: Network (module tree and parameter counts), Scalars (loss curves and measures, with
the phases of training) and Notes.

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
from comgra_callbacks.store.format import MEASURE_PREFIX


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


FRACTION, LOSS = "fraction", "loss"
NO_PHASES = "(none)"
PHASE_COLORS = ("#cfe2f3", "#fce5cd", "#d9ead3", "#ead1dc", "#fff2cc", "#d0e0e3")


def unit_of(name: str, values: Any) -> str:
    """The y axis a series is drawn on: ``"loss"`` for a name with ``loss`` (or ``nll``, ``perplexity``);
    ``"fraction"`` for a name with ``acc``, ``share``, ``gini`` or ``frac``, or for values that all lie in
    [0, 1]; otherwise the first dotted part of its name (``wnorm.total`` and ``wnorm.fc1.weight`` share one).

    >>> unit_of("measure/test_acc", [0.2]), unit_of("val_loss", [3.0]), unit_of("measure/wnorm.total", [7e3])
    ('fraction', 'loss', 'wnorm')
    """
    base = name[len(MEASURE_PREFIX):] if name.startswith(MEASURE_PREFIX) else name
    low = base.lower()
    if any(word in low for word in ("loss", "nll", "perplexity")):
        return LOSS
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if any(word in low for word in ("acc", "share", "gini", "frac")) or (finite.size and finite.min() >= 0 and finite.max() <= 1):
        return FRACTION
    return base.split(".")[0] or base


def series_table(run: Any) -> dict[str, pd.Series]:
    """Every logged scalar (by its name) and measure (``measure/<name>``) of a run, each a Series by step."""
    out: dict[str, pd.Series] = {}
    scalars = run.scalars
    for name, group in scalars.groupby("name", sort=True):
        out[str(name)] = group.groupby("step")["value"].last().sort_index()
    measures = run.measures
    for column in measures.columns:
        out[MEASURE_PREFIX + str(column)] = measures[column].dropna()
    return out


PHASE_COUNTS = {"auto": 0, **{str(k): k for k in range(2, 7)}}  # 0: analysis.phases chooses (n=None)


def detect_phases(series: pd.Series | None, count: int = 0) -> pd.DataFrame | None:
    """``analysis.phases`` of a series (``count`` phases; 0: chosen by its criterion), or None when the series
    is too short for it."""
    from comgra_callbacks.analysis import phases

    if series is None or len(series.dropna()) < max(6, 3 * count):
        return None
    return phases(series, n=count or None)


def phase_spans(series: pd.Series | None, y_dims: tuple[str, str], count: int = 0) -> tuple[pd.DataFrame | None, list[hv.Element]]:
    """The phases of ``series`` (see :func:`detect_phases`) and a shaded span per phase (dimensions ``y_dims``,
    so the spans add no axis of their own)."""
    found = detect_phases(series, count)
    if found is None:
        return None, []
    spans = [
        hv.VSpan(row.first_step, row.last_step, kdims=list(y_dims)).opts(color=PHASE_COLORS[i % len(PHASE_COLORS)], alpha=0.45)
        for i, row in enumerate(found.itertuples())
    ]
    return found, spans


class ScalarsView(Viewer):
    """Logged scalars and measures over steps, one y axis per unit (see :func:`unit_of`), a log scale that
    toggles (every axis but the fractions'), the phases of a chosen series shaded (their number chosen by ``analysis.phases`` or by hand), and the current
    step marked."""

    def __init__(self, selection: Selection, **params: Any) -> None:
        super().__init__(**params)
        self.selection = selection
        self.names = pn.widgets.MultiChoice(label="Scalars and measures", options=[], value=[], width=500)
        self.plot = pn.pane.HoloViews(linked_axes=False, sizing_mode="stretch_width")
        self.logy = pn.widgets.Checkbox(label="log scale", value=False)
        self.phases_of = pn.widgets.Select(label="Shade the phases of", options=[NO_PHASES], value=NO_PHASES, width=260)
        self.phase_count = pn.widgets.Select(label="Phases", options=PHASE_COUNTS, value=0, width=80)
        self.phase_text = pn.pane.Markdown("", margin=(0, 10))
        self.series: dict[str, pd.Series] = {}
        self.phases: pd.DataFrame | None = None
        self._quiet = False
        selection.param.watch(self.refresh, ["run", "revision"])
        selection.param.watch(self._draw, ["step"])
        for widget in (self.names, self.logy, self.phases_of, self.phase_count):
            widget.param.watch(self._draw, ["value"])
        self.refresh()

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(pn.Row(self.names, self.logy, self.phases_of, self.phase_count), self.plot, self.phase_text, sizing_mode="stretch_width")

    def refresh(self, *_: Any) -> None:
        data = self.selection.data
        if data is None:
            return
        self.series = series_table(data.run)
        names = list(self.series)
        measures = [n for n in names if n.startswith(MEASURE_PREFIX)]
        chosen = [n for n in self.names.value if n in names]
        if not chosen:
            logged = [n for n in names if "loss" in n and not n.startswith(MEASURE_PREFIX)]
            chosen = (logged + [n for n in measures if "acc" in n] + [n for n in measures if "loss" in n])[:6] or names[:3]
        default_phases = next((n for n in measures if "test" in n and "acc" in n), NO_PHASES)
        shade = self.phases_of.value if self.phases_of.value in names else default_phases
        # MultiChoice renders its labels as HTML: the labels are escaped, the values stay the names.
        self._quiet = True  # one drawing for the whole update, not one per widget
        try:
            self.phases_of.param.update(options=[NO_PHASES, *names], value=shade)
            self.names.param.update(options={safe.label(n): n for n in names}, value=chosen)
        finally:
            self._quiet = False
        self._draw()

    def _draw(self, *_: Any) -> None:
        if self.selection.data is None or self._quiet:
            return
        if not self.series:
            self.plot.object = plots.message("No scalars or measures in this run (log_scalars=True stores Lightning's logged metrics; measures= evaluates measures).", width=900)
            self.phase_text.object = ""
            return
        shown = [n for n in self.names.value if n in self.series]
        if not shown:
            self.plot.object = plots.message("Choose scalars or measures to plot.", width=900)
            return
        curves = []
        for name in shown:
            values = self.series[name]
            unit = unit_of(name, values.to_numpy())
            curve = hv.Curve((values.index.to_numpy(), values.to_numpy()), "step", unit, label=name)
            curves.append(curve.opts(logy=self.logy.value and unit != FRACTION))
        first_dims = ("step", curves[0].vdims[0].name)
        self.phases, spans = phase_spans(self.series.get(self.phases_of.value), first_dims, int(self.phase_count.value or 0))
        self.phase_text.object = _phase_caption(self.phases_of.value, self.phases)
        marker = hv.VLine(self.selection.step, kdims=list(first_dims)).opts(color="black", line_dash="dashed", line_width=1)
        overlay = hv.Overlay([*curves, *spans, marker])
        self.plot.object = overlay.opts(
            hv.opts.Curve(tools=["hover"]),
            hv.opts.Overlay(height=420, responsive=True, multi_y=True, legend_position="top_right", title="logged scalars and measures"),
        )


def _phase_caption(name: str, found: pd.DataFrame | None) -> str:
    if found is None:
        return "" if name == NO_PHASES else f"Too few points of {safe.code(name)} for phases."
    ranges = ", ".join(f"{i}: steps {int(r.first_step)}–{int(r.last_step)}" for i, r in enumerate(found.itertuples()))
    return f"**Phases of {safe.code(name)}** (`analysis.phases`): {ranges}."


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
