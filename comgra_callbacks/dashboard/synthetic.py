"""Synthetic runs written straight through the store writer: for tests, benchmarks and screenshots.

No torch, no training: an MLP-shaped graph (input, target, ``layers.{i}`` with weight and bias, an output,
a loss and an auxiliary loss, a node with several roles and one recorded twice per step) whose values follow
a simple random process. Midway through training a few layers change regime (a "phase change"), which the
training-phase comparison must find.

    python -c "from comgra_callbacks.dashboard.synthetic import write_run; write_run('/tmp/runs', 'demo')"

>>> import tempfile
>>> from comgra_callbacks.store.reader import open_run
>>> root = tempfile.mkdtemp()
>>> spec = write_run(root, "tiny", records=20, layers=2)
>>> run = open_run(f"{root}/tiny")
>>> len(run.steps), run.status, sorted(spec.changed)[:1]
(20, 'finished', ['layers.1'])
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from comgra_callbacks.store import format as fmt
from comgra_callbacks.store.format import SeriesKey
from comgra_callbacks.store.storage import open_root
from comgra_callbacks.store.writer import HostEntry, HostRecord, RunWriter, StoreLayout

BATCH = 8


@dataclass
class SyntheticSpec:
    """What :func:`write_run` wrote, for tests to check against."""

    nodes: dict[str, dict[str, Any]]
    edges: list[tuple[str, str]]
    steps: list[int]
    step_types: list[str]
    changed: set[str] = field(default_factory=set)  # nodes whose scale jumps at the phase change
    phase_step: int = 0


def _graph(layers: int, width: int) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str]]]:
    nodes: dict[str, dict[str, Any]] = {
        "x": {"kind": "input", "module": None, "shape": [BATCH, width]},
        "y": {"kind": "target", "module": None, "shape": [BATCH, width]},
    }
    edges: list[tuple[str, str]] = []
    prev = "x"
    for i in range(layers):
        name = f"layers.{i}"
        nodes[f"{name}.weight"] = {"kind": "parameter", "module": name, "shape": [width, width]}
        nodes[f"{name}.bias"] = {"kind": "parameter", "module": name, "shape": [width]}
        nodes[name] = {"kind": "intermediate", "module": name, "shape": [BATCH, width]}
        edges += [(prev, name), (f"{name}.weight", name), (f"{name}.bias", name)]
        prev = name
    nodes["attn"] = {"kind": "intermediate", "module": None, "shape": [BATCH, width], "roles": ["pos0", "pos1", "pos2"]}
    nodes["block"] = {"kind": "intermediate", "module": None, "shape": [BATCH, width], "iterations": 2}
    nodes["out"] = {"kind": "output", "module": "head", "shape": [BATCH, width]}
    nodes["loss"] = {"kind": "loss", "module": None, "shape": []}
    nodes["aux_loss"] = {"kind": "loss", "module": None, "shape": []}
    edges += [(prev, "attn"), ("attn", "block"), ("block", "out"), ("out", "loss"), ("y", "loss"), (prev, "aux_loss")]
    for attrs in nodes.values():
        attrs.setdefault("roles", [None])
        attrs.setdefault("iterations", 1)
        attrs["dtype"] = "float32"
    return nodes, edges


def _series(nodes: dict[str, dict[str, Any]], sample_nodes: set[str]) -> list[tuple[SeriesKey, bool, bool]]:
    """(key, with neurons, with samples) of every series, in a fixed order."""
    out = []
    for name, attrs in nodes.items():
        kind = attrs["kind"]
        views = ["value"]
        if kind not in ("input", "target"):
            views.append("grad")
        if name.startswith("layers.0") or name in ("out", "attn"):
            views.append("grad:aux_loss")
        if kind == "parameter":
            views.append("update")
        scalar = not attrs["shape"]
        for role in attrs["roles"]:
            for iteration in range(attrs["iterations"]):
                for view in views:
                    samples = name in sample_nodes and view in ("value", "grad")
                    out.append((SeriesKey(name, role, iteration, view), not scalar, samples))
    return out


def _stats(values: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """Batch statistics over axes 1.. of ``values`` (series, ...) -> (series, len(STAT_NAMES))."""
    flat = values.reshape(len(values), -1).astype(np.float64)
    out = np.full((len(values), len(fmt.STAT_NAMES)), np.nan, dtype=np.float32)
    ix = fmt.STAT_INDEX
    out[:, ix["mean"]] = flat.mean(1)
    out[:, ix["std"]] = flat.std(1, ddof=1) if flat.shape[1] > 1 else 0.0
    out[:, ix["abs_mean"]] = np.abs(flat).mean(1)
    out[:, ix["min"]] = flat.min(1)
    out[:, ix["max"]] = flat.max(1)
    out[:, ix["l2"]] = np.sqrt((flat**2).sum(1))
    out[:, ix["zero_frac"]] = (flat == 0).mean(1)
    out[:, ix["nan_count"]] = 0
    out[:, ix["inf_count"]] = 0
    out[:, ix["numel"]] = flat.shape[1]
    if reference is not None:
        out[:, ix["update_ratio"]] = out[:, ix["l2"]] / np.maximum(np.sqrt((reference.reshape(len(reference), -1) ** 2).sum(1)), 1e-12)
    return out


def write_run(
    root: str | os.PathLike[str],
    name: str,
    *,
    records: int = 200,
    layers: int = 4,
    width: int = 16,
    every: int = 1,
    ablation_every: int = 10,
    status: str = "finished",
    sample_every_layer: int = 2,
    notes: bool = True,
    layout: StoreLayout | None = None,
    block: int = 256,
    seed: int = 0,
) -> SyntheticSpec:
    """Write a synthetic run ``root/name`` and return what it contains.

    Args:
        records: number of recorded steps (step ``i * every``); every ``ablation_every``-th is of step type
            ``"ablation"`` (0: never), the others ``"train"``.
        layers: hidden layers; the graph has ``3 * layers + 7`` nodes.
        width: neurons per tensor.
        status: ``"finished"``, ``"failed"`` or ``"running"`` (the writer is left open: no final status).
        sample_every_layer: keep samples of every n-th layer's output (and of the input, output, ``attn``).
        block: records per appended block.
    """
    rng = np.random.default_rng(seed)
    nodes, edges = _graph(layers, width)
    sample_nodes = {"x", "y", "out", "attn", "layers.0.weight"} | {f"layers.{i}" for i in range(0, layers, max(sample_every_layer, 1))}
    series = _series(nodes, sample_nodes)
    changed = {f"layers.{i}" for i in range(1, layers, 2)}
    phase_record = int(records * 0.6)
    writer = RunWriter(open_root(root).run(name), meta={"hparams": {"lr": 0.01, "layers": layers, "width": width}, "framework": "synthetic"}, layout=layout)
    writer.start_segment(0)
    ablation_graph = [e for e in edges if e != ("attn", "block")] + [("layers.0", "block")] if layers else edges
    writer.write_graph(
        {
            "nodes": nodes,
            "graphs": {
                "train": {"nodes": list(nodes), "edges": [[s, d, "autograd"] for s, d in edges]},
                "ablation": {"nodes": list(nodes), "edges": [[s, d, "autograd"] for s, d in ablation_graph]},
            },
        }
    )
    modules: list[dict[str, Any]] = [{"name": "", "type": "MLP", "parent": None, "depth": 0, "params": 0}]
    modules += [{"name": "layers", "type": "ModuleList", "parent": "", "depth": 1, "params": 0}]
    modules += [{"name": f"layers.{i}", "type": "Linear", "parent": "layers", "depth": 2, "params": width * width + width} for i in range(layers)]
    modules += [{"name": "head", "type": "Identity", "parent": "", "depth": 1, "params": 0}]
    for row in modules:
        prefix = f"{row['name']}." if row["name"] else ""
        total = sum(r["params"] for r in modules if r["name"] == row["name"] or r["name"].startswith(prefix))
        row.update(params_total=total, trainable_total=total)
    writer.write_modules(modules)
    scale = np.array([1.0 + 0.2 * (i % 5) for i in range(len(series))])
    jump = np.array([4.0 if key.node in changed else 1.0 for key, _, _ in series])
    is_update = np.array([key.view == "update" for key, _, _ in series])
    position = {key: i for i, (key, _, _) in enumerate(series)}
    weight_of = np.array([position[SeriesKey(key.node, key.role, key.iteration, "value")] if key.view == "update" else i for i, (key, _, _) in enumerate(series)])
    pending: list[HostRecord] = []
    steps, types = [], []
    for r in range(records):
        step = r * every
        step_type = "ablation" if ablation_every and r % ablation_every == ablation_every - 1 else "train"
        drift = 1.0 + 0.5 * np.sin(r / max(records, 1) * 3.0)
        factor = scale * drift * np.where(r >= phase_record, jump, 1.0)
        values = rng.standard_normal((len(series), BATCH, width)).astype(np.float32) * factor[:, None, None].astype(np.float32)
        values[is_update] *= 0.01
        stats = _stats(values, values[weight_of])
        stats[~is_update, fmt.STAT_INDEX["update_ratio"]] = np.nan
        neurons = np.stack([values.mean(1), values.std(1), np.abs(values).mean(1)], axis=1)  # (series, 3, width)
        entries = []
        for i, (key, with_neurons, with_samples) in enumerate(series):
            if not nodes[key.node]["shape"]:
                s = stats[i].copy()
                s[fmt.STAT_INDEX["numel"]] = 1
                entries.append(HostEntry(key, s))
                continue
            entries.append(
                HostEntry(
                    key,
                    stats[i],
                    neurons[i] if with_neurons else None,
                    (values[i] if key.node != "layers.0.weight" else values[i].repeat(2, axis=0)) if with_samples else None,
                )
            )
        pending.append(HostRecord(step=step, step_type=step_type, epoch=step // 100, batch_idx=step % 100, time=time.time(), reason="every", entries=entries))
        steps.append(step)
        types.append(step_type)
        if len(pending) >= block:
            writer.append(pending)
            pending = []
    writer.append(pending)
    writer.add_scalars([(s, "loss", float(2.0 / (1 + 0.05 * s))) for s in steps[::5]] + [(s, "acc", float(min(1.0, s / max(steps[-1], 1)))) for s in steps[::5]] if steps else [])
    if notes and steps:
        writer.add_notes([{"step": steps[0], "time": time.time(), "text": "training started"}, {"step": steps[phase_record] if phase_record < len(steps) else steps[-1], "time": time.time(), "text": "phase change: odd layers scale up"}])
    writer.commit()
    if status in ("finished", "failed"):
        writer.close(status, "RuntimeError: synthetic failure" if status == "failed" else None)  # type: ignore[arg-type]
    return SyntheticSpec(nodes, edges, steps, types, changed, steps[phase_record] if phase_record < len(steps) else 0)


def write_bad_version(root: str | os.PathLike[str], name: str, version: str = "9.0") -> None:
    """Write a run whose ``meta.json`` claims a store format this package cannot read."""
    location = open_root(root).run(name)
    location.write_json(fmt.META_FILE, {"format": fmt.FORMAT_NAME, "format_version": version, "status": "finished"})
    location.write_json(fmt.MANIFEST_FILE, {"format_version": version})
