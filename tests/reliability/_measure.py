"""Figures for docs/reliability.md, by hand (a few minutes; not part of the test suite):

    PYTHONPATH=$PWD python -m tests.reliability._measure signals 10   # trials per signal
    PYTHONPATH=$PWD python -m tests.reliability._measure latency      # commit delay with flush_secs=0.2 under load
    PYTHONPATH=$PWD python -m tests.reliability._measure large [MB]   # a 27 M-parameter model, max_queue_mb=MB
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.reliability import _training as tr

KINDS = {
    "SIGINT to the group": (signal.SIGINT, "group"),
    "SIGTERM to the group": (signal.SIGTERM, "group"),
    "SIGTERM to the trainer": (signal.SIGTERM, "trainer"),
    "SIGKILL to the trainer": (signal.SIGKILL, "trainer"),
    "SIGKILL to the group": (signal.SIGKILL, "group"),
    "SIGKILL to everything": (signal.SIGKILL, "everything"),
}
FLUSH_SECS = 0.5


def signals(trials: int) -> None:
    from comgra_callbacks import open_run

    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp())
    print(f"flush_secs={FLUSH_SECS}, step_sleep=0.01 s; lost = steps the trainer handed over that are not in the store")
    for kind, (sig, whom) in KINDS.items():
        lost_counts, statuses, ages = [], set(), []
        for trial in range(trials):
            name = f"{sig.name}-{whom}-{trial}"
            config = {"root": str(tmp / "runs"), "run": name, "progress": str(tmp / f"{name}.txt"), "tmp": str(tmp), "flush_secs": FLUSH_SECS, "step_sleep": 0.01}
            proc = tr.start(config)
            writer = None
            try:
                at = rng.randint(3, 200)
                tr.wait_until(lambda c=config, n=at, p=proc: len(tr.progress(c["progress"])[1]) > n or p.poll() is not None, 150)
                time.sleep(rng.uniform(0, 0.05))
                writer = tr.progress(config["progress"])[0]
                killed = time.time()
                if whom == "trainer":
                    os.kill(proc.pid, sig)
                else:
                    os.killpg(proc.pid, sig)
                if whom == "everything" and tr.is_writer(writer):
                    os.kill(writer, sig)  # type: ignore[arg-type]
                tr.wait_until(lambda p=proc: p.poll() is not None, 60)
                tr.wait_until(lambda w=writer: not tr.alive(w), 60)
                _, steps = tr.progress(config["progress"])
                run = open_run(tmp / "runs" / name)
                recorded = set(run.steps["step"].tolist())
                lost = [(s, killed - t) for s, t in steps if s not in recorded]
                lost_counts.append(len(lost))
                ages.extend(age for _, age in lost)
                statuses.add(run.status)
            finally:
                tr.kill_all(proc, writer)
        oldest = f", oldest lost step handed over {max(ages):.2f} s before the kill" if ages else ""
        print(f"{kind}: lost per trial {lost_counts} (max {max(lost_counts)}){oldest}; status {sorted(statuses)}", flush=True)


def latency(seconds: float = 15.0) -> None:
    from comgra_callbacks import open_run

    tmp = Path(tempfile.mkdtemp())
    config = {"root": str(tmp / "runs"), "run": "live", "progress": str(tmp / "p.txt"), "tmp": str(tmp), "flush_secs": 0.2, "hidden": 256}
    proc = tr.start(config)
    seen: dict[int, float] = {}
    try:
        tr.wait_until(lambda: len(tr.progress(config["progress"])[1]) > 5, 150)
        run = open_run(tmp / "runs" / "live")
        end = time.time() + seconds
        while time.time() < end:
            run.refresh()
            now = time.time()
            for step in run.steps["step"].tolist():
                seen.setdefault(step, now)
            time.sleep(0.02)
    finally:
        writer = tr.progress(config["progress"])[0]
        tr.kill_all(proc, writer)
    _, steps = tr.progress(config["progress"])
    handed = dict(steps)
    delays = [seen[s] - handed[s] for s in seen if s in handed and s > 10]
    print(f"flush_secs=0.2, every step recorded as fast as it trains: {len(delays)} steps, visible after "
          f"median {statistics.median(delays):.2f} s, p99 {sorted(delays)[int(0.99 * len(delays))]:.2f} s, max {max(delays):.2f} s")


def large(max_queue_mb: int) -> None:
    import warnings

    import torch

    from comgra_callbacks import ComgraCallback, open_run
    from tests.conftest import quiet_trainer
    from tests.reliability.test_large_model import Wide

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    model = Wide([1024, 4096, 4096, 1536])
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(48, 1024, generator=g), torch.randint(0, 1536, (48,), generator=g))
    times: list[float] = []

    import lightning.pytorch as pl

    class Clock(pl.Callback):
        def on_train_batch_start(self, *args: object) -> None:
            self.started = time.perf_counter()

        def on_train_batch_end(self, *args: object) -> None:
            times.append(time.perf_counter() - self.started)

    comgra = ComgraCallback(str(tmp / "runs"), run_name="large", max_queue_mb=max_queue_mb, log_scalars=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_trainer([comgra, Clock()], tmp, max_steps=6).fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    run = open_run(tmp / "runs" / "large")
    print(f"{sum(p.numel() for p in model.parameters())} parameters, max_queue_mb={max_queue_mb}: recorded steps "
          f"{run.steps['step'].tolist()}, seconds a step {[round(t, 2) for t in times]}")
    for message in dict.fromkeys(str(w.message) for w in seen if str(w.message).startswith("comgra")):
        print("  warning:", message)


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    if sys.argv[1] == "signals":
        signals(int(sys.argv[2]) if len(sys.argv) > 2 else 5)
    elif sys.argv[1] == "large":
        large(int(sys.argv[2]) if len(sys.argv) > 2 else 256)
    else:
        latency()
