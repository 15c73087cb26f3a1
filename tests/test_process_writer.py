"""The writer process: it writes what the trainer sends, pushes back when its buffer is full, and reports
its failures instead of losing data silently."""

from __future__ import annotations

import glob
import os
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from comgra_callbacks import StoreError, open_run
from comgra_callbacks.recording.pending import FULL, PendingStep, Snapshot
from comgra_callbacks.recording.process_writer import ProcessWriter
from comgra_callbacks.store.format import STAT_INDEX, SeriesKey

pytestmark = pytest.mark.slow  # each test starts a writer process (about a second)


@pytest.fixture(autouse=True)
def raw_to_the_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests exercise the ring's raw path (the writer process reduces): on any machine, whatever
    ``parts.reduce_in_writer`` would choose there (the child processes they start inherit it)."""
    monkeypatch.setenv("COMGRA_REDUCE", "writer")


def step_with(step: int, size: int = 16, samples: int = 2) -> PendingStep:
    g = torch.Generator().manual_seed(step)
    value = torch.randn(size, 4, generator=g)
    weight = torch.randn(3, 4, generator=g)
    snaps = [
        Snapshot(SeriesKey("act", None, 0, "value"), value, "float32", False, True, samples),
        Snapshot(SeriesKey("ids", None, 0, "value"), torch.arange(size), "int64", False, False, samples),
        Snapshot(SeriesKey("w", None, 0, "value"), weight, "float32", True, True, FULL),
        Snapshot(SeriesKey("w", None, 0, "update"), 0.1 * weight, "float32", True, False, 0, reference=weight),
    ]
    return PendingStep(step, "train", 0, step, 1.0 + step, "schedule", snaps, batch_size=size)


def test_records_and_sidecars_arrive_in_the_store(tmp_path: Path) -> None:
    writer = ProcessWriter(root=str(tmp_path), run="r", meta={"hparams": {"lr": 0.1}})
    assert not glob.glob(f"/dev/shm/comgra-ring-{os.getpid()}-*")  # the ring has no name anywhere
    writer.op("start_segment", 0)
    for step in range(5):
        assert writer.submit(step_with(step))
    writer.op("add_notes", [{"step": 2, "time": 0.0, "text": "hi"}])
    writer.flush()
    live = open_run(tmp_path / "r")
    assert live.status == "running" and len(live.steps) == 5
    writer.close("finished")
    run = open_run(tmp_path / "r")
    assert run.status == "finished" and run.meta["hparams"] == {"lr": 0.1}
    expected = step_with(3)
    act = expected.snapshots[0].tensor
    assert run.stats("act").loc[3, "mean"] == pytest.approx(act.mean().item(), rel=1e-5)
    np.testing.assert_array_equal(run.samples("act", 3), act[:2].numpy())
    assert run.samples("ids", 3).tolist() == [0, 1]
    np.testing.assert_array_equal(run.samples("w", 3), expected.snapshots[2].tensor.numpy())
    assert run.stats("w", view="update").loc[3, "update_ratio"] == pytest.approx(0.1, rel=1e-5)
    assert run.notes["text"].tolist() == ["hi"]


def test_selected_samples_travel_to_the_writer(tmp_path: Path) -> None:
    writer = ProcessWriter(root=str(tmp_path), run="r")
    pending = step_with(0)
    pending.sample_index = torch.tensor([5, 1, 9])
    act = pending.snapshots[0].tensor.clone()
    writer.submit(pending)
    writer.close("finished")
    np.testing.assert_array_equal(open_run(tmp_path / "r").samples("act", 0), act[[5, 1, 9]].numpy())


def test_a_full_buffer_makes_training_wait_and_says_so(tmp_path: Path) -> None:
    writer = ProcessWriter(root=str(tmp_path), run="r", max_queue_bytes=16 << 10)
    with pytest.warns(RuntimeWarning, match="cannot keep up .*HINT: record less often"):
        for step in range(60):
            assert writer.submit(step_with(step, size=256))  # ~9 KiB each through a 16 KiB buffer
    writer.close("finished")
    assert writer.wait_seconds > 0
    assert open_run(tmp_path / "r").steps["step"].tolist() == list(range(60))


def test_a_step_larger_than_the_buffer_goes_in_parts_with_one_warning(tmp_path: Path) -> None:
    writer = ProcessWriter(root=str(tmp_path), run="r", max_queue_bytes=4096)
    big = step_with(0, size=4096)
    act = big.snapshots[0].tensor.clone()
    with pytest.warns(RuntimeWarning, match=r"needs 0.1 MiB in the writer's buffer, more than max_queue_mb .* in parts.* HINT: max_queue_mb=1 sends it"):
        assert writer.submit(big)
    assert writer.submit(step_with(1, size=8))
    writer.close("finished")
    run = open_run(tmp_path / "r")
    assert run.steps["step"].tolist() == [0, 1]
    assert run.stats("act").loc[0, "mean"] == pytest.approx(act.mean().item(), rel=1e-5)
    np.testing.assert_array_equal(run.samples("act", 0), act[:2].numpy())
    assert run.stats("w", view="update").loc[0, "update_ratio"] == pytest.approx(0.1, rel=1e-5)


def test_a_writer_process_that_dies_is_reported(tmp_path: Path) -> None:
    writer = ProcessWriter(root=str(tmp_path), run="r")
    writer.submit(step_with(0))
    writer.flush()
    os.kill(writer.proc.pid, signal.SIGKILL)
    writer.proc.wait(10)
    with pytest.warns(RuntimeWarning, match=r"writer process of run 'r' stopped .*; recording stops, training goes on"):
        assert writer.submit(step_with(1)) is False
    with pytest.warns(RuntimeWarning, match="may be incomplete"):
        writer.close("finished")
    run = open_run(tmp_path / "r")
    assert run.steps["step"].tolist() == [0]  # what was flushed stays valid
    assert run.status == "failed" and "stopped (exit code -9)" in run.meta["error"]


def test_raise_on_write_error(tmp_path: Path) -> None:
    writer = ProcessWriter(root=str(tmp_path), run="r", on_error="raise")
    os.kill(writer.proc.pid, signal.SIGKILL)
    writer.proc.wait(10)
    with pytest.raises(StoreError, match="writer process of run 'r' stopped"):
        writer.submit(step_with(0))
    with pytest.warns(RuntimeWarning, match="may be incomplete"):  # raised once, not twice
        writer.close("finished")


def test_failing_to_open_the_run_is_a_clear_error(tmp_path: Path) -> None:
    ProcessWriter(root=str(tmp_path), run="taken").close("finished")
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"a run already exists at .*taken.* HINT: choose another `run_name`"):
        ProcessWriter(root=str(tmp_path), run="taken")
    assert time.monotonic() - started < 60
    assert not glob.glob(f"/dev/shm/comgra-ring-{os.getpid()}-*")  # nothing left behind


def test_the_trainer_dying_leaves_everything_it_sent(tmp_path: Path) -> None:
    """The writer process outlives its trainer long enough to write what it received."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from tests.test_process_writer import step_with
        from comgra_callbacks.recording.process_writer import ProcessWriter
        writer = ProcessWriter(root={str(tmp_path)!r}, run="orphan", flush_secs=600)
        for step in range(20):
            writer.submit(step_with(step))
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    subprocess.run([sys.executable, str(script)], timeout=120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if open_run(tmp_path / "orphan").status != "running":
                break
        except Exception:
            pass
        time.sleep(0.2)
    run = open_run(tmp_path / "orphan")
    assert run.steps["step"].tolist() == list(range(20))
    assert run.status == "failed" and run.meta["error"].startswith("interrupted")
    assert run.stats("act")["numel"].eq(64).all() and not np.isnan(run.stats("act").iloc[:, STAT_INDEX["mean"]]).any()


def test_steps_reduced_on_a_device_travel_as_results(tmp_path: Path) -> None:
    """The path tensors on an accelerator take (reduced where they live, only results shipped), on the CPU."""
    from comgra_callbacks.recording.pending import pack

    writer = ProcessWriter(root=str(tmp_path), run="r")
    raw, packed = step_with(0), step_with(1)
    act = packed.snapshots[0].tensor.clone()
    writer.submit(raw)
    assert writer.submit(pack(packed))
    writer.close("finished")
    run = open_run(tmp_path / "r")
    assert run.steps["step"].tolist() == [0, 1]
    assert run.stats("act").loc[1, "mean"] == pytest.approx(act.mean().item(), rel=1e-5)
    np.testing.assert_array_equal(run.samples("act", 1), act[:2].numpy())
    assert run.neurons("act", 1).shape == (4, 4)  # 4 neurons x (mean, std, abs_mean, l2)
    assert run.stats("w", view="update").loc[1, "update_ratio"] == pytest.approx(0.1, rel=1e-5)
    assert run.samples("ids", 1).tolist() == [0, 1]


@pytest.mark.parametrize("kernel", ["numba", "torch"], ids=["one-pass-kernel", "numpy"])
def test_the_writer_process_reduces_a_record_as_the_training_side_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: str) -> None:
    """The writer process reduces a raw record's arrays at once (``reduce_numpy.reduce_arrays``), with the
    one-pass kernel (``COMGRA_KERNEL=numba``: from the first record) or numpy's; what it stores is what the
    training side computes from the same tensors (``pack``), a NaN and an offset that dwarfs the spread
    included."""
    from comgra_callbacks.recording import fused
    from comgra_callbacks.recording.pending import pack

    if kernel == "numba":
        assert fused.available(), "numba is part of the dev install (the `fast` extra)"
    monkeypatch.setenv(fused.KERNEL_ENV, kernel)
    g = torch.Generator().manual_seed(7)
    act = torch.randn(64, 32, generator=g)
    act[5, 3] = float("nan")
    tensors = {"act": act, "far": 1e4 + 1e-2 * torch.randn(200, 8, generator=g), "w": torch.randn(16, 32, generator=g), "flat": torch.randn(300, generator=g)}

    def step(number: int) -> PendingStep:
        snaps = [Snapshot(SeriesKey(name, None, 0, "value"), t.clone(), "float32", name == "w", name != "flat", 0) for name, t in tensors.items()]
        return PendingStep(number, "train", 0, number, 1.0, "schedule", snaps, batch_size=64)

    writer = ProcessWriter(root=str(tmp_path), run="r")
    writer.submit(step(0))  # raw: reduced in the writer process
    assert writer.submit(pack(step(1)))  # reduced here
    assert writer.submit(pack(step(2)))  # the same series: named by the id of the layout step 1 sent
    writer.close("finished")
    run = open_run(tmp_path / "r")
    assert run.steps["step"].tolist() == [0, 1, 2]
    for name in tensors:
        np.testing.assert_array_equal(run.stats(name).loc[2].to_numpy(dtype=float), run.stats(name).loc[1].to_numpy(dtype=float))
    for name in ("act", "w", "flat"):  # "far": float32 deviations about a float32 mean differ by ~0.2 % (below)
        raw, packed = run.stats(name).loc[0], run.stats(name).loc[1]
        np.testing.assert_allclose(raw.to_numpy(dtype=float), packed.to_numpy(dtype=float), rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=name)
        if name != "flat":
            np.testing.assert_allclose(run.neurons(name, 0), run.neurons(name, 1), rtol=1e-5, atol=1e-6, equal_nan=True, err_msg=name)
    far = tensors["far"].double()
    # numpy's deviations are about a float32-rounded mean (~1e-3 off at 1e4): ~0.2 % on this spread; the kernel's
    # sums about each neuron's shift are exact to float32 here
    rel = 1e-5 if kernel == "numba" else 3e-3
    assert run.stats("far").loc[0, "std"] == pytest.approx(far.std().item(), rel=rel)
    assert run.stats("far").loc[0, "mean"] == pytest.approx(far.mean().item(), rel=1e-7)
    np.testing.assert_allclose(run.neurons("far", 0)["std"].to_numpy(), far.std(0).numpy(), rtol=rel)  # per neuron
    assert run.stats("act").loc[0, "nan_count"] == 1
    assert run.stats("act").loc[0, "mean"] == pytest.approx(act[~act.isnan()].mean().item(), rel=1e-5)


def test_flush_bytes_counts_what_a_pending_record_holds() -> None:
    """``flush_bytes`` bounds the memory of records waiting to be appended: their results and samples, not the
    raw tensors they arrived as (those were already given back to the ring)."""
    from comgra_callbacks.store.format import STAT_NAMES, SeriesKey
    from comgra_callbacks.store.sink import held_bytes
    from comgra_callbacks.store.writer import HostEntry, HostRecord

    stats = np.zeros(len(STAT_NAMES), dtype=np.float32)
    record = HostRecord(0, "train", 0, 0, 0.0, "schedule", [
        HostEntry(SeriesKey("a", None, 0, "value"), stats, None, None, "float32"),
        HostEntry(SeriesKey("b", None, 0, "value"), stats, np.zeros((4, 10), np.float32), np.zeros((2, 5), np.float32), "float32"),
    ])
    assert held_bytes(record) == 2 * stats.nbytes + 4 * 40 + 4 * 10


def test_the_writer_process_yields_the_cores_torch_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``COMGRA_WRITER_NICE``: how much nicer than the trainer the writer process runs where torch's threads use every core (the
    statistics are then computed on the training side); where the writer has a core of its own it keeps the
    trainer's priority. A value that is not a niceness is a clear error, before any process starts."""
    from comgra_callbacks.recording.process_writer import NICE_ENV

    monkeypatch.setenv(NICE_ENV, "7")
    monkeypatch.setenv("COMGRA_REDUCE", "training")  # as where torch uses every core
    writer = ProcessWriter(root=str(tmp_path), run="busy")
    try:
        assert os.getpriority(os.PRIO_PROCESS, writer.proc.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)
    finally:
        writer.close("finished")
    monkeypatch.setenv(NICE_ENV, "idle")  # Linux's SCHED_IDLE: only on a core nothing else wants
    writer = ProcessWriter(root=str(tmp_path), run="idle")
    try:
        assert os.sched_getscheduler(writer.proc.pid) == os.SCHED_IDLE
    finally:
        writer.close("finished")
    monkeypatch.setenv("COMGRA_REDUCE", "writer")
    writer = ProcessWriter(root=str(tmp_path), run="free")
    try:
        assert os.getpriority(os.PRIO_PROCESS, writer.proc.pid) == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        writer.close("finished")
    monkeypatch.setenv(NICE_ENV, "high")
    with pytest.raises(StoreError, match=r"COMGRA_WRITER_NICE='high'.*an integer from 0 to 19.*or .idle."):
        ProcessWriter(root=str(tmp_path), run="bad")


def test_steps_with_the_same_tensors_reuse_their_plan_and_store_what_they_hold(tmp_path: Path) -> None:
    """The raw plan (dtype blocks, offsets, layout) is worked out once per set of tensors (``_raw_parts``):
    later steps with the same series, dtypes and shapes reuse it, yet each stores its own numbers; another
    shape, or a half-precision tensor that travels widened, gets a plan of its own."""
    writer = ProcessWriter(root=str(tmp_path), run="r")
    half = torch.linspace(-2, 2, 12).to(torch.bfloat16).reshape(3, 4)

    def step(number: int, size: int) -> PendingStep:
        pending = step_with(number, size=size)
        pending.snapshots.append(Snapshot(SeriesKey("half", None, 0, "value"), half * (number + 1), "bfloat16", False, True, 0))
        return pending

    expected = {}
    for number, size in enumerate([16, 16, 16, 8, 16]):
        pending = step(number, size)
        expected[number] = [s.tensor.clone() for s in pending.snapshots]
        assert writer.submit(pending)
    assert len(writer._plans) == 2  # sizes 16 and 8
    writer.close("finished")
    run = open_run(tmp_path / "r")
    assert run.steps["step"].tolist() == [0, 1, 2, 3, 4]
    for number, tensors in expected.items():
        act, ids, weight, _, widened = tensors
        assert run.stats("act").loc[number, "mean"] == pytest.approx(act.mean().item(), rel=1e-5)
        assert run.stats("act").loc[number, "numel"] == act.numel()
        np.testing.assert_array_equal(run.samples("act", number), act[:2].numpy())
        assert run.samples("ids", number).tolist() == [0, 1]
        np.testing.assert_array_equal(run.samples("w", number), weight.numpy())
        assert run.stats("w", view="update").loc[number, "update_ratio"] == pytest.approx(0.1, rel=1e-5)
        assert run.stats("half").loc[number, "max"] == pytest.approx(widened.float().max().item())
        np.testing.assert_allclose(run.neurons("half", number)["mean"].to_numpy(), widened.float().mean(0).numpy(), rtol=1e-6)


def test_a_reused_plan_sends_its_layout_again_once_the_writer_forgot_it(tmp_path: Path) -> None:
    """The writer process keeps the last 64 layouts: a plan whose layout is older than that describes it again."""
    writer = ProcessWriter(root=str(tmp_path), run="r")
    assert writer.submit(step_with(0, size=4))
    for number in range(1, 70):  # 69 other layouts (one size each) push the first one out
        assert writer.submit(step_with(number, size=4 + number))
    assert writer.submit(step_with(70, size=4))  # the first plan again
    writer.close("finished")
    run = open_run(tmp_path / "r")
    assert len(run.steps) == 71
    act = step_with(70, size=4).snapshots[0].tensor
    assert run.stats("act").loc[70, "mean"] == pytest.approx(act.mean().item(), rel=1e-5)
    assert run.stats("act").loc[70, "numel"] == act.numel()


def test_an_empty_ring_starts_again_at_its_beginning() -> None:
    """Once the writer took everything, the next block goes back to the start of the ring (once enough was
    used), so that the bytes in use stay in the cache; never while a block is still waiting, and never so
    that too little room is left."""
    from comgra_callbacks.recording.ring import CONSUMED, REWIND_BYTES, Ring

    ring = Ring.create(4 * REWIND_BYTES)
    try:
        block = 1 << 20
        offsets = []
        for _ in range(REWIND_BYTES // block):  # the writer takes each block at once
            offset, end = ring.place(block)  # type: ignore[misc]
            offsets.append(offset)
            ring.header[CONSUMED] = end
        assert offsets == [i * block for i in range(len(offsets))]  # less than REWIND_BYTES used: straight on
        offset, end = ring.place(block)  # type: ignore[misc]
        assert offset == 0  # empty, REWIND_BYTES used: back to the start
        second = ring.place(block)  # the first still waits: straight on
        assert second is not None and second[0] == block
        ring.header[CONSUMED] = second[1]
        assert ring.free() == ring.capacity
        big = ring.place(REWIND_BYTES)  # a block a quarter of what was used: no rewind for it
        assert big is not None and big[0] == 2 * block
    finally:
        ring.close()


def test_a_writer_expecting_large_raw_steps_reads_the_first_with_the_one_pass_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``expected_numel`` past ``KERNEL_AT_START_NUMEL``: the writer process loads the kernel before it
    answers, so that the first raw steps do not wait behind its loading. Seen in the numbers: a mean that
    dwarfs the spread keeps float32 precision in the kernel's sums (numpy's deviations about a float32 mean
    are ~0.2 % off here), from the very first step."""
    from comgra_callbacks.recording import fused
    from comgra_callbacks.recording.reduce_numpy import KERNEL_AT_START_NUMEL

    assert fused.available(), "numba is part of the dev install (the `fast` extra)"
    monkeypatch.delenv(fused.KERNEL_ENV, raising=False)  # the writer's own choice: after 2 M elements, or at the start
    far = 1e4 + 1e-2 * torch.randn(200, 8, generator=torch.Generator().manual_seed(7))
    writer = ProcessWriter(root=str(tmp_path), run="r", expected_numel=KERNEL_AT_START_NUMEL)
    snaps = [Snapshot(SeriesKey("far", None, 0, "value"), far.clone(), "float32", False, True, 0)]
    assert writer.submit(PendingStep(0, "train", 0, 0, 1.0, "schedule", snaps, batch_size=200))
    writer.close("finished")
    run = open_run(tmp_path / "r")
    assert run.stats("far").loc[0, "std"] == pytest.approx(far.double().std().item(), rel=1e-5)
    np.testing.assert_allclose(run.neurons("far", 0)["std"].to_numpy(), far.double().std(0).numpy(), rtol=1e-5)


def deferred_step(step: int, dtype: torch.dtype, shape: tuple[int, int]) -> tuple[PendingStep, torch.Tensor, torch.Tensor]:
    """A step whose update travels as the weight after the step (``Snapshot.deferred``), as the recorder sends
    it: the weight before is the step's value of the weight (half precision widened), the weight after is
    the parameter itself."""
    g = torch.Generator().manual_seed(step)
    before = torch.randn(*shape, generator=g).to(dtype).float()  # the recorder's copy (``parameters.private_copy``)
    after = (before + 0.01 * torch.randn(*shape, generator=g)).to(dtype)  # the parameter, not a copy
    snaps = [
        Snapshot(SeriesKey("w", None, 0, "value"), before, str(dtype).replace("torch.", ""), True, True, 0),
        Snapshot(SeriesKey("w", None, 0, "update"), after, str(dtype).replace("torch.", ""), True, True, FULL, reference=before, deferred=True),
    ]
    if shape[0] > 50:  # with a third tensor as large, the step is sent in three parts: one tensor each
        snaps.append(Snapshot(SeriesKey("act", None, 0, "value"), torch.randn(*shape, generator=g), "float32", False, True, 0))
    return PendingStep(step, "train", 0, step, 1.0, "schedule", snaps), after, after.float() - before


@pytest.mark.parametrize("apart", [False, True], ids=["in-one-part", "weight-in-another-part"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_an_update_sent_as_the_weight_after_the_step_is_stored_as_the_difference(tmp_path: Path, dtype: torch.dtype, apart: bool) -> None:
    """The writer process subtracts the weight before from the weight after in its buffer; where the two travel
    in different parts the difference is taken on the way. Either way the parameter is read only while the step
    is submitted: changing it afterwards changes nothing stored."""
    from comgra_callbacks.recording.parts import describe_raw, plan_raw

    shape = (100, 4) if apart else (6, 5)
    pending, after, expected = deferred_step(3, dtype, shape)
    item_value, item_update = describe_raw(pending, [0, 1]).items
    assert item_update.subtract == 0 and item_value.subtract is None
    before = pending.snapshots[0].tensor
    if apart:
        assert describe_raw(pending, [1]).resolve == {0}
        assert [p.raw for p in plan_raw(pending, 4096, lambda *a: None, "r")] == [[0], [1], [2]]
    writer = ProcessWriter(root=str(tmp_path), run="r", max_queue_bytes=4096 if apart else 1 << 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if apart else "error")  # apart: the "sent in parts" warning
        assert writer.submit(pending)
    after.add_(100.0)  # the next optimizer step
    writer.close("finished")
    run = open_run(tmp_path / "r")
    update = run.stats("w", view="update").loc[3]
    x = expected.double()
    assert update["mean"] == pytest.approx(x.mean().item(), rel=1e-5, abs=1e-7)
    assert update["l2"] == pytest.approx(x.norm().item(), rel=1e-5)
    assert update["min"] == pytest.approx(x.min().item(), rel=1e-5) and update["max"] == pytest.approx(x.max().item(), rel=1e-5)
    assert update["update_ratio"] == pytest.approx(x.norm().item() / before.double().norm().item(), rel=1e-5)
    np.testing.assert_allclose(run.samples("w", 3, view="update"), expected.numpy(), rtol=1e-6, atol=1e-7)
    assert run.stats("w").loc[3, "mean"] == pytest.approx(before.double().mean().item(), rel=1e-5, abs=1e-7)


def test_a_deferred_update_is_the_difference_wherever_the_step_is_reduced() -> None:
    """``pack`` (the thread writer, an accelerator, a writer without a core of its own) takes the difference
    first; what it computes is what a step with the difference already taken gives."""
    from comgra_callbacks.recording.pending import pack

    deferred, _, expected = deferred_step(1, torch.float32, (6, 5))
    plain, _, _ = deferred_step(1, torch.float32, (6, 5))
    plain.snapshots[1] = Snapshot(SeriesKey("w", None, 0, "update"), expected, "float32", True, True, FULL, reference=plain.snapshots[0].tensor)
    update = deferred.snapshots[1]
    got, want = pack(deferred).materialize(), pack(plain).materialize()
    assert not update.deferred and torch.equal(update.tensor, expected)
    for a, b in zip(got.entries, want.entries):
        assert a.key == b.key
        np.testing.assert_array_equal(a.stats, b.stats)
        np.testing.assert_array_equal(a.samples, b.samples)
