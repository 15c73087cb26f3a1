"""Which training data moved a neuron: outlier updates, per-sample contributions, top items, TracIn.

Over a run recorded with ``attribution=`` (see :mod:`comgra_callbacks.recording.attribution`). For a
parameter ``W`` and a step, sample ``i``'s share of the update is ``u_i = -lr * share * grad_i * precond``
(``grad_i = sum_t g_it ⊗ x_it`` from the recorded factors; ``share`` and ``precond`` describe the optimizer:
1 and none for plain SGD). Its *contribution* to a neuron ``j`` (row ``j`` of ``W``) is the signed length of
``u_ij`` along the recorded update ``Δ_j``: ``<u_ij, Δ_j> / |Δ_j|``. For plain SGD the ``u_i`` sum to ``Δ``
exactly, so the contributions sum to ``|Δ_j|``; what momentum, weight decay and Adam change is in
docs/attribution.md. Everything here is numpy and pandas; nothing imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from comgra_callbacks.errors import ConfigError, ConfigTypeError, StepNotFoundError
from comgra_callbacks.store.attribution import recorded_test_gradients

if TYPE_CHECKING:
    from comgra_callbacks.store.attribution import AttributionStep
    from comgra_callbacks.store.reader import Run

MAD_SCALE = 1.4826  # the median absolute deviation of a normal distribution, in standard deviations


def _robust_z(values: np.ndarray) -> np.ndarray:
    """``(x - median) / (MAD_SCALE * MAD)`` per column; a column without spread falls back to the mean absolute
    deviation, and one with none at all gives 0 where a value equals the median and inf elsewhere.

    >>> _robust_z(np.array([[1.0], [1.1], [0.9], [1.0], [9.0]])).round(1).ravel().tolist()
    [0.0, 0.7, -0.7, 0.0, 54.0]
    """
    median = np.nanmedian(values, axis=0)
    deviation = np.abs(values - median)
    scale = MAD_SCALE * np.nanmedian(deviation, axis=0)
    fallback = np.nanmean(deviation, axis=0) * np.sqrt(np.pi / 2)
    scale = np.where(scale > 0, scale, fallback)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(scale > 0, (values - median) / np.where(scale > 0, scale, 1.0), np.where(deviation > 0, np.inf, 0.0))
    return z


def update_outliers(run: Run, param: str, *, z: float = 4.0, step_type: str | None = None) -> pd.DataFrame:
    """The (step, neuron) pairs whose update norm is an outlier for that neuron over training.

    A neuron's update norm (the l2 norm of its row of the update, :meth:`Run.neuron_series`) is compared with
    the same neuron's norms at the other recorded steps through a robust z-score (median and median absolute
    deviation, so that a few outliers cannot hide themselves by inflating the spread). Every recorded step
    counts, whether or not its per-sample factors were kept.

    Returns:
        columns ``step``, ``neuron``, ``update_norm``, ``z`` (``z >= z``), largest ``z`` first.

    Raises:
        ConfigError: ``z`` is not a positive number.
    """
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not z > 0:
        raise ConfigError(f"`update_outliers(z=...)`: expected a positive number, got {z!r}.")
    series = run.neuron_series(param, view="update", statistic="l2", step_type=step_type)
    columns = ["step", "neuron", "update_norm", "z"]
    if series.empty:
        return pd.DataFrame(columns=columns)
    values = series.to_numpy(dtype=np.float64)
    scores = _robust_z(values)
    rows, cols = np.nonzero(scores >= z)
    frame = pd.DataFrame(
        {
            "step": series.index.to_numpy()[rows].astype(np.int64),
            "neuron": series.columns.to_numpy()[cols].astype(np.int64),
            "update_norm": values[rows, cols],
            "z": scores[rows, cols],
        }
    )
    frame = frame.sort_values(["z", "step"], ascending=[False, True], ignore_index=True)
    frame.attrs.update(param=param, z=z, run=run.name)
    return frame


def _directional(a: AttributionStep, direction: np.ndarray) -> np.ndarray:
    """``<u_i, direction>`` per sample and neuron: ``(B, d_out)``, without building the ``(B, d_out, d_in)``
    per-sample updates (``<g ⊗ x, D> = g · (D x)``)."""
    d = direction * a.precond if a.precond is not None else direction
    if a.per_sample is not None:  # (B, rows, ...) from torch.func
        ps = a.per_sample.astype(np.float64)
        return -a.lr * a.share * (ps * d[None]).reshape(ps.shape[0], ps.shape[1], -1).sum(axis=2)
    assert a.grad_outputs is not None
    g = a.grad_outputs.astype(np.float64)  # (B, T, d_out)
    if a.inputs is None:  # a bias: (d_out,)
        return -a.lr * a.share * (g.sum(axis=1) * d[None, :])
    projected = np.einsum("bti,oi->bto", a.inputs.astype(np.float64), d)  # (B, T, d_out): D_j · x_it
    return -a.lr * a.share * np.einsum("bto,bto->bo", g, projected)


def _check_neuron(a: AttributionStep, neuron: Any, method: str) -> int | None:
    if neuron is None:
        return None
    width = int(a.shape[0])
    if isinstance(neuron, bool) or not isinstance(neuron, (int, np.integer)) or not 0 <= int(neuron) < width:
        raise ConfigError(f"`{method}(neuron=...)`: expected an int 0 <= neuron < {width} (the rows of {a.param!r}), got {neuron!r}.")
    return int(neuron)


def _from_factors(a: AttributionStep, neuron: int | None) -> tuple[np.ndarray, float]:
    """``(B,)`` contributions along the update (of one row, or of all of it) and that update's norm."""
    assert a.update is not None
    update = a.update.astype(np.float64)
    if neuron is not None:
        direction = np.zeros_like(update)
        direction[neuron] = update[neuron]
        norm = float(np.linalg.norm(update[neuron]))
    else:
        direction, norm = update, float(np.linalg.norm(update))
    dots = _directional(a, direction).sum(axis=1)  # (B,)
    return (dots / norm if norm > 0 else np.zeros_like(dots)), norm


def _from_contributions(a: AttributionStep, neuron: int | None) -> tuple[np.ndarray, float]:
    """:func:`_from_factors` from the stored ``c_ij = <u_ij, Δ_j> / |Δ_j|``: along the whole update,
    ``<u_i, Δ> / |Δ| = sum_j c_ij |Δ_j| / |Δ|``."""
    assert a.contributions is not None and a.update_norms is not None
    c, norms = a.contributions.astype(np.float64), a.update_norms.astype(np.float64)
    if neuron is not None:
        return c[:, neuron], float(norms[neuron])
    norm = float(np.sqrt((norms**2).sum()))
    return ((c * norms[None, :]).sum(axis=1) / norm if norm > 0 else np.zeros(len(c))), norm


def contributions(run: Run, param: str, step: int, *, neuron: int | None = None, step_type: str | None = None) -> pd.DataFrame:
    """Each sample's signed share of the update of ``param`` at ``step`` (of one neuron, or of all of it).

    ``contribution`` is the length of the sample's share along the recorded update's direction; summed over
    the samples it gives the update's norm (attrs ``update_norm``) up to what no sample of this step caused
    (attrs ``residual``: momentum from earlier steps, weight decay, clipping, Adam's first moment; zero for
    plain SGD up to float32 rounding).

    Returns:
        one row per sample: ``sample_index`` (batch position), ``dataset_index``, ``contribution``.

    Raises:
        NodeNotFoundError / StepNotFoundError: ``param`` has no attribution (at ``step``).
        ConfigError: ``neuron`` is not a row of ``param``.
    """
    a = run.attribution(param, step, step_type=step_type)
    neuron = _check_neuron(a, neuron, "contributions")
    if a.update is None and a.contributions is None:
        raise StepNotFoundError(f"Run {run.name!r} has no recorded update of {param!r} at step {step}.")
    if a.contributions is not None:  # attribution_keep="contributions": reduced when the step was recorded
        values, norm = _from_contributions(a, neuron)
    else:
        values, norm = _from_factors(a, neuron)
    frame = pd.DataFrame({"sample_index": np.arange(a.batch_size), "dataset_index": a.dataset_index.astype(np.int64), "contribution": values})
    frame.attrs.update(
        param=param, step=int(step), neuron=neuron, update_norm=norm, residual=norm - float(values.sum()),
        optimizer=a.optimizer, lr=a.lr, index_from_batch=a.index_from_batch, run=run.name,
    )
    return frame


def top_items(
    run: Run,
    param: str,
    neuron: int,
    *,
    k: int = 10,
    over: Literal["all", "outliers"] = "all",
    z: float = 4.0,
    step_type: str | None = None,
) -> pd.DataFrame:
    """The training items that moved ``neuron`` of ``param`` most over the run.

    An item's ``score`` is the sum of its contributions (see :func:`contributions`) to the neuron's update
    over the steps with per-sample factors: all of them (``over="all"``) or only those where the neuron's
    update is an outlier (``over="outliers"``, see :func:`update_outliers` with ``z``). Items are the
    samples' dataset indices (batch positions when the batches carried none; ``attrs["index_from_batch"]``).

    Returns:
        ``k`` rows, largest score first: ``dataset_index``, ``score``, ``steps`` (the steps it contributed at).

    Raises:
        ConfigError: a bad ``k`` or ``over``, or ``over="outliers"`` and the neuron has no outlier step with factors.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"`top_items(k=...)`: expected a positive int, got {k!r}.")
    if over not in ("all", "outliers"):
        raise ConfigError(f"`top_items(over=...)`: expected 'all' or 'outliers', got {over!r}.")
    steps = run.attribution_steps(param, step_type=step_type)
    if over == "outliers":
        outliers = update_outliers(run, param, z=z, step_type=step_type)
        wanted = set(outliers.loc[outliers["neuron"] == neuron, "step"].tolist())
        chosen = [s for s in steps if s in wanted]
        if not chosen:
            raise ConfigError(
                f"`top_items(over='outliers')`: neuron {neuron} of {param!r} has no outlier update (z >= {z}) at a step with "
                f"per-sample factors ({len(steps)} such steps). HINT: over='all', or a lower z."
            )
        steps = chosen
    scores: dict[int, float] = {}
    seen: dict[int, list[int]] = {}
    from_batch = True
    for step in steps:
        frame = contributions(run, param, step, neuron=neuron, step_type=step_type)
        from_batch = from_batch and bool(frame.attrs["index_from_batch"])
        for item, value in frame.groupby("dataset_index")["contribution"].sum().items():
            scores[int(item)] = scores.get(int(item), 0.0) + float(value)
            seen.setdefault(int(item), []).append(int(step))
    items = sorted(scores, key=lambda i: (-scores[i], i))[:k]
    out = pd.DataFrame({"dataset_index": pd.Series(items, dtype="int64"), "score": [scores[i] for i in items], "steps": [seen[i] for i in items]})
    out.attrs.update(param=param, neuron=neuron, over=over, steps=list(steps), index_from_batch=from_batch, run=run.name)
    return out


def influence(
    run: Run,
    param: str,
    test_gradients: Mapping[int, Any] | np.ndarray,
    *,
    per_example: bool = True,
    step_type: str | None = None,
) -> pd.DataFrame:
    """TracIn over the recorded trajectory: ``sum over steps of lr * <per-sample gradient, test gradient>``.

    Args:
        test_gradients: the name of a :class:`~comgra_callbacks.measures.TestGradient` measure recorded with
            the run (``measures={"test": TestGradient(...)}``: the inner products were taken during training,
            the run alone answers); or the test item's gradient of ``param`` (shaped like it) at each recorded
            step, as ``{step: array}``, or one array used at every step. Only steps with both per-sample
            gradients and a test gradient count.
        per_example: multiply each recorded gradient by the batch size, undoing a mean-reduced loss, so that
            items of batches of different sizes compare (TracIn's per-example gradients).

    For Adam the per-sample gradient is preconditioned like the update (``share * precond``); for SGD it is
    the gradient itself. A parameter recorded with ``attribution_projection=k`` takes the products of the
    projected gradients with the test gradient projected by the same matrix: an estimate, relative error
    about ``1/sqrt(k)`` (docs/attribution.md#random-projection); a ``TestGradient`` measure stays exact. A positive influence: the item's step lowered the test loss (to first order).

    Returns:
        one row per training item, largest influence first: ``dataset_index``, ``influence``, ``steps``.

    Raises:
        ConfigTypeError: ``test_gradients`` is neither a measure name, a mapping nor an array.
        ConfigError: a test gradient's shape is not the parameter's, or no step has both; the run kept
            contributions only (``attribution_keep="contributions"``) and ``test_gradients`` is not a measure;
            no such measure.
    """
    steps = run.attribution_steps(param, step_type=step_type)
    if isinstance(test_gradients, str):
        return _influence_of_measure(run, param, test_gradients, steps, per_example=per_example, step_type=step_type)
    if isinstance(test_gradients, Mapping):
        given = {int(s): np.asarray(g, dtype=np.float64) for s, g in test_gradients.items()}
        chosen = [s for s in steps if s in given]
    elif isinstance(test_gradients, np.ndarray) or hasattr(test_gradients, "__array__"):
        array = np.asarray(test_gradients, dtype=np.float64)
        given = {s: array for s in steps}
        chosen = steps
    else:
        raise ConfigTypeError(
            f"`influence(test_gradients=...)`: expected the name of a TestGradient measure, {{step: gradient array}} or one "
            f"array shaped like {param!r}, got {type(test_gradients).__name__}."
        )
    if not chosen:
        raise ConfigError(
            f"`influence(test_gradients=...)`: no step has both per-sample factors of {param!r} (steps {steps[:10]}) and a "
            f"test gradient (steps {sorted(given)[:10]})."
        )
    totals: dict[int, float] = {}
    seen: dict[int, list[int]] = {}
    for step in chosen:
        a = run.attribution(param, step, step_type=step_type)
        if not a.has_factors and a.projected is None:
            raise ConfigError(
                f"`influence(test_gradients=...)`: {param!r} was recorded with attribution_keep='contributions' (step {step}), "
                f"which keeps no per-sample gradients to take a supplied test gradient's products with. HINT: record "
                f"the test gradient with the run, measures={{'test': TestGradient(test_data)}}, and call "
                f"influence(run, {param!r}, 'test'); or record with attribution_keep='factors'. Measures recorded: "
                f"{recorded_test_gradients(run, param)}."
            )
        test = given[step]
        shape = a.shape
        if test.shape != shape:
            raise ConfigError(f"`influence(test_gradients=...)`: expected the gradient of {param!r} with shape {shape}, got shape {test.shape} at step {step}.")
        if a.projected is not None:  # attribution_projection=k: <R g_i, R (test * precond)>, Johnson-Lindenstrauss
            d = test * a.precond if a.precond is not None else test
            values = a.lr * a.share * (a.projected.astype(np.float64) @ a.project(d))
        else:
            values = -_directional(a, test).sum(axis=1)  # lr * share * <grad_i * precond, test>
        if per_example:
            values = values * a.batch_size
        for item, value in zip(a.dataset_index.tolist(), values.tolist()):
            totals[int(item)] = totals.get(int(item), 0.0) + float(value)
            seen.setdefault(int(item), []).append(int(step))
    items = sorted(totals, key=lambda i: (-totals[i], i))
    out = pd.DataFrame({"dataset_index": pd.Series(items, dtype="int64"), "influence": [totals[i] for i in items], "steps": [seen[i] for i in items]})
    out.attrs.update(param=param, steps=chosen, run=run.name)
    return out


def _influence_of_measure(run: Run, param: str, measure: str, steps: list[int], *, per_example: bool, step_type: str | None) -> pd.DataFrame:
    """:func:`influence` from the products ``<grad_i * precond, test>`` a ``TestGradient`` measure recorded."""
    from comgra_callbacks.store.attribution import read_test_products

    known = recorded_test_gradients(run, param)
    if measure not in known:
        raise ConfigError(
            f"`influence(test_gradients={measure!r})`: run {run.name!r} has no TestGradient measure of that name for "
            f"{param!r}; it has {known}. HINT: measures={{{measure!r}: TestGradient(test_data)}} with attribution={param!r}."
        )
    totals: dict[int, float] = {}
    seen: dict[int, list[int]] = {}
    chosen = []
    for step in steps:
        found = read_test_products(run, param, step, measure, step_type=step_type)
        if found is None:
            continue
        dots, index, fields = found
        values = fields.get("lr", float("nan")) * fields.get("share", 1.0) * dots.astype(np.float64)
        if per_example:
            values = values * len(dots)
        chosen.append(step)
        for item, value in zip(index.tolist(), values.tolist()):
            totals[int(item)] = totals.get(int(item), 0.0) + float(value)
            seen.setdefault(int(item), []).append(int(step))
    if not chosen:
        raise ConfigError(f"`influence(test_gradients={measure!r})`: the measure has no products with {param!r} at a step with attribution (steps {steps[:10]}).")
    items = sorted(totals, key=lambda i: (-totals[i], i))
    out = pd.DataFrame({"dataset_index": pd.Series(items, dtype="int64"), "influence": [totals[i] for i in items], "steps": [seen[i] for i in items]})
    out.attrs.update(param=param, steps=chosen, run=run.name, measure=measure)
    return out
