"""Signals at random moments of a real Lightning training: what each one may cost.

Each trial trains in its own session (a shell's job); the test signals the trainer, its group, or every
process including the writer, and compares the store with the last step the trainer handed over:

- SIGINT / SIGTERM (the trainer or its group: Ctrl+C, ``timeout``, ``docker stop``, a scheduler): nothing
  handed over is lost, and the run is marked ``failed``;
- SIGKILL of the trainer or its group: the writer process (another session) writes everything it got and
  marks the run ``failed`` (interrupted);
- SIGKILL of every process, the writer too: what was handed over more than ``2 * flush_secs`` (plus a
  commit) before the kill is in the store.

The trials run side by side (each one mostly waits for its imports); docs/reliability.md has the figures
of many more trials.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from comgra_callbacks import open_run
from tests.reliability import _training as tr

pytestmark = pytest.mark.slow

FLUSH_SECS = 0.5
BOUND_SECS = 2 * FLUSH_SECS + 1.0  # in the ring <= flush_secs, pending in the writer <= flush_secs, a commit

# (name, signal, whom): "trainer" = its pid, "group" = its process group, "everything" = group and writer
MATRIX = [
    ("sigint-group", signal.SIGINT, "group"),
    ("sigterm-group", signal.SIGTERM, "group"),
    ("sigterm-trainer", signal.SIGTERM, "trainer"),
    ("sigkill-group", signal.SIGKILL, "group"),
    ("sigkill-everything", signal.SIGKILL, "everything"),
]


def _trial(tmp: Path, name: str) -> dict[str, Any]:
    config = {
        "root": str(tmp / "runs"), "run": name, "progress": str(tmp / f"{name}.txt"), "tmp": str(tmp),
        "flush_secs": FLUSH_SECS, "step_sleep": 0.01,
    }
    return {"name": name, "config": config, "proc": tr.start(config)}


def _signal(trial: dict[str, Any], sig: int, whom: str) -> None:
    proc, writer = trial["proc"], trial["writer"]
    trial["killed_at"] = time.time()
    if whom == "trainer":
        os.kill(proc.pid, sig)
    else:
        os.killpg(proc.pid, sig)
    if whom == "everything" and tr.is_writer(writer):
        os.kill(writer, sig)


@pytest.mark.timeout(420)
def test_signal_matrix(tmp_path: Path) -> None:
    seed = int(os.environ.get("COMGRA_SIGNAL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    trials = [_trial(tmp_path, name) for name, _, _ in MATRIX]
    failures = []
    try:
        for trial, (name, sig, whom) in zip(trials, MATRIX):
            at_step = rng.randint(3, 40)
            ok = tr.wait_until(lambda t=trial, n=at_step: len(tr.progress(t["config"]["progress"])[1]) > n or t["proc"].poll() is not None, 150)
            assert ok and trial["proc"].poll() is None, f"{name}: training did not reach step {at_step}: {tr.stderr_tail(trial['proc'])}"
            time.sleep(rng.uniform(0, 0.05))  # a random moment inside a step
            trial["writer"] = tr.progress(trial["config"]["progress"])[0]
            _signal(trial, sig, whom)
        for trial, (name, _, whom) in zip(trials, MATRIX):
            # the trainer ends once its writer has committed what it holds: on a loaded 2-core CI machine (ten
            # processes of this test beside another test file) that took more than 60 s once
            assert tr.wait_until(lambda t=trial: t["proc"].poll() is not None, 120), f"seed {seed}, {name}: the trainer did not end; its standard error and stacks: {tr.dump_stacks(trial['proc'])}"
            assert tr.wait_until(lambda t=trial: not tr.alive(t["writer"]), 60), f"{name}: the writer did not end"
            _, steps = tr.progress(trial["config"]["progress"])
            run = open_run(Path(trial["config"]["root"]) / name)
            recorded = set(run.steps["step"].tolist())
            if whom == "everything":
                due = {s for s, t in steps if t < trial["killed_at"] - BOUND_SECS}
                lost = sorted(due - recorded)
                trial["summary"] = f"{name}: reached {len(steps)}, recorded {len(recorded)}, lost {len(lost)} older than {BOUND_SECS} s"
                if lost:
                    failures.append(f"{trial['summary']}: {lost[:10]}")
            else:
                lost = sorted({s for s, _ in steps} - recorded)
                trial["summary"] = f"{name}: reached {len(steps)}, recorded {len(recorded)}, lost {len(lost)}, status {run.status}"
                if lost or run.status != "failed":
                    failures.append(f"{trial['summary']}: {lost[:10]} {run.meta.get('error')!r}")
    finally:
        for trial in trials:
            tr.kill_all(trial["proc"], trial.get("writer"))
    print("\n".join(t.get("summary", t["name"]) for t in trials))
    assert not failures, f"seed {seed}:\n" + "\n".join(failures)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, IndexError, ValueError):
                pass
    return found


@pytest.mark.timeout(120)
def test_a_trainer_killed_while_its_writer_starts_leaves_no_shared_memory(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "start.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {tr.REPO!r})\n"
        "from comgra_callbacks.recording.process_writer import ProcessWriter\n"
        f"ProcessWriter(root={str(tmp_path / 'runs')!r}, run='r')\n"
        "import time; time.sleep(60)\n"
    )
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True, stderr=subprocess.DEVNULL)
        writers: list[int] = []
        try:
            assert tr.wait_until(lambda p=proc, w=writers: bool(w.extend(c for c in _children(p.pid) if tr.is_writer(c)) or w), 30, 0.001)
            os.killpg(proc.pid, signal.SIGKILL)  # the writer is still importing: it has not answered yet
            proc.wait(10)
            assert tr.wait_until(lambda w=writers: not any(tr.alive(pid) for pid in w), 30), "the writer outlived its trainer"
            left = [p for d in ("/dev/shm", "/tmp") if os.path.isdir(d) for p in os.listdir(d) if p.startswith(f"comgra-ring-{proc.pid}-")]
            assert not left, left
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            for pid in writers:
                if tr.is_writer(pid):
                    os.kill(pid, signal.SIGKILL)
