"""Bokeh figures that stay on the page and only get new data: the hot path of the tensor panel.

Every selector change updates these figures in place (``source.data = ...``, a title, a marker) instead of
building new plots: that costs well under a millisecond on the server, where rebuilding a HoloViews plot
costs 100–300 ms (measured in ``benchmarks/dashboard_bench.py``; see docs/benchmarks.md). Each class owns
one figure; ``message(text)`` empties it and says why there is nothing to show.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import panel as pn
from bokeh.models import ColumnDataSource, HoverTool, LinearColorMapper
from bokeh.models.annotations import ColorBar, Label, Span, Title
from bokeh.palettes import RdBu11, Viridis256
from bokeh.plotting import figure

WIDTH, HEIGHT = 520, 260
A_COLOR, B_COLOR, GREY = "#1f77b4", "#d62728", "#7f7f7f"
DIVERGING = list(RdBu11)  # Bokeh orders it blue (low) to red (high)


class Figure:
    """A figure with a message label and a dashed marker at the current step (hidden unless used)."""

    def __init__(
        self, title: str = "", *, x_label: str = "", y_label: str = "", height: int = HEIGHT, width: int = WIDTH,
        tooltips: list[tuple[str, str]] | None = None, y_axis_type: Literal["linear", "log"] = "linear",
    ) -> None:
        self.figure = figure(
            width=width, height=height, title=title, tools="pan,wheel_zoom,box_zoom,reset,save",
            toolbar_location="right", x_axis_label=x_label, y_axis_label=y_label, y_axis_type=y_axis_type,
        )
        self.figure.toolbar.logo = None
        if tooltips:
            self.figure.add_tools(HoverTool(tooltips=tooltips))
        self.label = Label(x=10, y=10, x_units="screen", y_units="screen", text="", text_font_size="10pt", text_color="#555555", visible=False)
        self.figure.add_layout(self.label)
        self.marker = Span(location=0, dimension="height", line_color="black", line_dash="dashed", line_width=1, visible=False)
        self.figure.add_layout(self.marker)
        self.sources: list[ColumnDataSource] = []
        self.pane = pn.pane.Bokeh(self.figure, margin=(5, 10))
        # Show / hide this container, never the Bokeh pane: the pane copies `visible` back from the figure.
        self.box = pn.Column(self.pane, margin=0)

    @property
    def message_text(self) -> str:
        return str(self.label.text) if self.label.visible else ""

    def source(self, **columns: Any) -> ColumnDataSource:
        src = ColumnDataSource(columns)
        self.sources.append(src)
        return src

    def message(self, text: str, title: str | None = None) -> None:
        """Empty the figure and show ``text`` instead (nothing is sent to the browser if it already does)."""
        text = _wrap(text)
        if self.label.visible and self.label.text == text and (title is None or self._title_text() == title):
            return
        for src in self.sources:
            src.data = {key: [] for key in src.data}
        self.label.text = text
        self.label.visible = True
        self.marker.visible = False
        if title is not None:
            self._title(title)

    def shown(self, title: str) -> None:
        if self.label.visible:
            self.label.visible = False
        self._title(title)

    def _title(self, text: str) -> None:
        title = self.figure.title
        if isinstance(title, Title) and title.text != text:
            title.text = text

    def _title_text(self) -> str:
        title = self.figure.title
        return str(title.text) if isinstance(title, Title) else ""

    def mark(self, step: int | None) -> None:
        visible = step is not None and not self.label.visible
        if self.marker.visible != visible:
            self.marker.visible = visible
        if step is not None and self.marker.location != step:
            self.marker.location = step


def _wrap(text: str, width: int = 70) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


class LineFigure(Figure):
    """One statistic over training (a line), with the current step marked."""

    def __init__(self, title: str = "", *, y_label: str = "", color: str = A_COLOR, log: bool = False) -> None:
        super().__init__(title, x_label="step", y_label=y_label, tooltips=[("step", "@x"), ("value", "@y{0.0000g}")], y_axis_type="log" if log else "linear")
        self.src = self.source(x=[], y=[])
        self.figure.line("x", "y", source=self.src, color=color, line_width=1.5)

    def set(self, x: np.ndarray, y: np.ndarray, title: str, y_label: str | None = None) -> None:
        self.src.data = {"x": np.asarray(x), "y": np.asarray(y, dtype=np.float64)}
        if y_label is not None:
            self.figure.yaxis.axis_label = y_label
        self.shown(title)


class BandFigure(Figure):
    """Batch statistics over training: min to max, mean ± std, and the mean."""

    def __init__(self) -> None:
        super().__init__(x_label="step", y_label="value", tooltips=[("step", "@x"), ("mean", "@mean{0.0000g}"), ("std", "@std{0.0000g}"), ("min", "@lo{0.0000g}"), ("max", "@hi{0.0000g}")])
        self.src = self.source(x=[], lo=[], hi=[], mean=[], std=[], inner_lo=[], inner_hi=[])
        fig = self.figure
        fig.varea("x", "lo", "hi", source=self.src, fill_color=GREY, fill_alpha=0.2, legend_label="min–max")
        fig.varea("x", "inner_lo", "inner_hi", source=self.src, fill_color=A_COLOR, fill_alpha=0.3, legend_label="mean ± std")
        fig.line("x", "mean", source=self.src, color=A_COLOR, line_width=1.5, legend_label="mean")
        fig.legend.location = "top_left"
        fig.legend.background_fill_alpha = 0.6

    def set(self, frame: Any, title: str) -> None:
        mean, std = frame["mean"].to_numpy(), frame["std"].to_numpy()
        self.src.data = {
            "x": frame.index.to_numpy(), "lo": frame["min"].to_numpy(), "hi": frame["max"].to_numpy(),
            "mean": mean, "std": std, "inner_lo": mean - std, "inner_hi": mean + std,
        }
        self.shown(title)


class BarFigure(Figure):
    """Per-neuron values as bars."""

    def __init__(self) -> None:
        super().__init__(x_label="neuron", tooltips=[("neuron", "@x"), ("value", "@top{0.0000g}")])
        self.src = self.source(x=[], top=[])
        self.figure.vbar(x="x", top="top", width=0.8, source=self.src, color=A_COLOR)

    def set(self, values: np.ndarray, title: str, y_label: str) -> None:
        self.src.data = {"x": np.arange(len(values)), "top": np.asarray(values, dtype=np.float64)}
        self.figure.yaxis.axis_label = y_label
        self.shown(title)


class HeatmapFigure(Figure):
    """A matrix as an image: rows top to bottom, a diverging palette centred on 0 for signed data."""

    def __init__(self, *, x_label: str = "column", y_label: str = "row") -> None:
        super().__init__(x_label=x_label, y_label=y_label, height=HEIGHT + 40, tooltips=[("x", "$x{0}"), ("y", "$y{0}"), ("value", "@image{0.0000g}")])
        self.mapper = LinearColorMapper(palette=Viridis256, nan_color="#dddddd")
        self.src = self.source(image=[], dw=[], dh=[])
        self.figure.image(image="image", x=0, y=0, dw="dw", dh="dh", source=self.src, color_mapper=self.mapper)  # type: ignore[call-arg]
        self.figure.add_layout(ColorBar(color_mapper=self.mapper, width=10), "right")
        for rng in (self.figure.x_range, self.figure.y_range):
            rng.update(range_padding=0)

    def set(self, matrix: np.ndarray, title: str, y_ticks: dict[float, str] | None = None) -> None:
        rows, cols = matrix.shape
        finite = matrix[np.isfinite(matrix)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo < 0 < hi:
            bound = max(-lo, hi)
            self.mapper.update(palette=DIVERGING, low=-bound, high=bound)
        else:
            self.mapper.update(palette=Viridis256, low=lo, high=hi if hi > lo else lo + 1)
        self.src.data = {"image": [np.ascontiguousarray(matrix[::-1], dtype=np.float32)], "dw": [cols], "dh": [rows]}
        if y_ticks:
            self.figure.yaxis.ticker = list(y_ticks)
            overrides: dict[Any, Any] = dict(y_ticks)
            self.figure.yaxis.major_label_overrides = overrides
        self.shown(title)


class HistFigure(Figure):
    """A histogram (counts per bin)."""

    def __init__(self) -> None:
        super().__init__(x_label="value", y_label="count", tooltips=[("from", "@left{0.0000g}"), ("to", "@right{0.0000g}"), ("count", "@top")])
        self.src = self.source(left=[], right=[], top=[])
        self.figure.quad(left="left", right="right", bottom=0, top="top", source=self.src, color=GREY, line_color="white")

    def set(self, counts: np.ndarray, edges: np.ndarray, title: str) -> None:
        self.src.data = {"left": edges[:-1], "right": edges[1:], "top": counts}
        self.shown(title)
