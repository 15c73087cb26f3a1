"""Where a recorded step of the transformer workload spends its time: ``python benchmarks/lm_phases.py``.

Trains ``lm_workload.LM`` in a real Lightning ``Trainer`` with two timing callbacks around the comgra
callback (one before it, one after it), and reports the median of each phase per step: forward (batch start
to ``on_before_backward``), backward, optimizer step, and the callback's own end of step (its
``on_train_batch_end``: parameter updates, graph, ``pack()``); ``--profile`` prints a cProfile of the
timed steps instead. Rows are interleaved (``--rounds``); ``--every 0`` runs without the callback.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_workload import LM, data  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")
WARMUP = 5


class Marks(pl.Callback):
    """Time stamps of the Lightning hooks of every step (``marks[hook]``: one list per hook)."""

    def __init__(self) -> None:
        self.marks: dict[str, list[float]] = {}
        self.faults: list[int] = []  # minor page faults of the process at each batch start

    def _mark(self, hook: str) -> None:
        self.marks.setdefault(hook, []).append(time.perf_counter())

    def on_train_batch_start(self, *args: Any) -> None:
        self._mark("batch_start")
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)

    def on_before_backward(self, *args: Any) -> None:
        self._mark("before_backward")

    def on_after_backward(self, *args: Any) -> None:
        self._mark("after_backward")

    def on_before_optimizer_step(self, *args: Any) -> None:
        self._mark("before_optimizer")

    def on_train_batch_end(self, *args: Any) -> None:
        self._mark("batch_end")


def phases(first: Marks, last: Marks) -> dict[str, list[float]]:
    """Per step (ms): forward, backward, optimizer, callback end of step, whole step (batch start to batch
    start); and the minor page faults of the step (fresh memory the allocator had to map)."""
    a, b = first.marks, last.marks
    n = len(a["batch_start"]) - 1
    out: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "callback end": [], "step": [], "page faults": []}
    for i in range(WARMUP, n):
        out["forward"].append(b["before_backward"][i] - b["batch_start"][i])
        out["backward"].append(a["after_backward"][i] - b["before_backward"][i])
        out["optimizer"].append(a["batch_end"][i] - b["before_optimizer"][i])
        out["callback end"].append(b["batch_end"][i] - a["batch_end"][i])
        out["step"].append(a["batch_start"][i + 1] - a["batch_start"][i])
        out["page faults"].append((first.faults[i + 1] - first.faults[i]) / 1e3)  # shown x1000 below
    return {k: [x * 1e3 for x in v] for k, v in out.items()}


def fit(every: int, steps: int, root: str, options: dict[str, Any]) -> dict[str, list[float]]:
    from comgra_callbacks import ComgraCallback

    first, last = Marks(), Marks()
    callbacks: list[Any] = [first]
    if every:
        callbacks.append(ComgraCallback(root, every_n_steps=every, log_scalars=False, **options))
    callbacks.append(last)
    trainer = pl.Trainer(
        max_steps=steps + WARMUP + 1, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=root,
    )
    trainer.fit(LM(4), data(steps + WARMUP + 1))
    return phases(first, last)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--every", type=int, nargs="+", default=[0, 1], help="every_n_steps per row (0: no callback)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    rows: dict[int, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="comgra-phases-") as tmp:
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            fit(args.every[-1], args.steps, tmp + "/p", {})
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(40)
            return
        for r in range(args.rounds):
            for every in args.every:
                got = fit(every, args.steps, f"{tmp}/{r}-{every}", {})
                for k, v in got.items():
                    rows.setdefault(every, {}).setdefault(k, []).extend(v)
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[0]
    print(json.dumps({"load": load, **{f"every {e}" if e else "no callback": {k: round(statistics.median(v), 1) for k, v in p.items()} for e, p in rows.items()}}))


if __name__ == "__main__":
    main()
