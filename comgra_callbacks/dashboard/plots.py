"""HoloViews elements for the tensor and comparison panels, built from the gathered data.

Every function takes plain data (DataFrames, arrays) and returns an element or overlay with its options
set; none reads the store. Dimension names are distinct per plot so that Panel does not link their axes.
"""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd

from comgra_callbacks.dashboard.data import Missing


def ensure_backend() -> None:
    """Load HoloViews' Bokeh backend once (options cannot be set before it is loaded)."""
    if hv.Store.current_backend != "bokeh" or "bokeh" not in hv.Store.loaded_backends():
        hv.extension("bokeh", logo=False)


ensure_backend()

WIDTH = 520
HEIGHT = 260
TOOLS = ["hover"]
A_COLOR, B_COLOR = "#1f77b4", "#d62728"


def message(text: str, *, height: int = HEIGHT, width: int = WIDTH) -> hv.Text:
    """An empty plot that says why there is nothing to show (a plot pane always holds a plot)."""
    return hv.Text(0.5, 0.5, text, fontsize=10).opts(
        xaxis=None, yaxis=None, width=width, height=height, toolbar=None, show_frame=False, xlim=(0, 1), ylim=(0, 1)
    )


def wrap(text: str, width: int = 70) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def history(frame: pd.DataFrame | Missing, statistic: str, title: str) -> hv.Element:
    """One statistic over all recorded steps."""
    if isinstance(frame, Missing):
        return message(wrap(frame.message))
    if statistic not in frame.columns or frame.empty:
        return message(f"no {statistic!r} recorded for this view")
    return hv.Curve((frame.index.to_numpy(), frame[statistic].to_numpy()), "step", statistic, label=statistic).opts(
        title=title, width=WIDTH, height=HEIGHT, tools=TOOLS, line_width=1.5, framewise=True, show_legend=False
    )


def step_marker(step: int) -> hv.VLine:
    return hv.VLine(step).opts(color="black", line_dash="dashed", line_width=1)


def marked(element: hv.Element, stream: hv.streams.Stream, title: str, **opts: object) -> hv.Element:
    """``element`` with a dashed line at the current step; moving the step (``stream.event(step=...)``)
    redraws only that line. A message (nothing to plot) is returned as it is."""
    if isinstance(element, hv.Text):
        return element
    overlay = element * hv.DynamicMap(step_marker, streams=[stream])
    return overlay.opts(hv.opts.Overlay(title=title, width=WIDTH, height=HEIGHT, **opts))  # type: ignore[arg-type]


def band(frame: pd.DataFrame | Missing, title: str) -> hv.Element:
    """Batch statistics over training as bands: min to max, mean ± std, and the mean."""
    if isinstance(frame, Missing):
        return message(wrap(frame.message))
    if frame.empty:
        return message("no records of this view")
    x = frame.index.to_numpy()
    mean, std = frame["mean"].to_numpy(), frame["std"].to_numpy()
    full = hv.Area((x, frame["min"].to_numpy(), frame["max"].to_numpy()), "step", ["value", "value_hi"], label="min–max")
    inner = hv.Area((x, mean - std, mean + std), "step", ["value", "value_hi"], label="mean ± std")
    line = hv.Curve((x, mean), "step", "value", label="mean")
    return (full.opts(alpha=0.2, color="gray") * inner.opts(alpha=0.35, color=A_COLOR) * line.opts(color=A_COLOR)).opts(
        title=title, width=WIDTH, height=HEIGHT, legend_position="top_left", framewise=True
    )


def ratio(series: pd.Series) -> hv.Element:
    """‖update‖ / ‖weight‖ of a parameter over training, on a log axis."""
    values = series.to_numpy()
    steps = series.index.to_numpy()
    keep = np.isfinite(values) & (values > 0)
    if not keep.any():
        return message("no update-to-weight ratio recorded")
    return hv.Curve((steps[keep], values[keep]), "step", "update_ratio").opts(
        title="‖update‖ / ‖weight‖ over training", logy=True, width=WIDTH, height=HEIGHT, tools=TOOLS, color="#2ca02c", framewise=True
    )


def neurons(frame: pd.DataFrame | Missing, statistic: str, title: str) -> hv.Element:
    """Per-neuron statistics: bars for up to 128 neurons, else a heatmap of mean / std / abs_mean."""
    if isinstance(frame, Missing):
        return message(wrap(frame.message))
    column = statistic if statistic in frame.columns else "mean"
    n = len(frame)
    if n <= 128:
        data = pd.DataFrame({"neuron": frame.index.to_numpy(), column: frame[column].to_numpy()})
        return hv.Bars(data, "neuron", column).opts(
            title=f"{title}: per-neuron {column}", width=WIDTH, height=HEIGHT, tools=TOOLS, xticks=min(n, 16), color=A_COLOR
        )
    grid = frame[["mean", "std", "abs_mean"]].to_numpy().T  # (3, neurons)
    image = hv.Image(grid[::-1], bounds=(0, 0, n, 3), kdims=["neuron", "statistic_row"], vdims=["value"])
    return image.opts(
        title=f"{title}: per-neuron mean / std / abs_mean", width=WIDTH, height=HEIGHT, cmap="RdBu_r", colorbar=True,
        tools=TOOLS, yticks=[(0.5, "abs_mean"), (1.5, "std"), (2.5, "mean")], symmetric=True,
    )


def heatmap(matrix: np.ndarray | Missing | None, title: str) -> hv.Element:
    """Raw values as a heatmap (rows top to bottom), centred colours for signed data."""
    if matrix is None:
        return message("choose the detail 'individual sample' to see raw values")
    if isinstance(matrix, Missing):
        return message(wrap(matrix.message))
    rows, cols = matrix.shape
    finite = matrix[np.isfinite(matrix)]
    signed = finite.size > 0 and finite.min() < 0 < finite.max()
    image = hv.Image(matrix[::-1].astype(np.float32), bounds=(0, 0, cols, rows), kdims=["column", "row"], vdims=["raw"])
    return image.opts(
        title=title, width=WIDTH, height=max(120, min(HEIGHT + 80, 24 * rows + 80)), cmap="RdBu_r" if signed else "viridis",
        colorbar=True, tools=TOOLS, symmetric=bool(signed),
    )


def hist(counts_edges: tuple[np.ndarray, np.ndarray] | None, title: str) -> hv.Element:
    if counts_edges is None:
        return message("a histogram needs per-neuron or sample detail")
    counts, edges = counts_edges
    return hv.Histogram((edges, counts), kdims=["bin"], vdims=["count"]).opts(
        title=title, width=WIDTH, height=HEIGHT, tools=TOOLS, color="#7f7f7f", line_color=None
    )


def compared_history(a: pd.DataFrame | Missing, b: pd.DataFrame | Missing, statistic: str, labels: tuple[str, str], spans: tuple[tuple[int, int], tuple[int, int]] | None) -> hv.Element:
    """The statistic over training for both sides: one curve with the two ranges shaded (same run and type),
    or two curves (different runs or step types)."""
    if isinstance(a, Missing):
        return message(wrap(a.message))
    curve_a = hv.Curve((a.index.to_numpy(), a[statistic].to_numpy()), "step", statistic, label=labels[0]).opts(color=A_COLOR)
    overlay = curve_a
    if spans is not None:
        for (lo, hi), color in zip(spans, (A_COLOR, B_COLOR), strict=True):
            overlay = overlay * (hv.VSpan(lo, hi).opts(color=color, alpha=0.15) if hi > lo else hv.VLine(lo).opts(color=color, line_width=2))
    elif not isinstance(b, Missing):
        overlay = overlay * hv.Curve((b.index.to_numpy(), b[statistic].to_numpy()), "step", statistic, label=labels[1]).opts(color=B_COLOR)
    return overlay.opts(title=f"{statistic} over training", width=2 * WIDTH, height=HEIGHT, legend_position="top_left", framewise=True, tools=TOOLS)
