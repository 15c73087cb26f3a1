"""Helpers shared by the training benchmarks: step timing inside a Lightning ``Trainer``, memory, bytes on
disk, and interleaved rounds (each configuration once per round, so that a noisy minute of a shared machine
hits every configuration alike)."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


def rss_mb() -> float:
    """Resident memory of this process, MiB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (what a run takes on disk)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class BatchStartTimer(pl.Callback):
    """Wall time between consecutive batch starts: a step's time including what every callback does at the end
    of one step and the start of the next (the writer's hand-off, the hooks of the next step)."""

    def __init__(self, rss_every: int = 50) -> None:
        self.starts: list[float] = []
        self.cpu: list[float] = []  # CPU time of this process (all its threads) at each batch start
        self.rss: list[float] = []
        self.rss_every = rss_every

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if len(self.starts) % self.rss_every == 0:
            self.rss.append(rss_mb())

    def periods(self, warmup: int) -> list[float]:
        """Step times in seconds, without the first ``warmup`` steps."""
        return [b - a for a, b in zip(self.starts, self.starts[1:])][warmup:]

    def cpu_periods(self, warmup: int) -> list[float]:
        """CPU seconds this process used per step (every thread; not a writer process), without the first
        ``warmup`` steps: less sensitive than wall time to other jobs on a shared machine, though an OpenMP
        pool waiting for a preempted thread spins and counts too."""
        return [b - a for a, b in zip(self.cpu, self.cpu[1:])][warmup:]


def interleaved(names: list[str], rounds: int, run: Callable[[str, int], list[float]]) -> dict[str, list[float]]:
    """``run(name, round)`` for every name in every round, in order; the step times of each name, pooled."""
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names:
            print(f"round {round_ + 1}/{rounds}: {name}", file=sys.stderr, flush=True)
            samples[name] += run(name, round_)
    return samples


def summarise(samples: dict[str, list[float]], how: str = "median") -> dict[str, float]:
    """One figure per configuration (seconds): the median step, or the mean (the amortised cost)."""
    pick = statistics.median if how == "median" else statistics.mean
    return {name: pick(values) for name, values in samples.items() if values}
