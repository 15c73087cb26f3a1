"""Measures computed after training from what was recorded: :func:`derive` evaluates a function of recorded
full tensors at every record that has them all, and stores the result as a measure of the run, so that
``run.measures`` (and the dashboard) shows it next to the measures taken during training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from comgra_callbacks.errors import ConfigError, ConfigTypeError, StepNotFoundError


def derive(
    run: Any,
    name: str,
    fn: Callable[..., Any],
    nodes: Sequence[str],
    *,
    step_type: str | None = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Evaluate ``fn`` on the recorded full tensors of ``nodes`` at every record that has them all; store the
    values as the measure ``name`` of the run.

    Args:
        run: the run (``open_run(...)``); it must not be being written (see
            :func:`comgra_callbacks.store.writer.append_scalars`).
        name: the measure's name (no ``/``); a dict result is stored as ``name.key``, an array as ``name.0``, ...
        fn: called as ``fn(*tensors)`` with one numpy array per node, in the order of ``nodes``; returns a
            float, a dict of floats or a small array (as a measure does).
        nodes: the nodes, each recorded in full on the records that count (``detail={"embed.weight": "full"}``;
            for an activation, what ``run.samples`` returns: the kept samples).
        step_type: which records (see ``Run.resolve_step_type``).
        overwrite: replace a measure of that name (the new values are read instead of the old ones).

    Returns:
        The derived values: a DataFrame indexed by step, the columns ``run.measures`` now has for ``name``.

    Raises:
        ConfigError: a bad name, a name that exists already (without ``overwrite``), or no nodes.
        StepNotFoundError: a node has no full tensor at any record (with the ``detail=`` that records one).
        StoreError: the run is being written.

    Example::

        derive(run, "ew_sparsity", lambda E, W1: spectrum(E @ W1.T).summary(), nodes=["embed.weight", "fc1.weight"])
        run.measures["ew_sparsity.top1_share"]
    """
    from comgra_callbacks.measures import flatten
    from comgra_callbacks.store.format import MEASURE_PREFIX
    from comgra_callbacks.store.writer import append_scalars

    nodes = _check(run, name, fn, nodes, overwrite)
    steps = run.steps
    chosen = run.resolve_step_type(step_type, "derive")
    if chosen is not None:
        steps = steps[steps["step_type"] == chosen]
    found: dict[int, list[np.ndarray]] = {}
    missing = {node: 0 for node in nodes}
    for step in dict.fromkeys(int(s) for s in steps["step"]):
        tensors = []
        for node in nodes:
            try:
                tensors.append(run.samples(node, step, step_type=chosen))
            except StepNotFoundError:
                missing[node] += 1
                break
        if len(tensors) == len(nodes):
            found[step] = tensors
    if not found:
        worst = max(missing, key=lambda n: missing[n])
        raise StepNotFoundError(
            f"`derive({name!r})`: node {worst!r} has no full tensor at any record of run {run.name!r} "
            f"({len(steps)} records); expected nodes recorded in full. HINT: ComgraCallback(detail={{{worst!r}: 'full'}})."
        )
    rows: list[tuple[int, str, float]] = []
    for step, tensors in found.items():
        values = flatten(name, fn(*tensors))
        rows.extend((step, MEASURE_PREFIX + key, value) for key, value in values.items())
    append_scalars(run.location, rows, owner=f"derive({name!r})")
    run.refresh(force=True)
    frame = run.measures
    return frame[[c for c in frame.columns if c == name or c.startswith(name + ".")]].dropna(how="all")


def _check(run: Any, name: Any, fn: Any, nodes: Any, overwrite: bool) -> list[str]:
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"`derive(name=...)`: expected a non-empty name without '/', got {name!r}.")
    if not callable(fn):
        raise ConfigTypeError(f"`derive(fn=...)`: expected a function of the nodes' tensors, got {fn!r}.")
    if isinstance(nodes, str) or not isinstance(nodes, Sequence) or not nodes or not all(isinstance(n, str) for n in nodes):
        raise ConfigError(f"`derive(nodes=...)`: expected a non-empty list of node names, got {nodes!r}. HINT: nodes=['embed.weight'].")
    taken = [c for c in run.measures.columns if c == name or c.startswith(name + ".")]
    if taken and not overwrite:
        raise ConfigError(f"`derive(name={name!r})`: the run has that measure already ({taken[:4]}). HINT: another name, or overwrite=True.")
    return list(nodes)
