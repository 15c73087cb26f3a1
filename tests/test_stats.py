"""One table of edge cases through every kernel and every path of the statistics (comgra_callbacks/stats.py):
numpy (the writer process), torch grouped and alone, the CPU path and the accelerator path (forced on the
CPU), the masked path, and a whole step packed and recorded. All are held to one float64 reference."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from comgra_callbacks import stats as spec
from comgra_callbacks.recording import fused, reduce, reduce_numpy
from comgra_callbacks.store.format import NEURON_STAT_NAMES, STAT_INDEX, STAT_NAMES, SeriesKey

torch.manual_seed(7)
EDGE_CASES = {
    "normal": torch.randn(6, 5),
    "empty": torch.zeros(0, 4),
    "nan_and_inf": torch.tensor([[1.0, float("nan")], [float("inf"), -2.0], [float("-inf"), 0.0]]),
    "all_nan": torch.full((3, 2), float("nan")),
    "integers": torch.randint(-5, 50, (4, 3)),
    "booleans": torch.tensor([[True, False], [True, True], [False, False]]),
    "bfloat16": torch.randn(4, 3).bfloat16(),
    "half": torch.randn(4, 3).half(),
    "huge": torch.tensor([[1e30, -3e30], [2e30, 5e29]]),
    "large_offset": 1000.0 + 0.01 * torch.randn(32, 4),
    "one_item": torch.tensor([[3.0, -1.0]]),
    "scalar": torch.tensor(2.5),
    "float64": torch.randn(3, 2, dtype=torch.float64),
}
LOOSE = {"large_offset", "half", "bfloat16"}  # float32 inputs fix the std at 1000 +- 0.01 to ~1e-4


def reference_stats(t: torch.Tensor) -> dict[str, float]:
    x = t.double().reshape(-1)
    finite = x[torch.isfinite(x)]
    out = {"numel": float(x.numel()), "nan_count": float(torch.isnan(x).sum()), "inf_count": float(torch.isinf(x).sum()),
           "zero_frac": float((x == 0).double().mean()) if x.numel() else math.nan}
    if finite.numel():
        out.update(mean=float(finite.mean()), std=float(finite.std()) if finite.numel() > 1 else 0.0, abs_mean=float(finite.abs().mean()),
                   min=float(finite.min()), max=float(finite.max()), l2=float(finite.norm()))
    else:
        out.update({k: math.nan for k in ("mean", "std", "abs_mean", "min", "max", "l2")})
    return out


def reference_neurons(t: torch.Tensor, is_parameter: bool) -> np.ndarray | None:
    m = reduce.neuron_matrix(t, is_parameter=is_parameter)
    if m is None:
        return None
    x = np.ma.masked_invalid(m.double().numpy())
    counts = (~np.ma.getmaskarray(x)).sum(axis=0)
    std = np.where(counts > 1, x.std(axis=0, ddof=1).filled(0.0) if x.shape[0] > 1 else 0.0, 0.0)
    block = [x.mean(axis=0).filled(np.nan), std, np.abs(x).mean(axis=0).filled(np.nan), np.sqrt((x * x).sum(axis=0).filled(0.0))]
    return np.where(counts > 0, np.stack(block), np.nan)


def check_row(name: str, row: np.ndarray) -> None:
    rel = 1e-3 if name in LOOSE else 1e-5
    for stat, value in reference_stats(EDGE_CASES[name]).items():
        got = float(row[STAT_INDEX[stat]])
        assert (math.isnan(got) and math.isnan(value)) or math.isclose(got, value, rel_tol=rel, abs_tol=1e-6), (name, stat, got, value)
    assert math.isnan(float(row[STAT_INDEX["update_ratio"]]))


def check_neurons(name: str, block: np.ndarray | None, is_parameter: bool) -> None:
    expected = reference_neurons(EDGE_CASES[name], is_parameter)
    if expected is None:
        assert block is None
        return
    assert block is not None and block.shape == (len(NEURON_STAT_NAMES), expected.shape[1])
    rel = 1e-3 if name in LOOSE else 1e-5
    np.testing.assert_allclose(np.asarray(block, dtype=np.float64), expected, rtol=rel, atol=1e-6, equal_nan=True, err_msg=name)


# every kernel and path: (name, function of (tensors, is_parameter) -> [(stats row, neurons block)])
def numpy_path(tensors: list[torch.Tensor], is_parameter: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
    arrays = [t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy() for t in tensors]
    return [reduce_numpy.reduce_array(a, neurons=True, is_parameter=is_parameter) for a in arrays]


def numpy_record_path(kernel: bool):  # noqa: ANN201
    """The writer process's way: a record's arrays at once (``reduce_numpy.reduce_arrays``), with or without
    the one-pass kernel."""

    def run(tensors: list[torch.Tensor], is_parameter: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
        if kernel:
            assert fused.available(), "numba is part of the dev install (the `fast` extra)"
        arrays = [t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy() for t in tensors]
        rows, blocks = reduce_numpy.reduce_arrays(arrays, [(True, is_parameter, None)] * len(arrays), kernel=kernel)
        return list(zip(rows, blocks))

    return run


def torch_path(synchronous: bool, alone: bool, shared: bool | None = None, repeats: int = 1, kernel: str = "torch"):  # noqa: ANN201
    """``shared``: the groups reduced by two threads (``reduce.share_work``) or one; ``repeats``: the same
    step reduced that many times, the last result checked (the plan and what it learnt are reused);
    ``kernel``: the plain sums by torch's reductions or by the one-pass kernel (``recording/fused.py``)."""

    def run(tensors: list[torch.Tensor], is_parameter: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
        limit, forced, fused_min = reduce.GROUP_MAX_NUMEL, reduce.FORCE_SHARING, reduce.FUSED_MIN_NUMEL
        reduce.GROUP_MAX_NUMEL = 1 if alone else 1 << 30
        reduce.FORCE_SHARING = shared
        reduce.FUSED_MIN_NUMEL = 0 if kernel == "fused" else 1 << 62
        if kernel == "fused":
            assert fused.available(), "numba is part of the dev install (the `fast` extra)"
        try:
            for _ in range(repeats):
                rows, blocks = reduce.reduce_tensors(tensors, [(True, is_parameter, None)] * len(tensors), synchronous=synchronous)
        finally:
            reduce.GROUP_MAX_NUMEL, reduce.FORCE_SHARING, reduce.FUSED_MIN_NUMEL = limit, forced, fused_min
        return [(r.numpy(), None if b is None else b.numpy()) for r, b in zip(rows, blocks)]

    return run


PATHS = {
    "numpy": numpy_path,
    "numpy-record": numpy_record_path(False),
    "numpy-record-fused": numpy_record_path(True),
    "torch-cpu-grouped": torch_path(True, False),
    "torch-cpu-alone": torch_path(True, True),
    "torch-accelerator-grouped": torch_path(False, False),
    "torch-accelerator-alone": torch_path(False, True),
    "torch-cpu-two-threads": torch_path(True, True, shared=True),
    "torch-cpu-one-thread": torch_path(True, True, shared=False),
    "torch-cpu-third-step": torch_path(True, True, repeats=3),  # tensors remembered for the deviation kernel
    "fused-cpu-grouped": torch_path(True, False, kernel="fused"),
    "fused-cpu-alone": torch_path(True, True, kernel="fused"),
    "fused-cpu-two-threads": torch_path(True, True, shared=True, kernel="fused"),
    # the kernels' calls prepared first (stacks of small tensors among them), then run by both threads
    "fused-cpu-two-threads-grouped": torch_path(True, False, shared=True, kernel="fused"),
}


@pytest.mark.parametrize("is_parameter", [False, True], ids=["activation", "parameter"])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_gives_the_reference_numbers(path: str, is_parameter: bool) -> None:
    names = [n for n in EDGE_CASES if not (is_parameter and EDGE_CASES[n].numel() == 0)]  # a parameter is never empty
    # twice each: same-layout tensors are reduced as one group, and a bad one must not spoil its neighbours
    tensors = [EDGE_CASES[n] for n in names] * 2
    results = PATHS[path](tensors, is_parameter)
    for name, (row, block) in zip(names * 2, results):
        check_row(name, row)
        check_neurons(name, block, is_parameter)


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_masked_path_and_batch_only_views_agree(name: str) -> None:
    """The general path alone (``stats_torch``), batch statistics without per-neuron ones (all elements as
    one neuron: a different set of partial sums), and numpy's ``stats_numpy``."""
    t = EDGE_CASES[name]
    check_row(name, reduce.stats_torch(t).numpy())
    check_row(name, reduce.stats_rows([t, t])[1].numpy())
    check_row(name, reduce.stats_rows([t], synchronous=False)[0].numpy())
    check_row(name, spec.stats_numpy(t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()))


def test_the_specification_names_every_column_once() -> None:
    assert STAT_NAMES == spec.STAT_NAMES and len(set(STAT_NAMES)) == len(STAT_NAMES)
    assert NEURON_STAT_NAMES == ("mean", "std", "abs_mean", "l2") and spec.LEGACY_NEURON_STAT_NAMES == NEURON_STAT_NAMES[:3]
    assert [spec.update_ratio(*a) for a in ((1.0, 2.0), (1.0, 0.0), (0.0, 0.0))] == [0.5, math.inf, 0.0]


def _record(step: int, neurons: np.ndarray) -> Any:
    from comgra_callbacks.store.writer import HostEntry, HostRecord

    row = np.full(len(STAT_NAMES), float(step), dtype=np.float32)
    return HostRecord(step, "train", 0, step, 1.0 + step, "schedule", [HostEntry(SeriesKey("n", None, 0, "value"), row, neurons, None)])


def test_stores_without_per_neuron_l2_keep_reading_and_resuming(tmp_path: Path) -> None:
    """A store written before per-neuron l2 (three blocks per entry, named so in its manifest) reads l2 as NaN;
    resumed, it keeps writing three blocks; a new store holds four."""
    from comgra_callbacks import open_run
    from comgra_callbacks.store.storage import open_root
    from comgra_callbacks.store.writer import RunWriter

    old = np.arange(6, dtype=np.float32).reshape(3, 2)  # what the older writer produced: mean, std, abs_mean
    writer = RunWriter(open_root(tmp_path).run("old"))
    writer.manifest.neuron_stat_names = spec.LEGACY_NEURON_STAT_NAMES
    writer.append([_record(0, old)])
    writer.close("finished")
    assert json.loads((tmp_path / "old" / "manifest.json").read_text())["neuron_stat_names"] == ["mean", "std", "abs_mean"]
    resumed = RunWriter(open_root(tmp_path).run("old"), resume=True)
    resumed.append([_record(1, np.vstack([old + 10, np.full((1, 2), 99.0, dtype=np.float32)]))])  # today's four blocks
    resumed.close("finished")
    run = open_run(tmp_path / "old")
    for step, offset in ((0, 0.0), (1, 10.0)):
        frame = run.neurons("n", step)
        assert list(frame.columns) == list(NEURON_STAT_NAMES)
        np.testing.assert_array_equal(frame[["mean", "std", "abs_mean"]].to_numpy().T, old + offset)
        assert frame["l2"].isna().all()

    writer = RunWriter(open_root(tmp_path).run("new"))
    writer.append([_record(0, np.arange(8, dtype=np.float32).reshape(4, 2))])
    writer.close("finished")
    np.testing.assert_array_equal(open_run(tmp_path / "new").neurons("n", 0)["l2"].to_numpy(), [6.0, 7.0])
