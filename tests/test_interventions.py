"""Interventions while training: an extra pass per intervention, recorded at the same step, leaving no trace in
training (Lightning and the HF Trainer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from comgra_callbacks import Ablate, ComgraCallback, ConfigError, ConfigTypeError, Every, Patch, open_run
from tests.conftest import classification_loader, quiet_trainer


class Net(pl.LightningModule):
    """Dropout and BatchNorm: an extra pass that consumed random numbers or moved running statistics would
    change the training that follows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def train(tmp: Path, name: str, **kw: Any) -> tuple[Net, Any]:
    torch.manual_seed(1)
    module = Net()
    cb = ComgraCallback(str(tmp / "runs"), run_name=name, **kw)
    quiet_trainer([cb], tmp, max_steps=6).fit(module, classification_loader(n_batches=6))
    return module, open_run(tmp / "runs" / name)


def test_an_ablation_is_recorded_at_the_same_step_and_leaves_training_unchanged(tmp_path: Path) -> None:
    plain, _ = train(tmp_path, "plain", every_n_steps=2)
    ablated, run = train(tmp_path, "ablated", every_n_steps=2, interventions={"ablate": Ablate("net.0", units=[0, 3, 5])})
    steps = run.steps
    assert sorted(zip(steps["step"], steps["step_type"], steps["reason"]), key=lambda r: (r[0], r[1] != "train")) == [
        (0, "train", "schedule"), (0, "ablate", "intervention"), (2, "train", "schedule"),
        (2, "ablate", "intervention"), (4, "train", "schedule"), (4, "ablate", "intervention"),
    ]
    for step in (0, 2, 4):
        neurons = run.neurons("net.0", step, step_type="ablate")
        assert (neurons.loc[[0, 3, 5], ["mean", "abs_mean"]] == 0).all().all()  # the recorded value is after it
        assert (run.neurons("net.0", step, step_type="train").loc[[0, 3, 5], "abs_mean"] > 0).all()
        # the same parameters, a different loss, gradients of the ablated pass
        for stat in ("mean", "l2"):
            assert run.stats("net.4.weight", step_type="ablate").loc[step, stat] == run.stats("net.4.weight", step_type="train").loc[step, stat]
        assert run.stats("loss", step_type="ablate").loc[step, "mean"] != run.stats("loss", step_type="train").loc[step, "mean"]
        ablated_grad = run.stats("net.4.weight", view="grad", step_type="ablate").loc[step, "l2"]
        assert np.isfinite(ablated_grad) and ablated_grad != run.stats("net.4.weight", view="grad", step_type="train").loc[step, "l2"]
    # no optimizer step follows the extra pass: it has no update
    assert run.stats("net.0.weight", view="update", step_type="train").index.tolist() == [0, 2, 4]
    assert run.stats("net.0.weight", view="update", step_type="ablate").empty
    # the training that followed is bit for bit the one without interventions
    for (name, a), (_, b) in zip(plain.state_dict().items(), ablated.state_dict().items()):
        assert torch.equal(a, b), name
    assert run.graph_for("ablate") is not None and "net.0" in run.graph_for("ablate")


def test_modes_schedule_and_patches(tmp_path: Path) -> None:
    source = torch.zeros(8, 8)
    source[:, 2] = 5.0
    other = next(iter(classification_loader(n_batches=1, seed=3)))
    _, run = train(
        tmp_path, "modes", every_n_steps=1, intervention_schedule=Every(3),
        interventions={
            "mean": Ablate("net.0", mode="mean"),
            "resample": Ablate("net.0", units=[1], mode="resample"),
            "patch": Patch("net.0", source=source, units=[2]),
            "other": Patch("net.0", source=other),
        },
    )
    assert sorted(run.steps[run.steps["step_type"] != "train"]["step"].unique().tolist()) == [0, 3]
    normal = run.neurons("net.0", 3, step_type="train")
    mean = run.neurons("net.0", 3, step_type="mean")
    np.testing.assert_allclose(mean["mean"], normal["mean"], rtol=1e-5, atol=1e-6)
    assert (mean["std"] < 1e-6).all()  # every sample holds the batch mean
    resample = run.neurons("net.0", 3, step_type="resample")
    assert resample.loc[1, "mean"] == pytest.approx(normal.loc[1, "mean"], rel=1e-5)  # a permutation of the batch
    np.testing.assert_allclose(resample.drop(index=1)["mean"], normal.drop(index=1)["mean"], rtol=1e-6)
    patched = run.neurons("net.0", 3, step_type="patch")
    assert patched.loc[2, "mean"] == pytest.approx(5.0) and patched.loc[2, "std"] == 0
    assert run.neurons("net.0", 3, step_type="other")["mean"].tolist() != normal["mean"].tolist()


def test_bad_interventions_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`ComgraCallback\(interventions=...\)`: expected names other than \['test', 'train', 'val'\]"):
        ComgraCallback(str(tmp_path), interventions={"train": Ablate("net.0")})
    with pytest.raises(ConfigTypeError, match=r"expected Ablate\(...\) or Patch\(...\) for 'x', got 3"):
        ComgraCallback(str(tmp_path), interventions={"x": 3})
    with pytest.raises(ConfigError, match=r"`Ablate\(mode=...\)`: expected one of \['zero', 'mean', 'resample'\], got 'half'"):
        Ablate("net.0", mode="half")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"intervention_schedule=...\)`: expected interventions= too"):
        ComgraCallback(str(tmp_path), intervention_schedule=Every(2))
    with pytest.raises(ConfigError, match=r"intervention on 'net.9': the model has no such module"):
        train(tmp_path, "missing", interventions={"x": Ablate("net.9")})


def test_manual_optimization_is_refused(tmp_path: Path) -> None:
    class Manual(Net):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            opt.step()

    cb = ComgraCallback(str(tmp_path), interventions={"x": Ablate("net.0")})
    with pytest.raises(ConfigError, match=r"expected a LightningModule with automatic optimization"):
        quiet_trainer([cb], tmp_path, max_steps=2).fit(Manual(), classification_loader())


def test_hf_trainer_interventions(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import Trainer

    from comgra_callbacks import ComgraTrainerCallback
    from tests.integrations.tiny_hf import MaskedTokens, tiny_bert, training_args

    node = "bert.encoder.layer.0.attention.self"
    cb = ComgraTrainerCallback(str(tmp_path / "runs"), run_name="hf", every_n_steps=2, interventions={"heads": Ablate(node)})
    Trainer(model=tiny_bert(), args=training_args(str(tmp_path / "out"), max_steps=3), train_dataset=MaskedTokens(), callbacks=[cb]).train()
    run = open_run(tmp_path / "runs" / "hf")
    assert sorted(zip(run.steps["step"], run.steps["step_type"])) == [(0, "heads"), (0, "train"), (2, "heads"), (2, "train")]
    name = node if node in run.nodes else f"{node}:0"  # its first output (HF attention returns a tuple)
    assert run.stats(name, step_type="heads").loc[0, "abs_mean"] == 0 and run.stats(name, step_type="train").loc[0, "abs_mean"] > 0
    assert run.stats("loss", step_type="heads").loc[2, "mean"] != run.stats("loss", step_type="train").loc[2, "mean"]


def test_patch_from_a_recorded_step_of_the_same_run_and_of_a_finished_one(tmp_path: Path) -> None:
    from comgra_callbacks import RecordedStep, Steps

    full = {"net.0": "full"}
    _, run = train(
        tmp_path, "own", every_n_steps=2, detail=full, intervention_schedule=Steps([4]),
        interventions={"from0": Patch("net.0", source=RecordedStep(0)), "from2": Patch("net.0", source=RecordedStep(2), units=[1])},
    )
    step0 = run.samples("net.0", 0, step_type="train")
    assert step0.shape == (8, 8)
    np.testing.assert_array_equal(run.samples("net.0", 4, step_type="from0"), step0)  # the value after the patch
    assert not np.array_equal(run.samples("net.0", 4, step_type="train"), step0)
    np.testing.assert_array_equal(run.samples("net.0", 4, step_type="from2")[:, 1], run.samples("net.0", 2, step_type="train")[:, 1])
    assert run.meta["config"]["interventions"]["from0"]["source"] == {"step": 0, "step_type": "train", "run": None}
    # a finished run as the source, by its path
    _, other = train(tmp_path, "other", every_n_steps=3, detail=full, interventions={"old": Patch("net.0", source=RecordedStep(2, run=run.uri))})
    np.testing.assert_array_equal(other.samples("net.0", 3, step_type="old"), run.samples("net.0", 2, step_type="train"))


def test_patch_from_a_recorded_step_names_what_is_missing(tmp_path: Path) -> None:
    from comgra_callbacks import RecordedStep, RecordingError, Steps

    with pytest.raises(ConfigError, match=r"`RecordedStep\(step=...\)`: expected a non-negative int, got -1"):
        RecordedStep(-1)
    with pytest.raises(ConfigTypeError, match=r"`RecordedStep\(run=...\)`: expected None \(this run\), a Run or a run's path or URL, got int"):
        RecordedStep(0, run=3)
    # net.2 keeps only per-neuron statistics by default: nothing to patch from
    with pytest.raises(RecordingError, match=r"no recorded values of 'net.2' at step 0 \('train'\).*HINT: record the node in full"):
        train(tmp_path, "stats", every_n_steps=2, intervention_schedule=Steps([2]), interventions={"p": Patch("net.2", source=RecordedStep(0))})
    # a step that is not recorded (yet)
    with pytest.raises(RecordingError, match=r"no recorded values of 'net.0' at step 4"):
        train(tmp_path, "later", every_n_steps=2, detail={"net.0": "full"}, intervention_schedule=Steps([2]), interventions={"p": Patch("net.0", source=RecordedStep(4))})
    # the output keeps n_samples samples only, not the batch
    with pytest.raises(RecordingError, match=r"the source has shape \[4, 3\], the output \[8, 3\].*HINT: .*detail=\{'net.4': 'full'\}"):
        train(tmp_path, "samples", every_n_steps=2, intervention_schedule=Steps([2]), interventions={"p": Patch("net.4", source=RecordedStep(0))})


def test_hf_trainer_patch_from_a_recorded_step(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import Trainer

    from comgra_callbacks import ComgraTrainerCallback, RecordedStep, Steps
    from tests.integrations.tiny_hf import MaskedTokens, tiny_bert, training_args

    node = "bert.encoder.layer.0.intermediate"
    cb = ComgraTrainerCallback(
        str(tmp_path / "runs"), run_name="hf", every_n_steps=2, detail={node: "full"}, intervention_schedule=Steps([2]),
        interventions={"from0": Patch(node, source=RecordedStep(0))},
    )
    Trainer(model=tiny_bert(), args=training_args(str(tmp_path / "out"), max_steps=3), train_dataset=MaskedTokens(), callbacks=[cb]).train()
    run = open_run(tmp_path / "runs" / "hf")
    step0 = run.samples(node, 0, step_type="train")
    assert step0.shape == (4, 12, 64)
    np.testing.assert_array_equal(run.samples(node, 2, step_type="from0"), step0)
    assert not np.array_equal(run.samples(node, 2, step_type="train"), step0)
