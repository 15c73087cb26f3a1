"""The writer process's line reader: every message line arrives whole and in order, whether it reads while
messages come (polling) or after an idle spell (waiting in the kernel), across chunk boundaries and at the end."""

from __future__ import annotations

import os
import threading
import time

import pytest

from comgra_callbacks.recording import worker
from comgra_callbacks.recording.worker import LineReader


def _write_later(fd: int, pieces: list[tuple[float, bytes]]) -> threading.Thread:
    """Write each piece after its delay, then close the pipe's write end."""

    def run() -> None:
        for delay, data in pieces:
            time.sleep(delay)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_readline_keeps_the_newline_and_ends_with_empty_bytes() -> None:
    read, write = os.pipe()
    try:
        os.write(write, b"\n{\"a\": 1}\n\nrest")
        os.close(write)
        reader = LineReader(read)
        assert [reader.readline() for _ in range(5)] == [b"\n", b'{"a": 1}\n', b"\n", b"rest", b""]
    finally:
        os.close(read)


def test_lines_arrive_whole_while_polling_and_after_an_idle_spell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "BLOCK_AFTER_SECS", 0.05)  # the last pieces come after the reader waits in the kernel
    long_line = b"x" * (200 << 10)  # spans several reads of 64 KiB
    read, write = os.pipe()
    pieces = [
        (0.0, b"\nfirst\nsec"),
        (0.01, b"ond\n"),  # the rest of a line, while the reader polls
        (0.0, long_line[:70_000]),
        (0.0, long_line[70_000:] + b"\n"),
        (0.2, b"after idle\n"),  # longer than BLOCK_AFTER_SECS: the reader waits for it in the kernel
        (0.0, b"partial at the end"),
    ]
    thread = _write_later(write, pieces)
    try:
        got = list(LineReader(read).lines())
    finally:
        thread.join(5)
        os.close(read)
    assert got == [b"\n", b"first\n", b"second\n", long_line + b"\n", b"after idle\n", b"partial at the end"]


def test_the_reader_waits_in_the_kernel_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """After BLOCK_AFTER_SECS without a message, no more polls: an idle writer costs nothing."""
    monkeypatch.setattr(worker, "BLOCK_AFTER_SECS", 0.05)
    polls: list[bool] = []
    real_read = LineReader._read

    def counted(self: LineReader, *, wait: bool) -> bool:
        if not wait:
            polls.append(True)
        return real_read(self, wait=wait)

    monkeypatch.setattr(LineReader, "_read", counted)
    read, write = os.pipe()
    thread = _write_later(write, [(0.0, b"one\n"), (0.6, b"two\n")])
    try:
        got = list(LineReader(read).lines())
    finally:
        thread.join(5)
        os.close(read)
    assert got == [b"one\n", b"two\n"]
    # polls only within BLOCK_AFTER_SECS of a message: far fewer than 0.6 s of polling (~300) would take
    assert 0 < len(polls) <= 2 * (0.05 / worker.POLL_SECS) + 10
