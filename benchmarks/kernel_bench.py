"""What the one-pass kernel costs on a real step: ``python benchmarks/kernel_bench.py`` (not part of ``make bench``).

Records one step of the transformer workload (``lm_workload.py``, default detail) in a real Lightning
``Trainer`` (through ``pack_bench.captured_step``), then reduces its 217 tensors with
``reduce.reduce_tensors`` on one thread (no sharing), ``--repeats`` times, and reports the best CPU time
(``time.thread_time``: the machine's noise moves it far less than wall time) of the whole reduction and of
the kernel calls by kernel (``rows+derive``: neurons ``k`` apart, the activations; ``cols+derive``: each
neuron's items contiguous, the parameters). ``--baseline /path/to/other/checkout`` runs that checkout's
``recording/_fused_kernels.py`` too, interleaved, on the same tensors.

    python benchmarks/kernel_bench.py --baseline /path/to/checkout-before --repeats 9
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def baseline_kernels(checkout: Path) -> dict[str, Any]:
    """Another checkout's kernels, by the names ``fused._build`` gives them."""
    source = checkout / "comgra_callbacks" / "recording" / "_fused_kernels.py"
    if not source.is_file():
        raise SystemExit(f"--baseline {checkout}: no comgra_callbacks/recording/_fused_kernels.py there")
    # loaded from a copy: numba caches a kernel next to its source, under the module's name, and a cache
    # written there under another name breaks that checkout's own import of its kernels afterwards
    path = Path(tempfile.mkdtemp(prefix="comgra-baseline-kernels-")) / "comgra_baseline_kernels.py"
    shutil.copyfile(source, path)
    spec = importlib.util.spec_from_file_location("comgra_baseline_kernels", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline {checkout}: {source} cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # numba's cache looks the module up by name
    spec.loader.exec_module(module)
    return {"rows": module.over_rows, "cols": module.over_cols, "rows+derive": module.rows_derived, "cols+derive": module.cols_derived}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="reductions per variant (the best is reported)")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout whose kernels to compare with")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import pack_bench

    from comgra_callbacks.recording import fused, reduce

    if not fused.available() or fused._kernels() is None:
        raise SystemExit("numba is not installed here (pip install comgra_callbacks[fast]): there is no kernel to measure")
    reduce.FORCE_SHARING = False  # one thread: the CPU time of the work itself
    step = pack_bench.captured_step(True, None)
    tensors = [s.tensor for s in step.snapshots]
    wanted = [(s.neurons, s.is_parameter, s.neuron_axis) for s in step.snapshots]
    variants = {"this checkout": dict(fused._STATE["kernels"])}
    if args.baseline is not None:
        variants = {"baseline": baseline_kernels(args.baseline), **variants}
    spent: dict[str, float] = {}
    call = fused._call

    def timed(name: str, dim: int, call_args: tuple[Any, ...], dtype: Any) -> None:
        started = time.thread_time()
        call(name, dim, call_args, dtype)
        spent[name] = spent.get(name, 0.0) + time.thread_time() - started

    fused._call = timed  # type: ignore[assignment]
    best: dict[str, tuple[float, dict[str, float]]] = {}
    try:
        for repeat in range(args.repeats + 1):
            for label, kernels in variants.items():
                fused._STATE["kernels"] = kernels
                spent.clear()
                started = time.thread_time()
                reduce.reduce_tensors(tensors, wanted)
                total = time.thread_time() - started
                if repeat and (label not in best or total < best[label][0]):  # the first: compilation, cold caches
                    best[label] = (total, dict(spent))
    finally:
        fused._call = call  # type: ignore[assignment]
        fused._STATE["kernels"] = variants["this checkout"]
    mb = sum(t.numel() * t.element_size() for t in tensors) / 1e6
    print(f"one captured LM step: {len(tensors)} tensors, {mb:.1f} MB; CPU ms, best of {args.repeats}")
    print(f"{'variant':<15} {'reduction':>10} " + " ".join(f"{k:>12}" for k in ("rows+derive", "cols+derive")))
    for label, (total, parts) in best.items():
        print(f"{label:<15} {total * 1e3:>10.1f} " + " ".join(f"{parts.get(k, 0.0) * 1e3:>12.1f}" for k in ("rows+derive", "cols+derive")))


if __name__ == "__main__":
    main()
