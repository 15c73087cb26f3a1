"""A writer process that stops answering or dies: training never hangs, the run says what happened, and the
user's own exception stays the one raised."""

from __future__ import annotations

import gc
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from comgra_callbacks import ComgraCallback, StoreError, open_run
from comgra_callbacks.store import sink
from tests.conftest import classification_loader, make_mlp_module, quiet_trainer
from tests.reliability import _training as tr

pytestmark = pytest.mark.slow  # each test starts a writer process


@pytest.fixture
def short_stalls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sink, "STALL_WARN_SECS", 0.3)  # one bound for both transports
    monkeypatch.setattr(sink, "STALL_SECS", 1.5)


class AtStep(pl.Callback):
    """Does something to the writer process at the start of one training step (or at the end of training)."""

    def __init__(self, comgra: ComgraCallback, step: int | None, action: Any, step_sleep: float = 0.0) -> None:
        self.comgra, self.step, self.action, self.step_sleep = comgra, step, action, step_sleep
        self.pid: int | None = None

    def _act(self) -> None:
        recorder = self.comgra.recorder
        assert recorder is not None
        self.pid = recorder.writer.proc.pid
        self.action(recorder.writer)

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self._act()
        time.sleep(self.step_sleep)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.step is None:
            self._act()


def stop(writer: Any) -> None:
    os.kill(writer.proc.pid, signal.SIGSTOP)


def kill(writer: Any) -> None:
    os.kill(writer.proc.pid, signal.SIGKILL)
    writer.proc.wait(10)


def resume_and_wait(pid: int | None) -> None:
    """SIGCONT, so that nothing is left stopped; then the writer finishes alone."""
    if tr.is_writer(pid):
        assert pid is not None
        os.kill(pid, signal.SIGCONT)
        assert tr.wait_until(lambda: not tr.alive(pid), 30), "the writer did not finish after SIGCONT"


def fit(tmp: Path, comgra: ComgraCallback, other: pl.Callback, module: Any = None, steps: int = 30) -> float:
    trainer = quiet_trainer([comgra, other], tmp, max_steps=steps, max_epochs=-1)
    started = time.monotonic()
    trainer.fit(module or make_mlp_module(), classification_loader(n_batches=8))
    return time.monotonic() - started


@pytest.mark.timeout(90)
def test_a_stopped_writer_does_not_hang_training_warn(tmp_path: Path, short_stalls: None) -> None:
    comgra = ComgraCallback(str(tmp_path / "runs"), run_name="stopped", flush_secs=0.2, log_scalars=False)
    at = AtStep(comgra, 2, stop, step_sleep=0.02)  # records older than flush_secs wait for the writer
    try:
        with pytest.warns(RuntimeWarning) as seen:
            elapsed = fit(tmp_path, comgra, at)
        messages = [str(w.message) for w in seen]
        assert any("has made no progress for" in m and "on_write_error='warn' decides" in m for m in messages)
        assert any("made no progress for 1.5 s" in m and "recording stops, training goes on" in m and "kill -CONT" in m for m in messages)
        assert elapsed < 30  # the stall bound (1.5 s) once, then training goes on without recording
    finally:
        resume_and_wait(at.pid)
    run = open_run(tmp_path / "runs" / "stopped")
    assert run.status == "failed" and "made no progress" in run.meta["error"]
    assert run.steps["step"].tolist()[:2] == [0, 1]  # what it had before it was stopped


@pytest.mark.timeout(90)
def test_a_stopped_writer_does_not_hang_training_raise(tmp_path: Path, short_stalls: None) -> None:
    comgra = ComgraCallback(str(tmp_path / "runs"), run_name="stopped", flush_secs=0.2, log_scalars=False, on_write_error="raise")
    at = AtStep(comgra, 2, stop, step_sleep=0.02)
    started = time.monotonic()
    try:
        with pytest.raises(StoreError, match=r"made no progress for 1.5 s .*stopped or hung.* HINT: `kill -CONT") as raised:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fit(tmp_path, comgra, at)
        assert time.monotonic() - started < 30
        assert raised.value.__context__ is None  # raised once, not again while closing
    finally:
        resume_and_wait(at.pid)


@pytest.mark.timeout(90)
def test_a_writer_stopped_at_the_end_delays_teardown_boundedly(tmp_path: Path, short_stalls: None) -> None:
    comgra = ComgraCallback(str(tmp_path / "runs"), run_name="late", log_scalars=False)
    at = AtStep(comgra, None, stop)
    try:
        with pytest.warns(RuntimeWarning, match="may be incomplete.*made no progress"):
            elapsed = fit(tmp_path, comgra, at, steps=6)
        assert elapsed < 30
    finally:
        resume_and_wait(at.pid)
    run = open_run(tmp_path / "runs" / "late")  # it had everything, and the close: it finished alone
    assert run.status == "finished" and run.steps["step"].tolist() == list(range(6))


class Boom(pl.LightningModule):
    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.net = nn.Linear(6, 3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.at:
            raise ValueError("boom")
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.timeout(90)
def test_writer_death_keeps_the_users_exception(tmp_path: Path) -> None:
    comgra = ComgraCallback(str(tmp_path / "runs"), run_name="boom", log_scalars=False, on_write_error="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="boom") as raised:
            fit(tmp_path, comgra, AtStep(comgra, 3, kill), module=Boom(at=3))
    assert type(raised.value) is ValueError and str(raised.value) == "boom"
    notes = getattr(raised.value, "__notes__", [])
    assert any("comgra: the writer process of run 'boom' stopped (exit code -9)" in n for n in notes), notes
    run = open_run(tmp_path / "runs" / "boom")
    assert run.status == "failed" and run.meta["error"].startswith("ValueError: boom; the writer process")


@pytest.mark.timeout(90)
def test_writer_death_then_a_normal_end_marks_the_run_failed(tmp_path: Path) -> None:
    comgra = ComgraCallback(str(tmp_path / "runs"), run_name="dead", log_scalars=False)
    with pytest.warns(RuntimeWarning) as seen:
        fit(tmp_path, comgra, AtStep(comgra, 3, kill), steps=8)
    assert sum("recording stops, training goes on" in str(w.message) for w in seen) == 1  # once, not every step
    run = open_run(tmp_path / "runs" / "dead")
    assert run.status == "failed" and "stopped (exit code -9)" in run.meta["error"]


@pytest.mark.timeout(90)
def test_writer_death_with_raise_raises_once(tmp_path: Path) -> None:
    comgra = ComgraCallback(str(tmp_path / "runs"), run_name="dead", log_scalars=False, on_write_error="raise")
    with pytest.raises(StoreError, match="stopped") as raised:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit(tmp_path, comgra, AtStep(comgra, 3, kill), steps=8)
    assert raised.value.__context__ is None
    assert open_run(tmp_path / "runs" / "dead").status == "failed"


@pytest.mark.timeout(90)
def test_a_normal_run_leaves_no_resource_warning(tmp_path: Path) -> None:
    comgra = ComgraCallback(str(tmp_path / "runs"), run_name="clean", log_scalars=False)
    gc.collect()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        fit(tmp_path, comgra, pl.Callback(), steps=4)
        del comgra
        gc.collect()
    leaks = [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks
    assert open_run(tmp_path / "runs" / "clean").status == "finished"


class _Stuck:
    """A record whose writing hangs until released (a file system that stopped answering)."""

    nbytes = 1000

    def __init__(self, release: Any) -> None:
        self.release = release

    def materialize(self) -> Any:
        self.release.wait(30)
        return None  # nothing to write after all


@pytest.mark.timeout(60)
@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_a_stuck_writer_thread_does_not_hang_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_error: str) -> None:
    import threading

    from comgra_callbacks.store.background import BackgroundWriter
    from comgra_callbacks.store.storage import open_root
    from comgra_callbacks.store.writer import RunWriter

    monkeypatch.setattr(sink, "STALL_WARN_SECS", 0.3)
    monkeypatch.setattr(sink, "STALL_SECS", 1.5)
    release = threading.Event()
    writer = BackgroundWriter(RunWriter(open_root(tmp_path).run("r")), max_queue_bytes=1500, on_error=on_error)  # type: ignore[arg-type]
    started = time.monotonic()
    try:
        with pytest.warns(RuntimeWarning, match="writer thread of run 'r' has made no progress"):
            writer.submit(_Stuck(release))
            if on_error == "raise":
                with pytest.raises(StoreError, match="made no progress for 1.5 s .*stuck"):
                    writer.submit(_Stuck(release))  # waits for room: bounded
            else:
                with pytest.warns(RuntimeWarning, match="made no progress.*; recording stops, training goes on"):
                    assert writer.submit(_Stuck(release)) is False
        assert time.monotonic() - started < 10
        with pytest.warns(RuntimeWarning, match="may be incomplete"):
            writer.close("failed", "KeyboardInterrupt")  # bounded too, and never raises over an exception
    finally:
        release.set()


@pytest.mark.timeout(60)
def test_an_interrupt_between_the_parts_of_a_step_drops_that_step_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from comgra_callbacks.recording.process_writer import ProcessWriter
    from tests.test_process_writer import step_with

    monkeypatch.setenv("COMGRA_REDUCE", "writer")  # raw tensors in parts, whatever this machine would choose
    writer = ProcessWriter(root=str(tmp_path), run="r", max_queue_bytes=4096)
    real = ProcessWriter._send

    def interrupted(self: ProcessWriter, message: Any) -> None:
        if getattr(message, "part", 0) == 1:
            raise KeyboardInterrupt  # Ctrl+C after the first part of step 0 was sent
        real(self, message)

    monkeypatch.setattr(ProcessWriter, "_send", interrupted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyboardInterrupt):
            writer.submit(step_with(0, size=200))  # ~5 KiB: more than one part
        monkeypatch.setattr(ProcessWriter, "_send", real)
        expected = step_with(1, size=200)
        act = expected.snapshots[0].tensor.clone()
        assert writer.submit(expected)
    writer.close("finished")
    run = open_run(tmp_path / "r")
    assert run.steps["step"].tolist() == [1]  # not a mix of the two steps
    assert run.stats("act").loc[1, "mean"] == pytest.approx(act.mean().item(), rel=1e-5)
    assert set(run.stats("w", view="update").index) == {1}
