"""Phases of training: the change points of a series (test accuracy, excluded loss, a weight norm) that split
training into stretches of one behaviour each, found by an exact optimal segmentation.

The series is fitted by ``n`` segments, each a straight line (``fit="linear"``, the default: a plateau, a rise
and a plateau are three phases) or a constant (``fit="constant"``); dynamic programming finds the boundaries
that minimise the total squared error, exactly. Numpy only, deterministic (ties go to the earliest boundary).

>>> import numpy as np, pandas as pd
>>> steps = np.arange(0, 300, 10)
>>> acc = pd.Series(np.r_[np.full(10, 0.3), np.linspace(0.3, 1.0, 10), np.full(10, 1.0)], index=steps)
>>> phases(acc)[["first_step", "last_step"]].values.tolist()
[[0, 90], [100, 190], [200, 290]]
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pandas as pd

from comgra_callbacks.errors import ConfigError, ConfigTypeError

MAX_POINTS = 1000  # longer series are averaged in consecutive bins first (the segmentation is O(points^2))
Fit = Literal["linear", "constant"]


def phases(
    series: Any,
    *,
    n: int | None = None,
    fit: Fit = "linear",
    max_phases: int = 6,
    min_size: int | None = None,
) -> pd.DataFrame:
    """Split a series into phases at its change points.

    Args:
        series: a ``pandas.Series`` indexed by step (``run.measures["test"]``, ``run.stats(node)["l2"]``), or
            a 1-D array (steps are then the positions 0, 1, ...). NaNs are dropped.
        n: the number of phases; ``None`` chooses it by the Bayesian information criterion: the ``k`` in
            ``1 .. max_phases`` minimising ``m * log(RSS_k / m) + q * k * log(m)`` (``m`` points, ``RSS_k`` the
            squared error of the best ``k``-segment fit, ``q`` = 3 parameters per linear segment: slope,
            intercept, its boundary; 2 for a constant). A drop of the error must outweigh ``q * log(m)``.
        fit: ``"linear"`` (a line per phase) or ``"constant"`` (a level per phase).
        max_phases: the largest ``n`` considered when ``n`` is None.
        min_size: the fewest points a phase has (default 3 for lines, 2 for constants).

    Returns:
        One row per phase (index ``phase``, 0, 1, ...): ``first_step``, ``last_step``, ``points``, ``mean``,
        ``start`` and ``end`` (the fitted value at the first and last step), ``slope`` (per step). The change
        points are ``first_step`` of the phases after the first (also ``frame.attrs["change_points"]``).

    Raises:
        ConfigError: a bad argument, or fewer points than ``n * min_size``.
    """
    steps, values = _points(series)
    fit = _check(fit, n, max_phases, min_size)
    size = min_size if min_size is not None else (3 if fit == "linear" else 2)
    if n is not None and len(values) < n * size:
        raise ConfigError(f"`phases(n={n})`: expected at least n * min_size = {n * size} points, got {len(values)}.")
    if len(values) < size:
        raise ConfigError(f"`phases(series=...)`: expected at least {size} finite points, got {len(values)}.")
    first_index, x, y = _bin(steps, values)
    top = n if n is not None else max(1, min(max_phases, len(y) // size))
    cost = _segment_costs(x, y, fit, size)
    bounds_by_k = _segmentations(cost, top)
    if n is None:
        k = _choose(bounds_by_k, cost, len(y), 3 if fit == "linear" else 2)
    else:
        k = n
        if k not in bounds_by_k:
            raise ConfigError(f"`phases(n={n})`: the series of {len(values)} points cannot be split into {n} phases of at least {size} points.")
    starts = [first_index[b] for b in bounds_by_k[k]] + [len(values)]
    return _describe(steps, values, starts, fit)


def _points(series: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(series, pd.DataFrame):
        raise ConfigTypeError(f"`phases(series=...)`: expected one series, got a DataFrame with columns {list(series.columns)[:6]}. HINT: phases(run.measures['test']).")
    if isinstance(series, pd.Series):
        steps, values = np.asarray(series.index, dtype=np.float64), np.asarray(series.to_numpy(), dtype=np.float64)
    else:
        try:
            values = np.asarray(series, dtype=np.float64)
        except (TypeError, ValueError):
            raise ConfigTypeError(f"`phases(series=...)`: expected a pandas Series indexed by step or a 1-D array of numbers, got {type(series).__name__}.") from None
        if values.ndim != 1:
            raise ConfigError(f"`phases(series=...)`: expected a 1-D series, got shape {list(values.shape)}.")
        steps = np.arange(len(values), dtype=np.float64)
    keep = np.isfinite(values) & np.isfinite(steps)
    steps, values = steps[keep], values[keep]
    order = np.argsort(steps, kind="stable")
    return steps[order], values[order]


def _check(fit: Any, n: Any, max_phases: Any, min_size: Any) -> Fit:
    if fit not in ("linear", "constant"):
        raise ConfigError(f"`phases(fit=...)`: expected 'linear' or 'constant', got {fit!r}.")
    for name, value in (("n", n), ("max_phases", max_phases), ("min_size", min_size)):
        if value is None and name != "max_phases":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"`phases({name}=...)`: expected a positive int{' or None' if name != 'max_phases' else ''}, got {value!r}.")
    return fit


def _bin(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At most MAX_POINTS points: consecutive bins averaged. Returns each point's first original index and the
    (scaled) coordinates the segmentation runs on."""
    m = len(values)
    if m > MAX_POINTS:
        edges = np.linspace(0, m, MAX_POINTS + 1).astype(np.int64)
        first = edges[:-1]
        x = np.add.reduceat(steps, first) / np.diff(edges)
        y = np.add.reduceat(values, first) / np.diff(edges)
    else:
        first, x, y = np.arange(m), steps, values
    span = float(x[-1] - x[0]) or 1.0
    scale = float(np.std(y)) or 1.0
    return first, (x - x[0]) / span, (y - float(np.mean(y))) / scale


def _segment_costs(x: np.ndarray, y: np.ndarray, fit: Fit, size: int) -> np.ndarray:
    """``cost[i, j]``: the squared error of the best fit to points ``i .. j-1`` (inf when shorter than ``size``)."""
    m = len(x)

    def prefix(a: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(a)])

    sx, sy, sxx, sxy, syy = (prefix(a) for a in (x, y, x * x, x * y, y * y))
    i, j = np.meshgrid(np.arange(m + 1), np.arange(m + 1), indexing="ij")
    count = (j - i).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cx, cy = sx[j] - sx[i], sy[j] - sy[i]
        vyy = syy[j] - syy[i] - cy * cy / count
        if fit == "linear":
            vxx = sxx[j] - sxx[i] - cx * cx / count
            vxy = sxy[j] - sxy[i] - cx * cy / count
            rss = np.where(vxx > 1e-15, vyy - vxy * vxy / np.where(vxx > 1e-15, vxx, 1.0), vyy)
        else:
            rss = vyy
    rss = np.maximum(np.nan_to_num(rss, nan=np.inf), 0.0)
    rss[count < size] = np.inf
    return rss


def _segmentations(cost: np.ndarray, top: int) -> dict[int, list[int]]:
    """The optimal first indices of the segments for every number of segments ``1 .. top`` that fits."""
    m = cost.shape[0] - 1
    best = cost[0].copy()  # best[j]: the error of points 0 .. j-1 in k segments
    back: list[np.ndarray] = []
    out: dict[int, list[int]] = {}
    if np.isfinite(best[m]):
        out[1] = [0]
    for k in range(2, top + 1):
        total = best[:, None] + cost  # [i, j]: k-1 segments up to i, then one from i to j
        arg = np.argmin(total, axis=0)  # the earliest i on ties
        best = total[arg, np.arange(m + 1)]
        back.append(arg)
        if not np.isfinite(best[m]):
            continue
        starts, j = [], m
        for arr in reversed(back):  # the start of the last segment, then of the one before, ...
            j = int(arr[j])
            starts.append(j)
        out[k] = [0] + starts[::-1]
    return out


def _total(cost: np.ndarray, starts: list[int]) -> float:
    ends = starts[1:] + [cost.shape[0] - 1]
    return float(sum(cost[a, b] for a, b in zip(starts, ends)))


def _choose(bounds_by_k: dict[int, list[int]], cost: np.ndarray, m: int, per_segment: int) -> int:
    """The number of phases with the lowest BIC (the error floored, so an exact fit does not score -inf)."""
    floor = 1e-9 * m  # the series is scaled to unit variance: this is far below any noise
    scores = {k: m * math.log(max(_total(cost, starts), floor) / m) + per_segment * k * math.log(m) for k, starts in bounds_by_k.items()}
    return min(scores, key=lambda k: (scores[k], k))


def _describe(steps: np.ndarray, values: np.ndarray, starts: list[int], fit: Fit) -> pd.DataFrame:
    rows = []
    for a, b in zip(starts[:-1], starts[1:]):
        x, y = steps[a:b], values[a:b]
        if fit == "linear" and len(x) > 1 and np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
        else:
            slope, intercept = 0.0, float(np.mean(y))
        rows.append(
            {
                "first_step": int(x[0]),
                "last_step": int(x[-1]),
                "points": int(b - a),
                "mean": float(np.mean(y)),
                "start": float(intercept + slope * x[0]),
                "end": float(intercept + slope * x[-1]),
                "slope": float(slope),
            }
        )
    frame = pd.DataFrame(rows)
    frame.index.name = "phase"
    frame.attrs["change_points"] = [int(v) for v in frame["first_step"].iloc[1:]]
    return frame


def compare_measures(run: Any, a: int | tuple[int, int], b: int | tuple[int, int], *, run_b: Any = None) -> pd.DataFrame:
    """The measures of a run (``run.measures``) on two steps or step ranges (e.g. two phases), ranked by how
    much they changed against how much they move over training anyway.

    Args:
        run: the run (side ``a``, and side ``b`` unless ``run_b`` is given).
        a, b: a step or an inclusive range ``(first, last)`` of steps; a side's value is the mean of the
            measure's values at the steps in it.
        run_b: take side ``b`` from another run (matched by measure name).

    Returns:
        One row per measure present on both sides (index ``measure``): ``a``, ``b``, ``change`` (``b - a``),
        ``relative`` (``change / |a|``), ``spread`` (the measure's standard deviation over all of ``run``) and
        ``score`` (``change / spread``), sorted by ``|score|``, largest first. Empty when there are no measures.

    >>> class Fake:
    ...     measures = pd.DataFrame({"acc": [0.3, 0.3, 1.0, 1.0], "norm": [5.0, 4.9, 4.8, 4.7]}, index=pd.Index([0, 1, 2, 3], name="step"))
    >>> compare_measures(Fake(), (0, 1), (2, 3))[["a", "b", "change"]]  # doctest: +NORMALIZE_WHITESPACE
                a     b  change
    measure
    acc      0.30  1.00     0.7
    norm     4.95  4.75    -0.2
    """
    frame_a = run.measures
    frame_b = frame_a if run_b is None else run_b.measures
    mean_a, mean_b = _side_mean(frame_a, a, "a"), _side_mean(frame_b, b, "b")
    names = [c for c in frame_a.columns if c in mean_b.index]
    out = pd.DataFrame({"a": mean_a.reindex(names), "b": mean_b.reindex(names)})
    out["change"] = out["b"] - out["a"]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["relative"] = out["change"] / out["a"].abs()
        out["spread"] = frame_a[names].std(ddof=0) if names else pd.Series(dtype="float64")
        out["score"] = out["change"] / out["spread"].where(out["spread"] > 0)
    out = out.reindex(out["score"].abs().fillna(-1).sort_values(ascending=False, kind="stable").index)
    out.index.name = "measure"
    return out


def _side_mean(frame: pd.DataFrame, side: Any, which: str) -> pd.Series:
    if isinstance(side, (int, np.integer)) and not isinstance(side, bool):
        first, last = int(side), int(side)
    elif isinstance(side, (tuple, list)) and len(side) == 2 and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in side):
        first, last = int(side[0]), int(side[1])
    else:
        raise ConfigTypeError(f"`compare_measures({which}=...)`: expected a step or an inclusive range (first, last) of steps, got {side!r}.")
    steps = frame.index.to_numpy()
    return frame[(steps >= first) & (steps <= last)].mean()
