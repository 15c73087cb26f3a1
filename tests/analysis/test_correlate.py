"""correlate on a tiny real training whose loss is driven by a recorded tensor ("gain"), and the p-values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from comgra_callbacks import ConfigError, NodeNotFoundError, analysis
from comgra_callbacks.analysis.correlate import COLUMNS, betainc, correlation_p_value
from tests.analysis._planted import train

STEPS = 30


@pytest.fixture(scope="module")
def driven(tmp_path_factory: pytest.TempPathFactory):
    rng = np.random.default_rng(3)
    drive = list(np.exp(1.5 * rng.standard_normal(STEPS)))  # heavy-tailed: a few steps spike the loss
    return train(tmp_path_factory.mktemp("driven"), "driven", drive=drive, steps=STEPS)


def test_the_driver_ranks_first(driven):
    frame = analysis.correlate(driven, "loss")
    assert list(frame.columns) == COLUMNS
    assert frame.loc[0, "node"] == "gain"
    assert frame.loc[0, "rho"] > 0.9 and frame.loc[0, "p_value"] < 1e-6 and frame.loc[0, "n"] == STEPS
    assert "loss" not in set(frame["node"]), "the target itself is left out"
    others = frame[frame["node"] != "gain"]
    assert others["rho"].abs().max() < frame.loc[0, "rho"]
    assert frame["rho"].abs().is_monotonic_decreasing
    assert {"value", "grad", "update"} <= set(frame["view"])


def test_a_logged_scalar_as_target(driven):
    assert "train_loss" in set(driven.scalars["name"])
    frame = analysis.correlate(driven, "train_loss", method="pearson")
    assert frame.loc[0, "node"] == "loss" and frame.loc[0, "rho"] == pytest.approx(1.0, abs=1e-6)  # the same number
    assert frame.loc[frame["node"] != "loss", "node"].iloc[0] == "gain"


def test_correlate_says_what_is_wrong(driven):
    with pytest.raises(NodeNotFoundError, match=r"no node or scalar 'nope'"):
        analysis.correlate(driven, "nope")
    with pytest.raises(ConfigError, match=r"method=.*got 'kendall'"):
        analysis.correlate(driven, "loss", method="kendall")


@pytest.mark.parametrize("r,n,expected", [(0.5, 10, 0.141113), (0.3, 30, 0.107246), (-0.9, 5, 0.037386), (0.0, 12, 1.0)])
def test_p_value_matches_the_t_distribution(r, n, expected):
    # reference: 2 * the t density (n-2 dof) integrated numerically from |t| = |r| sqrt((n-2)/(1-r^2)) outwards
    assert correlation_p_value(r, n) == pytest.approx(expected, abs=2e-6)


def test_betainc_against_closed_forms():
    for x in (0.1, 0.5, 0.9):
        assert betainc(1.0, 1.0, x) == pytest.approx(x)
        assert betainc(2.0, 1.0, x) == pytest.approx(x * x)
        assert betainc(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)))
