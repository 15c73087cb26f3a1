"""Readers behind :meth:`Run.neuron_series`, :meth:`Run.attribution_steps` and :meth:`Run.attribution`.

Kept apart from :mod:`~comgra_callbacks.store.reader` so that the reader stays small; each function takes the
:class:`~comgra_callbacks.store.reader.Run` and reads through its validated, retrying array access.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from comgra_callbacks.errors import ConfigError, NodeNotFoundError, StepNotFoundError
from comgra_callbacks.store import format as fmt

if TYPE_CHECKING:
    import pandas as pd

    from comgra_callbacks.store.reader import Run

_NUMEL = fmt.STAT_INDEX["numel"]
PREFIX = "attribution:"
"""The views of a parameter node that hold what ``attribution=`` recorded (not listed by ``Run.views``)."""
OPTIMIZER_FIELDS = ("kind", "lr", "share", "has_precond", "index_from_batch", "beta1", "weight_decay", "optimizer_step", "projection_seed")
"""The entries of the ``attribution:optimizer`` vector, in order."""
OPTIMIZER_KINDS = ("other", "sgd", "adam", "adamw")
"""``kind`` codes: an optimizer that is none of SGD, Adam, AdamW is treated like plain SGD (``share`` 1)."""
KEEP_CHOICES = ("factors", "contributions")
"""``attribution_keep=``: the exact per-sample factors, or only each sample's contribution to each neuron's update."""
TEST_PREFIX = PREFIX + "test:"
"""``attribution:test:<measure>``: per sample, ``<grad_i * precond, test gradient>`` of a ``TestGradient`` measure."""
INDEX_SPLIT = 1 << 24
"""Samples are stored as float32, exact for integers below 2**24: a dataset index is kept as two halves."""
PROJECTION_SEED = 14
"""The seed of the random projections of ``attribution_projection=`` (recorded as the optimizer field
``projection_seed``, float32-exact below 2**24, so that the reader rebuilds the same matrix)."""
PROJECTION_CHUNK = 8192
"""Rows of a projection matrix generated at once: each chunk has its own generator, so that a matrix is
rebuilt piece by piece without ever holding all of it."""


def projection_chunks(param: str, numel: int, k: int, seed: int = PROJECTION_SEED) -> Iterator[tuple[int, np.ndarray]]:
    """The random projection ``R`` (``(numel, k)``, float32, entries N(0, 1/k)) of parameter ``param``, as
    ``(first row, rows)`` chunks of :data:`PROJECTION_CHUNK` rows.

    Chunk ``c`` is ``standard_normal((rows, k), float32) / sqrt(k)`` from numpy's
    ``default_rng([seed, crc32(param), c])`` (PCG64 seeded through a ``SeedSequence``): the recorder and the
    reader rebuild the same ``R`` from the seed and the name, in any process and on any machine; nothing of
    ``R`` is stored.

    >>> a = np.concatenate([r for _, r in projection_chunks("emb.weight", 10, 4)])
    >>> a.shape, bool(np.array_equal(a, np.concatenate([r for _, r in projection_chunks("emb.weight", 10, 4)])))
    ((10, 4), True)
    """
    tag = zlib.crc32(param.encode("utf-8"))
    scale = np.float32(1.0 / np.sqrt(k))
    for c, start in enumerate(range(0, numel, PROJECTION_CHUNK)):
        rows = min(PROJECTION_CHUNK, numel - start)
        yield start, np.random.default_rng([int(seed), tag, c]).standard_normal((rows, k), dtype=np.float32) * scale


def project(param: str, vectors: np.ndarray, k: int, seed: int = PROJECTION_SEED) -> np.ndarray:
    """``(..., k)``: ``vectors`` (``(..., numel)``, flattened parameter-shaped arrays) times the projection
    ``R`` of ``param`` (see :func:`projection_chunks`), in float64.

    ``R`` of up to :data:`READER_CACHE_BYTES` is built once and kept for the next call (``influence`` projects
    a test gradient at every recorded step; generating ``R`` took ~1 s for 65 536 × 512); a larger one is
    generated chunk by chunk on each call.

    >>> v = np.ones((2, 10))
    >>> bool(np.allclose(project("emb.weight", v, 4), v @ np.concatenate([r for _, r in projection_chunks("emb.weight", 10, 4)])))
    True
    """
    flat = np.asarray(vectors, dtype=np.float64)
    numel = flat.shape[-1]
    if numel * k * 8 <= READER_CACHE_BYTES:
        return flat @ _cached_matrix(param, numel, k, int(seed))
    out = np.zeros((*flat.shape[:-1], k), dtype=np.float64)
    for start, rows in projection_chunks(param, numel, k, seed):
        out += flat[..., start : start + len(rows)] @ rows.astype(np.float64)
    return out


READER_CACHE_BYTES = 128 * 2**20
"""The largest projection (as float64) that :func:`project` keeps between calls; at most two are kept."""


@functools.lru_cache(maxsize=2)
def _cached_matrix(param: str, numel: int, k: int, seed: int) -> np.ndarray:
    matrix = np.concatenate([rows for _, rows in projection_chunks(param, numel, k, seed)]).astype(np.float64)
    matrix.setflags(write=False)  # shared between callers
    return matrix


def has_statistics(view: str) -> bool:
    """Whether a recorded series gets batch statistics. The ``attribution:*`` series do not: they are read
    only as samples (their statistics were the largest single cost of a recorded step with attribution,
    docs/benchmarks.md#attribution), so their row keeps just ``numel`` (which tells the steps that have them)
    and the NaN and inf counts (which tell a deleted chunk from recorded NaNs); the rest is NaN."""
    return not view.startswith(PREFIX)


def counts_row(a: np.ndarray) -> np.ndarray:
    """The statistics row of a series without statistics (see :func:`has_statistics`), ``(N_STATS,)`` float32."""
    row = np.full(len(fmt.STAT_NAMES), np.nan, dtype=np.float32)
    row[_NUMEL] = a.size
    finite = a.dtype.kind not in "fc" or bool(np.isfinite(a).all())
    row[fmt.STAT_INDEX["nan_count"]] = 0 if finite else np.count_nonzero(np.isnan(a))
    row[fmt.STAT_INDEX["inf_count"]] = 0 if finite else np.count_nonzero(np.isinf(a))
    return row


def counts_row_torch(t: Any) -> Any:
    """:func:`counts_row` with torch, on the tensor's device (nothing waits for it)."""
    import torch

    row = torch.full((len(fmt.STAT_NAMES),), float("nan"), dtype=torch.float32, device=t.device)
    row[_NUMEL] = float(t.numel())
    if t.is_floating_point() or t.is_complex():
        row[fmt.STAT_INDEX["nan_count"]] = torch.isnan(t).sum().to(torch.float32)
        row[fmt.STAT_INDEX["inf_count"]] = torch.isinf(t).sum().to(torch.float32)
    else:
        row[fmt.STAT_INDEX["nan_count"]] = row[fmt.STAT_INDEX["inf_count"]] = 0.0
    return row


def _last_present_columns(ptr: np.ndarray) -> np.ndarray:
    """Per row, the index (into the second axis) of the last column whose pointer is set, or -1."""
    present = ptr[:, :, 0] >= 0
    last = ptr.shape[1] - 1 - np.argmax(present[:, ::-1], axis=1)
    return np.where(present.any(axis=1), last, -1)


def neuron_series(
    run: Run,
    node: str,
    *,
    view: str = "update",
    statistic: str = "l2",
    role: str | None = None,
    iteration: int | None = None,
    step_type: str | None = None,
) -> pd.DataFrame:
    """See :meth:`Run.neuron_series`.

    With the per-neuron statistics ``mean`` and ``std`` (correction 1, as :mod:`~comgra_callbacks.recording.reduce`
    computes it) over ``n`` items, ``l2 = sqrt(n * mean**2 + (n - 1) * std**2)``; ``n`` is the tensor's number
    of elements over its number of neurons. A store that keeps ``l2`` itself is read directly.
    """
    import pandas as pd

    names = list(run.neuron_stat_names)
    choices = sorted(set(names) | {"l2"})
    if statistic not in choices:
        raise ConfigError(f"`Run.neuron_series(statistic=...)`: expected one of {choices}, got {statistic!r}.")
    cols = [c for _, c in run._columns(node, view, role, iteration)]
    rows = run._record_rows(step_type, "neuron_series")
    empty = pd.DataFrame(index=pd.Index([], name="step", dtype="int64"), dtype="float32")
    if len(rows) == 0 or not cols:
        return empty
    ptr = run._read(fmt.NEURONS_PTR, (rows, cols, slice(None))) if len(cols) > 1 else run._read(fmt.NEURONS_PTR, (rows, cols[0], slice(None)))[:, None, :]
    which = _last_present_columns(ptr)
    keep = which >= 0
    if not keep.any():
        raise StepNotFoundError(f"Node {node!r} (view {view!r}) of run {run.name!r} has no per-neuron statistics at any step (detail was lower).")
    rows, which = rows[keep], which[keep]
    chosen = ptr[keep, which]  # (R, 2): offset, width
    offsets, widths = chosen[:, 0], chosen[:, 1]
    width = int(widths.max())
    n = len(names)
    if np.any(offsets + n * widths > run.manifest.neurons_len):
        raise run._corrupt_array(fmt.NEURONS_PTR, f"points node {node!r} past the end of {fmt.NEURONS!r} (\"neurons_len\" in {fmt.MANIFEST_FILE}).")
    derive = statistic == "l2" and "l2" not in names
    wanted = [names.index("mean"), names.index("std")] if derive else [names.index(statistic)]
    neuron = np.arange(width)
    valid = neuron[None, :] < widths[:, None]  # (R, width): a narrower record leaves NaN
    flat_idx = [np.where(valid, offsets[:, None] + k * widths[:, None] + neuron[None, :], 0) for k in wanted]
    points = np.concatenate([i.reshape(-1) for i in flat_idx])
    values = _read_points(run, fmt.NEURONS, points).reshape(len(wanted), len(rows), width)
    values = np.where(valid[None], values, np.nan)
    if derive:
        col_of_row = np.asarray(cols)[which]
        numel = run._read(fmt.STATS, (rows, sorted(set(cols)), _NUMEL))
        numel = numel.reshape(len(rows), -1)[np.arange(len(rows)), np.searchsorted(sorted(set(cols)), col_of_row)]
        items = (numel / widths).astype(np.float64)[:, None]
        mean, std = values[0].astype(np.float64), values[1].astype(np.float64)
        data = np.sqrt(np.maximum(items * mean**2 + np.maximum(items - 1, 0) * std**2, 0.0)).astype(np.float32)
    else:
        data = values[0].astype(np.float32)
    frame = pd.DataFrame(data, index=pd.Index(run.steps.loc[rows, "step"].to_numpy(), name="step"), columns=pd.Index(neuron, name="neuron"))
    frame.attrs.update(node=node, view=view, statistic=statistic, run=run.name, derived=derive)
    return frame


def _read_points(run: Run, name: str, points: np.ndarray) -> np.ndarray:
    """Values of a flat array at integer positions, in one read (zarr fetches only the chunks they fall in)."""
    if len(points) == 0:
        return np.empty(0, dtype=np.float32)
    uniq, inverse = np.unique(points, return_inverse=True)
    return _orthogonal(run, name, uniq)[inverse.reshape(-1)]


def _orthogonal(run: Run, name: str, idx: np.ndarray) -> np.ndarray:
    def read() -> np.ndarray:
        return np.asarray(run._array(name).get_orthogonal_selection((idx,)))

    from comgra_callbacks.store.reader import _retry

    return _retry(read, lambda: run._arrays.pop(name, None))


def _column(run: Run, param: str, view: str) -> int:
    run._node_series(param)
    cols = [i for i, key in run._series_by_node.get(param, []) if key.view == view]
    if not cols:
        raise NodeNotFoundError(
            f"Run {run.name!r} has no attribution of {param!r}. HINT: record it with attribution={param!r}; "
            f"parameters with attribution: {attributed_parameters(run)}."
        )
    return cols[-1]


def recorded_test_gradients(run: Run, param: str) -> list[str]:
    """The ``TestGradient`` measures whose inner products with ``param``'s per-sample gradients were recorded."""
    return sorted(v[len(TEST_PREFIX) :] for v in run._all_views(param) if v.startswith(TEST_PREFIX))


def attributed_parameters(run: Run) -> list[str]:
    """The parameters with recorded per-sample factors."""
    return list(dict.fromkeys(key.node for key in run.manifest.series if key.view == PREFIX + "optimizer"))


def attribution_steps(run: Run, param: str, *, step_type: str | None = None) -> list[int]:
    col = _column(run, param, PREFIX + "optimizer")
    rows = run._record_rows(step_type, "attribution_steps")
    if len(rows) == 0:
        return []
    numel = run._read(fmt.STATS, (rows, col, _NUMEL))
    return [int(s) for s in run.steps.loc[rows[~np.isnan(numel)], "step"].to_numpy()]


@dataclass
class AttributionStep:
    """The per-sample factors of one parameter at one step, as recorded by ``attribution=``.

    Attributes:
        param / step: which parameter, which step.
        inputs: ``(B, T, d_in)`` the layer's inputs (None for a bias).
        grad_outputs: ``(B, T, d_out)`` the gradients of the loss with respect to the layer's outputs.
        dataset_index: ``(B,)`` int64, each sample's dataset index (its batch position when the batch had none).
        index_from_batch: whether ``dataset_index`` came from the batch.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"other"``.
        lr: the learning rate of the step. share: this step's gradient's factor in the update direction
            (see docs/attribution.md). precond: Adam's ``1 / (sqrt(v_hat) + eps)`` (None otherwise).
        update: the parameter's recorded change over the step.
        fields: the whole ``attribution:optimizer`` vector by name.
        per_sample: ``(B, *param.shape)`` per-sample gradients of a parameter outside ``nn.Linear`` (``torch.func``);
            then ``inputs`` and ``grad_outputs`` are None.
        contributions: ``(B, rows)`` with ``attribution_keep="contributions"``: each sample's signed share of each
            row's (neuron's) update along it, ``<u_ij, Δ_j> / |Δ_j|``; then no factors, ``precond`` or ``update``.
        update_norms: ``(rows,)`` the rows' update norms ``|Δ_j|`` (``attribution_keep="contributions"``).
        projected: ``(B, k)`` with ``attribution_projection=k`` (``torch.func`` parameters): each sample's
            gradient, flattened, times the random projection ``R`` (:meth:`project` applies the same ``R``);
            then ``per_sample`` is None and ``contributions`` / ``update_norms`` hold the exact contributions.
    """

    param: str
    step: int
    inputs: np.ndarray | None
    grad_outputs: np.ndarray | None
    dataset_index: np.ndarray
    index_from_batch: bool
    optimizer: str
    lr: float
    share: float
    precond: np.ndarray | None
    update: np.ndarray | None
    fields: dict[str, float]
    per_sample: np.ndarray | None = None
    contributions: np.ndarray | None = None
    update_norms: np.ndarray | None = None
    projected: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return int(len(self.dataset_index))

    @property
    def keep(self) -> str:
        """``"factors"`` or ``"contributions"``: what the step kept (``attribution_keep=``)."""
        return "contributions" if self.contributions is not None and self.update is None else "factors"

    @property
    def has_factors(self) -> bool:
        """Whether each sample's gradient can be rebuilt (factors or ``torch.func`` per-sample gradients)."""
        return self.grad_outputs is not None or self.per_sample is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """The parameter's shape (only its rows, ``(rows,)``, with ``attribution_keep="contributions"``)."""
        if self.update is not None:
            return tuple(self.update.shape)
        if self.per_sample is not None:
            return tuple(self.per_sample.shape[1:])
        if self.update_norms is not None:
            return tuple(self.update_norms.shape)
        assert self.grad_outputs is not None
        return (self.grad_outputs.shape[-1],) if self.inputs is None else (self.grad_outputs.shape[-1], self.inputs.shape[-1])

    def per_sample_grads(self) -> np.ndarray:
        """``(B, *param.shape)``: each sample's gradient, ``sum_t g_it ⊗ x_it`` (``sum_t g_it`` for a bias; as
        recorded through ``torch.func`` for parameters of other modules).

        Raises:
            ConfigError: the step kept contributions only (``attribution_keep="contributions"``).
        """
        self._need_factors("per_sample_grads")
        if self.per_sample is not None:
            return self.per_sample.astype(np.float64)
        assert self.grad_outputs is not None
        g = self.grad_outputs.astype(np.float64)
        if self.inputs is None:
            return g.sum(axis=1)
        return np.einsum("bto,bti->boi", g, self.inputs.astype(np.float64))

    def project(self, vector: np.ndarray) -> np.ndarray:
        """``(k,)``: a parameter-shaped ``vector`` times the random projection the step's ``projected``
        gradients were taken with, rebuilt from the recorded seed and the parameter's name; then
        ``projected @ project(t)`` approximates each sample's ``<grad_i, t>`` (Johnson-Lindenstrauss, relative
        error about ``1 / sqrt(k)``, docs/attribution.md#random-projection).

        Raises:
            ConfigError: the step has no projected gradients.
        """
        if self.projected is None:
            raise ConfigError(f"`AttributionStep.project()`: {self.param!r} at step {self.step} was recorded without attribution_projection=.")
        seed = int(self.fields.get("projection_seed", PROJECTION_SEED))
        return project(self.param, np.asarray(vector, dtype=np.float64).reshape(-1), int(self.projected.shape[1]), seed)

    def per_sample_updates(self) -> np.ndarray:
        """``(B, *param.shape)``: each sample's share of the update, ``-lr * share * grad_i * precond``."""
        u = -self.lr * self.share * self.per_sample_grads()
        return u * self.precond if self.precond is not None else u

    def _need_factors(self, what: str) -> None:
        if not self.has_factors and self.projected is not None:
            raise ConfigError(
                f"`AttributionStep.{what}()`: {self.param!r} at step {self.step} was recorded with "
                f"attribution_projection={self.projected.shape[1]}, which keeps each sample's gradient only projected to "
                f"{self.projected.shape[1]} dimensions (AttributionStep.projected) and the exact contributions. HINT: "
                "record without attribution_projection= for the full per-sample gradients."
            )
        if not self.has_factors:
            raise ConfigError(
                f"`AttributionStep.{what}()`: {self.param!r} at step {self.step} was recorded with "
                "attribution_keep='contributions', which keeps each sample's contribution to each neuron's update "
                "but not the factors a per-sample gradient is rebuilt from. HINT: record with "
                "attribution_keep='factors' (the default)."
            )


def read_attribution(run: Run, param: str, step: int, *, step_type: str | None = None) -> AttributionStep:
    views = run._all_views(param)
    if PREFIX + "optimizer" not in views:
        _column(run, param, PREFIX + "optimizer")

    def get(view: str) -> np.ndarray | None:
        if PREFIX + view not in views:
            return None
        try:
            return run.samples(param, step, view=PREFIX + view, step_type=step_type)
        except StepNotFoundError:
            return None

    g, per_sample, contribution, projected = get("grad_output"), get("per_sample_grad"), get("contribution"), get("per_sample_grad_projected")
    if g is None and per_sample is None and contribution is None and projected is None:
        raise StepNotFoundError(f"Run {run.name!r} has no attribution of {param!r} at step {step}; it has it at steps {attribution_steps(run, param, step_type=step_type)[:10]}.")
    vector = get("optimizer")
    fields = dict(zip(OPTIMIZER_FIELDS, (float(v) for v in (vector if vector is not None else []))))
    halves = get("index")
    size = next(a for a in (g, per_sample, contribution, projected) if a is not None).shape[0]
    index = halves[:, 0].astype(np.int64) * INDEX_SPLIT + halves[:, 1].astype(np.int64) if halves is not None else np.arange(size)
    kind = int(fields.get("kind", 0))
    update = get("update")
    return AttributionStep(
        param=param,
        step=int(step),
        inputs=get("input"),
        grad_outputs=g,
        dataset_index=index,
        index_from_batch=bool(fields.get("index_from_batch", 0.0)),
        optimizer=OPTIMIZER_KINDS[kind] if 0 <= kind < len(OPTIMIZER_KINDS) else "other",
        lr=fields.get("lr", float("nan")),
        share=fields.get("share", 1.0),
        precond=get("precond") if fields.get("has_precond") else None,
        update=update,
        fields=fields,
        per_sample=per_sample,
        contributions=contribution,
        update_norms=get("update_norm"),
        projected=projected,
    )


def read_test_products(run: Run, param: str, step: int, measure: str, *, step_type: str | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, float]] | None:
    """What ``influence`` needs of a step from a ``TestGradient`` measure: the per-sample products
    ``<grad_i * precond, test>`` ``(B,)``, the dataset indices ``(B,)`` and the optimizer fields; None when
    the measure has none at ``step``. Reads three small series, never the factors."""

    def get(view: str) -> np.ndarray | None:
        try:
            return run.samples(param, step, view=view, step_type=step_type)
        except StepNotFoundError:
            return None

    dots = get(TEST_PREFIX + measure)
    if dots is None:
        return None
    vector = get(PREFIX + "optimizer")
    fields = dict(zip(OPTIMIZER_FIELDS, (float(v) for v in (vector if vector is not None else []))))
    halves = get(PREFIX + "index")
    index = halves[:, 0].astype(np.int64) * INDEX_SPLIT + halves[:, 1].astype(np.int64) if halves is not None else np.arange(len(dots))
    return dots.reshape(-1), index, fields
