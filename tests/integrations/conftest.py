"""Fixtures of the integration tests: a real S3-compatible server, subprocess runners, the tiny Lightning example."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for name in ("werkzeug", "transformers"):
    logging.getLogger(name).setLevel(logging.ERROR)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: one thread per process, offline, no stray cloud credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MASTER_", "WORLD_SIZE", "LOCAL_RANK", "RANK"))}
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]),
    )
    env.update(extra)
    return env


def run_python(args: list[str], cwd: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the test environment's Python with ``args`` in ``cwd``; output captured as text."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout
    )


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-6000:]}"


# ------------------------------------------------------------------------------------------ S3 (moto)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server (moto) on 127.0.0.1 and a free port, stopped after the module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_options(endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A new, empty bucket on the test server."""
    import boto3

    name = f"comgra-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    client.create_bucket(Bucket=name)
    return name


# ---------------------------------------------------------------------------------------- Lightning


def tiny_lightning_module(seed: int = 0) -> Any:
    """The LightningCLI example's classifier and its data, seeded: ``(module, train_dataloader)``."""
    from comgra_callbacks.examples.lightning_cli import PointsDataModule, TinyClassifier

    torch.manual_seed(seed)
    module = TinyClassifier()
    loader = PointsDataModule(n_samples=128, batch_size=16, seed=seed).train_dataloader()
    return module, loader
