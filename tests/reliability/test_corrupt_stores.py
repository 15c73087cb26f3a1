"""Damaged stores fail clearly: each case damages a copy of a genuine run one way, then reads everything.

Every case ends in one of two ways, and never in a hang (each test has a timeout): a ``CorruptStoreError``
(or the documented ``FormatVersionError``) whose message names the run and the damaged file, or data that is
still right. No case may return data from a run that failed validation.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from comgra_callbacks import CorruptStoreError, FormatVersionError, StepNotFoundError, analysis, open_run
from comgra_callbacks.errors import ComgraError, StoreError
from comgra_callbacks.store.storage import MAX_SIDECAR_BYTES

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------------------ damage
def _json(run: Path, name: str, edit: Callable[[Any], Any]) -> None:
    path = run / name
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def edit(data: dict[str, Any]) -> dict[str, Any]:
        data[key] = value
        return data

    return edit


def _array(run: Path, name: str, index: Any, value: Any) -> None:
    import zarr

    array = zarr.open_array(str(run / name), mode="r+")
    data = np.asarray(array[:])
    data[index] = value
    array[:] = data


def _first_pointer(run: Path, name: str) -> tuple[int, int]:
    import zarr

    ptr = np.asarray(zarr.open_array(str(run / name), mode="r")[:])
    record, column = np.argwhere(ptr[:, :, 0] >= 0)[0]
    return int(record), int(column)


def _pointer(name: str, field: int, value: int) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        record, column = _first_pointer(run, name)
        _array(run, name, (record, column, field), value)

    return damage


def _zarr_meta(name: str, key: str, value: Any) -> Callable[[Path], None]:
    return lambda run: _json(run, f"{name}/zarr.json", _set(key, value))


def _link_outside(name: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        secret = run.parent.parent / f"secret-{name.replace('/', '_')}"
        secret.write_text(json.dumps([{"step": 0, "time": 0, "text": "a secret outside the run"}]))
        (run / name).unlink()
        (run / name).symlink_to(secret)

    return damage


def _link_to(name: str, target: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        (run / name).unlink()
        (run / name).symlink_to(target)

    return damage


def _fifo(name: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        (run / name).unlink()
        os.mkfifo(run / name)

    return damage


def _sparse(name: str, size: int) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        with open(run / name, "r+b") as handle:
            handle.truncate(size)

    return damage


def _delete(name: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        target = run / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return damage


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda run: (run / name).write_bytes(data)


def _manifest(key: str, value: Any) -> Callable[[Path], None]:
    return lambda run: _json(run, "manifest.json", _set(key, value))


# (case, damage, the file the error must name; None: the data must still be right)
CASES: list[tuple[str, Callable[[Path], None], str | None]] = [
    ("manifest truncated", lambda run: (run / "manifest.json").write_text((run / "manifest.json").read_text()[:200]), "manifest.json"),
    ("manifest garbage bytes", _write("manifest.json", b"\xff\xfe\x00garbage"), "manifest.json"),
    ("manifest empty", _write("manifest.json", b""), "manifest.json"),
    ("manifest is a list", _write("manifest.json", b"[1, 2, 3]"), "manifest.json"),
    ("manifest rows is a string", _manifest("rows", "8"), "manifest.json"),
    ("manifest rows negative", _manifest("rows", -1), "manifest.json"),
    ("manifest rows beyond the arrays", _manifest("rows", 100), "records"),
    ("manifest series item malformed", _manifest("series", [["x"]]), "manifest.json"),
    ("manifest series iteration is a string", lambda run: _json(run, "manifest.json", lambda m: {**m, "series": [[s[0], s[1], "0", s[3]] for s in m["series"]]}), "manifest.json"),
    ("manifest negative sample shape", lambda run: _json(run, "manifest.json", lambda m: {**m, "shapes": [[-4, 6]] + m["shapes"][1:]}), "manifest.json"),
    ("manifest without step types", _manifest("step_types", []), "records"),
    ("manifest step types not strings", _manifest("step_types", [1, 2]), "manifest.json"),
    ("manifest neurons_len beyond the array", _manifest("neurons_len", 10**9), "neurons"),
    ("manifest samples_len too short", _manifest("samples_len", 1), "samples_ptr"),
    ("manifest heartbeat not a number", _manifest("heartbeat", "soon"), "manifest.json"),
    ("manifest segments malformed", _manifest("segments", [{"segment": "zero"}]), "manifest.json"),
    ("manifest stat_names changed", _manifest("stat_names", ["max", "min"]), "manifest.json"),
    ("manifest more dtypes than series", lambda run: _json(run, "manifest.json", lambda m: {**m, "dtypes": m["dtypes"] * 2}), "manifest.json"),
    ("manifest deleted", _delete("manifest.json"), "manifest.json"),
    ("manifest deeply nested", _write("manifest.json", b"[" * 200_000 + b"]" * 200_000), "manifest.json"),
    ("meta garbage", _write("meta.json", b"{not json"), "meta.json"),
    ("meta is a list", _write("meta.json", b"[]"), "meta.json"),
    ("graph deeply nested", _write("graph.json", b'{"nodes": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"), "graph.json"),
    ("graph nodes is a list", _write("graph.json", b'{"nodes": [], "graphs": {}}'), "graph.json"),
    ("graph edges malformed", lambda run: _json(run, "graph.json", lambda g: {**g, "graphs": {"train": {"nodes": ["loss"], "edges": [["loss"]]}}}), "graph.json"),
    ("graph node shape negative", lambda run: _json(run, "graph.json", lambda g: {**g, "nodes": {**g["nodes"], "loss": {**g["nodes"]["loss"], "shape": [-1]}}}), "graph.json"),
    ("modules wrong types", _write("modules.json", b'[{"name": "", "type": 3, "params": "many"}]'), "modules.json"),
    ("modules is an object", _write("modules.json", b'{"a": 1}'), "modules.json"),
    ("notes is an object", _write("notes.json", b'{"a": 1}'), "notes.json"),
    ("notes text not a string", _write("notes.json", b'[{"step": 0, "time": 0, "text": {"html": 1}}]'), "notes.json"),
    ("record step-type code -1", lambda run: _array(run, "records", (0, 3), -1), "records"),
    ("record step-type code past the names", lambda run: _array(run, "records", (0, 3), 7), "records"),
    ("record reason code past the names", lambda run: _array(run, "records", (1, 4), 3), "records"),
    ("record step negative", lambda run: _array(run, "records", (2, 0), -5), "records"),
    ("record time NaN", lambda run: _array(run, "record_time", 0, np.nan), "record_time"),
    ("scalar name id past the names", lambda run: _array(run, "scalars", (0, 1), 99), "scalars"),
    ("neuron offset past the end", _pointer("neurons_ptr", 0, 10**9), "neurons_ptr"),
    ("neuron offset negative", _pointer("neurons_ptr", 0, -7), "neurons_ptr"),
    ("neuron width negative", _pointer("neurons_ptr", 1, -3), "neurons_ptr"),
    ("sample shape id past the shapes", _pointer("samples_ptr", 1, 99), "samples_ptr"),
    ("sample offset negative", _pointer("samples_ptr", 0, -5), "samples_ptr"),
    ("records chunk deleted", _delete("records/c/0/0"), "records"),
    ("record_time chunk deleted", _delete("record_time/c/0"), "record_time"),
    ("stats chunk deleted", _delete("stats/c/0/0/0"), "stats"),
    ("every stats chunk deleted", _delete("stats/c"), "stats"),
    ("neurons chunk deleted", _delete("neurons/c/0"), "neurons"),
    ("samples chunk deleted", _delete("samples/c/0"), "samples"),
    ("samples_ptr chunk deleted", _delete("samples_ptr/c/0/0/0"), "samples_ptr"),
    ("scalars chunk deleted", _delete("scalars/c/0/0"), "scalars"),
    ("stats array deleted", _delete("stats"), "stats"),
    ("stats chunk garbage", _write("stats/c/0/0/0", os.urandom(300)), "stats"),
    ("stats zarr.json garbage", _write("stats/zarr.json", b"{{{"), "stats"),
    ("stats shape shrunk", _zarr_meta("stats", "shape", [2, 24, 11]), "stats"),
    ("records dtype changed", _zarr_meta("records", "data_type", "float32"), "records"),
    ("records chunk is /dev/zero", _link_to("records/c/0/0", "/dev/zero"), "records/c/0/0"),
    ("manifest is /dev/zero", _link_to("manifest.json", "/dev/zero"), "manifest.json"),
    ("manifest is a FIFO", _fifo("manifest.json"), "manifest.json"),
    ("stats chunk is a FIFO", _fifo("stats/c/0/0/0"), "stats"),
    ("notes linked outside the run", _link_outside("notes.json"), "notes.json"),
    ("modules linked outside the run", _link_outside("modules.json"), "modules.json"),
    ("notes dangling link", _link_to("notes.json", "/nonexistent/notes.json"), "notes.json"),
    ("notes huge sparse file", _sparse("notes.json", 1 << 30), "notes.json"),
    ("graph just over the limit", _sparse("graph.json", MAX_SIDECAR_BYTES + 1), "graph.json"),
    # Damage that leaves the data right (or is a documented part of the format):
    ("graph missing", _delete("graph.json"), None),
    ("notes missing", _delete("notes.json"), None),
    ("unknown manifest field", _manifest("added_in_a_minor_version", [1, 2]), None),
    ("notes linked inside the run", lambda run: (shutil.copy(run / "notes.json", run / "notes-copy.json"), _link_to("notes.json", str(run / "notes-copy.json"))(run)), None),
]


def read_everything(run: Any) -> dict[str, Any]:
    """Every read the reader offers, for every node, view and step (of each step type)."""
    out: dict[str, Any] = {"steps": run.steps.copy(), "nodes": list(run.nodes), "modules": run.modules.copy(),
                           "notes": run.notes.copy(), "scalars": run.scalars.copy(), "graph": sorted(run.graph.edges())}
    for step_type in run.step_types:
        steps = sorted(set(run.steps.loc[run.steps["step_type"] == step_type, "step"]))
        out[("range", step_type)] = analysis.range_stats(run, steps[0], steps[-1], step_type=step_type)
        for node in run.nodes:
            for view in run.views(node):
                out[(node, view, step_type)] = run.stats(node, view=view, step_type=step_type)
                for step in steps:
                    for what, read in (("neurons", run.neurons), ("samples", run.samples)):
                        try:
                            out[(node, view, step_type, step, what)] = read(node, step, view=view, step_type=step_type)
                        except StepNotFoundError:
                            out[(node, view, step_type, step, what)] = None
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if hasattr(x, "equals"):
            assert x.equals(y), key
        elif isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=str(key))
        else:
            assert x == y, key


@pytest.fixture(scope="module")
def reference(tiny_run: Path) -> dict[str, Any]:
    return read_everything(open_run(tiny_run))


@pytest.mark.parametrize("case,damage,file", CASES, ids=[c[0] for c in CASES])
def test_a_damaged_store_fails_clearly_or_reads_right(case, damage, file, damaged, reference):
    run_dir = damaged()
    damage(run_dir)
    if file is None:
        data = read_everything(open_run(run_dir))
        if case == "graph missing":
            assert set(data["nodes"]) == set(reference["nodes"])
            data["nodes"], data["graph"] = reference["nodes"], reference["graph"]
            for key in [k for k in data if k[0] == "range"]:  # rows follow the node order, now the series order
                assert data[key].sort_index().equals(reference[key].sort_index())
                data[key] = reference[key]
        if case == "notes missing":
            assert data["notes"].empty
            data["notes"] = reference["notes"]
        _same(data, reference)
        return
    with pytest.raises(CorruptStoreError) as info:
        read_everything(open_run(run_dir))
    message = str(info.value)
    assert "'tiny'" in message or "/tiny" in message, message  # names the run
    assert file in message, message  # names the file
    assert isinstance(info.value, ValueError) and isinstance(info.value, ComgraError)
    assert "Traceback" not in message and len(message) < 1000, message


def test_the_reference_run_is_genuine(reference):
    """The table above damages a run with every part present: train and val records, neurons, samples,
    scalars, notes and a record()-ed node (otherwise some cases would test nothing)."""
    assert set(reference["steps"]["step_type"]) == {"train", "val"}
    assert "hidden" in reference["nodes"] and not reference["notes"].empty and not reference["scalars"].empty
    assert any(key[-1] == "neurons" and value is not None for key, value in reference.items() if isinstance(key, tuple))
    assert any(key[-1] == "samples" and value is not None for key, value in reference.items() if isinstance(key, tuple))


def test_html_in_the_format_version_is_a_format_version_error(damaged):
    run_dir = damaged()
    _json(run_dir, "meta.json", _set("format_version", "<img src=x onerror=alert(7)>"))
    with pytest.raises(FormatVersionError, match=r"store format <img src=x onerror=alert\(7\)>"):
        open_run(run_dir)


def test_open_run_on_a_file_says_it_wants_a_directory(damaged):
    run_dir = damaged()
    from comgra_callbacks import RunNotFoundError

    with pytest.raises(RunNotFoundError, match=r"expected the directory of a run, got .*manifest\.json', which is a file"):
        open_run(run_dir / "manifest.json")


def test_open_runs_skips_a_damaged_run_and_opens_the_others(damaged, tiny_run):
    from comgra_callbacks import open_runs

    run_dir = damaged()
    shutil.copytree(tiny_run, run_dir.parent / "good")
    _write("manifest.json", b"[")(run_dir)
    with pytest.warns(RuntimeWarning, match=r"skipping run 'tiny'.*manifest\.json"):
        runs = open_runs(run_dir.parent)
    assert [r.location.name for r in runs] == ["good"]


def test_an_unreachable_s3_endpoint_fails_fast_and_says_so():
    import socket
    import time

    pytest.importorskip("s3fs")
    from comgra_callbacks import open_runs

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(StoreError, match=rf"endpoint 'http://127\.0\.0\.1:{port}' .* could not be reached"):
        open_runs("s3://bucket/runs", storage_options={"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"})
    assert time.monotonic() - start < 5
