"""What recording costs training: run with ``make bench`` or ``python benchmarks/recording_bench.py``.

On the fixed workload of ``workload.py`` (4-layer MLP 64→256→256→256→10, batch 64, Adam, CPU, one thread,
300 steps) it measures, side by side in one process:

* Lightning: median step time without the callback; with it on steps it does not record; recording every
  step with statistics only; with statistics + per-neuron statistics + all 64 samples;
* the statistics-only row again as one fit recorded in alternate blocks of 10 steps: its recorded steps
  against its plain steps (``paired_ratio_every_step_stats``), a ratio the machine's drift between fits does
  not move;
* bytes written per recorded step, the time training waited for the writer, and memory (RSS) growth;
* a plain PyTorch loop with the framework-free recorder, to compare like for like with the original
  comgra package (measured by ``comgra_env.py`` in its own virtual environment).

A step's time is the wall time between consecutive batch starts, so it includes everything the callback
does at the end of one step and the start of the next. Configurations run in interleaved rounds and the
median of each is reported, to soften the noise of a shared machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------ Lightning
def lightning_run(config: dict[str, Any] | None, n_steps: int, root: Path, *, time_hooks: bool = False) -> dict[str, Any]:
    import lightning.pytorch as pl

    from comgra_callbacks import ComgraCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = workload.make_model()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return workload.loss_fn(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return workload.make_optimizer(self)

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.rss: list[float] = []
            self.writer: Any = None

        def on_train_batch_start(self, *args: Any) -> None:
            self.starts.append(time.perf_counter())
            if len(self.starts) % 50 == 0:
                self.rss.append(rss_mb())
            recorder = getattr(comgra, "_recorder", None)
            if recorder is not None:
                self.writer = recorder.writer  # kept: the callback lets go of it when the run closes

    class Around(pl.Callback):
        """Time stamps of the hooks the comgra callback implements, taken before it (``first``) and after it:
        their differences are the time the callback's own hooks take in a step."""

        def __init__(self) -> None:
            self.marks: list[float] = []

        def _mark(self, *args: Any) -> None:
            self.marks.append(time.perf_counter())

        on_train_batch_start = on_before_backward = on_before_optimizer_step = on_train_batch_end = _mark

    timer = Timer()
    callbacks: list[Any] = [timer]
    comgra = None
    first, last = Around(), Around()
    if config is not None:
        comgra = ComgraCallback(str(root), log_scalars=False, **config)
        callbacks += [first, comgra, last] if time_hooks else [comgra]
    batches = workload.make_batches(n_steps + 1)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = pl.Trainer(
        max_steps=n_steps + 1, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )
    trainer.fit(Module(), loader)
    periods = [b - a for a, b in zip(timer.starts, timer.starts[1:])][workload.WARMUP :]
    result: dict[str, Any] = {"step_s": periods, "rss_mb": timer.rss}
    if time_hooks and len(first.marks) == len(last.marks) == 4 * len(timer.starts):
        inside = [b - a for a, b in zip(first.marks, last.marks)]
        result["hooks_s"] = [sum(inside[4 * i : 4 * i + 4]) for i in range(len(timer.starts))][workload.WARMUP : workload.WARMUP + len(periods)]
    if comgra is not None:
        from comgra_callbacks import open_run

        run = open_run(root / comgra.run_name)
        records = len(run.steps)
        result["records"] = records
        result["bytes"] = dir_bytes(root / comgra.run_name)
        result["bytes_per_record"] = result["bytes"] / max(records, 1)
        result["waited_s"] = float(getattr(timer.writer, "wait_seconds", 0.0))
    return result


# ------------------------------------------------------------------------------------- plain torch
def torch_loop_run(record: bool, n_steps: int, root: Path) -> dict[str, Any]:
    from comgra_callbacks.recording.process_writer import ProcessWriter
    from comgra_callbacks.recording.recorder import Recorder, RecorderConfig

    model = workload.make_model()
    optimizer = workload.make_optimizer(model)
    batches = workload.make_batches(n_steps)
    recorder = None
    if record:
        writer = ProcessWriter(root=str(root), run=f"loop-{time.time_ns()}")
        recorder = Recorder(RecorderConfig(neurons=False, n_samples=0), writer)
        recorder.attach(model)
    times = []
    try:
        for step, (x, y) in enumerate(batches):
            start = time.perf_counter()
            if recorder is not None:
                recorder.begin_step(step=step, batch=(x, y))
            optimizer.zero_grad(set_to_none=True)
            loss = workload.loss_fn(model(x), y)
            if recorder is not None:
                recorder.before_backward(loss)
            loss.backward()
            if recorder is not None:
                recorder.before_optimizer_step()
            optimizer.step()
            if recorder is not None:
                recorder.end_step()
            times.append(time.perf_counter() - start)
    finally:
        if recorder is not None:
            recorder.close("finished")
    return {"step_s": times[workload.WARMUP :]}


def _always(outputs: Any, batch: Any) -> bool:
    return True


PAIRED = "every_step_stats_paired"  # the statistics-only row, as recorded and plain blocks of one fit
PAIR_BLOCK = 10


def paired_split(periods: list[float]) -> tuple[list[float], list[float]]:
    """A paired fit's step times (step ``WARMUP`` on) as (recorded, not recorded), without the first step of
    each block (where the other kind ends)."""
    recorded: list[float] = []
    plain: list[float] = []
    for i, period in enumerate(periods):
        step = i + workload.WARMUP
        if step % PAIR_BLOCK:
            (recorded if (step // PAIR_BLOCK) % 2 == 0 else plain).append(period)
    return recorded, plain


def configs(n_steps: int = workload.N_STEPS) -> dict[str, dict[str, Any] | None]:
    from comgra_callbacks import LossSpike, Never, Predicate, Steps

    return {
        "no_callback": None,
        "callback_not_recording": {"every_n_steps": 10**9},
        "every_step_stats": {"every_n_steps": 1, "neurons": False, "n_samples": 0},
        "every_step_stats_neurons_all_samples": {"every_n_steps": 1, "neurons": True, "n_samples": workload.BATCH_SIZE, "detail": {"*": "samples"}},
        # armed every step, decided by the writer from the step's statistics: never kept
        "armed_discarded": {"schedule": Never(), "triggers": [LossSpike(threshold=1e9)], "neurons": True},
        # armed every step and always kept (a batch predicate), with the default detail
        "armed_kept": {"schedule": Never(), "triggers": [Predicate(_always, name="always")], "neurons": True},
        # recorded in blocks of PAIR_BLOCK steps, not recorded in the blocks between: recorded against plain
        # steps of the same fit (this machine's speed drifts by +-30 % between fits, far more than the target)
        PAIRED: {"schedule": Steps([range(b, b + PAIR_BLOCK) for b in range(0, n_steps + 1, 2 * PAIR_BLOCK)]), "neurons": False, "n_samples": 0},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=workload.N_STEPS)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every configuration")
    parser.add_argument("--comgra", action="store_true", help="also run the original comgra 0.11.5 (own venv; minutes)")
    parser.add_argument("--comgra-steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/recording.json"))
    args = parser.parse_args(argv)
    workload.configure_torch()
    CONFIGS = configs(args.steps)
    samples: dict[str, list[float]] = {name: [] for name in CONFIGS}
    samples.update({"loop_plain": [], "loop_recorder_stats": []})
    extra: dict[str, dict[str, Any]] = {}
    waited: dict[str, list[float]] = {}  # seconds training waited for the writer, per round
    pair_hook_s: list[float] = []  # the paired fits' time in the callback's hooks, per step
    with tempfile.TemporaryDirectory(prefix="comgra-bench-") as tmp:
        for round_ in range(args.rounds):
            for name, config in CONFIGS.items():
                print(f"round {round_ + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                result = lightning_run(config, args.steps, Path(tmp) / f"{name}-{round_}", time_hooks=name == PAIRED)
                samples[name] += result["step_s"]
                if name == PAIRED and "hooks_s" in result:
                    pair_hook_s += result["hooks_s"]
                extra[name] = {k: v for k, v in result.items() if k != "step_s"}
                if "waited_s" in result:
                    waited.setdefault(name, []).append(round(result["waited_s"], 3))
            for name, record in (("loop_plain", False), ("loop_recorder_stats", True)):
                print(f"round {round_ + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                samples[name] += torch_loop_run(record, args.steps, Path(tmp))["step_s"]
    per_round = args.steps - workload.WARMUP
    pair_rounds = [paired_split(samples[PAIRED][i : i + per_round]) for i in range(0, len(samples[PAIRED]), per_round)]
    pair_all = [x for r, _ in pair_rounds for x in r], [x for _, p in pair_rounds for x in p]  # (recorded, plain)
    hook_rounds = [paired_split(pair_hook_s[i : i + per_round]) for i in range(0, len(pair_hook_s), per_round)]
    pair_hooks = [x for r, _ in hook_rounds for x in r], [x for _, p in hook_rounds for x in p]
    del samples[PAIRED]
    CONFIGS.pop(PAIRED)
    median = {name: statistics.median(values) for name, values in samples.items()}
    base = median["no_callback"]
    summary: dict[str, Any] = {
        "workload": "MLP 64-256-256-256-10, batch 64, Adam, CPU, 1 thread",
        "steps": args.steps,
        "rounds": args.rounds,
        "median_step_ms": {k: round(v * 1e3, 3) for k, v in median.items()},
        "ratio_to_no_callback": {k: round(median[k] / base, 3) for k in CONFIGS},
        "loop_ratio": round(median["loop_recorder_stats"] / median["loop_plain"], 3),
        # statistics only, recorded steps against the plain steps of the same fit (the callback attached, not
        # recording: within 1 % of no callback), per round and over all rounds
        "paired_ratio_every_step_stats": {
            "rounds": [round(statistics.median(r) / statistics.median(p), 3) for r, p in pair_rounds],
            "all": round(statistics.median(pair_all[0]) / statistics.median(pair_all[1]), 3),
            "recorded_ms": round(statistics.median(pair_all[0]) * 1e3, 3),
            "plain_ms": round(statistics.median(pair_all[1]) * 1e3, 3),
            # what the callback's hooks take on those plain steps (the not-recording overhead the ratio leaves out)
            "hooks_on_plain_ms": round(statistics.median(pair_hooks[1]) * 1e3, 3) if pair_hooks[1] else None,
            "hooks_on_recorded_ms": round(statistics.median(pair_hooks[0]) * 1e3, 3) if pair_hooks[0] else None,
        },
        "bytes_per_record": {k: round(extra[k]["bytes_per_record"]) for k in CONFIGS if k in extra and "bytes_per_record" in extra[k]},
        "writer_wait_s_per_round": waited,
        "rss_mb_every_50_steps": {k: [round(x) for x in extra[k]["rss_mb"]] for k in extra},
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    if args.comgra:
        from comgra_env import run_comgra_reference

        reference = run_comgra_reference(args=["--n-steps", str(args.comgra_steps)])
        summary["comgra_0_11_5"] = reference
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
