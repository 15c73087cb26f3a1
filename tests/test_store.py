"""The store: writer/reader conformance, live reads, crashes, versions, the background writer's limits."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from comgra_callbacks import FormatVersionError, RunNotFoundError, StoreError, open_run, open_runs
from comgra_callbacks.store import format as fmt
from comgra_callbacks.store.background import BackgroundWriter
from comgra_callbacks.store.format import STAT_NAMES, SeriesKey
from comgra_callbacks.store.storage import open_root
from comgra_callbacks.store.writer import HostEntry, HostRecord, RunWriter, StoreLayout

N = len(STAT_NAMES)
SMALL = StoreLayout(record_chunk=8, stats_rows=4, stats_series=2, flat_chunk=16, scalars_chunk=4)


def synthetic(step: int, n_nodes: int = 3, width: int = 4) -> HostRecord:
    """A record whose every value encodes its step, so a torn or wrong row is detectable."""
    entries = []
    for i in range(n_nodes):
        stats = np.full(N, step * 10 + i, dtype=np.float32)
        stats[fmt.STAT_INDEX["numel"]] = 8
        neurons = np.full((3, width), step + i / 10, dtype=np.float32)
        samples = np.full((2, width), step, dtype=np.float32)
        entries.append(HostEntry(SeriesKey(f"node{i}", None, 0, "value"), stats, neurons, samples))
    if step % 3 == 0:  # a series that appears later and only sometimes
        stats = np.full(N, -step, dtype=np.float32)
        stats[fmt.STAT_INDEX["numel"]] = 1
        entries.append(HostEntry(SeriesKey("sometimes", "r1", 0, "grad"), stats, None, np.array(step, dtype=np.float32)))
    return HostRecord(step, "train", 0, step, 1_700_000_000.0 + step, "schedule", entries)


class Item:
    def __init__(self, record: HostRecord) -> None:
        self.record = record
        self.nbytes = 1000

    def materialize(self) -> HostRecord:
        return self.record


class Gated(Item):
    """A record the writer thread cannot take before ``gate`` is set (a busy writer)."""

    def __init__(self, record: HostRecord, gate: threading.Event) -> None:
        super().__init__(record)
        self.gate = gate

    def materialize(self) -> HostRecord:
        self.gate.wait(10)
        return self.record


def test_round_trip_and_growth(tmp_path: Path) -> None:
    writer = RunWriter(open_root(tmp_path).run("r"), layout=SMALL)
    writer.start_segment(0)
    for block in range(5):
        writer.append([synthetic(step) for step in range(block * 5, block * 5 + 5)])
    writer.add_notes([{"step": 3, "time": 1.0, "text": "hello"}])
    writer.add_scalars([(1, "loss", 0.5), (2, "loss", 0.25)])
    writer.close("finished")
    run = open_run(tmp_path / "r")
    assert run.status == "finished" and len(run.steps) == 25
    stats = run.stats("node1")
    assert stats.index.tolist() == list(range(25))
    assert stats["mean"].tolist() == [s * 10 + 1 for s in range(25)]
    assert "update_ratio" not in stats.columns
    assert run.stats("sometimes", view="grad").index.tolist() == list(range(0, 25, 3))
    assert run.roles("sometimes") == ["r1"]
    np.testing.assert_array_equal(run.neurons("node2", 17)["mean"], np.full(4, np.float32(17.2)))
    np.testing.assert_array_equal(run.samples("node0", 24), np.full((2, 4), 24.0))
    assert run.samples("sometimes", 21, view="grad").shape == ()
    assert run.notes["text"].tolist() == ["hello"]
    assert run.scalars["value"].tolist() == [0.5, 0.25]
    step_stats = run.step_stats(9)
    assert step_stats.loc["node2", "mean"] == 92


def test_reader_errors_name_what_exists(tmp_path: Path) -> None:
    writer = RunWriter(open_root(tmp_path).run("r"))
    writer.append([synthetic(0), synthetic(1)])
    writer.close("finished")
    run = open_run(tmp_path / "r")
    with pytest.raises(KeyError, match=r"has no node 'node9'\. Did you mean \[.*'node0'.*\]\?"):
        run.stats("node9")
    with pytest.raises(KeyError, match=r"has no view 'grad'; it has \['value'\]"):
        run.stats("node0", view="grad")
    with pytest.raises(KeyError, match=r"has no role 'x'; it has \['r1'\]"):
        run.stats("sometimes", view="grad", role="x")
    with pytest.raises(KeyError, match=r"no record of step 7.*Nearest recorded steps: \[0, 1\]"):
        run.samples("node0", 7)
    with pytest.raises(KeyError, match=r"no records of step type 'val'; it has \['train'\]"):
        run.stats("node0", step_type="val")
    with pytest.raises(KeyError, match=r"'sometimes' \(view 'grad'\) was not recorded at step 1"):
        run.samples("sometimes", 1, view="grad")


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(RunNotFoundError, match="no comgra run at"):
        open_run(tmp_path / "nothing")
    with pytest.raises(RunNotFoundError, match="does not exist"):
        open_runs(tmp_path / "nowhere")
    assert open_runs(tmp_path) == []
    writer = RunWriter(open_root(tmp_path).run("future"))
    writer.close("finished")
    meta = json.loads((tmp_path / "future" / "meta.json").read_text())
    meta["format_version"] = "9.0"
    (tmp_path / "future" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FormatVersionError, match=r"store format 9\.0; this comgra_callbacks reads format 1\.x\. HINT: upgrade"):
        open_run(tmp_path / "future")
    with pytest.warns(RuntimeWarning, match="skipping run 'future'"):
        assert open_runs(tmp_path) == []
    with pytest.raises(FormatVersionError):
        open_runs(tmp_path, errors="raise")


def test_existing_run_is_not_overwritten(tmp_path: Path) -> None:
    RunWriter(open_root(tmp_path).run("r")).close("finished")
    with pytest.raises(StoreError, match="a run already exists"):
        RunWriter(open_root(tmp_path).run("r"))


def test_resume_drops_uncommitted_rows(tmp_path: Path) -> None:
    location = open_root(tmp_path).run("r")
    writer = RunWriter(location, layout=SMALL)
    writer.append([synthetic(s) for s in range(4)])
    writer.append([synthetic(s) for s in range(4, 7)], commit=False)  # a crash before the manifest
    del writer
    assert open_run(tmp_path / "r").steps["step"].tolist() == [0, 1, 2, 3]
    resumed = RunWriter(location, resume=True, layout=SMALL)
    assert resumed.group["stats"].shape[0] == 4
    resumed.append([synthetic(s) for s in range(10, 12)])
    resumed.close("finished")
    run = open_run(tmp_path / "r")
    assert run.steps["step"].tolist() == [0, 1, 2, 3, 10, 11]
    assert run.stats("node0")["mean"].tolist() == [0, 10, 20, 30, 100, 110]


def test_concurrent_reader_never_sees_partial_rows(tmp_path: Path) -> None:
    writer = BackgroundWriter(RunWriter(open_root(tmp_path).run("live"), layout=SMALL), flush_rows=3, flush_secs=0.01)
    total = 120
    problems: list[str] = []
    seen_rows: list[int] = []

    def read_loop() -> None:
        run = None
        while True:
            try:
                run = run or open_run(tmp_path / "live")
                run.refresh()
            except RunNotFoundError:
                continue
            steps = run.steps["step"].tolist()
            seen_rows.append(len(steps))
            if steps != list(range(len(steps))):
                problems.append(f"steps out of order: {steps[:10]}")
            if steps:
                means = run.stats("node1")["mean"].tolist()
                if means != [s * 10 + 1 for s in steps]:
                    problems.append(f"torn statistics at {len(steps)} rows")
                last = steps[-1]
                if not np.all(run.samples("node2", last) == last):
                    problems.append(f"torn samples at step {last}")
            if len(steps) == total or problems:
                return

    reader = threading.Thread(target=read_loop)
    reader.start()
    for step in range(total):
        writer.submit(Item(synthetic(step)))
        if step % 10 == 0:
            time.sleep(0.005)
    writer.close("finished")
    reader.join(60)
    assert not reader.is_alive()
    assert not problems, problems
    assert len(set(seen_rows)) > 3  # the reader really saw the run grow


def test_background_writer_bounds_memory_and_waits(tmp_path: Path) -> None:
    writer = BackgroundWriter(RunWriter(open_root(tmp_path).run("r")), max_queue_bytes=3000, flush_rows=2)
    gate = threading.Event()
    writer.submit(Gated(synthetic(0), gate))  # the writer thread is busy with the first record
    time.sleep(0.05)
    for step in range(1, 3):
        writer.submit(Item(synthetic(step)))  # 3 x 1000 bytes: fits

    def producer() -> None:
        with pytest.warns(RuntimeWarning, match="cannot keep up"):
            writer.submit(Item(synthetic(3)))

    blocked = threading.Thread(target=producer)
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # the fourth record waits for room
    gate.set()
    blocked.join(10)
    assert not blocked.is_alive()
    writer.close("finished")
    assert writer.wait_seconds > 0.2
    assert open_run(tmp_path / "r").steps["step"].tolist() == [0, 1, 2, 3]


def _break_store(run_dir: Path) -> None:
    """A real I/O failure: the stats array's directory becomes a file."""
    stats = run_dir / "stats"
    shutil.rmtree(stats)
    stats.write_text("not a directory")


def test_write_failure_warns_and_training_goes_on(tmp_path: Path) -> None:
    writer = BackgroundWriter(RunWriter(open_root(tmp_path).run("r")), flush_rows=1)
    writer.submit(Item(synthetic(0)))
    writer.flush()
    _break_store(tmp_path / "r")
    writer.submit(Item(synthetic(1)))
    with pytest.warns(RuntimeWarning, match="writing run 'r' failed: .*; recording stops, training goes on"):
        writer.flush()
    assert writer.submit(Item(synthetic(2))) is False
    writer.close("finished")
    assert open_run(tmp_path / "r").status == "failed"


def test_write_failure_raises_when_asked(tmp_path: Path) -> None:
    writer = BackgroundWriter(RunWriter(open_root(tmp_path).run("r")), flush_rows=1, on_error="raise")
    _break_store(tmp_path / "r")
    writer.submit(Item(synthetic(0)))
    with pytest.raises(StoreError, match="writing run 'r' failed"):
        writer.flush()
    with pytest.warns(RuntimeWarning, match="may be incomplete"):  # raised once, not again at the close
        writer.close("finished")


KILLED_SCRIPT = """
import sys, time, torch, lightning.pytorch as pl
from torch import nn
from comgra_callbacks import ComgraCallback

class Slow(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    def training_step(self, batch, i):
        x, y = batch
        if self.global_step == 6:
            print("READY", flush=True)
        if self.global_step >= 6:
            time.sleep(0.2)
        return nn.functional.cross_entropy(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

data = torch.utils.data.TensorDataset(torch.randn(4000, 4), torch.randint(0, 2, (4000,)))
cb = ComgraCallback(sys.argv[1], run_name="killed", flush_secs=0.1)
trainer = pl.Trainer(max_steps=1000, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu")
trainer.fit(Slow(), torch.utils.data.DataLoader(data, batch_size=4))
"""


@pytest.mark.slow
def test_run_killed_with_sigkill_stays_readable(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(KILLED_SCRIPT))
    root = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while "READY" not in proc.stdout.readline():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(1.0)  # some more steps, several flushes
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30  # the writer process outlives its trainer: it writes what it got, then says why
    while open_run(root / "killed").status == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    run = open_run(root / "killed")
    assert run.status == "failed" and run.meta["error"].startswith("interrupted")  # the writer process says why
    steps = run.steps["step"].tolist()
    assert len(steps) >= 6 and steps == list(range(len(steps)))
    for node in ("net.0", "net.2", "loss", "net.0.weight"):
        assert run.stats(node)["numel"].notna().all()
    assert run.samples("net.2", steps[-1]).shape == (4, 2)
    assert time.time() - run.heartbeat < 60


class Shrinking(Item):
    """Like PendingStep: its size drops to zero once materialized (the tensors are released)."""

    def materialize(self) -> HostRecord:
        self.nbytes = 0
        return self.record


@pytest.mark.filterwarnings("ignore:comgra.*cannot keep up")  # expected here; tested on its own above
def test_queue_accounting_survives_items_that_shrink(tmp_path: Path) -> None:
    writer = BackgroundWriter(RunWriter(open_root(tmp_path).run("r")), max_queue_bytes=5000, flush_rows=4)
    done = threading.Event()

    def produce() -> None:
        for step in range(60):  # 60 x 1000 bytes through a 5000-byte queue
            writer.submit(Shrinking(synthetic(step)))
        done.set()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    assert done.wait(30), "the producer blocked: the queue never freed the bytes of written records"
    writer.close("finished")
    assert len(open_run(tmp_path / "r").steps) == 60


EXIT_SCRIPT = """
import sys, numpy as np
from comgra_callbacks.store.background import BackgroundWriter
from comgra_callbacks.store.format import STAT_NAMES, SeriesKey
from comgra_callbacks.store.storage import open_root
from comgra_callbacks.store.writer import HostEntry, HostRecord, RunWriter

class Item:
    nbytes = 100
    def __init__(self, record):
        self.record = record
    def materialize(self):
        return self.record

writer = BackgroundWriter(RunWriter(open_root(sys.argv[1]).run("r")), flush_secs=600)
for step in range(5):
    stats = np.zeros(len(STAT_NAMES), np.float32)
    stats[STAT_NAMES.index("numel")] = 1
    writer.submit(Item(HostRecord(step, "train", 0, step, 0.0, "schedule", [HostEntry(SeriesKey("a", None, 0, "value"), stats)])))
# the script ends without closing the writer
"""


@pytest.mark.slow
def test_records_queued_at_exit_are_written(tmp_path: Path) -> None:
    script = tmp_path / "exit.py"
    script.write_text(textwrap.dedent(EXIT_SCRIPT))
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "failed" not in done.stderr
    run = open_run(tmp_path / "runs" / "r")
    assert run.steps["step"].tolist() == [0, 1, 2, 3, 4]
    assert run.status == "running"  # written, but the run never finished


def test_a_nested_run_group_has_one_name_however_it_is_opened(tmp_path: Path) -> None:
    RunWriter(open_root(tmp_path).run("exp/rank1")).close("finished")
    assert open_run(tmp_path / "exp" / "rank1").name == "exp/rank1"
    assert [run.name for run in open_runs(tmp_path)] == ["exp/rank1"]
