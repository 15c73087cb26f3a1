"""The Compare tab's phase part: its two ranges set from the detected phases of a series (test accuracy, a
loss, any measure), and the run's measures ranked by how they changed between the two sides.

Kept apart from :mod:`~comgra_callbacks.dashboard.compare_view` (which builds the node comparison): the tab
holds one :class:`PhasePicker` and calls :meth:`PhasePicker.rank` with its two sides after each refresh.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import panel as pn
from bokeh.models.widgets.tables import NumberFormatter
from panel.viewable import Viewer

from comgra_callbacks.dashboard import safe
from comgra_callbacks.dashboard.state import Comparison, Selection, Side
from comgra_callbacks.dashboard.tabs import NO_PHASES, PHASE_COUNTS, detect_phases, series_table

MANUAL = "(set by hand)"


class PhasePicker(Viewer):
    """Select a series, then a phase for side A and one for side B: the comparison's ranges follow."""

    def __init__(self, selection: Selection, comparison: Comparison, **params: Any) -> None:
        super().__init__(**params)
        self.selection, self.comparison = selection, comparison
        self.series_of = pn.widgets.Select(label="Ranges from the phases of", options=[NO_PHASES], value=NO_PHASES, width=240)
        self.phase_count = pn.widgets.Select(label="Phases", options=PHASE_COUNTS, value=0, width=80)
        self.phase_a = pn.widgets.Select(label="Phase A", options=[MANUAL], value=MANUAL, width=200)
        self.phase_b = pn.widgets.Select(label="Phase B", options=[MANUAL], value=MANUAL, width=200)
        number = NumberFormatter(format="0.0000")
        self.table = pn.widgets.Tabulator(
            pd.DataFrame(), disabled=True, show_index=False, sizing_mode="stretch_width", height=260, layout="fit_data_table",
            formatters={"a": number, "b": number, "change": NumberFormatter(format="+0.0000"), "score": NumberFormatter(format="+0.00")},
        )
        self.caption = pn.pane.Markdown("", margin=(0, 10))
        self.phases: pd.DataFrame | None = None
        self.ranking: pd.DataFrame | None = None
        selection.param.watch(self._options, ["run", "revision"])
        self.series_of.param.watch(self._detect, ["value"])
        self.phase_count.param.watch(self._detect, ["value"])
        self.phase_a.param.watch(self._apply, ["value"])
        self.phase_b.param.watch(self._apply, ["value"])
        self._options()

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Row(self.series_of, self.phase_count, self.phase_a, self.phase_b, sizing_mode="stretch_width")

    def measures_panel(self) -> pn.viewable.Viewable:
        """The ranked measures (shown under the node ranking)."""
        return pn.Column(pn.pane.Markdown("#### Measures, ranked by change against their spread over training", margin=(0, 10)), self.caption, self.table, sizing_mode="stretch_width")

    def _options(self, *_: Any) -> None:
        data = self.selection.data
        names = list(series_table(data.run)) if data is not None else []
        keep = self.series_of.value if self.series_of.value in names else NO_PHASES
        self.series_of.param.update(options=[NO_PHASES, *names], value=keep)

    def _detect(self, *_: Any) -> None:
        """Find the phases of the chosen series; side A gets the first, side B the last."""
        data = self.selection.data
        name = self.series_of.value
        series = series_table(data.run).get(name) if data is not None and name != NO_PHASES else None
        found = detect_phases(series, int(self.phase_count.value or 0))
        self.phases = found
        if found is None:
            self.phase_a.param.update(options=[MANUAL], value=MANUAL)
            self.phase_b.param.update(options=[MANUAL], value=MANUAL)
            return
        labels = {f"{i}: steps {int(r.first_step)}–{int(r.last_step)}": i for i, r in enumerate(found.itertuples())}
        options = {MANUAL: -1, **labels}
        self.phase_a.param.update(options=options, value=0)
        self.phase_b.param.update(options=options, value=len(found) - 1)
        self._apply()

    def _apply(self, *_: Any) -> None:
        found = self.phases
        a, b = self.phase_a.value, self.phase_b.value
        if found is None or not isinstance(a, int) or not isinstance(b, int) or not (0 <= a < len(found) and 0 <= b < len(found)):
            return  # "(set by hand)", or a phase of the previous detection while the options change
        span = lambda i: (int(found.iloc[i]["first_step"]), int(found.iloc[i]["last_step"]))  # noqa: E731
        self.comparison.param.update(mode="ranges", range_a=span(a), range_b=span(b))

    def rank(self, side_a: Side, side_b: Side) -> None:
        """Rank the measures of side A's run between the two sides (``analysis.compare_measures``)."""
        from comgra_callbacks.analysis import compare_measures

        runs = self.selection.catalog.runs
        data_a, data_b = runs.get(side_a.run), runs.get(side_b.run)
        if data_a is None or data_b is None:
            return
        ranking = compare_measures(data_a.run, (side_a.first, side_a.last), (side_b.first, side_b.last), run_b=None if side_b.run == side_a.run else data_b.run)
        self.ranking = ranking
        if ranking.empty:
            self.caption.object = "This run has no measures (`ComgraCallback(measures=...)`, or `analysis.derive`)."
        else:
            self.caption.object = f"A = {safe.text(side_a.label)}, B = {safe.text(side_b.label)}; mean of each measure over each side's steps."
        self.table.value = ranking.reset_index()
