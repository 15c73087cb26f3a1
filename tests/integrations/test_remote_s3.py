"""Runs written to and read from a real S3-compatible server (moto) on 127.0.0.1, started by the fixture.

One Lightning training is recorded to S3 (``module``-scoped fixture ``s3_run``); while it trains, a callback
opens the run with the reader, as the dashboard would. The same seeded training recorded to a local
directory is the oracle for what S3 must hold. Tests of the reader (and, later, of the dashboard) use the
fixture's run.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lightning.pytorch.callbacks import Callback

from comgra_callbacks import (
    ComgraCallback,
    ComgraTrainerCallback,
    ConfigError,
    MissingDependencyError,
    StoreError,
    open_run,
    open_runs,
)
from comgra_callbacks.store.writer import RunWriter

from ..conftest import quiet_trainer
from .conftest import explain, run_python, s3_options, tiny_lightning_module

pytestmark = pytest.mark.slow
STEPS = 30


@dataclass
class Observed:
    """What happened while the S3 run was being written."""

    url: str
    storage_options: dict[str, Any]
    local: Path  # the same training recorded locally
    live_records: int = 0  # records the reader saw during training
    live_status: str = ""
    writer_calls: list[tuple[str, str]] = field(default_factory=list)  # (method, thread name)


class ReadWhileTraining(Callback):
    """At step ``at``, opens the run being written and waits (up to 20 s) until a record is visible."""

    def __init__(self, observed: Observed, at: int) -> None:
        self.observed, self.at = observed, at

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self.at:
            return
        deadline = time.monotonic() + 20
        run = open_run(self.observed.url, storage_options=self.observed.storage_options)
        while len(run.steps) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
            run.refresh()
        self.observed.live_records, self.observed.live_status = len(run.steps), run.status


class TrainingWindow(Callback):
    """Open from the first training batch to the end of training (before the callbacks' teardown)."""

    def __init__(self) -> None:
        self.open = False

    def on_train_batch_start(self, *args: Any) -> None:
        self.open = True

    def on_train_end(self, *args: Any) -> None:
        self.open = False


def _watch_writer_threads(monkeypatch: pytest.MonkeyPatch, calls: list[tuple[str, str]], window: TrainingWindow) -> None:
    """Note which thread calls each RunWriter method that touches the store while the training steps run
    (the calls themselves happen as usual)."""
    for name in ("append", "commit", "add_scalars", "start_segment", "write_graph", "write_modules", "update_meta", "close"):
        original = getattr(RunWriter, name)

        @functools.wraps(original)
        def watched(self: Any, *args: Any, __original: Any = original, __name: str = name, **kwargs: Any) -> Any:
            if window.open:
                calls.append((__name, threading.current_thread().name))
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(RunWriter, name, watched)


def _train(root: str, tmp: Path, extra: list[Any], **options: Any) -> None:
    module, loader = tiny_lightning_module(seed=1)
    cb = ComgraCallback(root, run_name="exp", ranks="all", flush_secs=0.3, **options)
    quiet_trainer([cb, *extra], tmp, max_steps=STEPS).fit(module, loader)


@pytest.fixture(scope="module")
def s3_run(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    import boto3

    boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).create_bucket(Bucket="recorded")
    tmp = tmp_path_factory.mktemp("s3run")
    observed = Observed("s3://recorded/runs/exp/rank0", s3_options(s3_endpoint), tmp / "local")
    window = TrainingWindow()
    with pytest.MonkeyPatch.context() as monkeypatch:
        _watch_writer_threads(monkeypatch, observed.writer_calls, window)
        # the thread writer, to watch which thread writes; the local oracle uses the default writer process
        _train("s3://recorded/runs", tmp, [window, ReadWhileTraining(observed, at=20)], storage_options=observed.storage_options, writer="thread")
    _train(str(observed.local), tmp, [])
    yield observed


def test_reader_sees_records_while_training_runs(s3_run: Observed) -> None:
    assert s3_run.live_records >= 1 and s3_run.live_status == "running"


def test_writes_happen_on_the_writer_thread_in_blocks(s3_run: Observed) -> None:
    calls = s3_run.writer_calls  # from the first training batch to the end of training
    assert {"append", "commit", "add_scalars"} <= {name for name, _ in calls}
    assert all(thread.startswith("comgra-writer-") for _, thread in calls), calls
    appends = sum(1 for name, _ in calls if name == "append")
    assert 1 <= appends <= STEPS // 2  # buffered: several records per request


def test_the_writer_process_leaves_no_store_writes_in_the_training_process(s3_endpoint: str, tmp_path: Path) -> None:
    import boto3

    boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).create_bucket(Bucket="byprocess")
    calls: list[tuple[str, str]] = []
    window = TrainingWindow()
    with pytest.MonkeyPatch.context() as monkeypatch:
        _watch_writer_threads(monkeypatch, calls, window)
        _train("s3://byprocess/runs", tmp_path, [window], storage_options=s3_options(s3_endpoint))
    assert calls == []  # every write happened in the writer process
    run = open_run("s3://byprocess/runs/exp/rank0", storage_options=s3_options(s3_endpoint))
    assert run.status == "finished" and list(run.steps["step"]) == list(range(STEPS))


def test_reader_opens_the_finished_s3_run_and_matches_the_local_oracle(s3_run: Observed) -> None:
    remote = open_run(s3_run.url, storage_options=s3_run.storage_options)
    local = open_run(s3_run.local / "exp" / "rank0")
    assert remote.status == "finished" and remote.meta["run_name"] == "exp/rank0"
    assert list(remote.steps["step"]) == list(range(STEPS)) == list(local.steps["step"])
    assert remote.nodes == local.nodes
    for node, view in (("net.0", "value"), ("net.0", "grad"), ("net.2.weight", "update"), ("confidence", "value")):
        # written by the thread writer (torch reductions) and the writer process (numpy): equal up to float32 rounding
        np.testing.assert_allclose(remote.stats(node, view=view).to_numpy(), local.stats(node, view=view).to_numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(remote.samples("input", 7), local.samples("input", 7))
    np.testing.assert_allclose(remote.neurons("net.0", 7).to_numpy(), local.neurons("net.0", 7).to_numpy(), rtol=1e-5, atol=1e-7)
    assert list(remote.graph.edges) == list(local.graph.edges)


def test_open_runs_lists_rank_groups_under_an_s3_root(s3_run: Observed) -> None:
    [run] = open_runs("s3://recorded/runs", storage_options=s3_run.storage_options, errors="raise")
    assert run.name == "exp/rank0" and len(run.steps) == STEPS


def test_hf_trainer_records_to_s3(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    from transformers import Trainer

    from .tiny_hf import MaskedTokens, tiny_bert, training_args

    options = s3_options(s3_endpoint)
    cb = ComgraTrainerCallback(f"s3://{s3_bucket}/hf", run_name="bert", every_n_steps=2, storage_options=options, flush_secs=0.2)
    Trainer(model=tiny_bert(), args=training_args(str(tmp_path / "out"), max_steps=4), train_dataset=MaskedTokens(), callbacks=[cb]).train()
    run = open_run(f"s3://{s3_bucket}/hf/bert", storage_options=options)
    assert run.status == "finished" and list(run.steps["step"]) == [0, 2]
    assert run.stats("loss")["numel"].tolist() == [1.0, 1.0]


# ------------------------------------------------------------------------------------ failure paths


def _fit_and_expect(error: type[Exception], match: str, tmp_path: Path, root: str, **options: Any) -> None:
    module, loader = tiny_lightning_module()
    started: list[int] = []

    class Started(Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            started.append(1)

    with pytest.raises(error, match=match):
        quiet_trainer([ComgraCallback(root, **options), Started()], tmp_path, max_steps=2).fit(module, loader)
    assert started == []  # failed at setup, before training


def test_missing_bucket_fails_at_setup(s3_endpoint: str, tmp_path: Path) -> None:
    _fit_and_expect(
        StoreError,
        r"cannot write to the store root 's3://no-such-bucket/runs': FileNotFoundError: .*HINT: check that the bucket 'no-such-bucket' exists",
        tmp_path, "s3://no-such-bucket/runs", storage_options=s3_options(s3_endpoint),
    )


def test_missing_bucket_fails_before_the_first_hf_step(s3_endpoint: str, tmp_path: Path) -> None:
    from transformers import Trainer

    from .tiny_hf import MaskedTokens, tiny_bert, training_args

    cb = ComgraTrainerCallback("s3://no-such-bucket/runs", storage_options=s3_options(s3_endpoint))
    trainer = Trainer(model=tiny_bert(), args=training_args(str(tmp_path / "out")), train_dataset=MaskedTokens(), callbacks=[cb])
    with pytest.raises(StoreError, match=r"HINT: check that the bucket 'no-such-bucket' exists"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_unreachable_endpoint_fails_at_setup(tmp_path: Path) -> None:
    with socket_closed_port() as port:
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s", "config_kwargs": {"retries": {"max_attempts": 1}}}
        _fit_and_expect(StoreError, r"EndpointConnectionError: Could not connect to the endpoint URL", tmp_path, "s3://bucket/runs", storage_options=options)


def test_unknown_storage_option_fails_at_setup(s3_endpoint: str, tmp_path: Path) -> None:
    options = {**s3_options(s3_endpoint), "endpoint": "typo"}
    _fit_and_expect(StoreError, r"unexpected keyword argument 'endpoint'", tmp_path, "s3://bucket/runs", storage_options=options)


def test_unknown_protocol_fails_at_setup(tmp_path: Path) -> None:
    _fit_and_expect(ConfigError, r"`root`: cannot open the URL 's4://bucket/runs': Protocol not known: s4", tmp_path, "s4://bucket/runs")


def test_storage_options_with_a_local_root_are_refused(tmp_path: Path) -> None:
    _fit_and_expect(ConfigError, r"`storage_options`: only used with a URL root", tmp_path, str(tmp_path / "runs"), storage_options={"key": "k"})


def test_missing_fsspec_driver_names_the_package(tmp_path: Path) -> None:
    _fit_and_expect(MissingDependencyError, r"needs the fsspec driver for gs:// .*HINT: pip install gcsfs", tmp_path, "gs://bucket/runs")


def test_missing_s3fs_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['s3fs'] = None\n"  # what Python does for a package that is not installed
        "from comgra_callbacks import open_runs\n"
        "try:\n"
        "    open_runs('s3://bucket/runs')\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, '|', exc)\n"
    )
    proc = run_python(["-c", code], cwd=tmp_path)
    assert proc.stdout.strip() == (
        "MissingDependencyError | the store root 's3://bucket/runs' needs the optional package 's3fs'. "
        "HINT: pip install 'comgra-callbacks[s3]'"
    ), explain(proc)


class socket_closed_port:
    """A port on 127.0.0.1 that nothing listens on (bound and released)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def __exit__(self, *exc: Any) -> None:
        return None


def test_the_dashboard_reads_the_s3_run(s3_run: Observed) -> None:
    """The dashboard's views, built on the s3:// root (no browser), show the S3 run's data."""
    from comgra_callbacks.dashboard.app import Dashboard
    from comgra_callbacks.dashboard.data import Catalog
    from comgra_callbacks.dashboard.options import DashboardOptions

    root = "s3://recorded/runs"
    dash = Dashboard(Catalog(root, s3_run.storage_options), DashboardOptions(root, s3_run.storage_options, poll_secs=0))
    assert dash.catalog.problem is None and list(dash.catalog.runs) == ["exp/rank0"]
    dash.selection.param.update(run="exp/rank0", node="net.0", step=7)
    reference = open_run(s3_run.url, storage_options=s3_run.storage_options).stats("net.0", step_type="train").loc[7]
    table = dash.tensor.table.object
    np.testing.assert_allclose(table.loc[reference.index, "▸ value"].to_numpy(), reference.to_numpy(), rtol=1e-6)
