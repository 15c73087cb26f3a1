"""Per-sample attribution of parameter updates (``attribution=``), with a real Lightning Trainer.

A planted item: one training item alone has a large value on an input feature that every other item has at
zero, so only it moves the weights of that feature. The recorded factors must rank it first, the
contributions must add up to the recorded update (plain SGD), the factors must equal ``torch.func``'s
per-sample gradients, and Adam's preconditioned shares must relate consecutive recorded updates exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from comgra_callbacks import ComgraCallback, open_run
from comgra_callbacks.analysis import contributions, influence, top_items, update_outliers
from comgra_callbacks.errors import ConfigError, ConfigTypeError, NodeNotFoundError

from .conftest import quiet_trainer

N_ITEMS, N_IN, HIDDEN, N_OUT, BATCH = 32, 6, 5, 3, 8
PLANTED, FEATURE = 17, N_IN - 1
W0 = "net.0.weight"
NEURON = 0  # the hidden unit the planted item drives (the largest weight towards its far-off target)


class Items(torch.utils.data.Dataset):
    """``{"x", "y", "idx"}`` items; feature ``FEATURE`` is zero for every item but ``PLANTED`` (where it is 8)."""

    def __init__(self, layout: str = "dict") -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(N_ITEMS, N_IN, generator=g)
        self.x[:, FEATURE] = 0.0
        self.x[PLANTED, FEATURE] = 3.0
        self.y = torch.randn(N_ITEMS, N_OUT, generator=g)
        self.y[PLANTED] = 6.0  # far from what the model predicts: a large gradient
        self.layout = layout

    def __len__(self) -> int:
        return N_ITEMS

    def __getitem__(self, i: int) -> Any:
        if self.layout == "dict":
            return {"x": self.x[i], "y": self.y[i], "idx": i}
        if self.layout == "tuple3":
            return self.x[i], self.y[i], i
        return self.x[i], self.y[i]


class Regressor(pl.LightningModule):
    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, **opt: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(N_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, N_OUT))
        self.optimizer, self.lr, self.opt = optimizer, lr, opt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else (batch[0], batch[1])
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[self.optimizer]
        return kind(self.parameters(), lr=self.lr, **self.opt)


def fit(tmp: Path, name: str, module: pl.LightningModule, *, layout: str = "dict", steps: int = 12, **cb: Any) -> Any:
    callback = ComgraCallback(str(tmp), run_name=name, **{"writer": "thread", **cb})
    loader = torch.utils.data.DataLoader(Items(layout), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1))
    quiet_trainer([callback], tmp, max_steps=steps).fit(module, loader)
    return open_run(tmp / name)


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("attr")
    return fit(tmp, "sgd", Regressor("sgd", lr=0.05), attribution="net.*", detail={"net.0.weight": "full"})


# ------------------------------------------------------------------------------------ recording
def test_every_step_has_factors_with_dataset_indices(sgd_run: Any) -> None:
    assert sgd_run.attribution_steps(W0) == list(range(12))
    a = sgd_run.attribution(W0, 3)
    assert a.inputs.shape == (BATCH, 1, N_IN) and a.grad_outputs.shape == (BATCH, 1, HIDDEN)
    assert a.optimizer == "sgd" and a.lr == pytest.approx(0.05) and a.share == 1.0 and a.precond is None
    assert a.index_from_batch
    seen = np.concatenate([sgd_run.attribution(W0, s).dataset_index for s in range(4)])
    assert sorted(seen.tolist()) == list(range(N_ITEMS))  # one epoch: every item once
    x = Items().x.numpy()
    np.testing.assert_allclose(a.inputs[:, 0], x[a.dataset_index], rtol=1e-6)  # the index names the item
    assert "attribution:input" not in sgd_run.views(W0)  # the factors stay out of the dashboard's views


@pytest.mark.parametrize(("writer", "reduce_where"), [("thread", None), ("process", "writer"), ("process", "training")])
def test_factor_series_keep_counts_but_no_statistics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str, reduce_where: str | None) -> None:
    """Nobody reads statistics of the factors (they were the largest cost of a step): only numel and the NaN
    and inf counts are stored for them, on every path statistics take; the update keeps its statistics."""
    if reduce_where is not None:
        monkeypatch.setenv("COMGRA_REDUCE", reduce_where)
    run = fit(tmp_path, writer, Regressor("sgd", lr=0.05), steps=3, attribution="net.0.weight", writer=writer)
    assert run.attribution_steps(W0) == [0, 1, 2]
    factors = run.stats(W0, view="attribution:input")
    assert factors["numel"].tolist() == [BATCH * N_IN] * 3
    assert (factors["nan_count"] == 0).all() and (factors["inf_count"] == 0).all()
    assert factors[["mean", "std", "min", "max", "l2"]].isna().all().all()
    update = run.stats(W0, view="update")
    assert update["l2"].notna().all() and (update["l2"] > 0).all()
    a = run.attribution(W0, 1)
    np.testing.assert_allclose(a.per_sample_updates().sum(axis=0), a.update, rtol=1e-4, atol=1e-7)


def test_per_sample_updates_sum_to_the_recorded_update(sgd_run: Any) -> None:
    for step in sgd_run.attribution_steps(W0):
        for param in (W0, "net.0.bias", "net.2.weight"):
            a = sgd_run.attribution(param, step)
            np.testing.assert_allclose(a.per_sample_updates().sum(axis=0), a.update, atol=1e-7, rtol=1e-4)
        # the recorded update is also the one the ordinary detail path stored
        np.testing.assert_allclose(sgd_run.samples(W0, step, view="update"), sgd_run.attribution(W0, step).update, atol=1e-8)


def test_contributions_sum_to_the_update_norm(sgd_run: Any) -> None:
    for step in (0, 5, 11):
        whole = contributions(sgd_run, W0, step)
        assert list(whole.columns) == ["sample_index", "dataset_index", "contribution"] and len(whole) == BATCH
        assert whole["contribution"].sum() == pytest.approx(whole.attrs["update_norm"], rel=1e-4)
        for neuron in range(HIDDEN):
            one = contributions(sgd_run, W0, step, neuron=neuron)
            norm = float(np.linalg.norm(sgd_run.attribution(W0, step).update[neuron]))
            assert one.attrs["update_norm"] == pytest.approx(norm, rel=1e-6)
            assert one["contribution"].sum() == pytest.approx(norm, rel=1e-4, abs=1e-9)


def test_planted_item_ranks_first(sgd_run: Any) -> None:
    top = top_items(sgd_run, W0, NEURON, k=3)
    assert list(top.columns) == ["dataset_index", "score", "steps"]
    assert int(top["dataset_index"].iloc[0]) == PLANTED, top
    assert top["score"].iloc[0] > 3 * top["score"].iloc[1]
    assert len(top["steps"].iloc[0]) == 3  # 12 steps of 4 batches per epoch: the planted item is in 3 of them


def test_outliers_are_the_planted_items_steps(sgd_run: Any) -> None:
    planted_steps = {s for s in sgd_run.attribution_steps(W0) if PLANTED in sgd_run.attribution(W0, s).dataset_index}
    out = update_outliers(sgd_run, W0, z=4.0)
    assert list(out.columns) == ["step", "neuron", "update_norm", "z"]
    assert len(out) and set(out["step"]) <= planted_steps, out
    neuron = int(out["neuron"].iloc[0])
    top = top_items(sgd_run, W0, neuron, k=2, over="outliers")
    assert int(top["dataset_index"].iloc[0]) == PLANTED
    assert set(top.attrs["steps"]) <= planted_steps


def test_neuron_series_reads_l2_of_the_update_rows(sgd_run: Any) -> None:
    series = sgd_run.neuron_series(W0, view="update", statistic="l2")
    assert series.shape == (12, HIDDEN) and series.index.name == "step" and not series.attrs["derived"]  # stored
    for step in (0, 7):
        np.testing.assert_allclose(series.loc[step].to_numpy(), np.linalg.norm(sgd_run.samples(W0, step, view="update"), axis=1), rtol=1e-4)
    # a store from before per-neuron l2 (mean, std, abs_mean only): l2 derived from mean, std and the count
    stored = sgd_run.neuron_stat_names
    try:
        sgd_run.neuron_stat_names = ["mean", "std", "abs_mean"]
        derived = sgd_run.neuron_series(W0, view="update", statistic="l2")
    finally:
        sgd_run.neuron_stat_names = stored
    assert derived.attrs["derived"]
    np.testing.assert_allclose(derived.to_numpy(), series.to_numpy(), rtol=1e-4)
    means = sgd_run.neuron_series(W0, view="update", statistic="mean")
    np.testing.assert_allclose(means.loc[4].to_numpy(), sgd_run.neurons(W0, 4, view="update")["mean"].to_numpy())
    value = sgd_run.neuron_series("net.1", view="value", statistic="l2")  # an activation: rows of the batch
    assert value.shape[1] == HIDDEN


def test_influence_is_tracin(sgd_run: Any) -> None:
    first = next(s for s in sgd_run.attribution_steps(W0) if PLANTED in sgd_run.attribution(W0, s).dataset_index)
    a = sgd_run.attribution(W0, first)
    test_grad = np.zeros((HIDDEN, N_IN))  # a test item like the planted one, through its unique feature only
    test_grad[:, FEATURE] = a.per_sample_grads()[list(a.dataset_index).index(PLANTED)][:, FEATURE]
    scores = influence(sgd_run, W0, test_grad)
    assert list(scores.columns) == ["dataset_index", "influence", "steps"]
    assert int(scores["dataset_index"].iloc[0]) == PLANTED and scores["influence"].iloc[0] > 0
    assert np.abs(scores["influence"].iloc[1:]).max() < 1e-12  # no other item has that feature
    # by hand: sum over steps of lr * <per-example gradient, test gradient>
    want = 0.0
    for step in sgd_run.attribution_steps(W0):
        a = sgd_run.attribution(W0, step)
        grads = a.per_sample_grads() * a.batch_size
        for item, g in zip(a.dataset_index, grads):
            if item == PLANTED:
                want += a.lr * float((g * test_grad).sum())
    assert scores["influence"].iloc[0] == pytest.approx(want, rel=1e-4)
    other = np.random.default_rng(0).normal(size=(HIDDEN, N_IN))
    per_step = influence(sgd_run, W0, {0: other, 1: other})
    assert per_step.attrs["steps"] == [0, 1]


# ------------------------------------------------------- attribution_keep="contributions" (compact)
@pytest.fixture(scope="module")
def compact_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The run of ``sgd_run`` again (same seeds), keeping only each sample's contribution per neuron."""
    tmp = tmp_path_factory.mktemp("attr_compact")
    return fit(tmp, "compact", Regressor("sgd", lr=0.05), attribution="net.*", attribution_keep="contributions", detail={"net.0.weight": "full"})


def test_compact_mode_keeps_contributions_not_factors(compact_run: Any, sgd_run: Any) -> None:
    assert compact_run.attribution_steps(W0) == list(range(12))
    a = compact_run.attribution(W0, 3)
    assert a.keep == "contributions" and not a.has_factors
    assert a.inputs is None and a.grad_outputs is None and a.update is None and a.precond is None
    assert a.contributions.shape == (BATCH, HIDDEN) and a.update_norms.shape == (HIDDEN,) and a.shape == (HIDDEN,)
    np.testing.assert_allclose(a.update_norms, np.linalg.norm(sgd_run.attribution(W0, 3).update, axis=1), rtol=1e-5)
    assert "attribution:input" not in compact_run._all_views(W0) and "attribution:update" not in compact_run._all_views(W0)
    with pytest.raises(ConfigError, match=r"per_sample_grads\(\).*attribution_keep='contributions'.*HINT: record with attribution_keep='factors'"):
        a.per_sample_grads()
    with pytest.raises(ConfigError, match=r"influence\(test_gradients=...\).*attribution_keep='contributions'.*TestGradient"):
        influence(compact_run, W0, np.zeros((HIDDEN, N_IN)))


@pytest.mark.parametrize("param", [W0, "net.0.bias", "net.2.weight"])
def test_compact_contributions_equal_those_from_factors_and_sum_to_the_update(compact_run: Any, sgd_run: Any, param: str) -> None:
    rows = HIDDEN if param.startswith("net.0") else N_OUT
    for step in (0, 5, 11):
        whole = contributions(compact_run, param, step)
        assert list(whole.columns) == ["sample_index", "dataset_index", "contribution"] and len(whole) == BATCH
        assert whole["contribution"].sum() == pytest.approx(whole.attrs["update_norm"], rel=1e-4)
        np.testing.assert_allclose(whole["contribution"], contributions(sgd_run, param, step)["contribution"], rtol=1e-4, atol=1e-8)
        for neuron in range(rows):
            one = contributions(compact_run, param, step, neuron=neuron)
            exact = contributions(sgd_run, param, step, neuron=neuron)
            assert one.attrs["update_norm"] == pytest.approx(exact.attrs["update_norm"], rel=1e-5)
            assert one["contribution"].sum() == pytest.approx(one.attrs["update_norm"], rel=1e-4, abs=1e-9)
            np.testing.assert_allclose(one["contribution"], exact["contribution"], rtol=1e-4, atol=1e-8)
            assert one["dataset_index"].tolist() == exact["dataset_index"].tolist()


def test_compact_mode_finds_the_planted_item(compact_run: Any) -> None:
    top = top_items(compact_run, W0, NEURON, k=3)
    assert int(top["dataset_index"].iloc[0]) == PLANTED and top["score"].iloc[0] > 3 * top["score"].iloc[1]
    out = update_outliers(compact_run, W0, z=4.0)
    assert len(out)
    top = top_items(compact_run, W0, int(out["neuron"].iloc[0]), k=2, over="outliers")
    assert int(top["dataset_index"].iloc[0]) == PLANTED


def test_bad_attribution_keep_is_named() -> None:
    with pytest.raises(ConfigError, match=r"ComgraCallback\(attribution_keep=...\).*\('factors', 'contributions'\).*'exact'"):
        ComgraCallback(attribution="*", attribution_keep="exact")  # type: ignore[arg-type]


# ------------------------------------------------------------ TracIn through a TestGradient measure
TEST_X, TEST_Y = Items().x[PLANTED : PLANTED + 1].clone(), torch.full((1, N_OUT), 6.0)  # a test item like the planted one


@pytest.mark.parametrize(("optimizer", "keep"), [("sgd", "factors"), ("sgd", "contributions"), ("adamw", "factors"), ("adamw", "contributions")])
def test_influence_from_a_test_gradient_measure_equals_supplied_gradients(tmp_path: Path, optimizer: str, keep: str) -> None:
    """The measure's products, taken during training, give what supplied test gradients give (the gradient
    at each recorded step, taken here by a plain measure at the same moment) from the factors."""
    from comgra_callbacks import Every
    from comgra_callbacks.measures import TestGradient

    supplied: dict[int, np.ndarray] = {}

    def by_hand(model: Any, trainer: Any) -> float:  # the test gradient of net.0.weight at this step, kept here
        with torch.enable_grad():
            loss = nn.functional.mse_loss(model.net(TEST_X), TEST_Y)
            supplied[trainer.global_step] = torch.autograd.grad(loss, model.net[0].weight)[0].numpy().copy()
        return float(loss)

    measures = {"test": TestGradient((TEST_X, TEST_Y), loss_fn=nn.functional.mse_loss), "hand": by_hand}
    run = fit(tmp_path, f"{optimizer}_{keep}", Regressor(optimizer, lr=0.02), attribution=W0, attribution_keep=keep,
              measures=measures, schedule=Every(2), steps=8)
    assert run.attribution_steps(W0) == [0, 2, 4, 6] and sorted(supplied) == [0, 2, 4, 6]
    np.testing.assert_allclose(run.measures["test"].to_numpy(), run.measures["hand"].to_numpy(), rtol=1e-6)
    got = influence(run, W0, "test")
    assert list(got.columns) == ["dataset_index", "influence", "steps"] and got.attrs["steps"] == [0, 2, 4, 6]
    if keep == "factors":
        want = influence(run, W0, supplied)
    else:  # the same training (seeded), kept with factors: the supplied gradients' answer
        supplied_run = dict(supplied)
        supplied.clear()
        exact = fit(tmp_path, f"{optimizer}_exact", Regressor(optimizer, lr=0.02), attribution=W0, measures={"hand": by_hand}, schedule=Every(2), steps=8)
        for step in supplied_run:
            np.testing.assert_allclose(supplied[step], supplied_run[step], rtol=1e-5, atol=1e-8)
        want = influence(exact, W0, supplied)
    merged = got.merge(want, on="dataset_index", suffixes=("", "_supplied"))
    assert len(merged) == len(got) == len(want)
    np.testing.assert_allclose(merged["influence"], merged["influence_supplied"], rtol=1e-4, atol=1e-9)
    assert int(got["dataset_index"].iloc[0]) == PLANTED and got["influence"].iloc[0] > 0
    assert "attribution:test:test" not in run.views(W0)


def test_test_gradient_is_used_only_on_the_step_it_was_taken_for(tmp_path: Path) -> None:
    """Measured on every second step, recorded on every third: the gradient of step 2 (not recorded) is never
    paired with step 3's samples (the parameters moved in between); steps 0 and 6 have both."""
    from comgra_callbacks import Every
    from comgra_callbacks.measures import TestGradient

    test = TestGradient(lambda model: nn.functional.mse_loss(model.net(TEST_X), TEST_Y))  # the callable form
    run = fit(tmp_path, "sched", Regressor("sgd"), attribution=W0, measures={"test": test},
              schedule=Every(3), measure_schedule=Every(2), steps=7)
    assert run.attribution_steps(W0) == [0, 3, 6] and run.measures.index.tolist() == [0, 2, 4, 6]
    assert influence(run, W0, "test").attrs["steps"] == [0, 6]
    with pytest.raises(ConfigTypeError, match=r"TestGradient\(loss_fn=...\)"):
        TestGradient((TEST_X, TEST_Y), loss_fn=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigTypeError, match=r"TestGradient\(data=...\)"):
        TestGradient(5)


# ------------------------------------------------------------------------------ against torch.func
class SeqModel(pl.LightningModule):
    """Tokens of a sequence through one Linear: the per-sample gradient sums the positions' outer products."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(10, N_IN)  # token ids 0..9, added to the features: a parameter for torch.func
        self.norm = nn.LayerNorm(N_IN)
        self.proj = nn.Linear(N_IN, 4)
        self.head = nn.Linear(4, 2)
        self.seen: dict[int, tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x[..., 0].abs() * 4).long().clamp(max=9)  # (B, T) token ids derived from the input
        return self.head(torch.tanh(self.proj(self.norm(x + self.emb(ids))))).mean(dim=1)  # (B, T, d) -> (B, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        params = {k: v.detach().clone() for k, v in self.named_parameters()}
        self.seen[self.global_step] = (params, x.clone(), y.clone())
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_factors_and_func_gradients_equal_torch_func_per_sample_gradients(tmp_path: Path) -> None:
    from torch.func import functional_call, grad, vmap

    g = torch.Generator().manual_seed(5)
    data = torch.utils.data.TensorDataset(torch.randn(12, 7, N_IN, generator=g), torch.randn(12, 2, generator=g))
    model = SeqModel()
    callback = ComgraCallback(str(tmp_path), run_name="seq", writer="thread", attribution=["proj.weight", "head.*", "norm.*", "emb.weight"])
    quiet_trainer([callback], tmp_path, max_steps=3).fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    run = open_run(tmp_path / "seq")
    for step in range(3):
        params, x, y = model.seen[step]
        batch = x.shape[0]

        def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor, batch: int = batch) -> torch.Tensor:
            out = functional_call(model, p, (xi[None],))
            return ((out - yi[None]) ** 2).mean() / batch  # the sample's part of the batch's mean loss

        expected = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
        a = run.attribution("proj.weight", step)
        assert a.inputs.shape == (batch, 7, N_IN) and not a.index_from_batch
        np.testing.assert_array_equal(a.dataset_index, np.arange(batch))  # no index field: batch positions
        np.testing.assert_allclose(a.per_sample_grads(), expected["proj.weight"].numpy(), rtol=1e-4, atol=1e-7)
        for name in ("head.weight", "head.bias", "norm.weight", "norm.bias", "emb.weight"):
            np.testing.assert_allclose(run.attribution(name, step).per_sample_grads(), expected[name].numpy(), rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------ Adam
ADAM_TOLERANCE = 1e-3  # relative, documented in docs/attribution.md


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_adam_without_momentum_is_exact(tmp_path: Path) -> None:
    run = fit(tmp_path, "adam0", Regressor("adam", lr=0.01, betas=(0.0, 0.999)), attribution=W0, steps=6)
    for step in run.attribution_steps(W0):
        a = run.attribution(W0, step)
        assert a.optimizer == "adam" and a.precond is not None and a.share == pytest.approx(1.0)
        assert _rel(a.per_sample_updates().sum(axis=0), a.update) < ADAM_TOLERANCE


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_shares_plus_momentum_give_the_update(tmp_path: Path, optimizer: str) -> None:
    """With momentum the step's samples explain the part ``(1 - beta1) / (1 - beta1**t)`` of the update
    direction; the rest is the previous update carried on: ``Δ_t = Σ u_i + c_t Δ_{t-1} P_t / P_{t-1}`` with
    ``c_t = beta1 (1 - beta1**(t-1)) / (1 - beta1**t)`` (AdamW: plus its decay, ``-lr wd W``)."""
    wd = 0.1 if optimizer == "adamw" else 0.0
    run = fit(tmp_path, optimizer, Regressor(optimizer, lr=0.01, weight_decay=wd), attribution=W0, steps=6, detail={W0: "full"})
    steps = run.attribution_steps(W0)
    first = run.attribution(W0, steps[0])
    assert first.optimizer == optimizer and first.share == pytest.approx(1.0)  # t = 1: the step's gradient is all of m
    for prev_step, step in zip(steps, steps[1:]):
        prev, a = run.attribution(W0, prev_step), run.attribution(W0, step)
        t, beta1 = a.fields["optimizer_step"], a.fields["beta1"]
        assert a.share == pytest.approx((1 - beta1) / (1 - beta1**t))
        carried = beta1 * (1 - beta1 ** (t - 1)) / (1 - beta1**t) * (prev.update + prev.lr * wd * run.samples(W0, prev_step, view="value")) / prev.precond * a.precond
        decay = -a.lr * wd * run.samples(W0, step, view="value")
        assert _rel(a.per_sample_updates().sum(axis=0) + carried + decay, a.update) < ADAM_TOLERANCE
        shares = contributions(run, W0, step)
        assert 0 < shares["contribution"].sum() < shares.attrs["update_norm"] * 1.5


# ------------------------------------------------------------------------------------ bad input
def test_index_field_from_a_tuple_batch(tmp_path: Path) -> None:
    run = fit(tmp_path, "tuple", Regressor(), layout="tuple3", attribution=W0, index_field=2, steps=4)
    seen = np.concatenate([run.attribution(W0, s).dataset_index for s in range(4)])
    assert sorted(seen.tolist()) == list(range(N_ITEMS))
    assert int(top_items(run, W0, 0, k=1)["dataset_index"].iloc[0]) == PLANTED


def test_missing_index_field_warns_and_uses_positions(tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning, match="index_field='sample_id'"):
        run = fit(tmp_path, "noidx", Regressor(), attribution=W0, index_field="sample_id", steps=2)
    a = run.attribution(W0, 1)
    assert not a.index_from_batch and a.dataset_index.tolist() == list(range(BATCH))


def test_bad_options_are_named() -> None:
    with pytest.raises(ConfigTypeError, match=r"ComgraCallback\(attribution=...\)"):
        ComgraCallback(attribution=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigTypeError, match=r"ComgraCallback\(index_field=...\).*got 1.5"):
        ComgraCallback(index_field=1.5)  # type: ignore[arg-type]


def test_a_filter_matching_nothing_lists_the_linear_parameters(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`attribution='mlp\.\*\.weight'`: it matches no parameter.*'net\.0\.weight'"):
        fit(tmp_path, "none", Regressor(), attribution="mlp.*.weight", steps=1)


def test_bad_reads_are_named(sgd_run: Any) -> None:
    with pytest.raises(ConfigError, match=r"neuron=.*0 <= neuron < 5.*got 9"):
        contributions(sgd_run, W0, 0, neuron=9)
    with pytest.raises(ConfigError, match=r"top_items\(k=...\)"):
        top_items(sgd_run, W0, 0, k=0)
    with pytest.raises(ConfigError, match=r"over=...\).*'all' or 'outliers'"):
        top_items(sgd_run, W0, 0, over="some")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"update_outliers\(z=...\)"):
        update_outliers(sgd_run, W0, z=0)
    with pytest.raises(ConfigError, match=r"shape \(5, 6\), got shape \(2,\)"):
        influence(sgd_run, W0, np.zeros(2))
    with pytest.raises(ConfigTypeError, match=r"influence\(test_gradients=...\)"):
        influence(sgd_run, W0, 5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"influence\(test_gradients='grads'\).*no TestGradient measure of that name.*it has \[\]"):
        influence(sgd_run, W0, "grads")
    with pytest.raises(ConfigError, match=r"statistic=...\).*'l2'"):
        sgd_run.neuron_series(W0, statistic="median")
    with pytest.raises(NodeNotFoundError, match=r"no attribution of 'net\.1'"):
        sgd_run.attribution("net.1", 0)


# ------------------------------------------------------------------------------------- dashboard
@pytest.mark.parametrize("which", ["sgd_run", "compact_run"])
def test_dashboard_tab_shows_outliers_and_the_planted_item(request: pytest.FixtureRequest, which: str) -> None:
    sgd_run = request.getfixturevalue(which)  # factors, or attribution_keep="contributions"
    from comgra_callbacks.dashboard.app import Dashboard
    from comgra_callbacks.dashboard.data import Catalog
    from comgra_callbacks.dashboard.options import DashboardOptions

    root = Path(sgd_run.uri).parent
    dash = Dashboard(Catalog(root), DashboardOptions(str(root)))
    view = dash.attribution
    assert view.summary.object == ""  # nothing is read while the tab is hidden
    dash.show_tab("Attribution")
    assert view.active and view.param_select.value in view.param_select.options and W0 in view.param_select.options
    view.param_select.value = W0
    assert view.image.data["image"][0].shape == (HIDDEN, 12)
    outliers = update_outliers(sgd_run, W0)
    assert view.marks.data["step"] == outliers["step"].tolist() and view.marks.data["neuron"] == outliers["neuron"].tolist()
    planted_step = next(s for s in sgd_run.attribution_steps(W0) if PLANTED in sgd_run.attribution(W0, s).dataset_index)
    view.select_cell(float(list(sgd_run.neuron_series(W0).index).index(planted_step)), float(NEURON))
    assert view.step.value == planted_step and view.neuron.value == NEURON
    table = view.table.value
    assert list(table.columns) == ["sample_index", "dataset_index", "contribution"] and int(table["dataset_index"].iloc[0]) == PLANTED


def test_dashboard_tab_shows_the_recorded_input_of_kept_samples(sgd_run: Any) -> None:
    """The contributing samples whose input was kept (the first ``n_samples`` = 4 of a batch by default) show
    it; the others are counted as not kept."""
    from comgra_callbacks.dashboard.app import Dashboard
    from comgra_callbacks.dashboard.attribution_view import format_sample
    from comgra_callbacks.dashboard.data import Catalog
    from comgra_callbacks.dashboard.options import DashboardOptions

    root = Path(sgd_run.uri).parent
    dash = Dashboard(Catalog(root), DashboardOptions(str(root)))
    view = dash.attribution
    dash.show_tab("Attribution")
    view.param_select.value = W0
    assert view.input_select.options[0] == "batch.x" and view.input_select.options[-1] == "batch.idx"
    view.input_select.value = "batch.x"
    step = sgd_run.attribution_steps(W0)[2]
    view.step.value, view.neuron.value = step, NEURON
    shown = view.inputs_table.value
    kept = sgd_run.samples("batch.x", step)
    assert list(shown.columns) == ["sample_index", "dataset_index", "contribution", "input"]
    assert len(kept) < BATCH and sorted(shown["sample_index"].tolist()) == list(range(len(kept)))
    x = Items().x.numpy()
    for _, row in shown.iterrows():  # each kept input is the dataset item the index names
        assert row["input"] == format_sample(kept[int(row["sample_index"])]) == format_sample(x[int(row["dataset_index"])].astype(np.float32))
    assert f"kept for {len(kept)} of the {BATCH} samples" in view.inputs_note.object
    view.input_select.value = "batch.idx"  # an integer input: the ids themselves
    ids = view.inputs_table.value
    assert all(row["input"] == str(int(row["dataset_index"])) for _, row in ids.iterrows())


# ------------------------------------------------------------------ attribution_projection=k
VOCAB, DIM, TOKENS = 40, 8, 5
PROJECTED = ["emb.weight", "norm.weight"]  # parameters for torch.func: projected; head.weight keeps its factors


class Tokens(torch.utils.data.Dataset):
    """``{"ids", "y", "idx"}`` items: ``TOKENS`` token ids of ``VOCAB`` and a target of 2."""

    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, VOCAB, (n, TOKENS), generator=g)
        self.y = torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Any:
        return {"ids": self.ids[i], "y": self.y[i], "idx": i}


class Bag(pl.LightningModule):
    """Mean of token embeddings, a LayerNorm, a Linear head: two torch.func parameters and one Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(ids)).mean(dim=1))  # (B, T, DIM) -> (B, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.mse_loss(self(batch["ids"]), batch["y"])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.5)


TEST_IDS, TEST_T = torch.arange(TOKENS)[None] * 3, torch.ones(1, 2)


def _bag_run(tmp: Path, name: str, projection: int | None) -> Any:
    from comgra_callbacks.measures import TestGradient

    test = TestGradient(lambda m: nn.functional.mse_loss(m(TEST_IDS), TEST_T), params=PROJECTED)
    callback = ComgraCallback(str(tmp), run_name=name, writer="thread", attribution=[*PROJECTED, "head.weight"],
                              attribution_projection=projection, measures={"test": test})
    loader = torch.utils.data.DataLoader(Tokens(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    quiet_trainer([callback], tmp, max_steps=6).fit(Bag(), loader)
    return open_run(tmp / name)


@pytest.fixture(scope="module")
def bag_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int | None, Any]:
    """The same seeded training, kept whole and projected to k = 16 and k = 2048."""
    tmp = tmp_path_factory.mktemp("proj")
    return {k: _bag_run(tmp, f"k{k}", k) for k in (None, 16, 2048)}


def test_projection_stores_projected_gradients_rebuilt_by_the_reader(bag_runs: dict[int | None, Any]) -> None:
    from comgra_callbacks.store.attribution import project

    exact, projected = bag_runs[None], bag_runs[2048]
    for param in PROJECTED:
        assert "attribution:per_sample_grad" not in projected._all_views(param)
        for step in projected.attribution_steps(param):
            a, whole = projected.attribution(param, step), exact.attribution(param, step)
            assert a.projected.shape == (8, 2048) and a.per_sample is None and a.keep == "factors" and not a.has_factors
            flat = whole.per_sample_grads().reshape(8, -1)
            np.testing.assert_allclose(a.projected, project(param, flat, 2048), rtol=1e-4, atol=1e-7)  # R rebuilt from seed + name
            with pytest.raises(ConfigError, match=r"attribution_projection=2048.*HINT: record without attribution_projection="):
                a.per_sample_grads()
    a = projected.attribution("head.weight", 0)  # a Linear weight keeps its factors
    assert a.projected is None and a.inputs is not None and a.has_factors


@pytest.mark.parametrize("param", PROJECTED)
def test_projected_contributions_and_top_items_are_exact(bag_runs: dict[int | None, Any], param: str) -> None:
    exact, projected = bag_runs[None], bag_runs[16]
    steps = exact.attribution_steps(param)
    assert steps == projected.attribution_steps(param) == list(range(6))
    for step in steps:
        for neuron in (None, 1):
            want = contributions(exact, param, step, neuron=neuron)
            got = contributions(projected, param, step, neuron=neuron)
            np.testing.assert_array_equal(got["dataset_index"], want["dataset_index"])
            np.testing.assert_allclose(got["contribution"], want["contribution"], rtol=1e-5, atol=1e-5)
            assert got.attrs["update_norm"] == pytest.approx(want.attrs["update_norm"], rel=1e-6)
    want, got = top_items(exact, param, 1, k=5), top_items(projected, param, 1, k=5)
    assert got["dataset_index"].tolist() == want["dataset_index"].tolist()
    np.testing.assert_allclose(got["score"], want["score"], rtol=1e-5, atol=1e-5)


def _influence_vector(run: Any, param: str, test: Any) -> np.ndarray:
    frame = influence(run, param, test).sort_values("dataset_index")
    assert frame["dataset_index"].tolist() == list(range(48))
    return frame["influence"].to_numpy()


@pytest.mark.parametrize("param", PROJECTED)
def test_projected_influence_approximates_the_exact_one(bag_runs: dict[int | None, Any], param: str) -> None:
    """JL: with a supplied test gradient the projected products estimate the exact ones, relative error of
    the per-item influence vector about 1/sqrt(k) (< 0.15 at k = 2048, larger at k = 16); through a
    TestGradient measure (products taken before the projection) they are exact."""
    exact = bag_runs[None]
    test = sum(exact.attribution(param, s).per_sample_grads().sum(axis=0) for s in range(6))  # a direction training moves along
    want = _influence_vector(exact, param, test)
    errors = {k: float(np.linalg.norm(_influence_vector(bag_runs[k], param, test) - want) / np.linalg.norm(want)) for k in (16, 2048)}
    assert errors[2048] < 0.15 and errors[2048] < errors[16], errors
    np.testing.assert_allclose(_influence_vector(bag_runs[2048], param, "test"), _influence_vector(exact, param, "test"), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(("value", "error"), [(0, ConfigError), (-3, ConfigError), (2.5, ConfigTypeError), ("64", ConfigTypeError), (True, ConfigTypeError)])
def test_bad_attribution_projection_is_named(value: Any, error: type) -> None:
    with pytest.raises(error, match=r"`ComgraCallback\(attribution_projection=...\)`: expected None or a positive int.*got " + repr(value).replace(".", r"\.")) as raised:
        ComgraCallback(attribution="*", attribution_projection=value)
    assert type(raised.value) is error
