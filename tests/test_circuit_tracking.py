"""Circuits over training: attribution-patching scores of a fixed pair, stored on recorded steps, leaving
training unchanged (Lightning and the HF Trainer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from comgra_callbacks import CircuitTracking, ComgraCallback, ConfigError, ConfigTypeError, Steps, open_run
from comgra_callbacks.analysis import attribution_patching
from tests.conftest import classification_loader, quiet_trainer
from tests.test_interventions import Net as _Net


class Net(_Net):
    """The interventions' network (Dropout, BatchNorm), callable on its inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

CLEAN = torch.randn(3, 6, generator=torch.Generator().manual_seed(7))
CORRUPTED = torch.randn(3, 6, generator=torch.Generator().manual_seed(8))
NODES = ["net.0", "net.2"]


def train(tmp: Path, name: str, **kw: Any) -> tuple[Net, Any]:
    torch.manual_seed(1)
    module = Net()
    cb = ComgraCallback(str(tmp / "runs"), run_name=name, **kw)
    quiet_trainer([cb], tmp, max_steps=6).fit(module, classification_loader(n_batches=6))
    return module, open_run(tmp / "runs" / name)


def test_scores_are_stored_per_step_and_training_is_unchanged(tmp_path: Path) -> None:
    plain, _ = train(tmp_path, "plain", every_n_steps=2)
    tracked, run = train(tmp_path, "tracked", every_n_steps=2, circuit_tracking=CircuitTracking(CLEAN, CORRUPTED, NODES))
    # Dropout and BatchNorm in training mode: a tracking pass that left eval mode on, consumed random numbers,
    # moved running statistics or touched gradients would change the parameters that follow
    for (name, a), (_, b) in zip(plain.state_dict().items(), tracked.state_dict().items()):
        assert torch.equal(a, b), name
    scores = run.circuit_scores()
    assert list(scores.columns) == ["step", "node", "unit", "score", "effect"]
    assert scores["step"].unique().tolist() == [0, 2, 4]  # the steps the schedule records
    assert len(scores) == 3 * (8 + 8) and run.circuits == ["circuit"]
    # step 0: the model before any update, scored directly
    torch.manual_seed(1)
    fresh = Net().eval()
    expected = attribution_patching(fresh, CLEAN, CORRUPTED, NODES).sort_values(["node", "unit"]).reset_index(drop=True)
    at0 = scores[scores["step"] == 0].reset_index(drop=True)
    assert at0["node"].tolist() == expected["node"].tolist() and at0["unit"].tolist() == expected["unit"].tolist()
    np.testing.assert_allclose(at0["score"], expected["score"], rtol=1e-5)
    np.testing.assert_allclose(at0["effect"], expected["effect"], rtol=1e-4, atol=1e-6)
    # the scores follow training
    at4 = scores[scores["step"] == 4].reset_index(drop=True)
    assert not np.allclose(at0["score"], at4["score"])
    # they are not logged scalars, and the run's configuration says what was tracked
    assert not run.scalars["name"].str.startswith("circuit/").any()
    assert run.meta["config"]["circuit_tracking"]["circuit"]["nodes"] == NODES


def test_own_schedule_several_circuits_and_node_units(tmp_path: Path) -> None:
    _, run = train(
        tmp_path, "two", every_n_steps=3,
        circuit_tracking={"a": CircuitTracking(CLEAN, CORRUPTED, "net.2", schedule=Steps([1, 5])),
                          "whole": CircuitTracking(CLEAN, CORRUPTED, NODES, units="node")},
    )
    assert run.circuits == ["a", "whole"]
    assert run.circuit_scores("a")["step"].unique().tolist() == [1, 5]
    whole = run.circuit_scores("whole")
    assert whole["step"].unique().tolist() == [0, 3] and whole["unit"].unique().tolist() == [-1]
    with pytest.raises(ConfigError, match=r"`Run.circuit_scores\(name=...\)`: run 'two' tracked several circuits; expected one of \['a', 'whole'\], got None"):
        run.circuit_scores()
    with pytest.raises(ConfigError, match=r"expected one of \['a', 'whole'\] \(the circuits tracked in run 'two'\), got 'b'"):
        run.circuit_scores("b")
    _, bare = train(tmp_path, "bare", every_n_steps=3)
    assert bare.circuits == [] and bare.circuit_scores().empty


def test_mode_gradients_and_rng_are_left_as_they_were() -> None:
    torch.manual_seed(0)
    model = Net().train()
    model.net[4].eval()  # a mixed mode is restored module by module
    loss = model.net(torch.randn(8, 6)).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = torch.get_rng_state()
    table = CircuitTracking(CLEAN, CORRUPTED, NODES).scores(model)
    assert isinstance(table, pd.DataFrame) and len(table) == 16
    assert model.training and model.net[0].training and not model.net[4].training
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), before)


def test_bad_circuit_tracking_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigTypeError, match=r"`ComgraCallback\(circuit_tracking=...\)`: expected CircuitTracking\(clean, corrupted, nodes\) or a dict"):
        ComgraCallback(str(tmp_path), circuit_tracking=["net.0"])
    with pytest.raises(ConfigError, match=r"expected non-empty names without '/', got 'a/b'"):
        ComgraCallback(str(tmp_path), circuit_tracking={"a/b": CircuitTracking(CLEAN, CORRUPTED, "net.0")})
    with pytest.raises(ConfigTypeError, match=r"`CircuitTracking\(schedule=...\)`: expected a schedule such as Every\(50\) or None, got 5"):
        CircuitTracking(CLEAN, CORRUPTED, "net.0", schedule=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigTypeError, match=r"`CircuitTracking\(nodes=...\)`: expected a module name or a non-empty list of names, got \[\]"):
        CircuitTracking(CLEAN, CORRUPTED, [])
    with pytest.raises(ConfigError, match=r"`CircuitTracking`: expected `clean` and `corrupted` of the same shape"):
        CircuitTracking(CLEAN, CORRUPTED[:2], "net.0")
    from comgra_callbacks.errors import NodeNotFoundError

    with pytest.raises(NodeNotFoundError, match=r"the model has no module 'net.9'"):
        train(tmp_path, "missing", circuit_tracking=CircuitTracking(CLEAN, CORRUPTED, "net.9"))


def test_hf_trainer_circuit_tracking(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import Trainer

    from comgra_callbacks import ComgraTrainerCallback
    from tests.integrations.tiny_hf import MaskedTokens, tiny_bert, training_args

    data = MaskedTokens()
    clean = {"input_ids": data[0]["input_ids"][None]}
    corrupted = {"input_ids": data[1]["input_ids"][None]}
    node = "bert.encoder.layer.1.intermediate"

    def fit(name: str, **kw: Any) -> Any:
        model = tiny_bert()
        cb = ComgraTrainerCallback(str(tmp_path / "runs"), run_name=name, every_n_steps=2, **kw)
        Trainer(model=model, args=training_args(str(tmp_path / name), max_steps=3), train_dataset=data, callbacks=[cb]).train()
        return model

    plain = fit("plain")
    tracked = fit("tracked", circuit_tracking=CircuitTracking(clean, corrupted, node))
    for (name, a), (_, b) in zip(plain.state_dict().items(), tracked.state_dict().items()):
        assert torch.equal(a, b), name
    scores = open_run(tmp_path / "runs" / "tracked").circuit_scores()
    assert scores["step"].unique().tolist() == [0, 2] and set(scores["node"]) == {node} and len(scores) == 2 * 64
    assert np.isfinite(scores["score"]).all()
