"""Recording policies in a real Lightning Trainer: step types, triggers, forced steps, notes, samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from comgra_callbacks import (
    Balanced,
    Budget,
    ComgraCallback,
    ConfigError,
    ConfigTypeError,
    Every,
    Indices,
    LossSpike,
    Never,
    NonFinite,
    Predicate,
    TopK,
    note,
    open_run,
    record,
    record_this_step,
)
from comgra_callbacks.stats import NEURON_STAT_NAMES
from tests.conftest import classification_loader, make_mlp_module, quiet_trainer


class Kinds(torch.utils.data.Dataset):
    """Dict samples with a per-sample `kind`; one batch of 4 is all "long" every third batch, else "short"."""

    def __init__(self, n_batches: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n_batches * 4, 6, generator=g)
        self.y = torch.randint(0, 3, (n_batches * 4,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "y": self.y[i], "idx": i, "kind": "long" if (i // 4) % 3 == 2 else "short"}


class KindModel(pl.LightningModule):
    """Uses an extra layer for "long" batches, so the two step types have different graphs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(6, 5)
        self.extra = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        h = torch.tanh(self.first(batch["x"]))
        if batch["kind"][0] == "long":
            h = torch.tanh(self.extra(h))
        per_sample = nn.functional.cross_entropy(self.head(h), batch["y"], reduction="none")
        record("per_sample_loss", per_sample)
        return per_sample.mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def kinds_loader() -> Any:
    return torch.utils.data.DataLoader(Kinds(), batch_size=4)


def test_step_types_have_their_own_schedules_and_graphs(tmp_path: Path) -> None:
    cb = ComgraCallback(str(tmp_path), run_name="kinds", step_type="kind", schedule={"long": Every(1), "*": Every(4)})
    quiet_trainer([cb], tmp_path, max_steps=12).fit(KindModel(), kinds_loader())
    run = open_run(tmp_path / "kinds")
    recorded = list(zip(run.steps["step"], run.steps["step_type"]))
    # "long" batches are 2, 5, 8, 11: every one recorded; "short" ones only on multiples of 4
    assert recorded == [(0, "short"), (2, "long"), (4, "short"), (5, "long"), (8, "long"), (11, "long")]
    assert set(run.steps["reason"]) == {"schedule"}
    assert "extra" in run.graph_for("long") and "extra" not in run.graph_for("short")
    assert run.stats("extra", step_type="long").index.tolist() == [2, 5, 8, 11]  # several types, none "train": name one (issue 8)


class Planted(pl.LightningModule):
    """An MLP whose loss spikes at `spike_at` and whose recorded helper holds a NaN at `nan_at`."""

    def __init__(self, spike_at: int = -1, nan_at: int = -1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        self.spike_at, self.nan_at = spike_at, nan_at
        self.weights_at_forward: dict[int, torch.Tensor] = {}

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        self.weights_at_forward[self.global_step] = self.net[0].weight.detach().clone()
        out = self.net(x)
        helper = out.detach().clone()
        if self.global_step == self.nan_at:
            helper[0, 0] = float("nan")
        record("helper", helper)
        loss = nn.functional.cross_entropy(out, y)
        if self.global_step == self.spike_at:
            loss = loss * 50
        return {"loss": loss, "flag": torch.tensor(self.global_step == 7)}

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_loss_spike_keeps_the_armed_step_with_weights_from_its_forward_pass(tmp_path: Path) -> None:
    model = Planted(spike_at=15)
    cb = ComgraCallback(str(tmp_path), run_name="spike", schedule=Never(), triggers=[LossSpike(threshold=6.0, min_history=5)])
    quiet_trainer([cb], tmp_path, max_steps=20).fit(model, classification_loader(n_batches=20))
    run = open_run(tmp_path / "spike")
    assert run.steps["step"].tolist() == [15]
    assert run.steps["reason"].tolist() == ["LossSpike"]
    # the decision came after the optimizer step; the weights are those the forward pass used
    weight = model.weights_at_forward[15].double()
    assert run.stats("net.0.weight").loc[15, "mean"] == pytest.approx(weight.mean().item(), rel=1e-5)
    assert set(run.views("net.0.weight")) == {"value", "grad", "update"}
    assert run.neurons("net.0", 15).shape == (5, len(NEURON_STAT_NAMES))  # a kept armed step has its full detail


def test_nonfinite_trigger_next_to_a_schedule(tmp_path: Path) -> None:
    cb = ComgraCallback(str(tmp_path), run_name="nan", schedule=Every(10), triggers=[NonFinite()])
    quiet_trainer([cb], tmp_path, max_steps=14).fit(Planted(nan_at=7), classification_loader(n_batches=20))
    run = open_run(tmp_path / "nan")
    assert list(zip(run.steps["step"], run.steps["reason"])) == [(0, "schedule"), (7, "NonFinite"), (10, "schedule")]
    assert run.stats("helper").loc[7, "nan_count"] == 1


def test_arm_every_and_a_predicate_on_the_outputs(tmp_path: Path) -> None:
    def flagged(outputs: Any, batch: Any) -> bool:
        return bool(outputs["flag"])

    cb = ComgraCallback(str(tmp_path), run_name="pred", schedule=Never(), triggers=[Predicate(flagged)], arm_every=7)
    quiet_trainer([cb], tmp_path, max_steps=15).fit(Planted(), classification_loader(n_batches=20))
    run = open_run(tmp_path / "pred")
    assert list(zip(run.steps["step"], run.steps["reason"])) == [(7, "flagged")]


def test_record_this_step_and_notes(tmp_path: Path) -> None:
    class Forcing(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.global_step == 3:
                record_this_step()
                note("forced at three")
            if self.global_step == 5:
                note("an unrecorded step")
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = ComgraCallback(str(tmp_path), run_name="forced", every_n_steps=4)
    quiet_trainer([cb], tmp_path, max_steps=6).fit(Forcing(), classification_loader())
    run = open_run(tmp_path / "forced")
    assert list(zip(run.steps["step"], run.steps["reason"])) == [(0, "schedule"), (3, "forced"), (4, "schedule")]
    assert run.stats("net.2").index.tolist() == [0, 3, 4]  # called before the forward: modules are captured
    assert run.samples("input", 3).shape == (4, 6)  # the batch of a late start is still captured
    assert run.notes[["step", "text"]].values.tolist() == [[3, "forced at three"], [5, "an unrecorded step"]]
    with pytest.raises(TypeError, match=r"`note\(text=...\)`: expected a string"):
        note(3)  # type: ignore[arg-type]


def test_samples_with_the_highest_per_sample_loss(tmp_path: Path) -> None:
    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
            with torch.no_grad():  # the same forward as the model's, before its update
                h = torch.tanh(module.first(batch["x"]))
                if batch["kind"][0] == "long":
                    h = torch.tanh(module.extra(h))
                losses = nn.functional.cross_entropy(module.head(h), batch["y"], reduction="none")
            self.seen[trainer.global_step] = (batch["x"].clone(), losses)

    probe = Recorder()
    cb = ComgraCallback(str(tmp_path), run_name="topk", n_samples=2, samples=TopK("per_sample_loss"), detail={"per_sample_loss": "samples"})
    quiet_trainer([probe, cb], tmp_path, max_steps=4).fit(KindModel(), kinds_loader())
    run = open_run(tmp_path / "topk")
    for step in range(4):
        x, losses = probe.seen[step]
        top = torch.topk(losses, 2).indices
        assert run.samples("sample_index", step).tolist() == top.tolist()
        np.testing.assert_allclose(run.samples("batch.x", step), x[top].numpy(), rtol=1e-6)
        np.testing.assert_allclose(run.samples("per_sample_loss", step), losses[top].numpy(), rtol=1e-5)
        assert run.samples("per_sample_loss", step)[0] == pytest.approx(losses.max().item(), rel=1e-5)


def test_balanced_and_fixed_dataset_indices(tmp_path: Path) -> None:
    cb = ComgraCallback(str(tmp_path), run_name="balanced", samples=Balanced("y", per_category=1), n_samples=4)
    quiet_trainer([cb], tmp_path, max_steps=3).fit(KindModel(), kinds_loader())
    run = open_run(tmp_path / "balanced")
    data = Kinds()
    for step in range(3):
        labels = data.y[step * 4 : step * 4 + 4].tolist()
        positions = run.samples("sample_index", step).tolist()
        assert [labels[p] for p in positions] == sorted(set(labels))  # one of each class present, in class order
        assert run.samples("batch.y", step).tolist() == [labels[p] for p in positions]

    cb = ComgraCallback(str(tmp_path), run_name="indices", samples=Indices("idx", [1, 6, 7, 40]))
    quiet_trainer([cb], tmp_path, max_steps=3).fit(KindModel(), kinds_loader())
    run = open_run(tmp_path / "indices")
    assert run.samples("sample_dataset_index", 0).tolist() == [1]
    assert run.samples("sample_dataset_index", 1).tolist() == [6, 7]
    assert run.samples("batch.idx", 1).tolist() == [6, 7]
    assert run.samples("batch.x", 2).shape == (0, 6)  # none of the wanted items in this batch


def test_budget_thins_out_in_a_real_run(tmp_path: Path) -> None:
    cb = ComgraCallback(str(tmp_path), run_name="budget", schedule=Budget(Every(1), max_records=5))
    quiet_trainer([cb], tmp_path, max_steps=40).fit(make_mlp_module(), classification_loader(n_batches=40))
    assert open_run(tmp_path / "budget").steps["step"].tolist() == [0, 1, 2, 3, 4, 6, 10, 18, 34]
    state = json.loads(json.dumps(cb.state_dict()))
    assert state["policy"]["schedules"]["*"]["records"] == 9


def test_detail_per_node(tmp_path: Path) -> None:
    detail = {"net.0": "stats", "net.0.weight": "full", "net.1": "samples"}
    cb = ComgraCallback(str(tmp_path), run_name="detail", detail=detail, n_samples=2)
    module = make_mlp_module()
    quiet_trainer([cb], tmp_path, max_steps=2).fit(module, classification_loader())
    run = open_run(tmp_path / "detail")
    with pytest.raises(KeyError, match="no per-neuron statistics"):
        run.neurons("net.0", 0)
    assert run.samples("net.0.weight", 1).shape == (5, 6)  # the whole weight matrix
    assert run.samples("net.1", 0).shape == (2, 5)
    assert run.samples("net.2", 0).shape == (2, 3)  # an output: samples by default
    with pytest.raises(KeyError, match="no samples"):
        run.samples("net.2.bias", 0)  # parameters: statistics and neurons only by default


def test_policy_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"expected one of them, got every_n_steps=5 and schedule=Every\(2\)\. HINT: every_n_steps=n is short"):
        ComgraCallback(every_n_steps=5, schedule=Every(2))
    with pytest.raises(ConfigError, match=r"`ComgraCallback\(detail=...\)`: expected a level"):
        ComgraCallback(detail={"net.*": "all"})
    with pytest.raises(TypeError, match=r"`ComgraCallback\(samples=...\)`: expected 'first' or a sample selector"):
        ComgraCallback(samples="largest")
    with pytest.raises(ConfigError, match=r"`ComgraCallback\(arm_every=...\)`: arming needs triggers"):
        ComgraCallback(arm_every=3)


def test_policy_state_survives_a_checkpoint(tmp_path: Path) -> None:
    first = ComgraCallback(str(tmp_path), run_name="p", schedule=Budget(Every(1), max_records=3), triggers=[LossSpike(min_history=2)])
    quiet_trainer([first], tmp_path, max_steps=6).fit(make_mlp_module(), classification_loader())
    state = json.loads(json.dumps(first.state_dict()))
    second = ComgraCallback(str(tmp_path), run_name="q", schedule=Budget(Every(1), max_records=3), triggers=[LossSpike(min_history=2)])
    second.load_state_dict(state)
    assert second.options.policy.state_dict() == state["policy"]
    history = state["policy"]["triggers"]["LossSpike"]["history"]
    assert 2 <= len(history) <= 6 and all(isinstance(v, float) for v in history)  # spikes stay out of it
    assert state["policy"]["schedules"]["*"]["records"] >= 3


def test_callback_builds_from_yaml() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ComgraCallback, "comgra")
    config = parser.parse_string(
        """
comgra:
  root: runs
  schedule:
    class_path: comgra_callbacks.Decaying
    init_args: {every: [1, 10], until: [100]}
  step_type: kind
  triggers:
    - class_path: comgra_callbacks.LossSpike
      init_args: {threshold: 5.0}
    - class_path: comgra_callbacks.NonFinite
  arm_every: 5
  detail: {"encoder.*": samples, "*.weight": stats}
  samples:
    class_path: comgra_callbacks.TopK
    init_args: {node: per_sample_loss}
"""
    )
    cb = parser.instantiate_classes(config).comgra
    assert isinstance(cb, ComgraCallback)
    assert cb.options.policy.describe() == {
        "schedule": {"*": "Decaying(every=(1, 10), until=(100,))"},
        "step_type": "kind",
        "triggers": ["LossSpike(threshold=5.0, window=100, min_history=20, node='loss')", "NonFinite()"],
        "arm_every": 5,
    }
    assert repr(cb.options.samples) == "TopK('per_sample_loss', k=None, largest=True)"


class Poisoned(pl.LightningModule):
    """From ``nan_at`` on, sample 3 of the first layer's output is NaN; the loss (and then the weights) follow."""

    def __init__(self, nan_at: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        self.nan_at = nan_at
        self.net[0].register_forward_hook(self._poison)

    def _poison(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if self.global_step == self.nan_at:
            out = out.clone()
            out[3, 1] = float("nan")
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("once, after, kept", [(False, 0, [4, 5, 6, 7, 8, 9]), (True, 0, [4]), (True, 2, [4, 5, 6])])
def test_nonfinite_once_keeps_the_first_step_of_a_run(tmp_path: Path, once: bool, after: int, kept: list[int]) -> None:
    cb = ComgraCallback(str(tmp_path), run_name="nan", schedule=Never(), triggers=[NonFinite(once=once, after=after)], n_samples=2)
    quiet_trainer([cb], tmp_path, max_steps=10).fit(Poisoned(nan_at=4), classification_loader(n_batches=10))
    run = open_run(tmp_path / "nan")
    assert run.steps["step"].tolist() == kept and set(run.steps["reason"]) == {"NonFinite"}
    # a triggered step keeps samples of every node, the sample that made it fire first
    assert run.samples("sample_index", 4).tolist()[0] == 3
    hidden = run.samples("net.0", 4)  # an intermediate node: no samples on scheduled steps by default
    assert hidden.shape == (2, 5) and np.isnan(hidden[0, 1]) and np.isfinite(hidden[1]).all()


def test_nonfinite_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"`NonFinite\(after=...\)`: expected an int >= 0"):
        NonFinite(after=-1)
    with pytest.raises(ConfigTypeError, match=r"`NonFinite\(once=...\)`: expected True or False, got 'yes'"):
        NonFinite(once="yes")  # type: ignore[arg-type]
