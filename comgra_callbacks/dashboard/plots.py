"""HoloViews elements for the views that are not on the hot path: the comparison and the scalars.

(The graph and the tensor panel, which change on every click, use persistent Bokeh figures instead; see
:mod:`~comgra_callbacks.dashboard.figures`.) Every function takes plain data and returns an element with
its options set; none reads the store.
"""

from __future__ import annotations

import holoviews as hv
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


def step_marker(step: int) -> hv.VLine:
    return hv.VLine(step).opts(color="black", line_dash="dashed", line_width=1)


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
