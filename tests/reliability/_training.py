"""A small real Lightning training for the reliability tests, run in its own process group:

    python -m tests.reliability._training '{"root": "...", "run": "r", "progress": "steps.txt", ...}'

After every recorded step it appends ``<step> <time>`` to the progress file (flushed), so a test that kills
it knows the last step the trainer reached; its first line is ``writer <pid>`` (the writer process).
Options (JSON): root, run, progress, steps (max_steps), flush_secs, max_queue_mb, on_write_error,
hidden (MLP width), step_sleep (seconds per step, so that trials do not hog the machine).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------ the test's side
def start(config: dict[str, Any]) -> Any:
    """Start a training in a new session (its own process group, as a shell starts a job). Its standard
    error (and its writer process's, which inherits it) goes to a file, ``stderr_tail(proc)`` reads it: an
    unread pipe would block the trainer once 64 KiB of warnings filled it (a trainer that never ends)."""
    import subprocess
    import tempfile

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    log = tempfile.NamedTemporaryFile(prefix="comgra-trainer-", suffix=".stderr", dir=config.get("tmp"), delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability._training", json.dumps(config)],
        cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=log,
    )
    log.close()  # the child holds its own descriptor
    proc.stderr_path = log.name  # type: ignore[attr-defined]
    return proc


def dump_stacks(proc: Any, chars: int = 8000) -> str:
    """The Python stacks of every thread of a trainer started by :func:`start` that is still running (it
    writes them to its standard error on SIGUSR1), for the message of a test that waited for it in vain."""
    import signal

    if proc.poll() is not None:
        return stderr_tail(proc, chars)
    os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(2.0)
    return stderr_tail(proc, chars)


def stderr_tail(proc: Any, chars: int = 3000) -> str:
    """The last ``chars`` characters a trainer started by :func:`start` wrote to its standard error."""
    try:
        with open(proc.stderr_path, errors="replace") as f:
            return f.read()[-chars:]
    except (AttributeError, OSError):
        return ""


def progress(path: str) -> tuple[int | None, list[tuple[int, float]]]:
    """(the writer's pid, [(step, time the trainer handed it over), ...]) from a progress file."""
    writer, steps = None, []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None, []
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0] == "writer":
            writer = int(parts[1])
        elif len(parts) == 2:
            steps.append((int(parts[0]), float(parts[1])))
    return writer, steps


def alive(pid: int | None) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped counts as gone)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def is_writer(pid: int | None) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"comgra_callbacks.recording.worker" in f.read()
    except (FileNotFoundError, TypeError):
        return False


def wait_until(condition: Any, timeout: float, pause: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(pause)
    return bool(condition())


def kill_all(proc: Any, writer: int | None) -> None:
    """Leave nothing running or stopped: the training's group, and its writer (by pid, checked first)."""
    import signal

    if is_writer(writer):
        assert writer is not None
        os.kill(writer, signal.SIGCONT)
        os.kill(writer, signal.SIGKILL)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    if proc.stderr is not None:
        proc.stderr.close()


# ----------------------------------------------------------------------------- the trainer's side
def main(config: dict[str, Any]) -> None:
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # dump_stacks(): where a trainer that does not end is
    # Ctrl+C as in a terminal's foreground job, whoever started the test: a process started in the background
    # by a non-interactive shell (`cmd &`) inherits SIGINT ignored, and this trainer would never see it
    signal.signal(signal.SIGINT, signal.default_int_handler)

    import lightning.pytorch as pl
    import torch
    from torch import nn

    from comgra_callbacks import ComgraCallback
    from tests.conftest import quiet_trainer

    torch.set_num_threads(1)
    hidden = int(config.get("hidden", 32))
    sleep = float(config.get("step_sleep", 0.0))
    progress = open(config["progress"], "a", buffering=1)  # noqa: SIM115 - open for the whole run

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 3))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Progress(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            progress.write(f"writer {comgra.recorder.writer.proc.pid}\n")  # type: ignore[union-attr]

        def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
            progress.write(f"{trainer.global_step - 1} {time.time()}\n")  # the step ComgraCallback just handed over
            if sleep:
                time.sleep(sleep)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    comgra = ComgraCallback(
        config["root"],
        run_name=config.get("run", "r"),
        flush_secs=float(config.get("flush_secs", 2.0)),
        max_queue_mb=int(config.get("max_queue_mb", 256)),
        on_write_error=config.get("on_write_error", "warn"),
        log_scalars=False,
    )
    trainer = quiet_trainer([comgra, Progress()], config.get("tmp", "."), max_steps=int(config.get("steps", 100_000)), max_epochs=-1)
    trainer.fit(MLP(), loader)
    progress.write("done\n")


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    main(json.loads(sys.argv[1]))
