"""What recording costs a transformer: ``python benchmarks/transformer_bench.py`` (part of ``make bench``).

    python benchmarks/transformer_bench.py                       # the figures in docs/benchmarks.md
    python benchmarks/transformer_bench.py --quick               # a 1-2 minute smoke run

The workload (``lm_workload.py``): a small GPT-like LM, 4 pre-norm ``nn.TransformerEncoderLayer``s (d_model
128, 4 heads, ff 512), sequence 64, batch 16, vocabulary 512, AdamW, CPU, fixed seed, torch's default thread
count. Every configuration trains the same seeded model in a real Lightning ``Trainer``, rounds interleaved
in one process; a step's time is the wall time between consecutive batch starts. Rows:

* no callback; the callback on steps it does not record; recording every 10th step (the *mean* step: the
  amortised cost); every step with the default detail; every step with batch statistics only;
* a plain forward-hook recorder (4 statistics of every module output, on the training thread): what a user
  would write by hand;
* every step with the default detail, the statistics computed in the writer process instead (the
  alternative ``parts.reduce_in_writer`` does not choose when torch uses every core);
* every step with the default detail, torch's reductions instead of the one-pass numba kernel (what a user
  gets without the ``fast`` extra, ``recording/fused.py``);
* TensorBoard histograms of every parameter and gradient every step (skipped, with a message, when
  ``tensorboard`` is not installed);
* **the floor**: one reduction pass (``sum``) over as many bytes as a recorded step captures: what reading
  a step's data once costs on this machine.

Also reported: the every-10th row *paired* (``every_10th_paired_ratio``, :func:`paired_amortised`): each
run of ten steps that starts with a recorded one against the median of its own nine unrecorded steps, which
the drift of a shared machine between fits moves far less than the comparison of means across fits.

Also reported: bytes captured (the recorded tensors) and bytes written (on disk) per recorded step.
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

import lightning.pytorch as pl
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import BatchStartTimer, dir_bytes, interleaved, summarise  # noqa: E402
from lm_workload import LM, data  # noqa: E402

from comgra_callbacks.recording import fused  # noqa: E402
from comgra_callbacks.recording.fused import KERNEL_ENV  # noqa: E402
from comgra_callbacks.recording.parts import REDUCE_ENV  # noqa: E402

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")
WARMUP = 5

# name -> ComgraCallback arguments (None: no comgra callback)
COMGRA: dict[str, dict[str, Any] | None] = {
    "no callback": None,
    "callback, step not recorded": {"every_n_steps": 10**9},  # records step 0 only
    "every 10th step (mean)": {"every_n_steps": 10},
    "every step, default detail": {"every_n_steps": 1},
    "every step, statistics only": {"every_n_steps": 1, "neurons": False, "n_samples": 0},
}
# the alternative the recorder does not choose here (parts.reduce_in_writer): the writer process reduces
IN_WRITER = "every step, default detail, reduced in the writer process"
REDUCE_IN: dict[str, str] = {IN_WRITER: "writer"}
COMGRA[IN_WRITER] = {"every_n_steps": 1}
# the kernels used without numba (the `fast` extra): torch's reductions
TORCH_KERNELS = "every step, default detail, torch's kernels (without numba)"
COMGRA[TORCH_KERNELS] = {"every_n_steps": 1}
KERNEL_IN: dict[str, str] = {TORCH_KERNELS: "torch"}
HOOKS = "forward hooks, 4 statistics per module output"
EVERY_10TH = "every 10th step (mean)"
TENSORBOARD = "TensorBoard histograms, every parameter and gradient"


class HookRecorder(pl.Callback):
    """The recorder a user writes by hand: a forward hook on every module that keeps mean, std, min and max of
    its output (one ``stack`` per output, kept on the host every step)."""

    def __init__(self) -> None:
        self.kept: list[torch.Tensor] = []
        self.handles: list[Any] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        def hook(module: Any, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                t = output.detach()
                self.kept.append(torch.stack([t.mean(), t.std(), t.min(), t.max()]))

        self.handles = [m.register_forward_hook(hook) for m in pl_module.modules()]

    def on_train_batch_end(self, *args: Any) -> None:
        if self.kept:
            torch.stack(self.kept).numpy()  # the host copy a logger makes
            self.kept = []

    def on_fit_end(self, *args: Any) -> None:
        for handle in self.handles:
            handle.remove()


class TensorBoardHistograms(pl.Callback):
    """TensorBoard's usual recipe: a histogram of every parameter and of its gradient, every step."""

    def __init__(self, root: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(root))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step = trainer.global_step
        for name, p in pl_module.named_parameters():
            self.writer.add_histogram(name, p.detach(), step)
            if p.grad is not None:
                self.writer.add_histogram(f"{name}.grad", p.grad.detach(), step)

    def on_fit_end(self, *args: Any) -> None:
        self.writer.close()


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def captured_bytes(run: Any) -> int:
    """Bytes of the tensors a recorded step captured: the numel of every series of the last record times its
    dtype's size (what the recorder had to read)."""
    from comgra_callbacks.store import format as fmt

    if not len(run.steps):  # nothing recorded
        return 0
    block = run._read(fmt.STATS, (len(run.steps) - 1, slice(None), slice(None)))  # (series, stats)
    numel = block[:, fmt.STAT_INDEX["numel"]]
    dtypes = list(run.manifest.dtypes) + ["float32"] * (len(numel) - len(run.manifest.dtypes))
    return int(sum(n * np.dtype(d if d != "bfloat16" else "float16").itemsize for n, d in zip(numel, dtypes) if np.isfinite(n)))


def fit(name: str, steps: int, root: Path) -> dict[str, Any]:
    from comgra_callbacks import ComgraCallback

    timer = BatchStartTimer()
    callbacks: list[Any] = [timer]
    comgra = None
    if name == HOOKS:
        callbacks.append(HookRecorder())
    elif name == TENSORBOARD:
        callbacks.append(TensorBoardHistograms(root / "tb"))
    elif COMGRA[name] is not None:
        comgra = ComgraCallback(str(root), log_scalars=False, **COMGRA[name])  # type: ignore[arg-type]
        callbacks.append(comgra)
    os.environ[REDUCE_ENV] = REDUCE_IN.get(name, "")
    os.environ[KERNEL_ENV] = KERNEL_IN.get(name, "")
    trainer = pl.Trainer(
        max_steps=steps + 1, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=str(root),
    )
    trainer.fit(LM(4), data(steps + 1))
    result: dict[str, Any] = {"step_s": timer.periods(WARMUP), "cpu_s": timer.cpu_periods(WARMUP), "rss_mb": timer.rss}
    if comgra is not None:
        from comgra_callbacks import open_run

        run = open_run(root / comgra.run_name)
        records = len(run.steps)
        result.update(records=records, written=dir_bytes(root / comgra.run_name) / max(records, 1), captured=captured_bytes(run))
    return result


def paired_amortised(fits: list[list[float]], every: int = 10) -> float | None:
    """The amortised cost of recording every ``every``-th step, paired: each run of ``every`` steps that starts
    with a recorded one, against the median of its own unrecorded steps (what the drift of a shared machine
    between fits, and within one, moves far less than a comparison with other fits); the mean over all such
    runs of their time over ``every`` such medians. None without a whole run."""
    ratios = []
    for steps in fits:
        windows: dict[int, list[tuple[int, float]]] = {}
        for k, seconds in enumerate(steps):  # step WARMUP + k; the recorded ones are multiples of ``every``
            windows.setdefault((WARMUP + k) // every, []).append(((WARMUP + k) % every, seconds))
        for window in windows.values():
            if len(window) == every:
                base = statistics.median(seconds for phase, seconds in window if phase != 0)
                ratios.append(sum(seconds for _, seconds in window) / (every * base))
    return statistics.mean(ratios) if ratios else None


def floor_seconds(nbytes: int, repeats: int = 20) -> float:
    """One ``sum`` over ``nbytes`` of float32 (torch's default threads), median of ``repeats``: the cost of
    reading a recorded step's data once. The buffer is written first so that its pages are real."""
    x = torch.ones(max(nbytes // 4, 1))
    x.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per configuration and round (after a warm-up of 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every configuration")
    parser.add_argument("--quick", action="store_true", help="--steps 25 --rounds 1: a smoke run (not for the figures in docs/)")
    parser.add_argument("--only", default="", help="semicolon-separated row names or substrings of them: run only those rows (the no-callback row always runs)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/transformer.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 25, 1
    names = list(COMGRA) + [HOOKS]
    skipped = None
    if tensorboard_available():
        names.append(TENSORBOARD)
    else:
        skipped = f"{TENSORBOARD}: skipped, `tensorboard` is not installed (pip install tensorboard)"
        print(f"note: {skipped}", file=sys.stderr)
    if args.only:
        wanted = [w.strip() for w in args.only.split(";") if w.strip()]
        names = [n for n in names if n == "no callback" or n in wanted or any(w in n for w in wanted if w not in names)]
    extra: dict[str, dict[str, Any]] = {}
    cpu: dict[str, list[float]] = {}
    fits: dict[str, list[list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="comgra-lm-bench-") as tmp:
        for name in ("no callback", "every step, default detail"):  # imports, allocator and thread pools warm
            fit(name, 3, Path(tmp) / f"warm-{name.replace(' ', '-').replace(',', '')}")

        def run(name: str, round_: int) -> list[float]:
            result = fit(name, args.steps + WARMUP, Path(tmp) / f"{len(extra)}-{round_}-{names.index(name)}")
            extra[name] = {k: v for k, v in result.items() if k not in ("step_s", "cpu_s")}
            cpu.setdefault(name, []).extend(result["cpu_s"])
            fits.setdefault(name, []).append(list(result["step_s"]))
            return list(result["step_s"])

        samples = interleaved(names, args.rounds, run)
    median, mean = summarise(samples, "median"), summarise(samples, "mean")
    # the amortised rows compare means (a recorded step every 10th is the point), the others medians
    figure = {k: mean[k] if "(mean)" in k else median[k] for k in names}
    base = {k: mean["no callback"] if "(mean)" in k else median["no callback"] for k in names}
    captured = max((e.get("captured", 0) for e in extra.values()), default=0)
    floor = floor_seconds(captured) if captured else float("nan")
    plain = median["no callback"]
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[:3]
    summary: dict[str, Any] = {
        "load_average_at_end": load,
        "workload": f"LM 4x TransformerEncoderLayer d128 h4 ff512, seq 64, batch 16, vocab 512, AdamW, CPU, {torch.get_num_threads()} threads",
        "steps": args.steps,
        "rounds": args.rounds,
        "step_ms": {k: round(v * 1e3, 2) for k, v in figure.items()},
        "ratio_to_no_callback": {k: round(figure[k] / base[k], 3) for k in names},
        "cpu_ms_per_step": {k: round((statistics.mean(v) if "(mean)" in k else statistics.median(v)) * 1e3, 1) for k, v in cpu.items() if v},
        "every_10th_paired_ratio": None if EVERY_10TH not in fits else round(paired_amortised(fits[EVERY_10TH]) or float("nan"), 3),
        "floor_ms": round(floor * 1e3, 3),
        "floor_ratio": round((plain + floor) / plain, 3),
        "overhead_in_floors": {k: round((figure[k] - base[k]) / floor, 1) for k in names if floor > 0},
        "captured_bytes_per_recorded_step": {k: extra[k]["captured"] for k in COMGRA if "captured" in extra.get(k, {})},
        "written_bytes_per_recorded_step": {k: round(extra[k]["written"]) for k in COMGRA if "written" in extra.get(k, {})},
        "rss_mb_every_50_steps": {k: [round(x) for x in extra[k]["rss_mb"]] for k in extra},
        "skipped": skipped,
        "one_pass_kernel": "numba" if fused.available() else "missing: torch's kernels (pip install comgra_callbacks[fast])",
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
