"""Reference timing of the ORIGINAL ``comgra`` package (0.11.5) on the shared workload.

Runs inside the separate comgra virtual environment (see ``comgra_env.py``), never
in the project venv. In one process it trains the workload of ``workload.py``
twice with a plain PyTorch loop:

(a) without comgra, and
(b) with comgra recording EVERY step,

then prints exactly one JSON object on stdout (anything comgra prints is sent to
stderr). Usage::

    benchmarks/.venv-comgra/bin/python benchmarks/comgra_reference.py [--out-dir DIR]

What is recorded in (b), through comgra's public API only:

* ``ComgraRecorder.track_module`` on the model, so every weight and bias is a
  parameter node; comgra itself registers them in ``start_batch`` (value KPIs and,
  for 2-D weights, the top singular value).
* ``register_tensor`` on the input (``is_input``), the output of each of the 7
  modules of the ``nn.Sequential``, a one-hot float copy of the labels
  (``is_target``; comgra cannot set ``requires_grad`` on int64 labels, and it
  refuses 1-D batch tensors), and the loss (``is_loss``).
* ``record_current_gradients`` after backward, which stores the gradients of all
  of the above, and ``record_kpi_in_graph`` for the loss curve.

Besides statistics over the batch, comgra stores the first ``max_num_batch_size_to_record``
samples of every tensor individually. Its constructor default (``None``: all 64
samples) costs about 3.5 s and 7 MB per step here, so 300 steps would take ~18 min
and ~2 GB; we therefore default to 5, the value of comgra's own example
(``scripts/run.py``). ``--all-samples`` measures the constructor default instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import comgra
import torch
from comgra.objects import DecisionMakerForRecordingsFrequencyPerType
from comgra.recorder import ComgraRecorder
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # workload.py sits next to this file
import workload as wl  # noqa: E402

DEFAULT_SAMPLES_TO_RECORD = 5
GROUP = "benchmark"
TRIAL = "every_step"
TYPE_OF_EXECUTION = "train"


def time_plain(n_steps: int) -> list[float]:
    """Trains the workload without comgra; returns the wall time of every step in seconds."""
    model, batches = wl.make_model(), wl.make_batches(n_steps)
    opt = wl.make_optimizer(model)
    times = []
    for x, y in batches:
        t0 = time.perf_counter()
        wl.plain_step(model, opt, x, y)
        times.append(time.perf_counter() - t0)
    return times


def comgra_step(rec: ComgraRecorder, model: nn.Sequential, opt: torch.optim.Optimizer,
                step: int, x: Tensor, y: Tensor) -> Tensor:
    """One training step instrumented the way comgra's README and ``scripts/run.py`` do it.

    Args:
        rec: The active recorder.
        model: The benchmark MLP.
        opt: Its optimizer.
        step: Training step index (must increase monotonically for comgra).
        x: Inputs ``[B, 64]``.
        y: Labels ``[B]``.

    Returns:
        The detached loss.
    """
    # Registers all tracked parameters and decides whether this step is recorded.
    rec.start_batch(step, x.shape[0], type_of_execution=TYPE_OF_EXECUTION)
    rec.start_iteration()  # one iteration per step: no recurrence in this model
    rec.register_tensor("input", x, is_input=True)  # sets x.requires_grad = True
    h = x
    for name, layer in model.named_children():  # run the Sequential by hand to see each output
        h = layer(h)  # [B, 256] for hidden layers, [B, 10] for the last Linear
        rec.register_tensor(f"layer{name}_{type(layer).__name__.lower()}", h)
    target = nn.functional.one_hot(y, wl.N_CLASSES).float()  # [B, 10] stand-in for the int labels
    rec.register_tensor("target", target, is_target=True)
    loss = wl.loss_fn(h, y)
    rec.register_tensor("loss", loss, is_loss=True)
    rec.add_tensor_connection(target, loss)  # the labels feed the loss outside autograd
    rec.record_kpi_in_graph("loss", "", loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    rec.record_current_gradients("gradients")  # reads .grad of every registered tensor and parameter
    rec.finish_iteration()  # walks the autograd graph to build comgra's dependency graph
    rec.finish_batch()  # converts every statistic to floats and writes this step to disk
    return loss.detach()


def time_comgra(n_steps: int, out_dir: Path, max_batch_to_record: int | None) -> list[float]:
    """Trains the workload with comgra recording every step; returns per-step wall times."""
    model, batches = wl.make_model(), wl.make_batches(n_steps)
    opt = wl.make_optimizer(model)
    comgra.my_recorder = rec = ComgraRecorder(
        comgra_root_path=out_dir,
        group=GROUP,
        trial_id=TRIAL,
        # Record EVERY step: this decision maker records a step when at least
        # `min_training_steps_difference` steps have passed since the last recording of the
        # same type_of_execution; 1 means every step (the README example uses 10, run.py 1000).
        decision_maker_for_recordings=DecisionMakerForRecordingsFrequencyPerType(min_training_steps_difference=1),
        # Samples stored individually per tensor (None, comgra's default, means all of them).
        max_num_batch_size_to_record=max_batch_to_record,
    )
    rec.track_module("mlp", model)
    times = []
    for step, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        comgra_step(rec, model, opt, step, x, y)
        times.append(time.perf_counter() - t0)
        if not rec.recording_is_active():
            raise RuntimeError(f"comgra_reference: comgra did not record step {step}")
    rec.finalize()
    return times


def check_recorded(out_dir: Path, n_steps: int) -> int:
    """Fails loudly unless comgra wrote one recording per step; returns the bytes written."""
    trial = out_dir / GROUP / "trials" / TRIAL
    steps_with_data = [p for p in (trial / "recordings").glob(f"*__{TYPE_OF_EXECUTION}") if any(p.iterdir())]
    configs = list((trial / "configurations").glob("*.pkl"))
    if len(steps_with_data) != n_steps or len(configs) != n_steps:
        raise RuntimeError(
            f"comgra_reference: expected {n_steps} recorded steps under {trial}, found "
            f"{len(steps_with_data)} recording folders and {len(configs)} configuration files"
        )
    total = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    if total == 0:
        raise RuntimeError(f"comgra_reference: comgra wrote nothing under {out_dir}")
    return total


def median_after_warmup(times: list[float]) -> float:
    """Median of the per-step times, skipping the first ``WARMUP`` steps."""
    return statistics.median(times[wl.WARMUP:] if len(times) > wl.WARMUP else times)


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Parses arguments, runs both trainings and prints the result as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="empty directory comgra writes into, kept afterwards "
                             "(default: a fresh temporary directory, deleted after measuring)")
    parser.add_argument("--n-steps", type=int, default=wl.N_STEPS)
    samples = parser.add_mutually_exclusive_group()
    samples.add_argument("--max-batch-to-record", type=int, default=DEFAULT_SAMPLES_TO_RECORD,
                         help=f"comgra's max_num_batch_size_to_record (default {DEFAULT_SAMPLES_TO_RECORD})")
    samples.add_argument("--all-samples", action="store_true",
                         help="use comgra's default max_num_batch_size_to_record=None (all samples; slow)")
    args = parser.parse_args(argv)
    max_batch = None if args.all_samples else args.max_batch_to_record
    if max_batch is not None and max_batch < 1:
        parser.error("--max-batch-to-record must be at least 1 (comgra asserts it)")
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="comgra-reference-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise SystemExit(f"comgra_reference: --out-dir {out_dir} is not empty")
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON only
        plain = time_plain(args.n_steps)
        recorded = time_comgra(args.n_steps, out_dir, max_batch)
    total = check_recorded(out_dir, args.n_steps)
    if args.out_dir is None:
        shutil.rmtree(out_dir, ignore_errors=True)
    plain_med, comgra_med = median_after_warmup(plain), median_after_warmup(recorded)
    result: dict[str, object] = {
        "comgra_version": importlib.metadata.version("comgra"),
        "torch_version": torch.__version__,
        "plain_median_s": plain_med,
        "comgra_every_step_median_s": comgra_med,
        "ratio": comgra_med / plain_med,
        "bytes_written": total,
        "bytes_per_recorded_step": total / args.n_steps,
        "n_steps": args.n_steps,
        "warmup_steps_excluded": wl.WARMUP,
        "max_num_batch_size_to_record": max_batch,
        "out_dir": None if args.out_dir is None else str(out_dir),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
