"""The two reduction backends (numpy for CPU tensors, torch on the device) agree with each other and with
statistics computed directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comgra_callbacks.recording import reduce
from comgra_callbacks.recording.pending import FULL, PendingStep, Snapshot
from comgra_callbacks.store.format import STAT_INDEX, STAT_NAMES, SeriesKey

torch.manual_seed(1234)  # the cases are fixed
CASES = {
    "normal": torch.randn(16, 5),
    "with_nan_and_inf": torch.tensor([[1.0, float("nan"), 3.0], [float("inf"), -2.0, 0.0], [float("-inf"), 4.0, 0.0]]),
    "all_nan": torch.full((2, 3), float("nan")),
    "large_offset": 1000.0 + 0.01 * torch.randn(64, 8),
    "integers": torch.randint(-5, 50, (7, 4)),
    "scalar": torch.tensor(2.5),
    "one_element": torch.tensor([3.0]),
    "booleans": torch.tensor([[True, False], [True, True]]),
    "empty": torch.zeros(0, 4),
    "float64": torch.randn(5, 3, dtype=torch.float64),
}


def direct_stats(t: torch.Tensor) -> dict[str, float]:
    x = t.double().reshape(-1)
    finite = x[torch.isfinite(x)]
    out = {
        "numel": float(x.numel()),
        "nan_count": float(torch.isnan(x).sum()),
        "inf_count": float(torch.isinf(x).sum()),
        "zero_frac": float((x == 0).double().mean()) if x.numel() else math.nan,
    }
    if finite.numel():
        out.update(
            mean=float(finite.mean()),
            std=float(finite.std()) if finite.numel() > 1 else 0.0,
            abs_mean=float(finite.abs().mean()),
            min=float(finite.min()),
            max=float(finite.max()),
            l2=float(finite.norm()),
        )
    else:
        out.update({k: math.nan for k in ("mean", "std", "abs_mean", "min", "max", "l2")})
    return out


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_backends_agree_with_direct_statistics(case: str) -> None:
    t = CASES[case]
    expected = direct_stats(t)
    by_numpy = reduce.stats_numpy(t.numpy())
    by_torch = reduce.stats_torch(t).numpy()
    for name, value in expected.items():
        i = STAT_INDEX[name]
        assert same(float(by_numpy[i]), value), (case, name, by_numpy[i], value)
        assert same(float(by_torch[i]), value), (case, name, by_torch[i], value)
    assert math.isnan(by_numpy[STAT_INDEX["update_ratio"]]) and math.isnan(by_torch[STAT_INDEX["update_ratio"]])


@pytest.mark.parametrize("case", ["normal", "with_nan_and_inf", "integers", "large_offset", "all_nan"])
@pytest.mark.parametrize("is_parameter", [False, True])
def test_neuron_statistics_agree(case: str, is_parameter: bool) -> None:
    t = CASES[case]
    matrix_np = reduce.neuron_matrix_numpy(t.numpy(), is_parameter=is_parameter)
    matrix_t = reduce.neuron_matrix_torch(t, is_parameter=is_parameter)
    bad = bool((~torch.isfinite(t.double())).any())
    by_numpy = reduce.neurons_numpy(matrix_np, has_nonfinite=bad)
    by_torch = reduce.neurons_torch(matrix_t).numpy()
    # at 1000 +- 0.01, float32 inputs fix the std only to ~1e-4 relative; the backends round differently
    rtol = 1e-3 if case == "large_offset" else 1e-5
    np.testing.assert_allclose(by_numpy, by_torch, rtol=rtol, atol=1e-6, equal_nan=True)
    x = (t.double() if not is_parameter else t.double().reshape(t.shape[0], -1).T).numpy()
    masked = np.ma.masked_invalid(x)
    np.testing.assert_allclose(by_numpy[0], masked.mean(axis=0).filled(np.nan), rtol=1e-5, atol=1e-6, equal_nan=True)


def test_update_ratio_on_both_backends() -> None:
    before = torch.tensor([3.0, 4.0])
    delta = torch.tensor([0.3, 0.4])
    by_numpy = reduce.stats_numpy(delta.numpy(), reference_l2=5.0)
    by_torch = reduce.stats_torch(delta, torch.tensor(5.0, dtype=torch.float64))
    assert math.isclose(by_numpy[STAT_INDEX["update_ratio"]], 0.1, rel_tol=1e-6)
    assert math.isclose(float(by_torch[STAT_INDEX["update_ratio"]]), 0.1, rel_tol=1e-6)
    del before


def _pending(backend: str) -> PendingStep:
    weight = torch.randn(6, 4)
    snaps = [
        Snapshot(SeriesKey("act", None, 0, "value"), torch.randn(8, 3, 5), "float32", False, True, 2),
        Snapshot(SeriesKey("ids", None, 0, "value"), torch.randint(0, 9, (8, 7)), "int64", False, True, 3),
        Snapshot(SeriesKey("loss", None, 0, "value"), torch.tensor(0.7), "float32", False, True, 4),
        Snapshot(SeriesKey("w", None, 0, "value"), weight, "float32", True, True, FULL),
        Snapshot(SeriesKey("w", None, 0, "update"), 0.01 * torch.randn(6, 4), "float32", True, True, 0, reference=weight),
    ]
    torch.manual_seed(0)
    return PendingStep(5, "train", 0, 5, 1.0, "schedule", snaps, backend=backend)


def test_pending_step_backends_give_the_same_record() -> None:
    torch.manual_seed(0)
    a = _pending("auto")
    torch.manual_seed(0)
    b = _pending("torch")
    by_numpy, by_torch = a.materialize(), b.materialize()
    assert [e.key for e in by_numpy.entries] == [e.key for e in by_torch.entries]
    for x, y in zip(by_numpy.entries, by_torch.entries):
        np.testing.assert_allclose(x.stats, y.stats, rtol=1e-5, atol=1e-6, equal_nan=True)
        if x.neurons is None:
            assert y.neurons is None
        else:
            np.testing.assert_allclose(x.neurons, y.neurons, rtol=1e-5, atol=1e-6)
        if x.samples is None:
            assert y.samples is None
        else:
            np.testing.assert_array_equal(x.samples, y.samples)
    shapes = {e.key.node: (None if e.samples is None else e.samples.shape) for e in by_numpy.entries if e.key.view == "value"}
    assert shapes == {"act": (2, 3, 5), "ids": (3, 7), "loss": (), "w": (6, 4)}
    assert a.snapshots == []  # released after reduction


def test_stat_names_are_the_documented_ones() -> None:
    assert STAT_NAMES == ("mean", "std", "abs_mean", "min", "max", "l2", "zero_frac", "nan_count", "inf_count", "numel", "update_ratio")
