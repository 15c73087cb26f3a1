"""What the hand-off of one recorded step costs: ``python benchmarks/pack_bench.py`` (not part of ``make bench``).

Records one step of the transformer workload (``lm_workload.py``, default detail, every step) in a real
Lightning ``Trainer``, keeps that step's snapshots, and then times :func:`~comgra_callbacks.recording.pending.pack`
on them (median of ``--repeats``: wall time, and the training thread's CPU time), next to the floor (one ``sum``
over the same bytes, torch's default threads).
Run it from two checkouts one after the other (``PYTHONPATH=...``) to compare their kernels on the same data.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_workload import LM, data  # noqa: E402

from comgra_callbacks.recording import parts, pending, process_writer  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


def captured_step(neurons: bool = True, n_samples: int | None = None) -> pending.PendingStep:
    """The snapshots of the last step that a real Trainer recorded (default detail unless told)."""
    from comgra_callbacks import ComgraCallback

    kept: list[pending.PendingStep] = []
    original = process_writer.pack  # what the writer process's sink calls on a step

    def keep(step: pending.PendingStep) -> Any:
        kept.append(copy.copy(step))
        kept[-1].snapshots = [copy.copy(s) for s in step.snapshots]
        for s in kept[-1].snapshots:
            s.tensor = s.tensor.detach().clone()
        return original(step)

    process_writer.pack = keep  # type: ignore[assignment]
    parts_env = parts.os.environ.get(parts.REDUCE_ENV)
    parts.os.environ[parts.REDUCE_ENV] = "training"
    try:
        with tempfile.TemporaryDirectory(prefix="comgra-pack-bench-") as tmp:
            options: dict[str, Any] = {"every_n_steps": 1, "log_scalars": False, "neurons": neurons}
            if n_samples is not None:
                options["n_samples"] = n_samples
            trainer = pl.Trainer(
                max_steps=3, callbacks=[ComgraCallback(tmp, **options)], logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=tmp,
            )
            trainer.fit(LM(4), data(3))
    finally:
        process_writer.pack = original  # type: ignore[assignment]
        if parts_env is None:
            parts.os.environ.pop(parts.REDUCE_ENV, None)
        else:
            parts.os.environ[parts.REDUCE_ENV] = parts_env
    return kept[-1]


def time_pack(step: pending.PendingStep, repeats: int, clock: Any = time.perf_counter) -> list[float]:
    """``pack()`` of copies of ``step``, timed by ``clock`` (``time.thread_time``: the training thread's CPU
    time, which other jobs on a shared machine disturb less than the wall time)."""
    times = []
    for _ in range(repeats):
        fresh = copy.copy(step)
        fresh.snapshots = list(step.snapshots)
        start = clock()
        pending.pack(fresh)
        times.append(clock() - start)
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the repeats instead")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    for label, neurons, n_samples in (("default detail", True, None), ("statistics only", False, 0)):
        step = captured_step(neurons, n_samples)
        nbytes = sum(s.tensor.numel() * s.tensor.element_size() for s in step.snapshots)
        if args.profile:
            import cProfile
            import pstats

            time_pack(step, 2)
            prof = cProfile.Profile()
            prof.enable()
            time_pack(step, args.repeats)
            prof.disable()
            print(f"--- {label}")
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            continue
        time_pack(step, 2)
        floor = torch.ones(max(nbytes // 4, 1))
        floor_times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            floor.sum()
            floor_times.append(time.perf_counter() - start)
        pack_ms = statistics.median(time_pack(step, args.repeats)) * 1e3
        pack_cpu_ms = statistics.median(time_pack(step, args.repeats, time.thread_time)) * 1e3
        floor_ms = statistics.median(floor_times) * 1e3
        out[label] = {"tensors": len(step.snapshots), "mb": round(nbytes / 1e6, 1), "pack_ms": round(pack_ms, 2),
                      "pack_cpu_ms": round(pack_cpu_ms, 2), "floor_ms": round(floor_ms, 2), "in_floors": round(pack_ms / floor_ms, 1)}
    with open("/proc/loadavg") as handle:
        out["load"] = handle.read().split()[0]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
