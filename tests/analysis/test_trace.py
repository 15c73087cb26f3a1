"""trace / first_anomaly on tiny real trainings with one planted NaN or ×1000 value (in a value or a gradient)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from comgra_callbacks import ConfigError, StepNotFoundError, analysis
from comgra_callbacks.analysis.trace import COLUMNS
from tests.analysis._planted import Plant, train

PLANTS = {
    # block returns block.act's output ("same" edge): the child is the origin, not the block
    "value_nan": Plant("block.act", step=4, sample=2, how="nan"),
    "value_scale": Plant("block.lin", step=5, sample=1, how="scale"),
    "grad_nan": Plant("mid", step=3, sample=2, how="nan", grad=True),
    "grad_scale": Plant("block.lin", step=4, sample=3, how="scale", grad=True),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root: Path = tmp_path_factory.mktemp("planted")
    runs = {name: train(root, name, plant=plant) for name, plant in PLANTS.items()}
    runs["clean"] = train(root, "clean")
    return runs


def test_first_anomaly_names_the_planted_nan(planted):
    plant = PLANTS["value_nan"]
    found = analysis.first_anomaly(planted["value_nan"])
    assert found is not None
    assert (found["step"], found["origin"]) == (plant.step, [plant.node])
    assert {"block", "mid", "head", "loss"} <= set(found["nonfinite"]) and "block.lin" not in found["nonfinite"]
    assert found["step_type"] == "train" and found["reason"]


def test_trace_of_the_planted_nan_in_dependency_order(planted):
    run = planted["value_nan"]
    frame = analysis.trace(run, PLANTS["value_nan"].step)
    assert list(frame.columns) == COLUMNS and frame.attrs["mode"] == "non-finite"
    order = list(frame["node"])
    assert order.index("embed") < order.index("block.lin") < order.index("block.act") < order.index("block") < order.index("mid") < order.index("loss")
    assert list(frame.loc[frame["origin"], "node"]) == ["block.act"]
    assert frame.set_index("node").loc["block.act", "nan_count"] == 1


def test_a_gradient_nan_is_traced_backwards(planted):
    plant = PLANTS["grad_nan"]
    run = planted["grad_nan"]
    found = analysis.first_anomaly(run, view="grad")
    assert found is not None and (found["step"], found["origin"]) == (plant.step, [plant.node])
    frame = analysis.trace(run, plant.step, view="grad")
    order = list(frame["node"])
    assert order.index("loss") < order.index("head") < order.index("mid") < order.index("embed")
    assert not frame.set_index("node").loc[["head", "relu"], "anomalous"].any()
    # the values were finite at that step; the NaN reached them through the update, one step later
    assert analysis.first_anomaly(run)["step"] == plant.step + 1


@pytest.mark.parametrize("name", ["value_scale", "grad_scale"])
def test_trace_names_the_planted_outlier_and_its_sample(planted, name):
    plant = PLANTS[name]
    run = planted[name]
    view = "grad" if plant.grad else "value"
    assert analysis.first_anomaly(run, view=view) is None, "×1000 stays finite"
    frame = analysis.trace(run, plant.step, view=view)
    assert frame.attrs["mode"] == "outlier"
    origin = frame.loc[frame["origin"]]
    assert list(origin["node"]) == [plant.node]
    assert origin["sample"].item() == plant.sample and origin["z"].item() > 100
    followed = analysis.trace(run, plant.step, view=view, sample=plant.sample).set_index("node")
    assert followed.loc[plant.node, "z"] == pytest.approx(origin["z"].item())
    other = (plant.sample + 1) % 4
    assert not analysis.trace(run, plant.step, view=view, sample=other)["anomalous"].any()
    before = analysis.trace(run, plant.step - 1, view=view)
    assert not before["anomalous"].any()


def test_nothing_is_anomalous_in_a_clean_run(planted):
    run = planted["clean"]
    assert analysis.first_anomaly(run) is None and analysis.first_anomaly(run, view="grad") is None
    for step in run.steps["step"]:
        for view in ("value", "grad"):
            frame = analysis.trace(run, int(step), view=view)
            assert not frame["anomalous"].any(), (step, view, frame.loc[frame["z"] > 0, ["node", "z"]])
            assert frame["z"].max() < analysis.Z_THRESHOLD


def test_parameters_and_scalars_have_no_z(planted):
    frame = analysis.trace(planted["clean"], 2).set_index("node")
    assert np.isnan(frame.loc["mid.weight", "z"]) and np.isnan(frame.loc["loss", "z"])
    assert frame.loc["input", "z"] > 0


def test_trace_says_what_is_wrong(planted):
    run = planted["clean"]
    with pytest.raises(StepNotFoundError, match=r"batch position 9 has no recorded samples"):
        analysis.trace(run, 2, sample=9)
    with pytest.raises(ConfigError, match=r"threshold=.*got 0"):
        analysis.trace(run, 2, threshold=0)
    with pytest.raises(StepNotFoundError, match=r"no record of step 999"):
        analysis.trace(run, 999)


def test_sample_z_leaves_the_sample_out():
    rng = np.random.default_rng(1)
    clean = rng.standard_normal((16, 32))

    def against_whole(factor: float) -> float:
        scaled = clean.copy()
        scaled[5] *= factor
        return float(np.abs(scaled[5] - scaled.mean()).max() / scaled.std(ddof=1))

    # the masking the leave-out avoids: against the whole batch, ×1000 looks no worse than ×20
    assert against_whole(1000.0) == pytest.approx(against_whole(20.0), rel=0.05) and against_whole(1000.0) < 13
    batch = clean.copy()
    batch[5] *= 1000.0
    n, mean, l2 = batch.size, batch.mean(), float(np.sqrt((batch**2).sum()))
    rest = np.delete(batch, 5, axis=0)
    expected = np.abs(batch[5] - rest.mean()).max() / rest.std(ddof=1)
    assert analysis.sample_z(batch[5], n, mean, l2) == pytest.approx(expected, rel=1e-6)
    assert expected > 1000
    assert analysis.sample_z(batch[0], n, mean, l2) < 1.0


def test_a_step_kept_by_the_nonfinite_trigger_is_traced(tmp_path):
    from comgra_callbacks import Never, NonFinite

    plant = Plant("block.lin", step=3, sample=1, how="nan")
    run = train(tmp_path, "triggered", plant=plant, steps=6, schedule=Never(), triggers=[NonFinite()])
    kept = run.steps
    assert int(kept["step"].min()) == plant.step and set(kept["reason"]) == {NonFinite().name}
    found = analysis.first_anomaly(run)
    assert found == {**found, "step": plant.step, "origin": [plant.node], "reason": NonFinite().name}


def test_samples_chosen_by_a_selector_are_named_by_batch_position(tmp_path):
    from comgra_callbacks import TopK

    plant = Plant("block.lin", step=2, sample=11, how="scale")  # beyond the first 4: only TopK keeps it
    run = train(tmp_path, "topk", plant=plant, steps=4, per_sample=True, samples=TopK("per_sample_loss", k=4))
    positions, _ = analysis.sample_positions(run, plant.step, None, 4)
    assert plant.sample in set(positions.tolist()) and list(positions) != [0, 1, 2, 3]
    frame = analysis.trace(run, plant.step)
    origin = frame.loc[frame["origin"]]
    assert list(origin["node"]) == [plant.node] and origin["sample"].item() == plant.sample
    assert analysis.trace(run, plant.step, sample=plant.sample).set_index("node").loc[plant.node, "anomalous"]
