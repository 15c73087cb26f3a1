"""Where did it start? Follow a NaN, an infinity or an outlier sample back through the dependency graph.

This is the comgra paper's recipe ("Tracing the Origins of NaNs and Extreme Values") as a function: at each
node, in dependency order, look at whether it holds non-finite values and how far a sample's values lie from
the rest of the batch; the *origin* is an anomalous node none of whose ancestors is anomalous.

How far a sample lies from its batch (``z``): the largest ``|value - mean| / std`` over the sample's
elements, where ``mean`` and ``std`` are those of the *rest of the batch* at that node, computed exactly from
the node's recorded batch statistics (count, mean and L2 norm, over the finite elements) with the sample's own
elements taken out. Leaving the sample out matters: a sample scaled ×1000 inflates the batch's std so much
that, measured against the whole batch, it looks no more unusual than one scaled ×20 (its z stops growing
with the factor, at about √(batch size) times its own largest-to-typical element ratio).
Needs the node's samples (``detail="samples"``, or a step a trigger kept); parameters, scalars and nodes
without samples get NaN.

>>> import numpy as np
>>> batch = np.array([[1.0, -1.0], [0.5, -0.5], [100.0, 0.0], [0.0, 1.0]])
>>> n, mean, l2 = batch.size, batch.mean(), float(np.sqrt((batch ** 2).sum()))
>>> round(sample_z(batch[2], n, mean, l2), 1), round(sample_z(batch[0], n, mean, l2), 1)
(122.3, 0.4)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from comgra_callbacks.analysis.order import Flow, is_gradient
from comgra_callbacks.errors import ConfigError, NodeNotFoundError, StepNotFoundError

Z_THRESHOLD = 6.0
"""Default ``threshold`` of :func:`trace`: a sample is an outlier at a node when some element of it lies more
than this many standard deviations of the rest of the batch from the rest's mean (Chebyshev: at most 1/36 of
any distribution lies that far out; in the tiny models of the tests normal samples stay below about 4)."""

COLUMNS = ["node", "kind", "nan_count", "inf_count", "z", "sample", "anomalous", "origin"]


def sample_z(values: np.ndarray, batch_count: float, batch_mean: float, batch_l2: float) -> float:
    """The largest ``|value - mean| / std`` over one sample's finite elements, against the rest of its batch.

    ``batch_count`` / ``batch_mean`` / ``batch_l2``: the number, mean and L2 norm of the batch's finite
    elements (the stored statistics ``numel - nan_count - inf_count``, ``mean``, ``l2``). Falls back to the whole
    batch when the rest has fewer than two elements or no spread left; NaN without finite elements.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0 or not math.isfinite(batch_mean) or not math.isfinite(batch_l2):
        return math.nan
    total, squares = batch_mean * batch_count, batch_l2 * batch_l2
    n = batch_count - v.size
    mean = var = math.nan
    if n >= 2:
        mean = (total - float(v.sum())) / n
        var = (squares - float(v @ v) - n * mean * mean) / (n - 1)
    if not var > 1e-12 * max(squares / batch_count, 1e-30):
        mean = batch_mean
        var = (squares - batch_count * mean * mean) / max(batch_count - 1, 1)
    worst = float(np.max(np.abs(v - mean)))
    if not var > 0:
        return 0.0 if worst == 0 else math.inf
    return worst / math.sqrt(var)


def sample_positions(run: Any, step: int, step_type: str | None, count: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Batch positions of the ``count`` samples recorded at a step, and their dataset indices when recorded.

    Positions come from the node ``sample_index`` when a selector chose the samples, else they are the first
    ``count`` positions; dataset indices from ``sample_dataset_index`` (``Indices`` selector), else None.
    """
    def read(node: str) -> np.ndarray | None:
        if node not in run.nodes:  # cheap: the error path would look for similar names
            return None
        try:
            index = np.asarray(run.samples(node, step, step_type=step_type)).reshape(-1).astype(np.int64)
        except (NodeNotFoundError, StepNotFoundError):
            return None
        return index if len(index) == count else None

    positions = read("sample_index")
    return (np.arange(count) if positions is None else positions), read("sample_dataset_index")


def _node_z(run: Any, node: str, kind: str, row: pd.Series, step: int, step_type: str, view: str, sample: int | None) -> tuple[float, float]:
    """(z, batch position) of ``sample`` (or of the most distant recorded sample) at one node."""
    if kind == "parameter" or view == "update":
        return math.nan, math.nan
    try:
        values = np.asarray(run.samples(node, step, view=view, step_type=step_type))
    except (NodeNotFoundError, StepNotFoundError):
        return math.nan, math.nan
    if values.ndim == 0 or len(values) == 0 or values.dtype == np.bool_:
        return math.nan, math.nan
    count = float(row["numel"] - row["nan_count"] - row["inf_count"])
    positions, _ = sample_positions(run, step, step_type, len(values))
    picks = range(len(values)) if sample is None else [i for i, p in enumerate(positions) if p == sample]
    best, where = math.nan, math.nan
    for i in picks:
        z = sample_z(values[i], count, float(row["mean"]), float(row["l2"]))
        if not math.isnan(z) and (math.isnan(best) or z > best):
            best, where = z, float(positions[i])
    return best, where


def trace(
    run: Any,
    step: int,
    *,
    step_type: str | None = None,
    view: str = "value",
    sample: int | None = None,
    threshold: float = Z_THRESHOLD,
) -> pd.DataFrame:
    """Every node at one step, in the order the view flows, with how anomalous it is and where it started.

    Args:
        run: a :class:`~comgra_callbacks.store.reader.Run`.
        step: the step (one record of it; pass ``step_type`` when the step has several).
        view: ``"value"`` (order: inputs to losses), ``"grad"`` / ``"grad:<loss>"`` (order: losses back to
            inputs, the way gradients flow) or ``"update"``.
        sample: a batch position to follow; without it each node reports its most distant recorded sample.
        threshold: the ``z`` above which a node is an outlier (default :data:`Z_THRESHOLD`).

    Returns:
        One row per node recorded at that step in that view: ``node``, ``kind``, ``nan_count``,
        ``inf_count``, ``z`` (see the module docstring), ``sample`` (the batch position ``z`` belongs to),
        ``anomalous`` and ``origin`` (anomalous, and no node it depends on is). When any node holds a NaN or
        an infinity, *anomalous* means non-finite (the origin is the earliest node that holds one); otherwise
        it means ``z > threshold``. ``frame.attrs["mode"]`` is ``"non-finite"`` or ``"outlier"``.

    Raises:
        StepNotFoundError: no such record, or ``sample`` was not recorded at any node.
    """
    if not threshold > 0:
        raise ConfigError(f"`trace(threshold=...)`: expected a positive number, got {threshold!r}.")
    record = run.record_of(step, step_type=step_type)
    kept_type = str(run.steps.at[record, "step_type"])
    stats = run.step_stats(step, view=view, step_type=kept_type)
    try:
        graph = run.graph_for(kept_type)
    except NodeNotFoundError:
        graph = run.graph
    missing = [name for name in stats.index if name not in graph]
    if missing:  # recorded, but not in this step type's graph: order them by name, after what they follow
        graph = graph.copy()
        graph.add_nodes_from(missing, kind="intermediate")
    flow = Flow(graph, backward=is_gradient(view))
    names = [n for n in flow.order if n in stats.index]
    rows = []
    for name in names:
        row = stats.loc[name]
        kind = str(graph.nodes[name].get("kind") or "intermediate")
        z, where = _node_z(run, name, kind, row, step, kept_type, view, sample)
        rows.append({"node": name, "kind": kind, "nan_count": int(row["nan_count"]), "inf_count": int(row["inf_count"]), "z": z, "sample": where})
    frame = pd.DataFrame(rows, columns=COLUMNS[:6])
    if sample is not None and len(frame) and frame["sample"].isna().all():
        raise StepNotFoundError(f"`trace(sample={sample!r})`: batch position {sample} has no recorded samples at step {step} of run {run.name!r}.")
    nonfinite = (frame["nan_count"] + frame["inf_count"]) > 0
    mode = "non-finite" if nonfinite.any() else "outlier"
    anomalous = nonfinite if mode == "non-finite" else frame["z"].fillna(0.0) > threshold
    frame["anomalous"] = anomalous.to_numpy(dtype=bool)
    flagged = set(frame.loc[frame["anomalous"], "node"])
    frame["origin"] = [bool(a) and not (flow.before(n) & flagged) for n, a in zip(frame["node"], frame["anomalous"], strict=True)]
    frame.attrs.update(run=run.name, step=int(step), step_type=kept_type, view=view, sample=sample, threshold=threshold, mode=mode)
    return frame


def first_anomaly(run: Any, *, view: str = "value") -> dict[str, Any] | None:
    """The first recorded step holding a NaN or an infinity in ``view``, and where it started.

    Reads ``nan_count`` / ``inf_count`` of every node over all records once, block by block, then
    :func:`trace` of that one step.

    Returns:
        None when every recorded value is finite; else ``{"step", "step_type", "reason", "origin": [node, ...],
        "nonfinite": [node, ...]}`` (``reason``: why the record was kept, e.g. the trigger).
    """
    from comgra_callbacks.store import format as fmt

    nan_i, inf_i = fmt.STAT_INDEX["nan_count"], fmt.STAT_INDEX["inf_count"]
    _, blocks = run.stats_blocks(view=view)
    hits: list[int] = []
    for records, values in blocks:
        bad = np.nansum(values[:, :, nan_i], axis=1) + np.nansum(values[:, :, inf_i], axis=1)
        hits.extend(int(r) for r in records[bad > 0])
    if not hits:
        return None
    steps = run.steps
    record = min(hits, key=lambda r: (int(steps.at[r, "step"]), r))
    step, step_type = int(steps.at[record, "step"]), str(steps.at[record, "step_type"])
    frame = trace(run, step, step_type=step_type, view=view)
    return {
        "step": step,
        "step_type": step_type,
        "reason": str(steps.at[record, "reason"]),
        "origin": list(frame.loc[frame["origin"], "node"]),
        "nonfinite": list(frame.loc[frame["anomalous"], "node"]),
    }
