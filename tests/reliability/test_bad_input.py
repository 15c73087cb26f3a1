"""Clear errors for bad input: reader arguments, step types never mixed, and `comgra-callbacks serve` lines."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from comgra_callbacks import (
    ConfigError,
    ConfigTypeError,
    NodeNotFoundError,
    StepNotFoundError,
    analysis,
    open_run,
)

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------------------------ the reader
@pytest.mark.parametrize("bad", [1.7, 3.0, "3", True, None, np.float64(2.0)])
def test_steps_must_be_ints(tiny_run, bad):
    run = open_run(tiny_run)
    reads = [lambda: run.neurons("net.0", bad), lambda: run.samples("input", bad), lambda: run.step_stats(bad), lambda: run.entry_stats("net.0", bad)]
    if bad is not None:  # a range's bound may be None: that side is open
        reads += [lambda: analysis.range_stats(run, bad, 5), lambda: analysis.range_stats(run, 0, bad)]
    for read in reads:
        with pytest.raises(ConfigTypeError, match=r"`Run\.\w+\((step|first_step|last_step)=\.\.\.\)`: expected an int \(a trainer step\), got "):
            read()


def test_numpy_integer_steps_are_fine(tiny_run):
    run = open_run(tiny_run)
    assert run.neurons("net.0", np.int64(2)).equals(run.neurons("net.0", 2))


@pytest.mark.parametrize("method", ["step_stats", "stats_blocks"])
def test_a_bogus_view_names_the_valid_ones(tiny_run, method):
    run = open_run(tiny_run)
    read = (lambda: run.step_stats(2, view="gradd")) if method == "step_stats" else (lambda: analysis.range_stats(run, 0, 5, view="gradd"))
    with pytest.raises(NodeNotFoundError, match=rf"`Run\.{method}\(view=\.\.\.\)`: run 'tiny' has no view 'gradd'; it has \['grad', 'update', 'value'\]"):
        read()


def test_train_and_validation_records_are_never_mixed(tiny_run):
    """Step 3 has a train and a val record: `stats(node)` is the training curve, one row per step."""
    run = open_run(tiny_run)
    train = sorted(run.steps.loc[run.steps["step_type"] == "train", "step"])
    val = sorted(run.steps.loc[run.steps["step_type"] == "val", "step"])
    assert 3 in train and 3 in val  # the case that zigzagged
    for node in ("loss", "net.2", "hidden"):
        stats = run.stats(node)
        assert stats.index.is_unique and list(stats.index) == train
        assert stats.equals(run.stats(node, step_type="train"))
    assert list(run.stats("net.2", step_type="val").index) == val  # (no loss is backpropagated in validation)
    assert run.node_stats("net.2")["value"].equals(run.stats("net.2"))
    assert analysis.range_stats(run, 0, 6).equals(analysis.range_stats(run, 0, 6, step_type="train"))
    assert run.record_of(3) == run.record_of(3, step_type="train") != run.record_of(3, step_type="val")
    assert run.step_stats(3).equals(run.step_stats(3, step_type="train"))


def test_a_step_of_another_type_says_which_type_has_it(tiny_run):
    run = open_run(tiny_run)
    with pytest.raises(StepNotFoundError, match=r"no record of step 6 of step type 'train'.*HINT: step 6 has records of step type \['val'\]: pass step_type='val'"):
        run.neurons("net.0", 6)
    assert len(run.neurons("net.0", 6, step_type="val")) == 5


def _run_of_types(root: Path, name: str, types: list[str]) -> Path:
    from comgra_callbacks.store.format import SeriesKey
    from comgra_callbacks.store.storage import open_root
    from comgra_callbacks.store.writer import HostEntry, HostRecord, RunWriter

    stats = np.full(11, np.nan, dtype=np.float32)
    stats[:10] = [1, 0, 1, 1, 1, 1, 0, 0, 0, 1]
    writer = RunWriter(open_root(root).run(name))
    writer.append([HostRecord(i, t, 0, i, time.time(), "every", [HostEntry(SeriesKey("h", None, 0, "value"), stats)]) for i, t in enumerate(types)])
    writer.close("finished")
    return root / name


def test_several_step_types_without_train_need_an_explicit_one(tmp_path):
    run = open_run(_run_of_types(tmp_path, "ab", ["a", "b", "a"]))
    with pytest.raises(ConfigError, match=r"`Run\.stats\(step_type=None\)`: run 'ab' has records of several step types \['a', 'b'\] and none of them is 'train'.*HINT: pass step_type='a'"):
        run.stats("h")
    with pytest.raises(ConfigError, match=r"`Run\.stats_blocks\(step_type=None\)`"):
        analysis.range_stats(run, 0, 2)
    assert list(run.stats("h", step_type="a").index) == [0, 2]


def test_a_single_step_type_is_the_default_whatever_its_name(tmp_path):
    run = open_run(_run_of_types(tmp_path, "only", ["eval", "eval"]))
    assert list(run.stats("h").index) == [0, 1] and run.resolve_step_type(None) == "eval"


# --------------------------------------------------------------------------------------- the CLI
def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from comgra_callbacks.cli import main; raise SystemExit(main())", "serve", *args, "--no-show"]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def _one_clear_line(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_serve_with_a_port_out_of_range(tmp_path):
    _one_clear_line(_serve(str(tmp_path), "--port", "70000"), "argument --port: expected a port from 0 to 65535", "'70000'", "HINT")


def test_serve_with_an_impossible_address(tmp_path):
    _one_clear_line(_serve(str(tmp_path), "--address", "999.1.1.1"), "argument --address: expected an IP address", "'999.1.1.1'")


def test_serve_with_a_file_as_root(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("not runs")
    _one_clear_line(_serve(str(target)), "expected a directory of runs", "which is a file", "HINT")


@pytest.mark.slow
def test_serve_on_a_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _one_clear_line(_serve(str(tmp_path), "--port", str(port)), f"cannot listen on 127.0.0.1:{port}", "HINT: choose another --port")
    assert "in use" in line


@pytest.mark.slow
def test_serve_on_every_interface_warns_that_anyone_can_read_the_runs(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", "from comgra_callbacks.cli import main; raise SystemExit(main())", "serve", str(tmp_path),
               "--address", "0.0.0.0", "--port", str(port), "--no-show"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        warning = ""
        while time.time() < deadline and process.stderr is not None:
            line = process.stderr.readline()
            if "warning" in line or not line:
                warning = line
                break
        assert "listening on 0.0.0.0" in warning and "no authentication" in warning and "anyone who can reach this port" in warning, warning
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_the_custom_file_runs_once_per_server(tmp_path, tiny_run, dashboard_for):
    import shutil

    shutil.copytree(tiny_run, tmp_path / "runs" / "tiny")
    counter = tmp_path / "count.txt"
    custom = tmp_path / "counting_view.py"
    custom.write_text(f"from pathlib import Path\np = Path({str(counter)!r})\np.write_text(p.read_text() + 'x' if p.exists() else 'x')\n\ndef view(selection, run):\n    return 'hello'\n")
    for _ in range(3):  # three browser sessions
        dashboard_for(tmp_path / "runs", custom=str(custom))
    assert counter.read_text() == "x"


def test_the_dashboard_says_when_the_object_store_cannot_be_reached():
    pytest.importorskip("s3fs")
    from comgra_callbacks.dashboard.data import Catalog

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    catalog = Catalog("s3://bucket/runs", {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"})
    assert time.monotonic() - start < 5
    assert catalog.problem is not None and "could not be reached" in catalog.problem and not catalog.runs
