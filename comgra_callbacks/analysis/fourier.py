"""The Fourier spectrum of a matrix: how much of its structure lies in few frequencies (the grokking seeds'
Fourier basis over the token axis of an embedding).

:func:`spectrum` is the one definition of the math: :class:`comgra_callbacks.measures.FourierSparsity`
(during training, on the live model), :func:`fourier` (post hoc, on a recorded full tensor) and the
dashboard's Fourier view all call it. Numpy only.

>>> import numpy as np
>>> p = 11
>>> wave = np.cos(2 * np.pi * 3 * np.arange(p) / p)[:, None] * np.ones((1, 4))  # frequency 3 in every column
>>> s = spectrum(wave)
>>> s.key[:1], round(s.key_share, 6), round(s.gini, 3), s.power.shape
([3], 1.0, 0.8, (4, 5))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from comgra_callbacks.errors import ConfigError, ConfigTypeError


@dataclass(frozen=True)
class Spectrum:
    """The Fourier power of a matrix along one axis.

    A *row* is one slice along the other axis (for the effective input weights ``E @ W1.T`` of shape
    ``(p, hidden)`` with ``axis=0``: one neuron). Frequencies are ``1 .. p // 2``; the constant term is left
    out (it says nothing about periodic structure).

    Attributes:
        power: ``(rows, frequencies)`` DataFrame, index ``row``, columns the frequency numbers.
        top1_share: per row, the share of its power in its strongest frequency (0 for a row without power).
        top1_frequency: per row, that strongest frequency.
        gini: the Gini coefficient of the total power per frequency (0: spread evenly; ``(F-1)/F``: in one).
        key: the ``n_key`` frequencies with most total power, strongest first.
        key_share: their share of the total power.
    """

    power: pd.DataFrame
    top1_share: pd.Series
    top1_frequency: pd.Series
    gini: float
    key: list[int]
    key_share: float

    def summary(self) -> dict[str, float]:
        """What :class:`~comgra_callbacks.measures.FourierSparsity` stores: ``gini``, ``top1_share`` (the mean
        over rows), ``key_share`` and ``key.0``, ``key.1``, ... (floats)."""
        out = {"gini": self.gini, "top1_share": float(self.top1_share.mean()) if len(self.top1_share) else math.nan, "key_share": self.key_share}
        out.update({f"key.{i}": float(k) for i, k in enumerate(self.key)})
        return out


def gini(values: Any) -> float:
    """Gini coefficient of non-negative values (0: all equal; ``(n-1)/n``: all in one; NaN: no values or all zero).

    >>> gini([1, 1, 1, 1]), gini([0, 0, 0, 4])
    (0.0, 0.75)
    """
    v = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    n, total = v.size, float(v.sum())
    if n == 0 or total <= 0:
        return math.nan
    ranks = np.arange(1, n + 1, dtype=np.float64)
    return float(2 * (ranks * v).sum() / (n * total) - (n + 1) / n)


def spectrum(matrix: Any, axis: int = 0, n_key: int = 5) -> Spectrum:
    """The Fourier spectrum of a 2-D matrix along ``axis`` (see :class:`Spectrum`).

    Args:
        matrix: a 2-D array (numpy, or anything ``np.asarray`` takes; a 1-D vector is one row).
        axis: the axis the transform runs along (0 or 1).
        n_key: how many key frequencies are reported.

    Raises:
        ConfigError: not 1-D or 2-D, fewer than 3 values along ``axis``, or a bad ``axis`` / ``n_key``.
    """
    if axis not in (0, 1, -1, -2):
        raise ConfigError(f"`spectrum(axis=...)`: expected 0 or 1 (an axis of a 2-D matrix), got {axis!r}.")
    if isinstance(n_key, bool) or not isinstance(n_key, int) or n_key < 1:
        raise ConfigError(f"`spectrum(n_key=...)`: expected a positive int, got {n_key!r}.")
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim == 1:
        m = m[:, None]
        axis = 0
    if m.ndim != 2:
        raise ConfigError(f"`spectrum(matrix=...)`: expected a 2-D matrix, got shape {list(m.shape)}.")
    m = m if axis in (0, -2) else m.T  # (p, rows): the transform along dim 0
    p = m.shape[0]
    if p < 3:
        raise ConfigError(f"`spectrum(matrix=...)`: expected at least 3 values along axis {axis} for a frequency, got shape {list(m.shape)}.")
    m = np.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    power = np.abs(np.fft.rfft(m, axis=0)[1 : p // 2 + 1]) ** 2  # (frequencies, rows), no constant term
    per_row = power.sum(axis=0)
    strongest = power.argmax(axis=0)
    top1 = np.divide(power.max(axis=0), per_row, out=np.zeros_like(per_row), where=per_row > 0)
    total = power.sum(axis=1)  # per frequency
    order = np.argsort(-total, kind="stable")[:n_key]
    grand = float(total.sum())
    freqs = np.arange(1, power.shape[0] + 1)
    rows = pd.Index(range(power.shape[1]), name="row")
    return Spectrum(
        power=pd.DataFrame(power.T, index=rows, columns=pd.Index(freqs, name="frequency")),
        top1_share=pd.Series(top1, index=rows, name="top1_share"),
        top1_frequency=pd.Series(freqs[strongest], index=rows, name="top1_frequency"),
        gini=gini(total),
        key=[int(freqs[k]) for k in order],
        key_share=float(total[order].sum()) / grand if grand > 0 else math.nan,
    )


def full_tensors(run: Any, nodes: Sequence[str], step: int, *, step_type: str | None = None, owner: str = "fourier") -> list[np.ndarray]:
    """The recorded full tensors of ``nodes`` at ``step`` (``run.samples``: the whole tensor of a parameter
    recorded with ``detail={node: "full"}``), with one error naming what is missing."""
    from comgra_callbacks.errors import ComgraError, StepNotFoundError

    out = []
    for node in nodes:
        try:
            out.append(np.asarray(run.samples(node, step, step_type=step_type), dtype=np.float64))
        except StepNotFoundError as exc:
            raise StepNotFoundError(
                f"`{owner}`: node {node!r} has no full tensor at step {step} of run {run.name!r} ({exc}). "
                f"HINT: record it with ComgraCallback(detail={{{node!r}: 'full'}})."
            ) from None
        except ComgraError:
            raise
    return out


def fourier(
    run: Any,
    node: str | Callable[..., Any],
    step: int,
    *,
    axis: int = 0,
    nodes: Sequence[str] | None = None,
    n_key: int = 5,
    step_type: str | None = None,
) -> Spectrum:
    """The Fourier spectrum of a recorded full tensor at one step (post hoc: no model needed).

    Args:
        run: the run (``open_run(...)``).
        node: a node recorded in full (a parameter with ``detail={"embed.weight": "full"}``), or a function of
            the full tensors of ``nodes`` (numpy arrays, in that order) returning the matrix, so the effective
            input weights are ``fourier(run, lambda E, W1: E @ W1.T, step, nodes=["embed.weight", "fc1.weight"])``.
        step: the recorded step.
        axis: the axis of the matrix the transform runs along (0: over rows, e.g. the tokens of an embedding).
        nodes: the nodes the function reads (only with a function).
        n_key: how many key frequencies are reported.
        step_type: which records (see ``Run.resolve_step_type``).

    Returns:
        A :class:`Spectrum`: per row the power per frequency, the top-1 share and frequency; the Gini
        coefficient; the key frequencies and their share. ``spectrum.summary()`` is what ``FourierSparsity``
        would have stored.

    Raises:
        StepNotFoundError: a node has no full tensor at ``step`` (with the ``detail=`` that records one).
        ConfigError: a function without ``nodes``, ``nodes`` with a node name, or a matrix that is not 2-D.
    """
    if isinstance(node, str):
        if nodes is not None:
            raise ConfigError(f"`fourier(nodes=...)`: expected nodes= only with a function as `node`, got node={node!r} and nodes={nodes!r}.")
        matrix = full_tensors(run, [node], step, step_type=step_type)[0]
    elif callable(node):
        if not nodes or isinstance(nodes, str) or not all(isinstance(n, str) for n in nodes):
            raise ConfigError(f"`fourier(nodes=...)`: expected a list of node names the function reads, got {nodes!r}. HINT: nodes=['embed.weight', 'fc1.weight'].")
        matrix = node(*full_tensors(run, list(nodes), step, step_type=step_type))
    else:
        raise ConfigTypeError(f"`fourier(node=...)`: expected a node name or a function of recorded tensors, got {node!r}.")
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2:
        raise ConfigError(f"`fourier`: expected a 2-D matrix, got shape {list(matrix.shape)} at step {step}. HINT: reshape it in a function of the tensor.")
    return spectrum(matrix, axis=axis, n_key=n_key)
