"""Readers of the scalars array beyond logged scalars: the measures (``measure/`` names) and the scores of
circuits tracked during training (``circuit/<name>/<node>/<unit>/score|effect``). Behind
:attr:`Run.measures <comgra_callbacks.store.reader.Run.measures>` and :meth:`Run.circuit_scores`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from comgra_callbacks.errors import ConfigError
from comgra_callbacks.store import format as fmt

if TYPE_CHECKING:
    from comgra_callbacks.store.reader import Run


def circuit_scores(run: Run, name: str | None = None) -> pd.DataFrame:
    """Attribution-patching scores of a circuit tracked during training (``circuit_tracking=``): columns
    step, node, unit, score, effect, one row per (step, node, unit), sorted by step, node, unit; the last
    value when a step was evaluated twice (a resumed run). ``name``: which circuit (None: the only one)."""
    names = run.circuits
    columns = {"step": "int64", "node": object, "unit": "int64", "score": "float64", "effect": "float64"}
    if name is None:
        if len(names) > 1:
            raise ConfigError(f"`Run.circuit_scores(name=...)`: run {run.name!r} tracked several circuits; expected one of {names}, got None.")
        if not names:
            return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})
        name = names[0]
    if name not in names:
        raise ConfigError(f"`Run.circuit_scores(name=...)`: expected one of {names} (the circuits tracked in run {run.name!r}), got {name!r}.")
    m = run.manifest
    block = run.scalar_block()
    prefix = f"{fmt.CIRCUIT_PREFIX}{name}/"
    parsed: dict[int, tuple[str, int, str]] = {}
    for i, full in enumerate(m.scalar_names):
        if full.startswith(prefix):
            node, unit, field = full[len(prefix):].rsplit("/", 2)
            parsed[i] = (node, int(unit), field)
    ids = block[:, 1].astype(np.int64)
    chosen = block[np.isin(ids, np.fromiter(parsed, dtype=np.int64, count=len(parsed)))]
    long = pd.DataFrame(
        [(int(step), *parsed[int(i)], float(value)) for step, i, value in chosen],
        columns=["step", "node", "unit", "field", "value"],
    )
    if long.empty:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})
    wide = long.pivot_table(index=["step", "node", "unit"], columns="field", values="value", aggfunc="last", dropna=False).reset_index()
    for field in ("score", "effect"):
        if field not in wide:
            wide[field] = np.nan
    wide = wide[list(columns)].sort_values(["step", "node", "unit"], kind="stable").reset_index(drop=True)
    wide.columns.name = None
    return wide.astype({"step": "int64", "unit": "int64", "score": "float64", "effect": "float64"})


def measures(run: Run) -> pd.DataFrame:
    """Measures evaluated during training (``ComgraCallback(measures=...)``): one row per step they were
    evaluated at (index ``step``), one column per value (``test``, ``wnorm.total``, ...); the last value
    when a step was evaluated twice (a resumed run)."""
    m = run.manifest
    if m.scalars_len == 0:
        return pd.DataFrame(index=pd.Index([], name="step", dtype="int64"))
    block = run.scalar_block()
    names = [m.scalar_names[int(i)] for i in block[:, 1]]
    keep = [i for i, name in enumerate(names) if name.startswith(fmt.MEASURE_PREFIX)]
    if not keep:
        return pd.DataFrame(index=pd.Index([], name="step", dtype="int64"))
    long = pd.DataFrame({"step": block[keep, 0].astype(np.int64), "name": [names[i][len(fmt.MEASURE_PREFIX):] for i in keep], "value": block[keep, 2]})
    wide = long.pivot_table(index="step", columns="name", values="value", aggfunc="last")
    wide.columns.name = None
    return wide
