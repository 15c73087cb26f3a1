"""recording/memory.py: the memory a recorded step frees is kept by glibc's malloc for the next one, so the
next recorded step does not map (page-fault) it again. Each case runs in its own process: malloc's
thresholds are process-wide and cannot be set back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from comgra_callbacks.recording import memory

pytestmark = pytest.mark.skipif(not memory._libc().startswith("glibc"), reason="glibc's malloc only")

ROUNDS = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from comgra_callbacks.recording.memory import keep_freed
    kept = keep_freed(48 << 20) if sys.argv[1] == "keep" else None
    faults = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        held = [torch.ones(128 * 1024) for _ in range(80)]  # 80 x 512 KB alive together, like a step's gradients
        del held
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"kept": kept, "faults": faults}))
    """
)


def rounds(mode: str, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, timeout=120, env={**os.environ, **env}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_memory_freed_by_one_step_is_reused_by_the_next_without_page_faults() -> None:
    """Without it, glibc gives the freed top of its heap back after a round and the next round maps it
    again, ~10 000 page faults for 40 MB, most of the time (not always: a small block allocated above can
    keep it, which is why the default is not asserted here)."""
    pages = 80 * 512 * 1024 // 4096
    kept = rounds("keep")
    assert kept["kept"] is True
    assert kept["faults"][0] > pages // 2  # the first round maps its memory: the count measures what it should
    assert max(kept["faults"][2:]) < pages // 20  # later rounds reuse it


def test_the_environment_switch_leaves_malloc_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(memory, "_STATE", {"trim": 0, "mallopt": lambda param, value: calls.append((param, value)) or 1})
    monkeypatch.setenv(memory.ENV, "0")
    assert memory.keep_freed(64 << 20) is False and calls == []
    monkeypatch.delenv(memory.ENV)
    assert memory.keep_freed(64 << 20) is True and len(calls) == 2


def test_the_kept_amount_grows_with_the_step_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_STATE", {"trim": 0})
    calls: list[tuple[int, int]] = []
    monkeypatch.setitem(memory._STATE, "mallopt", lambda param, value: calls.append((param, value)) or 1)
    assert memory.keep_freed(10 << 20)  # a small step: the least amount
    assert calls == [(memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD), (memory.M_TRIM_THRESHOLD, memory.MIN_TRIM)]
    assert memory.keep_freed(100 << 20) and len(calls) == 2  # still within what is kept: not set again
    assert memory.keep_freed(300 << 20) and calls[-1] == (memory.M_TRIM_THRESHOLD, 600 << 20)
    assert memory.keep_freed(10 << 30) and calls[-1] == (memory.M_TRIM_THRESHOLD, memory.MAX_TRIM)
    monkeypatch.setitem(memory._STATE, "mallopt", lambda param, value: 0)  # refused
    monkeypatch.setitem(memory._STATE, "trim", 0)
    assert not memory.keep_freed(1 << 20)
    assert memory._STATE["mallopt"] is None and not memory.keep_freed(1 << 20)
