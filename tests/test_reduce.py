"""Statistics computed in groups agree with statistics computed directly, tensor by tensor; packing a step
and cutting its host buffer back into entries loses nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comgra_callbacks.recording import reduce
from comgra_callbacks.recording.pending import FULL, PendingStep, Snapshot, pack
from comgra_callbacks.store.format import NEURON_STAT_NAMES, STAT_INDEX, STAT_NAMES, SeriesKey

torch.manual_seed(1234)  # the cases are fixed
CASES = {
    "normal": torch.randn(16, 5),
    "same_size_as_normal": torch.randn(80),  # grouped with "normal" (same number of elements)
    "with_nan_and_inf": torch.tensor([[1.0, float("nan"), 3.0], [float("inf"), -2.0, 0.0], [float("-inf"), 4.0, 0.0]]),
    "same_size_as_nan": torch.arange(9.0),  # grouped with the NaN case, must not be affected by it
    "all_nan": torch.full((2, 3), float("nan")),
    "large_offset": 1000.0 + 0.01 * torch.randn(64, 8),
    "integers": torch.randint(-5, 50, (7, 4)),
    "scalar": torch.tensor(2.5),
    "one_element": torch.tensor([3.0]),
    "booleans": torch.tensor([[True, False], [True, True]]),
    "empty": torch.zeros(0, 4),
    "float64": torch.randn(5, 3, dtype=torch.float64),
    "half": torch.randn(4, 4).half(),
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


def same(a: float, b: float, rel: float = 1e-5) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=1e-5)


@pytest.mark.parametrize("synchronous", [True, False], ids=["cpu-path", "accelerator-path"])
def test_grouped_statistics_agree_with_direct_ones(synchronous: bool) -> None:
    names = sorted(CASES)
    rows = reduce.stats_rows([CASES[n] for n in names], synchronous=synchronous)
    assert rows.shape == (len(names), len(STAT_NAMES)) and rows.dtype == torch.float32
    for name, row in zip(names, rows.tolist()):
        # at 1000 +- 0.01, float32 inputs fix the std only to ~1e-4 relative
        rel = 1e-3 if name in ("large_offset", "half") else 1e-5
        for stat, value in direct_stats(CASES[name]).items():
            assert same(row[STAT_INDEX[stat]], value, rel), (name, stat, row[STAT_INDEX[stat]], value)
        assert math.isnan(row[STAT_INDEX["update_ratio"]])


def test_slow_path_agrees_with_the_fast_one() -> None:
    for name in ("normal", "large_offset", "integers", "one_element"):
        fast = reduce.stats_rows([CASES[name]])[0]
        slow = reduce.stats_torch(CASES[name])
        np.testing.assert_allclose(fast.numpy(), slow.numpy(), rtol=1e-3, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("synchronous", [True, False], ids=["cpu-path", "accelerator-path"])
@pytest.mark.parametrize("is_parameter", [False, True])
def test_neuron_statistics(is_parameter: bool, synchronous: bool) -> None:
    names = ["normal", "with_nan_and_inf", "integers", "large_offset", "all_nan", "same_size_as_nan"]
    matrices = [reduce.neuron_matrix(CASES[n], is_parameter=is_parameter) for n in names]
    blocks = reduce.neuron_rows(matrices, synchronous=synchronous)
    for name, matrix, block in zip(names, matrices, blocks):
        x = np.ma.masked_invalid(matrix.double().numpy())
        assert block.shape == (len(NEURON_STAT_NAMES), matrix.shape[1])
        rel = 1e-3 if name == "large_offset" else 1e-5
        np.testing.assert_allclose(block[0].numpy(), x.mean(axis=0).filled(np.nan), rtol=rel, atol=1e-6, equal_nan=True)
        np.testing.assert_allclose(block[2].numpy(), np.abs(x).mean(axis=0).filled(np.nan), rtol=rel, atol=1e-6, equal_nan=True)
        counts = (~x.mask).sum(axis=0) if np.ma.is_masked(x) else np.full(x.shape[1], x.shape[0])
        expected_std = np.where(counts > 1, x.std(axis=0, ddof=1).filled(0.0), np.where(counts == 1, 0.0, np.nan))
        np.testing.assert_allclose(block[1].numpy(), expected_std, rtol=max(rel, 1e-4), atol=1e-5, equal_nan=True)
        l2 = np.sqrt((x * x).sum(axis=0)).filled(np.nan)
        np.testing.assert_allclose(block[3].numpy(), np.where(counts > 0, l2, np.nan), rtol=rel, atol=1e-5, equal_nan=True)


def test_pack_and_materialize_round_trip() -> None:
    weight = torch.randn(6, 4)
    update = 0.01 * torch.randn(6, 4)
    act = torch.randn(8, 3, 5)
    snaps = [
        Snapshot(SeriesKey("act", None, 0, "value"), act, "float32", False, True, 2),
        Snapshot(SeriesKey("ids", None, 0, "value"), torch.randint(0, 9, (8, 7)), "int64", False, False, 3),
        Snapshot(SeriesKey("loss", None, 0, "value"), torch.tensor(0.7), "float32", False, True, 4),
        Snapshot(SeriesKey("w", None, 0, "value"), weight, "float32", True, True, FULL),
        Snapshot(SeriesKey("w", None, 0, "update"), update, "float32", True, True, 0, reference=weight),
    ]
    pending = PendingStep(5, "train", 1, 9, 123.0, "schedule", snaps, sample_index=torch.tensor([6, 1]), batch_size=8)
    packed = pack(pending)
    record = packed.materialize()
    assert (record.step, record.step_type, record.epoch, record.batch_idx, record.reason) == (5, "train", 1, 9, "schedule")
    entries = {(e.key.node, e.key.view): e for e in record.entries}
    assert list(entries) == [("act", "value"), ("ids", "value"), ("loss", "value"), ("w", "value"), ("w", "update")]
    assert entries[("act", "value")].stats[STAT_INDEX["mean"]] == pytest.approx(act.mean().item(), rel=1e-5)
    np.testing.assert_array_equal(entries[("act", "value")].samples, act[[6, 1]].numpy())  # the selected samples
    assert entries[("act", "value")].neurons.shape == (len(NEURON_STAT_NAMES), 5)
    assert entries[("ids", "value")].neurons is None and entries[("ids", "value")].samples.shape == (2, 7)
    assert entries[("loss", "value")].samples.shape == () and entries[("loss", "value")].neurons is None
    np.testing.assert_array_equal(entries[("w", "value")].samples, weight.numpy())  # kept whole
    assert entries[("w", "value")].neurons.shape == (len(NEURON_STAT_NAMES), 6)  # one neuron per output unit
    ratio = update.double().norm().item() / weight.double().norm().item()
    assert entries[("w", "update")].stats[STAT_INDEX["update_ratio"]] == pytest.approx(ratio, rel=1e-5)
    assert entries[("w", "update")].samples is None
    assert pending.snapshots == []  # the tensors were released after packing
    assert packed.nbytes > 0


def test_stat_names_are_the_documented_ones() -> None:
    assert STAT_NAMES == ("mean", "std", "abs_mean", "min", "max", "l2", "zero_frac", "nan_count", "inf_count", "numel", "update_ratio")


def test_reductions_leave_torch_threads_as_they_were() -> None:
    """pack() reduces on one thread (reduce.cpu_threads) and must hand torch's thread count back, also when
    a reduction fails; a group large enough for the threaded path sees the count from outside."""
    before = torch.get_num_threads()
    reduce.reduce_tensors([torch.randn(64, 8), torch.randn(3)], [(True, False, None), (False, False, None)])
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with reduce.cpu_threads(1):
            assert torch.get_num_threads() == 1 and reduce.default_threads() == before
            raise RuntimeError("a failing reduction")
    assert torch.get_num_threads() == before


def test_large_offset_takes_the_deviation_kernel() -> None:
    """A neuron whose mean dwarfs its spread would lose m2 to cancellation in the sum of squares; its
    tensor is reduced again from deviations, so the std keeps float32 precision."""
    from comgra_callbacks import stats as spec

    x = (1e4 + torch.linspace(-1e-2, 1e-2, 4096, dtype=torch.float32)).reshape(1024, 4)
    block = reduce.neuron_rows([x])[0]
    expected = x.double().std(0)
    np.testing.assert_allclose(block[1].numpy(), expected.numpy(), rtol=1e-3)
    _, code = spec.partials_from_sums(spec.sums_torch(x.reshape(1, 1024, 4), 1)[0], torch.full((4,), 1024.0))
    assert code.tolist() == [1, 1, 1, 1]  # what sent it there


def test_a_tensor_needing_deviations_is_reduced_from_them_on_later_steps() -> None:
    """The plan of a step remembers a tensor whose m2 lost precision from plain sums and reduces it from
    deviations on the next steps (one pass fewer); the numbers stay those of the first step, and a NaN that
    appears later in that tensor still takes the masked kernel."""
    offset = (1e4 + torch.linspace(-1e-2, 1e-2, 1 << 16)).reshape(1024, 64)  # alone in its group (GROUP_MAX_NUMEL)
    other = torch.randn(1024, 64)
    layouts = [(True, False, None)] * 2
    first_rows, first_blocks = reduce.reduce_tensors([offset, other], layouts)
    plan = reduce._plan([offset, other], layouts)
    assert plan.deviations == {0}
    rows, blocks = reduce.reduce_tensors([offset, other], layouts)
    np.testing.assert_allclose(rows.numpy(), first_rows.numpy(), rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(blocks[0].numpy(), first_blocks[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(blocks[0][1].numpy(), offset.double().std(0).numpy(), rtol=1e-3)
    spoilt = offset.clone()
    spoilt[3, 5] = float("nan")
    rows = reduce.reduce_tensors([spoilt, other], layouts)[0]
    assert rows[0, STAT_INDEX["nan_count"]].item() == 1.0
    finite = spoilt[torch.isfinite(spoilt)].double()
    assert rows[0, STAT_INDEX["mean"]].item() == pytest.approx(finite.mean().item(), rel=1e-6)
    assert rows[0, STAT_INDEX["std"]].item() == pytest.approx(finite.std().item(), rel=1e-3)


def test_share_work_keeps_the_order_and_hands_back_failures() -> None:
    import threading

    seen: set[str] = set()

    def work(i: int) -> int:
        seen.add(threading.current_thread().name)
        torch.randn(256, 256).sum()  # releases the GIL: the helper gets a turn
        return i * i

    items = list(range(40))
    assert reduce.share_work(work, items, cost=lambda i: i % 7) == [i * i for i in items]
    assert reduce.share_work(work, [3]) == [9]
    for _ in range(20):  # the helper takes part (not guaranteed on every call of a busy machine)
        reduce.share_work(work, items)
        if "comgra-reduce" in seen:
            break
    assert "comgra-reduce" in seen

    def fails(i: int) -> int:
        if i == 5:
            raise ValueError("item 5")
        return i

    with pytest.raises(ValueError, match="item 5"):
        reduce.share_work(fails, list(range(10)))
    assert reduce.share_work(work, items) == [i * i for i in items]  # the helper still works afterwards


def test_sharing_follows_the_faster_way() -> None:
    """Each way is tried three times (the first, which pays for compiling, not counted), then the faster is
    kept, and the other is tried again now and then, so that a change of the machine's load changes the
    choice."""
    choice = reduce.Sharing()
    tried = []
    for n in range(6):
        way = choice.pick()
        tried.append(way)
        choice.observe(way, 5.0 if n < 2 else 0.010 if way else 0.030)  # two threads faster, after a slow start
    assert sorted(tried) == [False] * 3 + [True] * 3
    picks = []
    for _ in range(16):
        way = choice.pick()
        picks.append(way)
        choice.observe(way, 0.010 if way else 0.030)
    assert picks.count(True) >= 13 and False in picks  # mostly shared, the other way still tried
    for _ in range(60):  # the machine got busy: two threads now slower
        way = choice.pick()
        choice.observe(way, 0.050 if way else 0.030)
    assert [choice.pick() for _ in range(7)].count(False) >= 6


@pytest.mark.parametrize("n_items", [150, 16500], ids=["short", "long-rows"])
@pytest.mark.parametrize("dim", [1, 2], ids=["items-strided", "items-contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_one_pass_kernel_gives_torchs_partial_sums(dim: int, dtype: torch.dtype, n_items: int) -> None:
    """recording/fused.py (numba, part of the dev install) against stats.sums_torch, both turned into partial
    sums: more items than one float32 block (fused.BLOCK), zeros and -0.0, infinities, several groups, no
    items; and rows long enough to be read in lanes (``_fused_kernels.sums_row_wide``, with a rest that
    fills no lane, holding a bound). The kernel's sums are about the mean of each neuron's first
    fused.BLOCK items (its ``shift`` row), torch's about 0."""
    from comgra_callbacks import stats as spec
    from comgra_callbacks.recording import _fused_kernels, fused

    assert fused.available()
    assert (n_items >= _fused_kernels.WIDE_ROW and n_items % _fused_kernels.LANES) or n_items < _fused_kernels.WIDE_ROW
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, n_items, 9, generator=g, dtype=dtype) * 5 + 2
    x[0, 7, 2] = 0.0
    x[1, :, 4] = -0.0
    x[2, 11, 1] = float("inf")
    x[2, 12, 3] = float("-inf")
    x[0, n_items - 2, 5] = 1e3  # the largest of its neuron, in the rest of a long row
    x[1, n_items - 1, 6] = -1e3
    x = x if dim == 1 else x.transpose(1, 2).contiguous()
    got, want = fused.sums_fused(x, dim), spec.sums_torch(x, dim).double()
    assert got is not None and got.dtype == torch.float64 and got.shape == want.shape == (3, len(spec.SUM_NAMES), 9)
    first = (x[:, : fused.BLOCK, :].double().mean(1) if dim == 1 else x[:, :, : fused.BLOCK].double().mean(2))
    finite = torch.isfinite(first)
    torch.testing.assert_close(got[:, spec.SUM_NAMES.index("shift")][finite], first[finite], rtol=1e-6, atol=1e-6)
    items = torch.full((9,), float(n_items), dtype=torch.float64)
    for b in range(3):
        (p_got, code_got), (p_want, code_want) = spec.partials_from_sums(got[b], items), spec.partials_from_sums(want[b], items)
        assert torch.equal(code_got, code_want)  # 2 where a neuron has an infinity, else 0
        exact = code_want == 0
        torch.testing.assert_close(p_got[:, exact], p_want[:, exact], rtol=1e-5, atol=1e-3)
    empty = torch.zeros((1, 0, 4) if dim == 1 else (1, 4, 0), dtype=dtype)
    torch.testing.assert_close(fused.sums_fused(empty, dim), spec.sums_torch(empty, dim).double())


def test_the_one_pass_kernel_keeps_the_variance_of_a_large_offset() -> None:
    """Its sums are about a first estimate of each neuron's mean, so a mean that dwarfs the spread (where torch's plain sums
    send the tensor to the deviation kernel) keeps float32 precision in one pass."""
    from comgra_callbacks import stats as spec
    from comgra_callbacks.recording import fused

    x = (1e4 + torch.linspace(-1e-2, 1e-2, 4096, dtype=torch.float32)).reshape(1, 1024, 4)
    items = torch.full((4,), 1024.0, dtype=torch.float64)
    assert spec.partials_from_sums(spec.sums_torch(x, 1)[0], items)[1].tolist() == [1, 1, 1, 1]
    partials, code = spec.partials_from_sums(fused.sums_fused(x, 1)[0], items)
    assert code.tolist() == [0, 0, 0, 0]
    std = torch.sqrt(partials[spec.PARTIAL_NAMES.index("m2")] / 1023)
    torch.testing.assert_close(std, x[0].double().std(0), rtol=1e-3, atol=0.0)
    assert (partials[spec.PARTIAL_NAMES.index("sum")] / 1024).tolist() == pytest.approx(x[0].double().mean(0).tolist(), rel=1e-7)
    # neurons with their items contiguous in long rows, read in lanes about the same shift
    rows = (1e4 + torch.linspace(-1e-2, 1e-2, 4 * 4100, dtype=torch.float32)).reshape(1, 4, 4100)
    partials, code = spec.partials_from_sums(fused.sums_fused(rows, 2)[0], torch.full((4,), 4100.0, dtype=torch.float64))
    assert code.tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(torch.sqrt(partials[spec.PARTIAL_NAMES.index("m2")] / 4099), rows[0].double().std(1), rtol=1e-3, atol=0.0)
    assert (partials[spec.PARTIAL_NAMES.index("sum")] / 4100).tolist() == pytest.approx(rows[0].double().mean(1).tolist(), rel=1e-7)


def test_a_step_mixing_derived_groups_and_plain_sums_gives_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-pass kernel derives its groups' columns itself; a group reduced otherwise in the same step (a
    tensor remembered for the deviation kernel, here one with a NaN too) is derived on the host, and both
    are combined into the same rows and blocks as torch's kernels give."""
    from comgra_callbacks.recording import fused

    assert fused.available()
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(300, 7, generator=g) * 3 + 1, torch.randn(40, 7, generator=g), torch.randn(5, 9, generator=g) + 100.0]
    tensors[1][3, 2] = float("nan")
    layouts = [(True, False, None), (True, False, None), (False, False, None)]
    monkeypatch.setattr(reduce, "GROUP_MAX_NUMEL", 1)  # each tensor alone in its group
    monkeypatch.setattr(reduce, "FUSED_MIN_NUMEL", 1 << 62)
    want_rows, want_blocks = reduce.reduce_tensors(tensors, layouts)  # torch's kernels
    monkeypatch.setattr(reduce, "FUSED_MIN_NUMEL", 0)
    reduce._plan(tensors, layouts).deviations.add(1)  # as if its m2 had needed the deviations once
    rows, blocks = reduce.reduce_tensors(tensors, layouts)
    np.testing.assert_allclose(rows.numpy(), want_rows.numpy(), rtol=1e-5, atol=1e-6, equal_nan=True)
    for got, want in zip(blocks, want_blocks):
        assert (got is None) == (want is None)
        if got is not None:
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert rows[1, STAT_INDEX["nan_count"]].item() == 1.0


@pytest.mark.parametrize("copy_max", [reduce.PREPARED_COPY_MAX, 0], ids=["stacks-prepared", "stacks-where-read"])
def test_kernel_calls_prepared_for_two_threads_give_the_same_numbers(monkeypatch: pytest.MonkeyPatch, copy_max: int) -> None:
    """Where two threads share a step, the kernels' calls are prepared first and then run by both; groups
    whose view is a copy (a convolution's channels), whose tensors need the deviations or whose stacks pass
    ``PREPARED_COPY_MAX`` are still reduced where they are taken. All give torch's numbers."""
    from comgra_callbacks.recording import fused

    assert fused.available()
    g = torch.Generator().manual_seed(9)
    tensors = [
        torch.randn(64, 32, generator=g) * 2 - 1,  # alone
        torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g) + 4,  # stacked
        torch.randn(2, 6, 3, 3, generator=g),  # channels on axis 1: a copy
        torch.randn(40, 7, generator=g) + 1e4,  # remembered for the deviations
        torch.randn(16, generator=g), torch.randn(8, 16, generator=g),  # a bias and a weight
    ]
    layouts = [(True, False, None)] * 3 + [(True, False, 1), (True, False, None), (True, True, None), (True, True, None)]
    monkeypatch.setattr(reduce, "GROUP_MAX_NUMEL", 1000)
    monkeypatch.setattr(reduce, "FUSED_MIN_NUMEL", 1 << 62)
    want_rows, want_blocks = reduce.reduce_tensors(tensors, layouts)  # torch's kernels, one thread
    monkeypatch.setattr(reduce, "FUSED_MIN_NUMEL", 0)
    monkeypatch.setattr(reduce, "FORCE_SHARING", True)
    monkeypatch.setattr(reduce, "PREPARED_COPY_MAX", copy_max)
    plan = reduce._plan(tensors, layouts)
    plan.deviations.add(4)
    def stacked(g_: int) -> torch.Tensor:
        return torch.cat([tensors[i].reshape(plan.layouts[i].shape) for i in plan.groups[g_]])

    prepared = reduce._prepared_calls(plan, stacked, reduce._host_arrays(plan.segments.columns))
    stacked = [g_ for g_, members in enumerate(plan.groups) if len(members) > 1]
    assert stacked and all((g_ in prepared) == (copy_max > 0) for g_ in stacked)
    assert plan.group_of[0] in prepared and plan.group_of[3] not in prepared and plan.group_of[4] not in prepared
    rows, blocks = reduce.reduce_tensors(tensors, layouts)
    np.testing.assert_allclose(rows.numpy(), want_rows.numpy(), rtol=1e-5, atol=1e-5, equal_nan=True)
    for got, want in zip(blocks, want_blocks):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5, equal_nan=True)


def test_the_one_pass_kernel_leaves_what_it_cannot_read_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from comgra_callbacks.recording import fused

    x = torch.randn(1, 8, 4)
    assert fused.sums_fused(x.half(), 1) is None  # read as float32 by the caller first
    assert fused.sums_fused(torch.randn(1, 4, 8).transpose(1, 2), 1) is None  # a strided view
    assert fused.sums_fused(x.reshape(8, 4), 1) is None
    monkeypatch.setenv(fused.KERNEL_ENV, "torch")
    assert not fused.available()


def test_update_ratios_of_a_step_with_and_without_the_weight_recorded() -> None:
    """The ratios of all updates are computed together: from the weight's recorded row where there is one,
    from the kept copy of the weight where not, with the edge cases (zero weight: inf, or 0 without update)."""
    w, w_alone = torch.randn(5, 3), torch.randn(4)
    up, up_alone = 0.1 * torch.randn(5, 3), 0.2 * torch.randn(4)
    zero = torch.zeros(3)
    snaps = [
        Snapshot(SeriesKey("w", None, 0, "value"), w, "float32", True, False, 0),
        Snapshot(SeriesKey("w", None, 0, "update"), up, "float32", True, False, 0, reference=w),
        Snapshot(SeriesKey("b", None, 0, "update"), up_alone, "float32", True, False, 0, reference=w_alone),
        Snapshot(SeriesKey("z", None, 0, "update"), torch.ones(3), "float32", True, False, 0, reference=zero),
        Snapshot(SeriesKey("y", None, 0, "update"), torch.zeros(3), "float32", True, False, 0, reference=zero),
    ]
    record = pack(PendingStep(1, "train", 0, 0, 0.0, "schedule", snaps)).materialize()
    ratio = {e.key.node: float(e.stats[STAT_INDEX["update_ratio"]]) for e in record.entries if e.key.view == "update"}
    assert ratio["w"] == pytest.approx(up.norm().item() / w.norm().item(), rel=1e-5)
    assert ratio["b"] == pytest.approx(up_alone.norm().item() / w_alone.norm().item(), rel=1e-5)
    assert ratio["z"] == math.inf and ratio["y"] == 0.0
    assert math.isnan(float(record.entries[0].stats[STAT_INDEX["update_ratio"]]))


def test_the_writer_process_loads_the_kernel_on_a_thread_and_then_uses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``reduce_numpy.reduce_arrays`` (the writer process): past ``KERNEL_AFTER_NUMEL`` elements a thread loads
    numba and the kernels while records go on through numpy; then the kernel reads them. The numbers are the
    same either way."""
    from comgra_callbacks.recording import fused, reduce_numpy

    assert fused.available()
    monkeypatch.delenv(fused.KERNEL_ENV, raising=False)
    monkeypatch.setattr(reduce_numpy, "KERNEL_AFTER_NUMEL", 1000)
    monkeypatch.setattr(reduce_numpy, "_SEEN", {"numel": 0})
    monkeypatch.setattr(reduce_numpy, "_LOADER", [])
    monkeypatch.delitem(fused._STATE, "ready", raising=False)
    g = np.random.default_rng(2)
    arrays = [g.standard_normal((40, 30)).astype(np.float32), g.standard_normal((30, 20)).astype(np.float32), g.standard_normal(50).astype(np.float32)]
    wanted = [(True, False, None), (True, True, None), (False, False, None)]
    want_rows, want_blocks = reduce_numpy.reduce_arrays(arrays, wanted, kernel=False)
    assert not reduce_numpy._kernel_ready(10) and not reduce_numpy._LOADER  # below the threshold: nothing loads
    rows, blocks = reduce_numpy.reduce_arrays(arrays, wanted)  # 2,450 elements: past it, the loading starts
    assert len(reduce_numpy._LOADER) == 1
    reduce_numpy._LOADER[0].join(timeout=120)
    assert fused.ready() and reduce_numpy._kernel_ready(0)
    calls: list[str] = []
    call = fused._call
    monkeypatch.setattr(fused, "_call", lambda name, *rest: (calls.append(name), call(name, *rest))[1])
    kernel_rows, kernel_blocks = reduce_numpy.reduce_arrays(arrays, wanted)
    assert sorted(set(calls)) == ["cols+derive", "rows+derive"]  # read by the kernel now
    for got in (rows, kernel_rows):
        np.testing.assert_allclose(got, want_rows, rtol=1e-5, atol=1e-6)
    for got_blocks in (blocks, kernel_blocks):
        for got, want in zip(got_blocks, want_blocks):
            assert (got is None) == (want is None)
            if got is not None:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_kernel_that_cannot_be_loaded_leaves_the_writer_on_numpy(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The writer process loads the kernel before it answers where large raw steps will come
    (``load_kernels(wait=True)``): a failure there (a broken numba, a compilation error) must not stop it
    from writing. It says why once, never tries again, and the records are reduced with numpy."""
    from comgra_callbacks.recording import fused, reduce_numpy

    monkeypatch.delenv(fused.KERNEL_ENV, raising=False)
    monkeypatch.setattr(reduce_numpy, "_LOADER", [])
    monkeypatch.setattr(reduce_numpy, "_FAILED", [])
    monkeypatch.delitem(fused._STATE, "ready", raising=False)
    monkeypatch.setattr(fused, "available", lambda: True)
    tries: list[int] = []

    def broken() -> None:
        tries.append(1)
        raise RuntimeError("LLVM ERROR: no target")

    monkeypatch.setattr(fused, "preload", broken)
    reduce_numpy.load_kernels(wait=True)
    reduce_numpy.load_kernels(wait=True)
    reduce_numpy.load_kernels()  # the later rule (2 M elements reduced) does not try again either
    assert tries == [1] and not reduce_numpy._LOADER
    assert "the one-pass kernel could not be loaded (RuntimeError: LLVM ERROR: no target)" in capsys.readouterr().err
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    rows, _ = reduce_numpy.reduce_arrays([a], [(True, False, None)])
    assert rows[0][reduce_numpy.STAT_INDEX["mean"]] == pytest.approx(5.5)
