"""What the callback costs a ``torch.compile``'d model on the steps it does not record.

    python benchmarks/compile_bench.py                  # the figures in docs/benchmarks.md
    python benchmarks/compile_bench.py --steps 60 --rounds 1   # a smoke run

The model is a small GPT-like LM (2 ``nn.TransformerEncoderLayer``s, d_model 128, 4 heads, ff 512, sequence
64, batch 16, vocabulary 512, AdamW) whose network is compiled once with the default backend (inductor);
torch's default thread count. One process, rounds interleaved: each round trains the same compiled module for
``--steps`` steps in a fresh Lightning ``Trainer`` without the callback, then with a callback that records
step 0 only (its other steps are the "not recorded" steps), then with one recording every 10th step. The
first ``WARMUP`` steps of each fit are left out. The goal (issue 8): a compiled step the callback does not
record costs within 2 % of compiled training without the callback. Also reported: recompilations and graph
breaks Dynamo counted while the callback was on.
"""

from __future__ import annotations

import argparse
import json
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

WARMUP = 10


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._t)


def fit(module: LM, steps: int, root: Path, every: int | None) -> float:
    from comgra_callbacks import ComgraCallback

    timer = StepTimer()
    callbacks: list[Any] = [timer]
    if every is not None:
        callbacks.insert(0, ComgraCallback(str(root), every_n_steps=every, log_scalars=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, max_steps=steps, callbacks=callbacks, default_root_dir=str(root))
        trainer.fit(module, data(steps))
    return statistics.mean(timer.times[WARMUP:]) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from torch._dynamo.utils import counters

    module = LM(2, compile=True)
    rows: dict[str, list[float]] = {"no callback": [], "not recorded (records step 0 only)": [], "every 10th step (mean)": []}
    with tempfile.TemporaryDirectory() as tmp:
        fit(module, WARMUP + 2, Path(tmp), None)  # compile once, outside the measurement
        before = (dict(counters["recompiles"]), sum(counters["graph_break"].values()), counters["frames"]["total"])
        for r in range(args.rounds):
            for name, every in (("no callback", None), ("not recorded (records step 0 only)", 10**9), ("every 10th step (mean)", 10)):
                rows[name].append(fit(module, args.steps, Path(tmp) / f"{r}-{len(rows[name])}", every))
                print(f"round {r} {name}: {rows[name][-1]:.2f} ms", file=sys.stderr, flush=True)
        after = (dict(counters["recompiles"]), sum(counters["graph_break"].values()), counters["frames"]["total"])
    base = statistics.median(rows["no callback"])
    result = {
        "workload": f"compiled LM (inductor), {torch.get_num_threads()} threads, {args.steps} steps x {args.rounds} rounds",
        "mean_step_ms": {k: round(statistics.median(v), 3) for k, v in rows.items()},
        "ratio_to_no_callback": {k: round(statistics.median(v) / base, 4) for k, v in rows.items()},
        "recompiles_with_callback": {k: v - before[0].get(k, 0) for k, v in after[0].items() if v != before[0].get(k, 0)},
        "graph_breaks_with_callback": after[1] - before[1],
        "frames_compiled_with_callback": after[2] - before[2],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
