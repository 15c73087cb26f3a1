"""An intervention against the normal record of the same steps: paired statistics for every node.

An intervention (``interventions=`` of the callbacks) is recorded as its own step type at the same step as the
normal record, with the same parameters. Comparing the two step types over *all* their records would mix in
the normal records of steps without an intervention; :func:`paired_stats` averages each side over the steps
where both step types have a record only, so that the difference is the intervention's effect, node by node,
values and gradients alike. Feed the pair to :func:`~comgra_callbacks.analysis.compare_nodes` to rank the nodes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from comgra_callbacks.analysis.compare import stat_names
from comgra_callbacks.errors import ConfigError, StepNotFoundError
from comgra_callbacks.store import format as fmt

_NUMEL = list(fmt.STAT_NAMES).index("numel")


def paired_steps(run: Any, type_a: str, type_b: str, first_step: int | None = None, last_step: int | None = None) -> list[int]:
    """The steps (ascending) at which both step types have a record, within ``[first_step, last_step]``."""
    steps = run.steps
    types = sorted(set(steps["step_type"]))
    for arg, value in (("type_a", type_a), ("type_b", type_b)):
        if value not in types:
            raise ConfigError(f"`paired_steps({arg}=...)`: expected one of the run's step types {types}, got {value!r}.")
    both = set(steps.loc[steps["step_type"] == type_a, "step"]) & set(steps.loc[steps["step_type"] == type_b, "step"])
    lo = -np.inf if first_step is None else first_step
    hi = np.inf if last_step is None else last_step
    return sorted(int(s) for s in both if lo <= s <= hi)


def _mean_at(run: Any, steps: list[int], view: str, step_type: str) -> pd.DataFrame:
    nodes, blocks = run.stats_blocks(steps[0], steps[-1], view=view, step_type=step_type)
    wanted = np.asarray(steps)
    step_of = run.steps["step"].to_numpy()
    n_stats = len(fmt.STAT_NAMES)
    sums = np.zeros((len(nodes), n_stats), dtype=np.float64)
    counts = np.zeros((len(nodes), n_stats), dtype=np.int64)
    for records, values in blocks:
        keep = np.isin(step_of[records], wanted)
        chosen = values[keep]
        sums += np.nansum(chosen, axis=0)
        counts += (~np.isnan(chosen)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    frame = pd.DataFrame(means, index=pd.Index(nodes, name="node"), columns=list(fmt.STAT_NAMES))[stat_names(view)]
    frame["records"] = counts[:, _NUMEL]
    frame = frame[frame["records"] > 0]
    frame.attrs.update(run=run.name, view=view, step_type=step_type, steps=list(steps))
    return frame


def paired_stats(
    run: Any,
    type_a: str,
    type_b: str,
    *,
    view: str = "value",
    first_step: int | None = None,
    last_step: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean batch statistics of every node for each of two step types, over the steps both have a record.

    Returns two frames shaped like :func:`~comgra_callbacks.analysis.range_stats` (one row per node, the
    statistics of ``view`` and ``records``), with ``attrs["steps"]`` the paired steps: ready for
    :func:`~comgra_callbacks.analysis.compare_nodes`.

    Raises:
        ConfigError: a step type the run does not have (the message lists them).
        StepNotFoundError: no step with a record of both types.

    >>> from comgra_callbacks.dashboard.synthetic import write_run
    >>> import tempfile, comgra_callbacks as cc
    >>> root = tempfile.mkdtemp()
    >>> _ = write_run(root, "r", records=20, layers=2, ablation_every=5)  # "ablation" on steps of its own
    >>> run = cc.open_run(f"{root}/r")
    >>> paired_steps(run, "train", "ablation"), paired_steps(run, "train", "train")[:3]
    ([], [0, 1, 2])
    >>> paired_stats(run, "train", "ablation")
    Traceback (most recent call last):
    ...
    comgra_callbacks.errors.StepNotFoundError: Run 'r' has no step with records of both 'train' and 'ablation' with -inf <= step <= inf.
    """
    steps = paired_steps(run, type_a, type_b, first_step, last_step)
    if not steps:
        lo = "-inf" if first_step is None else first_step
        hi = "inf" if last_step is None else last_step
        raise StepNotFoundError(f"Run {run.name!r} has no step with records of both {type_a!r} and {type_b!r} with {lo} <= step <= {hi}.")
    return _mean_at(run, steps, view, type_a), _mean_at(run, steps, view, type_b)
