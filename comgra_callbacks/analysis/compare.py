"""Compare two selections of a run for every node: two steps, two ranges of steps, two step types, two runs.

:func:`range_stats` averages each node's batch statistics over the records of one side; :func:`compare_nodes`
joins two such summaries; :func:`compare` does both and ranks the nodes by how much a statistic changed
*relative to how much it moves over training anyway* (:func:`spread`), so that a bias that starts at 0 and a
noisy node do not push the nodes that really changed off the top.

>>> import pandas as pd
>>> a = pd.DataFrame({"abs_mean": [1.0, 2.0], "records": [3, 3]}, index=pd.Index(["h", "w"], name="node"))
>>> b = pd.DataFrame({"abs_mean": [1.5, 2.0], "records": [2, 2]}, index=pd.Index(["h", "w"], name="node"))
>>> compare_nodes(a, b, "abs_mean")[["a", "b", "change", "relative"]]  # doctest: +NORMALIZE_WHITESPACE
        a    b  change  relative
node
h     1.0  1.5     0.5       0.5
w     2.0  2.0     0.0       0.0
>>> spread_of = pd.Series({"h": 5.0, "w": 0.1})
>>> b.loc["w", "abs_mean"] = 2.2
>>> list(compare_nodes(a, b, "abs_mean", rank_by="spread", spread=spread_of).index)  # w moved 2 spreads, h 0.1
['w', 'h']
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd

from comgra_callbacks.errors import ConfigError, StepNotFoundError
from comgra_callbacks.store import format as fmt

_NUMEL = fmt.STAT_INDEX["numel"]
RankBy = Literal["spread", "relative", "change"]
RANK_BY = ("spread", "relative", "change", "absolute")  # "absolute": the dashboard's name for "change"
# A side of a comparison: one step, an inclusive (first, last) range of steps, or a step type.
Side = int | tuple[int, int] | str

SPREAD_NOTE = (
    "ranked by |change| / spread, where spread is the standard deviation of the statistic over every record "
    "of the run (so a node whose baseline is near zero does not rank first for a tiny change)"
)


def stat_names(view: str) -> list[str]:
    """The batch statistics a view has (``update_ratio`` only for ``update``)."""
    return list(fmt.STAT_NAMES) if view == "update" else [n for n in fmt.STAT_NAMES if n != "update_ratio"]


def range_stats(
    run: Any,
    first_step: int | None,
    last_step: int | None,
    *,
    view: str = "value",
    step_type: str | None = None,
) -> pd.DataFrame:
    """Mean of each batch statistic of every node over the records with ``first_step <= step <= last_step``
    (of ``step_type``; ``None`` leaves that side open): one row per node, plus the column ``records`` (how
    many records the node had in the range).

    Reads the rows between the first and the last matching record once, block by block
    (:meth:`Run.stats_blocks`); the default role and, per record, the last iteration of each node are used.
    ``first_step == last_step`` summarises a single step.

    Raises:
        StepNotFoundError: no record in the range.
    """
    nodes, blocks = run.stats_blocks(first_step, last_step, view=view, step_type=step_type)
    n_stats = len(fmt.STAT_NAMES)
    sums = np.zeros((len(nodes), n_stats), dtype=np.float64)
    counts = np.zeros((len(nodes), n_stats), dtype=np.int64)
    seen = 0
    for _, values in blocks:
        seen += len(values)
        sums += np.nansum(values, axis=0)
        counts += (~np.isnan(values)).sum(axis=0)
    if seen == 0:
        what = f" of step type {step_type!r}" if step_type else ""
        lo = "-inf" if first_step is None else first_step
        hi = "inf" if last_step is None else last_step
        raise StepNotFoundError(f"Run {run.name!r} has no record{what} with {lo} <= step <= {hi}.")
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    frame = pd.DataFrame(means, index=pd.Index(nodes, name="node"), columns=list(fmt.STAT_NAMES))[stat_names(view)]
    frame["records"] = counts[:, _NUMEL]
    frame = frame[frame["records"] > 0]
    frame.attrs.update(run=run.name, view=view, step_type=step_type, first_step=first_step, last_step=last_step)
    return frame


def spread(run: Any, *, view: str = "value", statistic: str = "abs_mean", step_type: str | None = None) -> pd.Series:
    """The standard deviation of ``statistic`` of every node over all records of the run (of ``step_type``):
    how much the statistic moves over training, the yardstick :func:`compare` ranks changes by.
    Index: node; NaN for a node with fewer than two records."""
    index = fmt.STAT_INDEX[_check_statistic(statistic, view)]
    nodes, blocks = run.stats_blocks(view=view, step_type=step_type)
    n = np.zeros(len(nodes))
    s1 = np.zeros(len(nodes))
    s2 = np.zeros(len(nodes))
    for _, values in blocks:
        column = values[:, :, index].astype(np.float64)
        finite = np.isfinite(column)
        column = np.where(finite, column, 0.0)
        n += finite.sum(axis=0)
        s1 += column.sum(axis=0)
        s2 += (column * column).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
        var = np.maximum(s2 - n * mean * mean, 0.0) / (n - 1)
    out = pd.Series(np.where(n > 1, np.sqrt(var), np.nan), index=pd.Index(nodes, name="node"), name="spread")
    return out


def compare_nodes(
    a: pd.DataFrame,
    b: pd.DataFrame,
    statistic: str,
    rank_by: RankBy | str = "relative",
    spread: pd.Series | None = None,
) -> pd.DataFrame:
    """Join two per-node summaries (:func:`range_stats`) and rank nodes by how much ``statistic`` changed.

    Columns: ``a``, ``b``, ``change`` (b − a), ``relative`` ((b − a) / |a|), ``records_a``, ``records_b``, and
    with ``spread`` given also ``spread`` and ``score`` (change / spread). ``rank_by``: ``"spread"`` (|score|,
    needs ``spread``), ``"relative"`` or ``"change"`` (alias ``"absolute"``), each by absolute value. Nodes present on one side only come
    last, with NaN on the other; ties keep name order.
    """
    if rank_by not in RANK_BY:
        raise ConfigError(f"`compare_nodes(rank_by=...)`: expected one of {list(RANK_BY)}, got {rank_by!r}.")
    if rank_by == "spread" and spread is None:
        raise ConfigError("`compare_nodes(rank_by='spread')`: needs `spread=` (see `analysis.spread`).")
    left = a[[statistic, "records"]].rename(columns={statistic: "a", "records": "records_a"})
    right = b[[statistic, "records"]].rename(columns={statistic: "b", "records": "records_b"})
    frame = left.join(right, how="outer")
    frame["change"] = frame["b"] - frame["a"]
    change = frame["change"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = frame["a"].abs().to_numpy()
        rel = np.where(scale > 0, change / np.where(scale > 0, scale, 1.0), np.where(change == 0, 0.0, np.inf))
    one_sided = (frame["a"].isna() | frame["b"].isna()).to_numpy()
    frame["relative"] = np.where(one_sided, np.nan, rel)
    columns = ["a", "b", "change", "relative", "records_a", "records_b"]
    if spread is not None:
        yardstick = spread.reindex(frame.index).to_numpy(dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(yardstick > 0, change / np.where(yardstick > 0, yardstick, 1.0), np.where(change == 0, 0.0, np.inf))
        frame["spread"] = yardstick
        frame["score"] = np.where(one_sided | np.isnan(yardstick), np.nan, score)
        columns += ["spread", "score"]
    key = frame[{"spread": "score", "relative": "relative", "change": "change", "absolute": "change"}[rank_by]].abs()
    order = np.lexsort((frame.index.to_numpy().astype(str), -key.fillna(-1).to_numpy()))
    frame = frame.iloc[order]
    frame.index.name = "node"
    return frame[columns]


def side_summary(run: Any, side: Side, *, view: str = "value") -> pd.DataFrame:
    """:func:`range_stats` of one side of a comparison: a step, a ``(first, last)`` range, or a step type."""
    if isinstance(side, str):
        return range_stats(run, None, None, view=view, step_type=side)
    if isinstance(side, tuple) and len(side) == 2:
        return range_stats(run, int(side[0]), int(side[1]), view=view)
    if isinstance(side, (int, np.integer)) and not isinstance(side, bool):
        return range_stats(run, int(side), int(side), view=view)
    raise ConfigError(f"`compare(a=..., b=...)`: expected a step (int), a (first, last) range of steps or a step type (str), got {side!r}.")


def compare(
    run: Any,
    a: Side,
    b: Side,
    *,
    view: str = "value",
    statistic: str = "abs_mean",
    run_b: Any = None,
) -> pd.DataFrame:
    """Every node's ``statistic`` on side ``a`` and side ``b``, ranked by how much it changed.

    Args:
        run: the run of side ``a`` (and of ``b`` unless ``run_b`` is given).
        a, b: a step, an inclusive ``(first, last)`` range of steps, or a step type; a side's value is the
            statistic's mean over its records.
        view: ``"value"``, ``"grad"``, ``"grad:<loss>"`` or ``"update"``.
        statistic: one of the batch statistics (``mean``, ``std``, ``abs_mean``, ``min``, ``max``, ``l2``, …).
        run_b: another run for side ``b`` (two runs compared node by node, by name).

    Returns:
        One row per node (index ``node``): ``a``, ``b``, ``change`` (b − a), ``relative`` ((b − a) / |a|),
        ``records_a``, ``records_b``, ``spread`` (the statistic's standard deviation over every record of
        ``run``) and ``score`` (change / spread). Rows are sorted by |score|: a change counts by how large it
        is against the node's own movement over training, not against its baseline, which for a bias that
        starts at zero is near zero. ``frame.attrs["ranked_by"]`` says so.
    """
    _check_statistic(statistic, view)
    other = run if run_b is None else run_b
    frame = compare_nodes(
        side_summary(run, a, view=view),
        side_summary(other, b, view=view),
        statistic,
        rank_by="spread",
        spread=spread(run, view=view, statistic=statistic),
    )
    frame.attrs.update(run=run.name, run_b=other.name, view=view, statistic=statistic, a=a, b=b, ranked_by=SPREAD_NOTE)
    return frame


def _check_statistic(statistic: str, view: str) -> str:
    names = stat_names(view)
    if statistic not in names:
        raise ConfigError(f"`statistic`: expected one of {names} for view {view!r}, got {statistic!r}.")
    return statistic
