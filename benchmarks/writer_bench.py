"""What the writer costs per committed record: ``python benchmarks/writer_bench.py`` (not part of ``make bench``).

Records one step of the transformer workload (``lm_workload.py``, default detail, every step) in a real
Lightning ``Trainer`` (through ``pack_bench.captured_step``), turns it into the :class:`HostRecord` the writer
process appends, and then appends it ``--commits`` times in blocks of ``--per-commit`` records (11 is what the
writer process commits per block on that workload) to a fresh :class:`RunWriter` on local disk, each
``append`` followed by its commit (rows, then the manifest), exactly as the writer's ``Worker`` does; each
record has its own entry and key objects, as the writer process decodes them.

Reported per variant (median over the commits after ``--warmup``): wall time of one commit, the process's
CPU time during it (``time.process_time``: every thread, so zarr's codec threads count, and that CPU is
what torch's threads lose while the writer works), both also per record, and the bytes on disk per record.
Variants: ``default`` (the layout a run gets), ``flat-zstd`` / ``flat-lz4`` / ``flat-raw`` (both flat arrays
compressed with zstd as before / blosc lz4 / not at all: ``StoreLayout.flat_codec``), ``zarr-1-thread``
(zarr's codec thread pool limited to one thread), ``series-16`` (16 series per chunk, the default
before 2 Dec 2026, instead of 64: smaller chunks, ~32 more files a commit), ``flat-4mib`` (flat arrays in chunks of
4 MiB instead of 1 MiB: ~6 files a commit instead of ~22, but a reader of one entry's samples decodes 4 MiB), ``zarr-writes`` (the chunks written through
zarr's ``array[...] = block`` instead of by ``store/chunks.py``: the same files); a variant the checkout's ``StoreLayout`` cannot express is
left out. ``--baseline /path/to/other/checkout`` adds the variant ``baseline``: that checkout's package
(its whole ``store/``: writer, chunk encoding, file writes), interleaved with the others in every round, which
is fairer on a shared machine than two runs one after the other. Every measurement runs in a fresh child
process (``--child``, with ``PYTHONPATH`` at the checkout measured) on the same record, saved once as ``.npz``
plus JSON, so that each side runs its own code from top to bottom and none inherits the other's warm state.

    python benchmarks/writer_bench.py --baseline /work/main --rounds 5 --only baseline default flat-zstd
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comgra_callbacks.store.storage import open_root  # noqa: E402
from comgra_callbacks.store.writer import HostRecord, RunWriter, StoreLayout  # noqa: E402


def captured_record() -> HostRecord:
    """One recorded LM step as the writer process hands it to the RunWriter."""
    import pack_bench

    from comgra_callbacks.recording import pending

    step = pack_bench.captured_step(True, None)
    return pending.pack(step).materialize()


def _layout_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(StoreLayout)}


def variants() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """name -> (StoreLayout overrides, zarr.config overrides); a variant the checkout cannot express is left out."""
    out: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {"default": ({}, {})}
    if "flat_codec" in _layout_fields():
        out["flat-zstd"] = ({"flat_codec": "zstd"}, {})
        out["flat-lz4"] = ({"flat_codec": "lz4"}, {})
        out["flat-raw"] = ({"flat_codec": "none"}, {})
    if "direct_chunks" in _layout_fields():
        out["zarr-writes"] = ({"direct_chunks": False}, {})
    out["zarr-1-thread"] = ({}, {"threading.max_workers": 1})
    out["series-16"] = ({"stats_series": 16}, {})  # the default before 2 Dec 2026
    out["flat-4mib"] = ({"flat_chunk": 1_048_576}, {})
    return out


@contextmanager
def zarr_config(overrides: dict[str, Any]) -> Iterator[None]:
    import zarr

    if not overrides:
        yield
        return
    with zarr.config.set(overrides):
        yield


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_record(record: HostRecord, folder: Path) -> Path:
    """Write ``record`` as ``record.json`` (its fields and series keys) and ``record.npz`` (its arrays)."""
    arrays: dict[str, Any] = {}
    entries = []
    for i, entry in enumerate(record.entries):
        arrays[f"stats{i}"] = entry.stats
        for part in ("neurons", "samples"):
            if getattr(entry, part) is not None:
                arrays[f"{part}{i}"] = getattr(entry, part)
        entries.append({"key": dataclasses.asdict(entry.key), "dtype": entry.dtype})
    fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name != "entries"}
    np.savez(folder / "record.npz", **arrays)
    (folder / "record.json").write_text(json.dumps({"fields": fields, "entries": entries}))
    return folder


def load_record(folder: Path) -> HostRecord:
    """The record :func:`save_record` wrote, with this checkout's classes."""
    from comgra_callbacks.store.format import SeriesKey
    from comgra_callbacks.store.writer import HostEntry

    described = json.loads((folder / "record.json").read_text())
    with np.load(folder / "record.npz") as arrays:
        entries = [
            HostEntry(SeriesKey(**e["key"]), arrays[f"stats{i}"], arrays.get(f"neurons{i}"), arrays.get(f"samples{i}"), e["dtype"])
            for i, e in enumerate(described["entries"])
        ]
    return HostRecord(**described["fields"], entries=entries)


def run_child(checkout: Path, folder: Path, overrides: dict[str, Any], config: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """One measurement in a fresh process whose ``comgra_callbacks`` is ``checkout``'s."""
    spec = {"record": str(folder), "overrides": overrides, "config": config, "commits": args.commits,
            "per_commit": args.per_commit, "warmup": args.warmup}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the measurement in {checkout} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(raw: str) -> None:
    """``--child SPEC``: measure once with this process's package and print the figures as one JSON line."""
    spec = json.loads(raw)
    layout = StoreLayout(**spec["overrides"])
    result = measure(load_record(Path(spec["record"])), RunWriter, layout, spec["config"], spec["commits"], spec["per_commit"], spec["warmup"])
    print(json.dumps(result))


def decoded(record: HostRecord, step: int) -> HostRecord:
    """``record`` at ``step`` with its own entry and key objects, as the writer process decodes every record
    (shared keys would let the writer's lookups short-cut on identity)."""
    entries = [dataclasses.replace(e, key=dataclasses.replace(e.key)) for e in record.entries]
    return dataclasses.replace(record, step=step, entries=entries)


def measure(record: HostRecord, writer_class: Any, layout: Any, config: dict[str, Any], commits: int, per_commit: int, warmup: int) -> dict[str, float]:
    """Append ``commits`` blocks of ``per_commit`` copies of ``record`` (consecutive steps) to a fresh run."""
    with tempfile.TemporaryDirectory(prefix="comgra-writer-bench-") as tmp, zarr_config(config):
        writer = writer_class(open_root(tmp).run("r"), layout=layout)
        wall: list[float] = []
        cpu: list[float] = []
        for c in range(commits):
            block = [decoded(record, c * per_commit + i) for i in range(per_commit)]
            w0, c0 = time.perf_counter(), time.process_time()
            writer.append(block)  # rows, then the manifest
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        writer.close("finished")
        size = _disk_bytes(Path(tmp) / "r")
    wall_ms = statistics.median(wall[warmup:]) * 1e3
    cpu_ms = statistics.median(cpu[warmup:]) * 1e3
    return {
        "wall_ms_per_commit": round(wall_ms, 1),
        "cpu_ms_per_commit": round(cpu_ms, 1),
        "wall_ms_per_record": round(wall_ms / per_commit, 2),
        "cpu_ms_per_record": round(cpu_ms / per_commit, 2),
        "disk_kib_per_record": round(size / 1024 / (commits * per_commit), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=14, help="blocks appended per variant and round")
    parser.add_argument("--per-commit", type=int, default=11, help="records per block (one commit each)")
    parser.add_argument("--warmup", type=int, default=2, help="first blocks left out of the medians")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the variants (median of rounds)")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout whose writer to compare with")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    if args.commits <= args.warmup:
        parser.error(f"--commits ({args.commits}) must be larger than --warmup ({args.warmup})")
    if args.baseline is not None and not (args.baseline / "comgra_callbacks" / "store" / "writer.py").is_file():
        parser.error(f"--baseline {args.baseline}: expected a checkout with comgra_callbacks/store/writer.py")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    record = captured_record()
    neurons = sum(e.neurons.size for e in record.entries if e.neurons is not None)
    samples = sum(e.samples.size for e in record.entries if e.samples is not None)
    print(f"one record: {len(record.entries)} entries, {neurons} per-neuron and {samples} sample float32 values")
    here = Path(__file__).resolve().parent.parent
    every = {name: (here, overrides, config) for name, (overrides, config) in variants().items()}
    if args.baseline is not None:
        every = {"baseline": (args.baseline.resolve(), {}, {}), **every}
    chosen = {k: v for k, v in every.items() if args.only is None or k in args.only}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory(prefix="comgra-writer-bench-record-") as folder:
        save_record(record, Path(folder))
        for _ in range(args.rounds):
            for name, (checkout, overrides, config) in chosen.items():
                rounds[name].append(run_child(checkout, Path(folder), overrides, config, args))
    results = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in rounds.items()}
    print(f"{'variant':<16} {'wall ms/commit':>15} {'cpu ms/commit':>14} {'wall ms/rec':>12} {'cpu ms/rec':>11} {'KiB/rec':>8}")
    for name, r in results.items():
        print(
            f"{name:<16} {r['wall_ms_per_commit']:>15.1f} {r['cpu_ms_per_commit']:>14.1f} {r['wall_ms_per_record']:>12.2f} "
            f"{r['cpu_ms_per_record']:>11.2f} {r['disk_kib_per_record']:>8.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"per_commit": args.per_commit, "results": results}, indent=2))


if __name__ == "__main__":
    main()
