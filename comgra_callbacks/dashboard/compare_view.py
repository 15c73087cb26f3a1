"""Training-phase comparison: two selections side by side, for the selected node and for every node.

The two sides differ by steps, by ranges of steps (e.g. memorisation vs generalisation in a grokking run),
by step type (normal vs intervention) or by run. For every node the chosen statistic is averaged over each
side's records (one slab of rows per side, read block by block and cached), and the nodes are ranked by how
much it changed; clicking a row selects that node everywhere (graph, selectors, tensor panel).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import panel as pn
from bokeh.models.widgets.tables import NumberFormatter
from panel.viewable import Viewer

from comgra_callbacks.analysis import compare_nodes, paired_stats, paired_steps, spread
from comgra_callbacks.dashboard import plots, safe
from comgra_callbacks.dashboard.data import Missing
from comgra_callbacks.dashboard.gather import node_comparison, side_summary
from comgra_callbacks.dashboard.phase_picker import PhasePicker
from comgra_callbacks.dashboard.state import Comparison, Selection


class CompareView(Viewer):
    """The comparison tab. It computes only while visible (:meth:`activate`), then follows every change."""

    def __init__(self, selection: Selection, comparison: Comparison, **params: Any) -> None:
        super().__init__(**params)
        self.selection = sel = selection
        self.comparison = cmp = comparison
        self.active = False
        self.ranking: pd.DataFrame | Missing | None = None
        self.node_table: pd.DataFrame | Missing | None = None
        p = cmp.param
        self.mode = pn.widgets.RadioButtonGroup.from_param(p.mode)
        lo, hi = (sel.steps[0], sel.steps[-1]) if sel.steps else (0, 1)
        self.step_a = pn.widgets.IntInput.from_param(p.step_a, width=120)
        self.step_b = pn.widgets.IntInput.from_param(p.step_b, width=120)
        self.range_a = pn.widgets.IntRangeSlider.from_param(p.range_a, start=lo, end=max(hi, lo + 1), width=300)
        self.range_b = pn.widgets.IntRangeSlider.from_param(p.range_b, start=lo, end=max(hi, lo + 1), width=300)
        self.type_a = pn.widgets.Select.from_param(p.type_a, width=140)
        self.type_b = pn.widgets.Select.from_param(p.type_b, width=140)
        self.run_b = pn.widgets.Select.from_param(p.run_b, width=220)
        self.rank_by = pn.widgets.RadioButtonGroup.from_param(p.rank_by)
        self.view = pn.widgets.Select.from_param(sel.param.view, label="View", width=140)
        self.statistic = pn.widgets.Select.from_param(sel.param.statistic, label="Statistic", width=120)
        self.summary = pn.pane.Markdown("", sizing_mode="stretch_width", margin=(0, 10))
        self.node_pane = pn.pane.DataFrame(None, float_format="{:.4g}".format, width=520)
        self.node_plot = pn.pane.HoloViews(linked_axes=False)
        number = NumberFormatter(format="0.0000")
        self.table = pn.widgets.Tabulator(
            pd.DataFrame(), disabled=True, selectable=1, show_index=False, pagination="local", page_size=20,
            sizing_mode="stretch_width", height=560, layout="fit_data_table",
            formatters={"a": number, "b": number, "change": NumberFormatter(format="+0.0000"), "relative": NumberFormatter(format="+0.0%")},
        )
        self.table.on_click(self._clicked)
        self.phase_picker = PhasePicker(sel, cmp)  # ranges from detected phases; measures ranked
        cmp.param.watch(self.refresh, ["mode", "step_a", "step_b", "range_a", "range_b", "type_a", "type_b", "run_b", "rank_by"])
        sel.param.watch(self.refresh, ["view", "statistic", "node", "step_type", "revision"])
        sel.param.watch(self._bounds, ["steps"])
        cmp.param.watch(self._visibility, ["mode"])
        self._visibility()

    def __panel__(self) -> pn.viewable.Viewable:
        controls = pn.Row(
            pn.Column(pn.pane.Markdown("**Compare**", margin=(0, 10)), self.mode),
            self.step_a, self.step_b, self.range_a, self.range_b, self.type_a, self.type_b, self.run_b,
            self.view, self.statistic, pn.Column(pn.pane.Markdown("**Rank by change**", margin=(0, 10)), self.rank_by),
            sizing_mode="stretch_width",
        )
        return pn.Column(
            controls, self.phase_picker, self.summary, pn.Row(self.node_pane, self.node_plot),
            pn.pane.Markdown("#### Every node, ranked by change (click a row to select the node)", margin=(0, 10)),
            self.table, self.phase_picker.measures_panel(), sizing_mode="stretch_width",
        )

    def activate(self, active: bool = True) -> None:
        """Start (or stop) following changes; computing while hidden would slow every selector down."""
        self.active = active
        if active:
            self.refresh()

    def _bounds(self, *_: Any) -> None:
        steps = self.selection.steps
        if steps:
            for slider in (self.range_a, self.range_b):
                slider.param.update(start=steps[0], end=max(steps[-1], steps[0] + 1))

    def _visibility(self, *_: Any) -> None:
        mode = self.comparison.mode
        self.step_a.visible = self.step_b.visible = mode == "steps"
        self.range_a.visible = mode in ("ranges", "runs")
        self.range_b.visible = mode == "ranges"
        self.type_a.visible = self.type_b.visible = mode == "step types"
        self.run_b.visible = mode == "runs"

    def refresh(self, *_: Any) -> None:
        if not self.active:
            return
        sel, cmp = self.selection, self.comparison
        side_a, side_b = cmp.sides()
        self.phase_picker.rank(side_a, side_b)
        data_a, data_b = sel.catalog.runs.get(side_a.run), sel.catalog.runs.get(side_b.run)
        paired = self._paired(data_a, side_a, side_b) if cmp.mode == "step types" else None
        if paired is not None:
            sum_a, sum_b, steps = paired
            over = f"averaged over the {len(steps)} steps where both step types have a record (the same batch and parameters)."
        else:
            sum_a, sum_b = side_summary(data_a, side_a, sel.view), side_summary(data_b, side_b, sel.view)
            over = "averaged over each side's records" + (" (the two step types share no step)." if cmp.mode == "step types" else ".")
        self.summary.object = (
            f"**A** = {safe.text(side_a.label)}  \n**B** = {safe.text(side_b.label)}  \nview **{safe.text(sel.view)}**, "
            f"statistic **{safe.text(sel.statistic)}**, {over}"
        )
        problem = next((s.message for s in (sum_a, sum_b) if isinstance(s, Missing)), None)
        if problem is not None:
            self.ranking = Missing(problem)
            self.summary.object += f"\n\n⚠ {safe.text(problem)}"
            self.table.value = pd.DataFrame({"message": [problem]})
            self.node_pane.object = None
            self.node_plot.object = plots.message(plots.wrap(problem))
            return
        yardstick = spread(data_a.run, view=sel.view, statistic=sel.statistic) if cmp.rank_by == "spread" and data_a is not None else None
        ranking = compare_nodes(sum_a, sum_b, sel.statistic, cmp.rank_by if yardstick is not None or cmp.rank_by != "spread" else "relative", yardstick)
        graph = data_a.run.graph if data_a is not None else None
        kinds = [graph.nodes[n].get("kind", "") if graph is not None and n in graph else "" for n in ranking.index]
        self.ranking = ranking
        shown = ranking.reset_index()
        shown.insert(1, "kind", kinds)
        self.table.value = shown
        self.node_table = node_comparison(sum_a, sum_b, sel.node)
        self.node_pane.object = None if isinstance(self.node_table, Missing) else self.node_table
        if isinstance(self.node_table, Missing):
            self.summary.object += f"\n\n⚠ {safe.text(self.node_table.message)}"
        self._node_plot(side_a, side_b)

    def _paired(self, data: Any, side_a: Any, side_b: Any) -> tuple[Any, Any, list[int]] | None:
        """Step-type mode: both sides over the steps where both step types have a record (an intervention
        and the normal record of its step), or None when they share no step (then each side's records)."""
        if data is None or side_a.step_type is None or side_b.step_type is None or side_a.step_type == side_b.step_type:
            return None
        view, a, b = self.selection.view, side_a.step_type, side_b.step_type
        steps = data._cached(("paired_steps", a, b), lambda: paired_steps(data.run, a, b))
        if isinstance(steps, Missing) or not steps:
            return None
        both = data._cached(("paired_stats", a, b, view), lambda: paired_stats(data.run, a, b, view=view))
        if isinstance(both, Missing):
            return both, both, steps
        return both[0], both[1], steps

    def _node_plot(self, side_a: Any, side_b: Any) -> None:
        sel = self.selection
        node = sel.node
        data_a, data_b = sel.catalog.runs.get(side_a.run), sel.catalog.runs.get(side_b.run)
        if node is None or data_a is None or data_b is None:
            return
        same_series = side_a.run == side_b.run and side_a.step_type == side_b.step_type
        hist_a = data_a.stats(node, sel.view, None, None, side_a.step_type) if data_a.has_data(node) else Missing(f"{node!r} has no data in {side_a.run!r}")
        hist_b = hist_a if same_series else (data_b.stats(node, sel.view, None, None, side_b.step_type) if data_b.has_data(node) else Missing(f"{node!r} has no data in {side_b.run!r}"))
        spans = ((side_a.first, side_a.last), (side_b.first, side_b.last)) if same_series else None
        self.node_plot.object = plots.compared_history(hist_a, hist_b, sel.statistic, ("A", "B"), spans)

    def _clicked(self, event: Any) -> None:
        ranking = self.ranking
        if not isinstance(ranking, pd.DataFrame) or event.row is None or event.row >= len(ranking):
            return
        node = self.table.value.iloc[event.row]["node"]
        if node in self.selection.param.node.objects:
            self.selection.node = node
