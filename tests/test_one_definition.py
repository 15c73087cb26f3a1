"""The update-to-weight ratio and the sample choice have one definition each (``stats.update_ratio``,
``sampling.kept_samples``), called by the training side (torch) and the writer process (numpy). One table
each, run through every kind of input, so the two paths cannot drift apart again."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from comgra_callbacks.recording.sampling import kept_samples
from comgra_callbacks.stats import update_ratio
from comgra_callbacks.store.messages import FULL

NAN, INF = math.nan, math.inf
# (‖update‖, ‖weight before‖, ratio): the edge cases of the specification (stats.py)
RATIOS = [
    (1.0, 2.0, 0.5),
    (3.0, 3.0, 1.0),
    (1.0, 0.0, INF),  # a zero weight that moved
    (0.0, 0.0, 0.0),  # nothing moved, nothing to move
    (0.0, 4.0, 0.0),
    (NAN, 2.0, NAN),
    (NAN, 0.0, 0.0),
    (2.0, NAN, INF),  # a NaN weight is not positive: like a zero one
    (1e30, 1e-30, 1e60),
]

KINDS: dict[str, Callable[[float], Any]] = {
    "float": float,
    "numpy 0-d": lambda v: np.asarray(v),
    "numpy float32": np.float32,
    "torch float32": lambda v: torch.tensor(v, dtype=torch.float32),
    "torch float64": lambda v: torch.tensor(v, dtype=torch.float64),
}


def _as_float(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(("l2", "ref", "expected"), RATIOS)
def test_update_ratio_edge_cases_are_the_same_for_every_kind(kind: str, l2: float, ref: float, expected: float) -> None:
    make = KINDS[kind]
    if kind == "torch float32" and expected == 1e60:
        expected = INF  # beyond float32 (scalars are divided as Python floats)
    got = _as_float(update_ratio(make(l2), make(ref)))
    assert got == pytest.approx(expected, rel=1e-6, nan_ok=True)


@pytest.mark.parametrize("xp", ["numpy", "torch"])
def test_update_ratio_of_arrays_is_elementwise_and_keeps_the_kind(xp: str) -> None:
    l2 = [r[0] for r in RATIOS]
    ref = [r[1] for r in RATIOS]
    expected = [r[2] for r in RATIOS]
    if xp == "numpy":
        out = update_ratio(np.array(l2), np.array(ref))
        assert isinstance(out, np.ndarray) and out.dtype == np.float64
    else:
        out = update_ratio(torch.tensor(l2, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64))
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
        out = out.numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_update_ratio_floats_give_a_float_and_a_float_beside_a_tensor_joins_it() -> None:
    assert type(update_ratio(1.0, 4.0)) is float and type(update_ratio(1, 0)) is float
    out = update_ratio(torch.tensor([2.0, 1.0]), 0.0)  # a float beside a tensor
    assert isinstance(out, torch.Tensor) and out.tolist() == [INF, INF]
    assert update_ratio(0.5, torch.tensor(2.0)).item() == 0.25


def test_update_ratio_of_tensors_never_reads_their_values_on_the_host() -> None:
    """Meta tensors have no values: any ``item()``, ``bool()`` or ``if`` on one raises, as a host sync would."""
    out = update_ratio(torch.tensor(1.0, device="meta"), torch.tensor(0.0, device="meta"))
    assert out.device.type == "meta" and out.shape == ()
    with pytest.raises(RuntimeError):
        bool(torch.tensor(1.0, device="meta") > 0)  # the test can fail: a branch on a value would raise


BATCH = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)  # 5 samples x 3
POSITIONS = [4, 1]
# (case, tensor, samples, index, is_parameter, batch_size, the rows kept of BATCH or the whole tensor)
SAMPLES: list[tuple[str, np.ndarray, int, list[int] | None, bool, int | None, Any]] = [
    ("full", BATCH, FULL, POSITIONS, False, 5, "all"),
    ("0-d", np.asarray(np.float32(2.5)), 3, POSITIONS, False, 5, "all"),
    ("first k", BATCH, 2, None, False, 5, [0, 1]),
    ("more than the batch", BATCH, 9, None, False, 5, [0, 1, 2, 3, 4]),
    ("selected", BATCH, 2, POSITIONS, False, 5, POSITIONS),
    ("selected, more than k", BATCH, 1, POSITIONS, False, 5, POSITIONS),
    ("parameter: never by position", BATCH, 2, POSITIONS, True, 5, [0, 1]),
    ("not batch-sized", BATCH, 2, POSITIONS, False, 7, [0, 1]),
    ("batch size unknown", BATCH, 3, POSITIONS, False, None, [0, 1, 2]),
    ("no selection", BATCH, 1, [], False, 5, []),
]


def _array(xp: str, a: np.ndarray) -> Any:
    return torch.from_numpy(a.copy()) if xp == "torch" else a


def _index(xp: str, positions: list[int] | None) -> Any:
    if positions is None:
        return None
    return torch.tensor(positions, dtype=torch.long) if xp == "torch" else np.asarray(positions, dtype=np.int64)


@pytest.mark.parametrize("xp", ["numpy", "torch"])
@pytest.mark.parametrize(("case", "a", "samples", "positions", "is_parameter", "batch_size", "rows"), SAMPLES, ids=[s[0] for s in SAMPLES])
def test_kept_samples_are_the_same_for_numpy_and_torch(
    xp: str, case: str, a: np.ndarray, samples: int, positions: list[int] | None, is_parameter: bool, batch_size: int | None, rows: Any
) -> None:
    kept = kept_samples(_array(xp, a), samples, _index(xp, positions), is_parameter=is_parameter, batch_size=batch_size)
    assert isinstance(kept, torch.Tensor if xp == "torch" else np.ndarray)
    expected = a if rows == "all" else a[np.asarray(rows, dtype=np.int64)].reshape(-1, *a.shape[1:])
    np.testing.assert_array_equal(np.asarray(kept), expected)


def test_kept_samples_of_a_tensor_move_the_index_to_its_device_without_a_sync() -> None:
    kept = kept_samples(torch.empty(5, 3, device="meta"), 2, torch.tensor(POSITIONS), is_parameter=False, batch_size=5)
    assert kept.device.type == "meta" and tuple(kept.shape) == (2, 3)
