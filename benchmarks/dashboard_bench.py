"""Dashboard speed: time to open a large store, and server-side time from a selector change to its data.

    .venv/bin/python benchmarks/dashboard_bench.py                      # 10 000 records x ~60 nodes
    .venv/bin/python benchmarks/dashboard_bench.py --records 2000 --nodes 30 --changes 200 --keep /tmp/store

Writes a synthetic run (statistics and per-neuron statistics for every series, samples for some nodes),
then measures, in this process (no browser):

* ``open_s``: opening the root as the dashboard does (catalog, run index, graph, the first selection);
* ``change_ms``: a random walk of selector changes (step, node, view, detail, role, step type), each timed
  from the change of the selection to the tensor panel's data being ready (``gather.tensor_data``), with
  the LRU cache on as in the server; p50 / p95 / max per kind of change, and for cache misses only;
* ``render_ms``: the same kind of changes applied to a full session (every view wired, Bokeh models
  attached), timed until the server-side models are updated (what is then sent to the browser);
* ``compare_ms``: the training-phase comparison of two ranges of steps over every node (cold and cached);
* ``touched``: the largest share of the store's bytes that any single change decompressed (chunks
  touched), to show that nothing reads the whole run.

Prints one JSON object. Targets (issue 4): open < 1 s; change p95 < 50 ms of data work.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comgra_callbacks.dashboard.synthetic import write_run  # noqa: E402
from comgra_callbacks.store.reader import Run  # noqa: E402
from comgra_callbacks.store.writer import StoreLayout  # noqa: E402


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"n": len(values), "p50": round(statistics.median(ordered), 2), "p95": round(p95, 2), "max": round(ordered[-1], 2)}


class ReadMeter:
    """Counts the bytes of the chunks each read decompresses (wraps ``Run._read``)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._original = Run._read

    def __enter__(self) -> ReadMeter:
        meter = self

        def read(run: Run, name: str, selection: Any) -> np.ndarray:
            meter.bytes += touched_bytes(run._array(name), selection)
            return meter._original(run, name, selection)

        Run._read = read  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        Run._read = self._original  # type: ignore[method-assign]


def touched_bytes(array: Any, selection: Any) -> int:
    """Bytes of every chunk a basic selection intersects (what zarr decompresses to answer it)."""
    if not isinstance(selection, tuple):
        selection = (selection,)
    selection = selection + (slice(None),) * (len(array.shape) - len(selection))
    count = 1
    for axis, (sel, size, chunk) in enumerate(zip(selection, array.shape, array.chunks, strict=True)):
        del axis
        if isinstance(sel, slice):
            start, stop, _ = sel.indices(size)
            count *= max(0, (max(stop - 1, start) // chunk) - (start // chunk) + 1) if stop > start else 0
        elif isinstance(sel, (list, tuple, np.ndarray)):
            count *= len({int(i) // chunk for i in sel})
        else:
            count *= 1
    return count * int(np.prod(array.chunks)) * array.dtype.itemsize


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def uncompressed_bytes(run: Run) -> int:
    total = 0
    for name in ("records", "stats", "neurons_ptr", "samples_ptr", "neurons", "samples", "scalars"):
        array = run._array(name)
        total += int(np.prod(array.shape)) * array.dtype.itemsize
    return total


CHANGES = ("step", "step_far", "node", "view", "detail", "role", "step_type")


def random_change(sel: Any, rng: random.Random) -> str:
    kind = rng.choice(CHANGES)
    if kind == "step":
        sel.move_step(rng.choice([-1, 1]))
    elif kind == "step_far":
        sel.step = rng.choice(sel.steps)
    elif kind == "node":
        sel.node = rng.choice([n for n in sel.param.node.objects if n != sel.node])
    elif kind == "view":
        sel.view = rng.choice(sel.param.view.objects)
    elif kind == "detail":
        sel.detail = rng.choice(["statistics", "neurons", "sample"])
    elif kind == "role":
        if len(sel.param.role.objects) < 2:
            sel.node = "attn"
        sel.role = rng.choice(sel.param.role.objects)
    else:
        sel.step_type = rng.choice(sel.param.step_type.objects)
    return kind


def measure_changes(root: Path, n: int, seed: int) -> dict[str, Any]:
    from comgra_callbacks.dashboard.data import Catalog
    from comgra_callbacks.dashboard.gather import tensor_data
    from comgra_callbacks.dashboard.state import Selection

    catalog = Catalog(root)
    sel = Selection(catalog)
    rng = random.Random(seed)
    by_kind: dict[str, list[float]] = {k: [] for k in CHANGES}
    all_ms, misses_ms = [], []
    worst_touch = 0
    total = uncompressed_bytes(sel.data.run)
    cache = catalog.cache
    for _ in range(n):
        misses = cache.misses
        with ReadMeter() as meter:
            start = time.perf_counter()
            kind = random_change(sel, rng)
            tensor_data(sel.data, sel.snapshot())
            elapsed = 1000 * (time.perf_counter() - start)
        by_kind[kind].append(elapsed)
        all_ms.append(elapsed)
        if cache.misses > misses:
            misses_ms.append(elapsed)
        worst_touch = max(worst_touch, meter.bytes)
    return {
        "all": percentiles(all_ms),
        "cache_misses_only": percentiles(misses_ms),
        "by_kind": {k: percentiles(v) for k, v in by_kind.items() if v},
        "cache": {"hits": cache.hits, "misses": cache.misses, "entries": len(cache), "mib": round(cache.nbytes / 2**20, 1)},
        "touched_max_mib": round(worst_touch / 2**20, 2),
        "touched_max_share_of_run": round(worst_touch / total, 4),
    }


def measure_render(root: Path, n: int, seed: int) -> dict[str, Any]:
    """Changes applied to a full session with its Bokeh models attached (server side only)."""
    from bokeh.document import Document

    from comgra_callbacks.dashboard.app import Dashboard
    from comgra_callbacks.dashboard.data import Catalog
    from comgra_callbacks.dashboard.options import DashboardOptions

    dash = Dashboard(Catalog(root), DashboardOptions(str(root)))
    doc = Document()
    dash.panel().get_root(doc)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {k: [] for k in CHANGES}
    for _ in range(n):
        start = time.perf_counter()
        kind = random_change(dash.selection, rng)
        times[kind].append(1000 * (time.perf_counter() - start))
    return {"all": percentiles([t for v in times.values() for t in v]), "by_kind": {k: percentiles(v) for k, v in times.items() if v}}


def measure_open(root: Path) -> dict[str, float]:
    from comgra_callbacks.dashboard.data import Catalog
    from comgra_callbacks.dashboard.state import Selection

    start = time.perf_counter()
    catalog = Catalog(root)
    opened = time.perf_counter()
    Selection(catalog)
    selected = time.perf_counter()
    return {"open_s": round(selected - start, 3), "catalog_s": round(opened - start, 3), "first_selection_s": round(selected - opened, 3)}


def measure_compare(root: Path) -> dict[str, Any]:
    from comgra_callbacks.analysis import compare_nodes
    from comgra_callbacks.dashboard.data import Catalog

    catalog = Catalog(root)
    data = catalog[catalog.names[0]]
    steps = data.steps_of("train")
    lo, hi = int(steps[0]), int(steps[-1])
    cut_a, cut_b = int(steps[int(len(steps) * 0.3)]), int(steps[int(len(steps) * 0.7)])
    out: dict[str, Any] = {}
    for label in ("cold", "cached"):
        with ReadMeter() as meter:
            start = time.perf_counter()
            a = data.range_stats(lo, cut_a, "value", "train")
            b = data.range_stats(cut_b, hi, "value", "train")
            compare_nodes(a, b, "abs_mean")
            out[f"ranges_{label}_ms"] = round(1000 * (time.perf_counter() - start), 1)
        out[f"ranges_{label}_touched_mib"] = round(meter.bytes / 2**20, 1)
    start = time.perf_counter()
    compare_nodes(data.range_stats(lo, lo, "value", "train"), data.range_stats(hi, hi, "value", "train"), "abs_mean")
    out["two_steps_cold_ms"] = round(1000 * (time.perf_counter() - start), 1)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--nodes", type=int, default=60, help="approximate number of graph nodes (3 per layer + 7)")
    parser.add_argument("--width", type=int, default=16, help="neurons per tensor")
    parser.add_argument("--changes", type=int, default=400, help="selector changes in the random walk")
    parser.add_argument("--render-changes", type=int, default=60, help="changes applied to a full session")
    parser.add_argument("--keep", metavar="DIR", default=None, help="write the store here and keep it (reused when it exists)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats-rows", type=int, default=None, help="records per chunk of the stats arrays (default: StoreLayout's)")
    parser.add_argument("--flush-rows", type=int, default=256, help="records per appended block while writing (the live writer uses 64)")
    args = parser.parse_args(argv)
    layers = max(1, round((args.nodes - 7) / 3))
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="comgra-dash-bench-"))
    result: dict[str, Any] = {"records": args.records, "nodes": 3 * layers + 7, "width": args.width, "stats_rows": args.stats_rows or StoreLayout().stats_rows, "flush_rows": args.flush_rows}
    try:
        if not (workdir / "bench" / "manifest.json").exists():
            start = time.perf_counter()
            layout = StoreLayout(stats_rows=args.stats_rows) if args.stats_rows else None
            write_run(workdir, "bench", records=args.records, layers=layers, width=args.width, sample_every_layer=4, notes=True, layout=layout, block=args.flush_rows)
            result["write_s"] = round(time.perf_counter() - start, 1)
        from comgra_callbacks import open_run

        run = open_run(workdir / "bench")
        result["nodes"] = len(run.nodes)
        result["series"] = len(run.manifest.series)
        result["store_mib_on_disk"] = round(store_bytes(workdir / "bench") / 2**20, 1)
        result["store_mib_uncompressed"] = round(uncompressed_bytes(run) / 2**20, 1)
        result["open"] = measure_open(workdir)
        result["change_ms"] = measure_changes(workdir, args.changes, args.seed)
        result["compare_ms"] = measure_compare(workdir)
        if args.render_changes:
            result["render_ms"] = measure_render(workdir, args.render_changes, args.seed + 1)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
