"""Figures for docs/reliability.md, by hand (a few minutes; not part of the test suite):

    PYTHONPATH=$PWD python -m tests.reliability._measure signals 10   # trials per signal
    PYTHONPATH=$PWD python -m tests.reliability._measure latency      # commit delay with flush_secs=0.2 under load
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


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    if sys.argv[1] == "signals":
        signals(int(sys.argv[2]) if len(sys.argv) > 2 else 5)
    else:
        latency()
