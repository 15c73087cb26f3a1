"""Distributed training on the CPU (gloo), in subprocesses: Lightning DDP with two processes, and the HF Trainer
under ``torchrun --nproc_per_node=2``. Each run has two callbacks: the default ``ranks="zero"`` and
``ranks="all"``, both with generated run names (each process draws its own; the ranks must agree)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import numpy as np
import pytest

from comgra_callbacks import open_runs

from .conftest import explain, run_python

LIGHTNING_DDP = """
import lightning.pytorch as pl
import torch
from comgra_callbacks import ComgraCallback
from comgra_callbacks.examples.lightning_cli import PointsDataModule, TinyClassifier

if __name__ == "__main__":
    torch.manual_seed(0)
    zero = ComgraCallback("runs_zero", every_n_steps=2, flush_secs=0.2)
    every = ComgraCallback("runs_all", every_n_steps=2, ranks="all", flush_secs=0.2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[zero, every],
    )
    trainer.fit(TinyClassifier(), PointsDataModule(n_samples=256, batch_size=16))
    print(f"RANK {trainer.global_rank} NAMES {zero.run_name} {every.run_name}", flush=True)
"""

HF_TORCHRUN = """
from transformers import Trainer
from tiny_hf import MaskedTokens, tiny_bert, training_args
from comgra_callbacks import ComgraTrainerCallback

zero = ComgraTrainerCallback("runs_zero", every_n_steps=2, flush_secs=0.2)
every = ComgraTrainerCallback("runs_all", every_n_steps=2, ranks="all", flush_secs=0.2)
args = training_args("out", ddp_backend="gloo", max_steps=4)
Trainer(model=tiny_bert(), args=args, train_dataset=MaskedTokens(), callbacks=[zero, every]).train()
print(f"RANK {args.process_index} NAMES {zero.run_name} {every.run_name}", flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_runs(tmp_path: Path, stdout: str, weight: str, input_node: str) -> None:
    names = dict((int(r), (z, a)) for r, z, a in re.findall(r"RANK (\d) NAMES (\S+) (\S+)", stdout))
    assert sorted(names) == [0, 1] and names[0] == names[1], names  # the ranks agreed on both names
    zero_name, all_name = names[0]

    [zero] = open_runs(tmp_path / "runs_zero", errors="raise")  # only rank 0 recorded
    assert zero.name == zero_name and zero.status == "finished"
    assert (zero.meta["rank"], zero.meta["world_size"]) == (0, 2)
    assert list(zero.steps["step"]) == [0, 2]

    ranks = open_runs(tmp_path / "runs_all", errors="raise")
    assert [r.name for r in ranks] == [f"{all_name}/rank0", f"{all_name}/rank1"]
    assert [(r.meta["rank"], r.meta["world_size"], r.status) for r in ranks] == [(0, 2, "finished"), (1, 2, "finished")]
    r0, r1 = ranks
    for step in (0, 2):
        # each rank saw its own shard of the data, and DDP averaged the gradients: equal on both ranks
        assert not np.array_equal(r0.samples(input_node, step), r1.samples(input_node, step))
        assert np.isclose(r0.stats(weight, view="grad")["l2"][step], r1.stats(weight, view="grad")["l2"][step], rtol=1e-5)
    np.testing.assert_allclose(zero.stats(weight, view="grad")["l2"], r0.stats(weight, view="grad")["l2"], rtol=1e-6)


@pytest.mark.slow
def test_lightning_ddp_on_two_cpu_processes(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(LIGHTNING_DDP)
    proc = run_python(["train.py"], cwd=tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert proc.returncode == 0, explain(proc)
    check_runs(tmp_path, proc.stdout, "net.0.weight", "input")


@pytest.mark.slow
def test_hf_trainer_under_torchrun(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(HF_TORCHRUN)
    proc = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"], cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    check_runs(tmp_path, proc.stdout, "bert.encoder.layer.0.output.dense.weight", "batch.input_ids")
