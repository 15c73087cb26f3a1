"""Which statistics move with the loss? Rank correlations across records, as hints for a human.

The comgra paper's "Anomaly Detection" asks for hints such as "abnormally high loss goes with tensor Y being
close to zero". :func:`correlate` computes, across the recorded steps, the rank correlation between a target
(a node's statistic, or a logged scalar) and every statistic of every node in every view. A high ``|rho|`` is
a reason to look, not a cause: anything downstream of the real cause, or anything that merely drifts during
training as the loss does, correlates too. Read the list from the top and check each candidate in the graph.

>>> x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
>>> rho, p = spearman(x, x ** 3)
>>> rho, round(p, 6)
(1.0, 0.0)
>>> rho, p = spearman(x, np.array([2.0, 1.0, 4.0, 3.0, 6.0, 5.0]))
>>> round(rho, 3), round(p, 3)
(0.829, 0.042)
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pandas as pd

from comgra_callbacks.analysis.compare import stat_names
from comgra_callbacks.analysis.order import Flow
from comgra_callbacks.errors import ConfigError, NodeNotFoundError
from comgra_callbacks.store import format as fmt

Method = Literal["spearman", "pearson"]
COLUMNS = ["node", "view", "statistic", "rho", "p_value", "n"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b).

    >>> round(betainc(2.0, 3.0, 0.4), 6)  # 1 - (1-x)^4 - 4x(1-x)^3 ... = 0.5248
    0.5248
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def correlation_p_value(r: float, n: int) -> float:
    """Two-sided p-value of a correlation ``r`` from ``n`` pairs, by the t approximation
    (t = r·√((n−2)/(1−r²)) with n−2 degrees of freedom; what scipy's ``spearmanr`` uses)."""
    if n < 3 or math.isnan(r):
        return math.nan
    df = n - 2
    if abs(r) >= 1.0:
        return 0.0
    t2 = r * r * df / (1.0 - r * r)
    return betainc(0.5 * df, 0.5, df / (df + t2))


def _ranks(x: np.ndarray) -> np.ndarray:
    return pd.Series(x).rank(method="average").to_numpy()


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman's rho (ties averaged) and its two-sided p-value, over the pairs where both are finite."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    r = _pearson(_ranks(x[keep]), _ranks(y[keep]))
    return r, correlation_p_value(r, int(keep.sum()))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return math.nan if den == 0 else max(-1.0, min(1.0, float(dx @ dy) / den))


def _target_series(run: Any, target: str, view: str, statistic: str, records: pd.Index) -> pd.Series:
    """The target per record (index: record number)."""
    if target in run.nodes:
        if statistic not in stat_names(view):
            raise ConfigError(f"`correlate(statistic=...)`: expected one of {stat_names(view)} for view {view!r}, got {statistic!r}.")
        nodes, blocks = run.stats_blocks(view=view)
        if target not in nodes:
            raise NodeNotFoundError(f"`correlate(target={target!r})`: the node has no view {view!r}; it has {run.views(target)}.")
        i, s = nodes.index(target), fmt.STAT_INDEX[statistic]
        parts = [pd.Series(values[:, i, s].astype(np.float64), index=recs) for recs, values in blocks]
        return pd.concat(parts) if parts else pd.Series(dtype=np.float64)
    scalars = run.scalars
    names = sorted(set(scalars["name"]))
    if target not in names:
        raise NodeNotFoundError(
            f"`correlate(target=...)`: run {run.name!r} has no node or scalar {target!r}; scalars: {names}, nodes: {run.nodes[:8]}…"
        )
    by_step = scalars[scalars["name"] == target].groupby("step")["value"].last()
    steps = run.steps.loc[records, "step"]
    return pd.Series(by_step.reindex(steps.to_numpy()).to_numpy(dtype=np.float64), index=records)


def correlate(
    run: Any,
    target: str,
    *,
    view: str = "value",
    statistic: str = "mean",
    method: Method | str = "spearman",
) -> pd.DataFrame:
    """Across records, the correlation between ``target`` and every statistic of every node in every view.

    Args:
        run: a :class:`~comgra_callbacks.store.reader.Run`.
        target: a node name (its ``statistic`` in ``view``) or the name of a logged scalar (``run.scalars``).
        view, statistic: which series of a node target.
        method: ``"spearman"`` (rank correlation, the default: robust to spikes and monotone transforms) or
            ``"pearson"``.

    Returns:
        One row per (node, view, statistic): ``node``, ``view``, ``statistic``, ``rho``, ``p_value`` (two-sided,
        by the t approximation, not corrected for the many series tested) and ``n`` (records where both are
        finite), sorted by ``|rho|`` (ties: the node earlier in the graph first). The target node's own series
        are left out, and so are series that do not vary (no correlation is defined). These are hints for a
        human, not causes: anything downstream of a cause correlates as well.
    """
    if method not in ("spearman", "pearson"):
        raise ConfigError(f"`correlate(method=...)`: expected 'spearman' or 'pearson', got {method!r}.")
    records = run.steps.index
    goal = _target_series(run, target, view, statistic, records).reindex(records)
    ok = np.isfinite(goal.to_numpy())
    y_all = goal.to_numpy()
    y_ranked_all = _ranks(y_all[ok]) if method == "spearman" else y_all[ok]
    flow = Flow(run.graph, backward=False)
    where = {name: i for i, name in enumerate(flow.order)}
    rows: list[dict[str, Any]] = []
    views = sorted({v for n in run.nodes for v in _views(run, n)}, key=_view_rank)
    for candidate_view in views:
        nodes, blocks = run.stats_blocks(view=candidate_view)
        parts = [(recs, values) for recs, values in blocks]
        if not parts or not nodes:
            continue
        recs = np.concatenate([r for r, _ in parts])
        values = np.concatenate([v for _, v in parts]).astype(np.float64)  # (records, nodes, stats)
        frame_index = pd.Index(recs)
        align = frame_index.get_indexer(records)
        present = align >= 0
        for s_name in stat_names(candidate_view):
            s = fmt.STAT_INDEX[s_name]
            column = np.full((len(records), len(nodes)), np.nan)
            column[present] = values[align[present], :, s]
            for j, node in enumerate(nodes):
                if node == target:
                    continue
                x = column[:, j]
                both = ok & np.isfinite(x)
                n = int(both.sum())
                if n < 3:
                    continue
                if both.sum() == ok.sum():
                    xr = _ranks(x[ok]) if method == "spearman" else x[ok]
                    r = _pearson(xr, y_ranked_all)
                else:
                    xs, ys = x[both], y_all[both]
                    r = _pearson(_ranks(xs), _ranks(ys)) if method == "spearman" else _pearson(xs, ys)
                if math.isnan(r):
                    continue
                rows.append({"node": node, "view": candidate_view, "statistic": s_name, "rho": r, "p_value": correlation_p_value(r, n), "n": n})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if len(frame):
        order = np.lexsort((frame["statistic"].to_numpy(), frame["view"].map(_view_rank).to_numpy(),
                            frame["node"].map(lambda n: where.get(n, len(where))).to_numpy(), -frame["rho"].abs().to_numpy()))
        frame = frame.iloc[order].reset_index(drop=True)
    frame.attrs.update(run=run.name, target=target, view=view, statistic=statistic, method=method)
    return frame


def _views(run: Any, node: str) -> list[str]:
    try:
        return list(run.views(node))
    except NodeNotFoundError:
        return []


def _view_rank(view: str) -> tuple[int, str]:
    return {"value": (0, ""), "grad": (1, ""), "update": (3, "")}.get(view, (2, view))
