"""analysis.activation_patching / attribution_patching / circuit on hand-built and small random models."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from comgra_callbacks.analysis import activation_patching, attribution_patching, circuit
from comgra_callbacks.analysis.patching import COLUMNS, logit_difference
from comgra_callbacks.errors import ConfigError, ConfigTypeError, NodeNotFoundError


def one_unit_mlp() -> nn.Sequential:
    """4 -> 6 -> 3 MLP whose logits depend on hidden unit 2 only (its other output weights are zero)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(24.0).view(6, 4) / 24)
        model[0].bias.zero_()
        model[2].weight.zero_()
        model[2].weight[:, 2] = torch.tensor([1.0, -2.0, 0.5])
        model[2].bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    return model


CLEAN = torch.tensor([[1.0, 2.0, 0.5, 1.0], [2.0, 1.0, 1.0, 0.0]])
CORRUPTED = torch.tensor([[0.1, 0.0, 0.2, 0.1], [0.0, 0.3, 0.0, 0.1]])


def random_mlp(seed: int = 0, sizes: tuple[int, ...] = (5, 12, 9, 4)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers).eval()


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------ the contract


@pytest.mark.parametrize("fn", [activation_patching, attribution_patching])
def test_the_one_unit_is_ranked_first_with_effect_one(fn) -> None:
    model = one_unit_mlp()
    table = fn(model, CLEAN, CORRUPTED, ["0", "1"])
    assert list(table.columns) == COLUMNS
    assert len(table) == 12
    assert table.loc[0, "unit"] == 2 and table.loc[1, "unit"] == 2
    assert table.loc[:1, "effect"].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert table.loc[:1, "score"].tolist() == pytest.approx([0.0, 0.0], abs=1e-5)
    assert table.loc[2:, "effect"].abs().max() < 1e-6
    assert table["effect"].is_monotonic_decreasing
    assert no_hooks_left(model)


def test_circuit_returns_the_one_unit() -> None:
    found = circuit(one_unit_mlp(), CLEAN, CORRUPTED, ["1"], k=1)
    assert found.units == {"1": [2]}
    assert found.effect == pytest.approx(1.0, abs=1e-6)
    assert found.logit_difference == pytest.approx(0.0, abs=1e-5)
    assert found.sparsity == pytest.approx(5 / 6)
    assert found.seconds > 0
    assert list(found.table.columns) == COLUMNS and found.table["unit"].tolist() == [2]
    assert "logit_difference=" in repr(found)


def test_scores_match_a_patch_done_by_hand() -> None:
    """Oracle: recompute each neuron's logit difference with a plain forward written out by hand."""
    model = random_mlp()
    clean, corrupted = torch.randn(3, 5), torch.randn(3, 5)
    table = activation_patching(model, clean, corrupted, "1").set_index("unit")
    with torch.no_grad():
        h_clean = torch.tanh(model[0](clean))
        logits_clean = model[4](torch.tanh(model[2](h_clean)))
        logits_corr = model(corrupted)
        gap = (logits_corr - logits_clean).norm(dim=1).mean()
        for unit in range(12):
            h = torch.tanh(model[0](corrupted))
            h[:, unit] = h_clean[:, unit]
            logits = model[4](torch.tanh(model[2](h)))
            score = (logits - logits_clean).norm(dim=1).mean()
            assert table.loc[unit, "score"] == pytest.approx(float(score), abs=1e-5)
            assert table.loc[unit, "effect"] == pytest.approx(float((gap - score) / gap), abs=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 256])
def test_batched_equals_one_pass_per_unit(chunk: int) -> None:
    model = random_mlp(1)
    clean, corrupted = torch.randn(4, 5), torch.randn(4, 5)
    a = activation_patching(model, clean, corrupted, ["0", "3"], chunk=chunk)
    b = activation_patching(model, clean, corrupted, ["0", "3"], batched=False)
    assert a[["node", "unit"]].equals(b[["node", "unit"]])
    assert a["score"].tolist() == pytest.approx(b["score"].tolist(), abs=1e-5)


def test_rows_per_pass_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from comgra_callbacks.analysis import patching

    model, clean, corrupted = random_mlp(1), torch.randn(4, 5), torch.randn(4, 5)
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    monkeypatch.setattr(patching, "MAX_ROWS", 8)
    small = activation_patching(model, clean, corrupted, "1")
    assert sizes[2:] == [8] * 6 + [4]  # after clean and corrupted: the unpatched check and 12 units, 2 copies a pass
    assert small["score"].tolist() == pytest.approx(activation_patching(model, clean, corrupted, "1", batched=False)["score"].tolist(), abs=1e-5)


def test_attribution_approximates_activation_patching_for_small_patches() -> None:
    model = random_mlp(2)
    corrupted = torch.randn(3, 5)
    clean = corrupted + 0.05 * torch.randn(3, 5)

    def margin(patched, clean, corrupted):  # smooth, unlike the norm near the clean logits
        return (patched[:, 0] - patched[:, 1]).mean()

    exact = activation_patching(model, clean, corrupted, "1", metric=margin).sort_values("unit")
    approx = attribution_patching(model, clean, corrupted, "1", metric=margin).sort_values("unit")
    spread = exact["score"].max() - exact["score"].min()
    assert (exact["score"] - approx["score"]).abs().max() < 0.05 * spread
    assert exact["unit"].iloc[exact["effect"].argmax()] == approx["unit"].iloc[approx["effect"].argmax()]


def test_attribution_leaves_parameter_gradients_alone() -> None:
    model = random_mlp(3)
    attribution_patching(model, torch.randn(2, 5), torch.randn(2, 5), ["0", "1"])
    assert all(p.grad is None for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)  # a frozen model still has gradients with respect to its activations
    table = attribution_patching(model, torch.randn(2, 5), torch.randn(2, 5), "1")
    assert table["effect"].abs().sum() > 0
    assert no_hooks_left(model)


def test_whole_node_patch_restores_the_clean_output() -> None:
    model = random_mlp(4)
    clean, corrupted = torch.randn(3, 5), torch.randn(3, 5)
    exact = activation_patching(model, clean, corrupted, ["1", "4"], units="node")
    assert exact["unit"].tolist() == [-1, -1]
    assert exact["effect"].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    # the output node's own patch is linear in itself: the gradient approximation is exact there
    approx = attribution_patching(model, clean, corrupted, ["1", "4"], units="node").set_index("node")
    assert approx.loc["4", "effect"] == pytest.approx(1.0, abs=1e-5) and approx.loc["1", "unit"] == -1


def test_circuit_patches_earlier_nodes_while_scoring_later_ones() -> None:
    model = random_mlp(5)
    clean, corrupted = torch.randn(3, 5), torch.randn(3, 5)
    every = circuit(model, clean, corrupted, ["1", "3"], k={"1": 12, "3": 9})
    assert every.effect == pytest.approx(1.0, abs=1e-5) and every.sparsity == 0.0
    # with all of layer 1 patched, layer 3 is already clean: every neuron there closes the whole remaining gap
    assert every.table.query("node == '3'")["effect"].tolist() == pytest.approx([1.0] * 9, abs=1e-5)
    some = circuit(model, clean, corrupted, ["1", "3"], k=3)
    assert [len(u) for u in some.units.values()] == [3, 3]
    assert some.sparsity == pytest.approx(1 - 6 / 21)
    first = activation_patching(model, clean, corrupted, "1")
    assert some.units["1"] == first["unit"].head(3).tolist()


def test_custom_metric() -> None:
    model = one_unit_mlp()

    def logit0(patched, clean, corrupted):
        return patched[:, 0].mean()

    for fn in (activation_patching, attribution_patching):
        table = fn(model, CLEAN, CORRUPTED, "1", metric=logit0)
        assert table.loc[0, "unit"] == 2 and table.loc[0, "effect"] == pytest.approx(1.0, abs=1e-5)
        assert table.loc[0, "score"] == pytest.approx(float(model(CLEAN)[:, 0].mean().detach()), abs=1e-5)


def test_neurons_are_channels_of_conv_outputs_and_last_axis_of_sequences() -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).eval()
    table = activation_patching(conv, torch.randn(2, 2, 6, 6), torch.randn(2, 2, 6, 6), "1")
    assert sorted(table["unit"]) == [0, 1, 2]
    seq = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)).eval()
    table = activation_patching(seq, torch.randn(2, 5, 4), torch.randn(2, 5, 4), "1")
    assert sorted(table["unit"]) == list(range(7))
    assert (attribution_patching(seq, torch.randn(2, 5, 4), torch.randn(2, 5, 4), "1")["unit"].nunique()) == 7


def test_dict_inputs_are_keyword_arguments() -> None:
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = one_unit_mlp()

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.body(pixels)

    table = activation_patching(Keyword().eval(), {"pixels": CLEAN}, {"pixels": CORRUPTED}, "body.1")
    assert table.loc[0, "unit"] == 2


def test_logit_difference() -> None:
    assert float(logit_difference(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2))) == 5.0


def test_a_few_hundred_neurons_take_seconds() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    started = time.perf_counter()
    table = activation_patching(model, torch.randn(16, 64), torch.randn(16, 64), ["1", "3"])
    assert len(table) == 512
    assert time.perf_counter() - started < 10


# ------------------------------------------------------------------------------------------ errors


def test_unknown_node_lists_the_available_ones() -> None:
    model = one_unit_mlp()
    with pytest.raises(NodeNotFoundError, match=r"no module 'fc'. Available: '0', '1', '2'"):
        activation_patching(model, CLEAN, CORRUPTED, "fc")
    with pytest.raises(NodeNotFoundError, match="no module 'fc'"):
        circuit(model, CLEAN, CORRUPTED, ["1", "fc"])
    with pytest.raises(KeyError):  # also the builtin
        attribution_patching(model, CLEAN, CORRUPTED, "fc")


def test_argument_errors() -> None:
    model = one_unit_mlp()
    with pytest.raises(ConfigError, match="same shape"):
        activation_patching(model, CLEAN, CORRUPTED[:1], "1")
    with pytest.raises(ConfigTypeError, match="tensor or a dict of tensors"):
        activation_patching(model, CLEAN.tolist(), CORRUPTED, "1")
    with pytest.raises(ConfigError, match=r"`activation_patching\(units=...\)`: expected one of \['neuron', 'node'\], got 'layer'"):
        activation_patching(model, CLEAN, CORRUPTED, "1", units="layer")  # type: ignore[arg-type]
    with pytest.raises(ConfigTypeError, match="non-empty list of names"):
        activation_patching(model, CLEAN, CORRUPTED, [])
    with pytest.raises(ConfigError, match="distinct names"):
        activation_patching(model, CLEAN, CORRUPTED, ["1", "1"])
    with pytest.raises(ConfigError, match=r"`circuit\(k=...\)`: expected an int from 1 to 6 \(the neurons of '1'\), got 7"):
        circuit(model, CLEAN, CORRUPTED, "1", k=7)
    with pytest.raises(ConfigTypeError, match="expected a torch.nn.Module"):
        activation_patching(lambda x: x, CLEAN, CORRUPTED, "1")
    with pytest.raises(ConfigTypeError, match="expected a 0-d tensor"):
        attribution_patching(model, CLEAN, CORRUPTED, "1", metric=lambda p, c, r: 1.0)
    assert no_hooks_left(model)


def test_a_model_that_mixes_the_batch_is_refused_when_batched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    # patching before the batch norm changes its batch statistics for every copy
    with pytest.raises(ConfigError, match="not batch-independent.*HINT: model.eval"):
        activation_patching(model, torch.randn(5, 4), torch.randn(5, 4), "0")
    assert no_hooks_left(model)
    assert len(activation_patching(model, torch.randn(5, 4), torch.randn(5, 4), "0", batched=False)) == 6
    dropout = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)).train()
    with pytest.raises(ConfigError, match="not batch-independent"):
        activation_patching(dropout, torch.randn(5, 4), torch.randn(5, 4), "0")


def test_nodes_that_cannot_be_patched() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pair, self.shared, self.unused = Pair(), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, _ = self.pair(x)
            return self.shared(self.shared(a)).sum(1)

    net = Net().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    with pytest.raises(ConfigTypeError, match="node 'pair' returns tuple"):
        activation_patching(net, x, y, "pair")
    with pytest.raises(ConfigError, match="'shared' runs more than once"):
        activation_patching(net, x, y, "shared")
    with pytest.raises(ConfigError, match=r"nodes \['unused'\] did not run"):
        attribution_patching(net, x, y, "unused")
    with pytest.raises(ConfigError, match=r"node '0' has output shape \(8,\), expected the batch \(2\) on its first axis"):
        activation_patching(nn.Sequential(nn.Flatten(0), nn.Linear(8, 2)).eval(), x, y, "0")
    with pytest.raises(ConfigError, match="no neuron axis.*HINT: units='node'"):
        activation_patching(nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)).eval(), x, y, "1")
    scalar = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)).eval()  # one number per example: patch it whole
    for fn in (activation_patching, attribution_patching):
        assert fn(scalar, x, y, "1", units="node")["effect"].tolist() == pytest.approx([1.0], abs=1e-5)
    assert no_hooks_left(net)


def test_the_analysis_package_does_not_import_torch() -> None:
    code = "import sys, comgra_callbacks.analysis; print('torch' in sys.modules, 'panel' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
