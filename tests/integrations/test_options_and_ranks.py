"""Options shared by both callbacks: who records under distributed training, the agreed set-up check, and the
one place that decides which steps are recorded. Real Lightning and HF trainers on one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from comgra_callbacks import (
    ComgraCallback,
    ComgraTrainerCallback,
    ConfigError,
    StoreError,
    open_run,
    open_runs,
)
from comgra_callbacks.integrations.common import agree_on_problem

from ..conftest import quiet_trainer
from .conftest import tiny_lightning_module


@pytest.mark.parametrize("cls", [ComgraCallback, ComgraTrainerCallback])
def test_ranks_must_be_zero_or_all(cls: Any) -> None:
    with pytest.raises(ConfigError, match=rf"`{cls.__name__}\(ranks=\.\.\.\)`: expected one of \['zero', 'all'\], got 'every'\."):
        cls("runs", ranks="every")


@pytest.mark.parametrize("cls", [ComgraCallback, ComgraTrainerCallback])
def test_both_callbacks_validate_the_same_options(cls: Any) -> None:
    with pytest.raises(ConfigError, match=rf"`{cls.__name__}\(every_n_steps=\.\.\.\)`: expected a positive int, got 0\."):
        cls("runs", every_n_steps=0)
    with pytest.raises(ConfigError, match=rf"`{cls.__name__}\(on_write_error=\.\.\.\)`: expected one of"):
        cls("runs", on_write_error="ignore")
    options = cls("runs", every_n_steps=3).options
    assert [s for s in range(10) if options.plan(s, "train") == "record"] == [0, 3, 6, 9]


class _Rank0Error(StoreError):
    pass


def test_ranks_agree_to_fail_when_rank_zero_cannot_write() -> None:
    problem = _Rank0Error("cannot write to the store root 's3://gone/runs'")
    sent: list[Any] = []

    def broadcast_from_rank0(obj: Any) -> Any:  # what rank 1 receives: rank 0's message
        sent.append(obj)
        return str(problem)

    with pytest.raises(_Rank0Error):  # rank 0 raises its own error
        agree_on_problem(problem, ranks="zero", broadcast=lambda obj: obj, all_ok=lambda ok: ok)
    with pytest.raises(StoreError, match=r"rank 0 could not open the store: cannot write to the store root 's3://gone/runs'"):
        agree_on_problem(None, ranks="zero", broadcast=broadcast_from_rank0, all_ok=lambda ok: ok)
    assert sent == [None]  # rank 1 had nothing to say


def test_ranks_agree_to_fail_when_any_recording_rank_cannot_write() -> None:
    problem = StoreError("the store root '/ro' is not writable")
    with pytest.raises(StoreError, match="is not writable"):  # the rank that failed
        agree_on_problem(problem, ranks="all", broadcast=lambda obj: obj, all_ok=lambda ok: False)
    with pytest.raises(StoreError, match=r"another rank could not open the store root"):  # the others
        agree_on_problem(None, ranks="all", broadcast=lambda obj: obj, all_ok=lambda ok: False)
    agree_on_problem(None, ranks="all", broadcast=lambda obj: obj, all_ok=lambda ok: True)  # nobody failed


def test_lightning_ranks_all_writes_a_rank_group(tmp_path: Path) -> None:
    module, loader = tiny_lightning_module()
    cb = ComgraCallback(tmp_path / "runs", run_name="exp", every_n_steps=2, ranks="all", flush_secs=0.1)
    quiet_trainer([cb], tmp_path, max_steps=4).fit(module, loader)
    [run] = open_runs(tmp_path / "runs")
    assert run.name == "exp/rank0"
    assert (run.meta["rank"], run.meta["world_size"], run.meta["status"]) == (0, 1, "finished")
    assert run.meta["config"]["ranks"] == "all"
    assert list(run.steps["step"]) == [0, 2]


def test_lightning_unwritable_root_fails_at_setup_before_training(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    module, loader = tiny_lightning_module()
    before = [p.detach().clone() for p in module.parameters()]
    cb = ComgraCallback(not_a_dir / "runs")
    with pytest.raises(StoreError, match=r"cannot create the store root .*file/runs"):
        quiet_trainer([cb], tmp_path, max_steps=2).fit(module, loader)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, module.parameters(), strict=True))  # no step ran
    assert cb.recorder is None


def test_hf_ranks_all_writes_a_rank_group(tmp_path: Path) -> None:
    from transformers import Trainer

    from .tiny_hf import MaskedTokens, tiny_bert, training_args

    cb = ComgraTrainerCallback(tmp_path / "runs", run_name="exp", ranks="all", every_n_steps=2, flush_secs=0.1)
    Trainer(model=tiny_bert(), args=training_args(str(tmp_path / "out"), max_steps=3), train_dataset=MaskedTokens(), callbacks=[cb]).train()
    run = open_run(tmp_path / "runs" / "exp" / "rank0")
    assert (run.meta["run_name"], run.meta["rank"], run.meta["world_size"]) == ("exp/rank0", 0, 1)
    assert list(run.steps["step"]) == [0, 2]
