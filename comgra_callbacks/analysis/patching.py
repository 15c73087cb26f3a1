"""Activation patching, attribution patching and circuit discovery on a model in memory.

A *clean* input shows the behaviour, a *corrupted* one does not. Patching copies the activation of one
unit (a neuron, or a whole node) from the clean run into the corrupted run and measures how far the output
moves back towards the clean output. ``nodes`` are dotted ``named_modules()`` names; a node's output is
replaced by a forward hook, and every hook is removed before the function returns.

A *neuron* is one index of the node output's last axis (``(B, C)``, ``(B, T, C)``: all positions together),
or of the channel axis 1 for outputs with four or more dimensions (``(N, C, H, W)``).

``clean`` and ``corrupted`` are model inputs with a leading batch axis, of the same shape (a tensor, or a
dict of tensors passed as keyword arguments). With several examples in the batch, a unit is patched in
every example at once and the default metric averages over the batch.

The tables have one row per (node, unit) and the columns ``node``, ``unit`` (-1 for ``units="node"``),
``score`` (the metric of the patched run; by default the logit difference
``mean_b ||L_patched - L_clean||_2``, lower is better) and ``effect`` (the fraction of the clean-corrupted
gap that the patch closes: ``(m_corr - score) / (m_corr - m_clean)``, 1 = fully restored). Rows are sorted by
``effect``, highest first (ties keep node order, then unit order).

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
>>> with torch.no_grad():
...     _ = model[0].weight.copy_(torch.eye(3, 2)); _ = model[0].bias.zero_()
...     _ = model[2].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 0, 0]])); _ = model[2].bias.zero_()
>>> table = activation_patching(model, torch.tensor([[1.0, 0]]), torch.tensor([[0.0, 1]]), "1")
>>> first = table.iloc[0]
>>> first["node"], int(first["unit"]), float(first["effect"])
('1', 0, 1.0)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from comgra_callbacks.errors import ConfigError, ConfigTypeError, NodeNotFoundError

if TYPE_CHECKING:
    import torch
    from torch import nn

COLUMNS = ["node", "unit", "score", "effect"]
MAX_ROWS = 16384  # rows (copies x batch) per batched forward pass: bounds the memory of one pass
Units = Literal["neuron", "node"]
Metric = Callable[[Any, Any, Any], Any]


def logit_difference(patched: torch.Tensor, clean: torch.Tensor, corrupted: torch.Tensor | None = None) -> torch.Tensor:
    """``||patched - clean||_2`` over the last axis (the logits), averaged over every other axis (the batch).

    >>> import torch
    >>> float(logit_difference(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.zeros(2, 2)))
    2.5
    """
    import torch

    return torch.linalg.vector_norm(patched - clean, dim=-1).mean()


# ------------------------------------------------------------------------------------------ plumbing


def _where(owner: str, arg: str) -> str:
    return f"`{owner}({arg}=...)`"


def _resolve_nodes(owner: str, model: Any, nodes: Any) -> list[str]:
    from torch import nn

    if not isinstance(model, nn.Module):
        raise ConfigTypeError(f"{_where(owner, 'model')}: expected a torch.nn.Module, got {type(model).__name__}.")
    names = [nodes] if isinstance(nodes, str) else nodes
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigTypeError(f"{_where(owner, 'nodes')}: expected a module name or a non-empty list of names, got {nodes!r}.")
    available = [n for n, _ in model.named_modules() if n]
    for name in names:
        if name not in available:
            shown = ", ".join(repr(n) for n in available[:30]) + (f", ... ({len(available) - 30} more)" if len(available) > 30 else "")
            raise NodeNotFoundError(f"{_where(owner, 'nodes')}: the model has no module {name!r}. Available: {shown}.")
    if len(set(names)) != len(names):
        raise ConfigError(f"{_where(owner, 'nodes')}: expected distinct names, got {list(names)!r}.")
    return list(names)


def _check_inputs(owner: str, clean: Any, corrupted: Any) -> int:
    """Check that clean and corrupted are paired inputs; return the batch size."""
    import torch

    def shapes(x: Any, arg: str) -> dict[str, tuple[int, ...]]:
        if isinstance(x, torch.Tensor):
            return {"": tuple(x.shape)}
        if isinstance(x, Mapping) and x and all(isinstance(v, torch.Tensor) for v in x.values()):
            return {k: tuple(v.shape) for k, v in x.items()}
        raise ConfigTypeError(f"{_where(owner, arg)}: expected a tensor or a dict of tensors, got {type(x).__name__}.")

    a, b = shapes(clean, "clean"), shapes(corrupted, "corrupted")
    if a != b:
        raise ConfigError(f"`{owner}`: expected `clean` and `corrupted` of the same shape, got {a} and {b}.")
    if any(len(s) == 0 for s in a.values()) or len({s[0] for s in a.values()}) != 1:
        raise ConfigError(f"`{owner}`: expected inputs with one leading batch axis, got shapes {a}.")
    return next(iter(a.values()))[0]


def _repeat(x: Any, copies: int) -> Any:
    if copies == 1:
        return x
    if isinstance(x, Mapping):
        return {k: v.repeat(copies, *([1] * (v.dim() - 1))) for k, v in x.items()}
    return x.repeat(copies, *([1] * (x.dim() - 1)))


def _logits(owner: str, model: Any, x: Any) -> torch.Tensor:
    import torch

    out = model(**x) if isinstance(x, Mapping) else model(x)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigTypeError(f"`{owner}`: expected the model to return a tensor, a tuple starting with one or an object with `.logits`, got {type(out).__name__}.")


@contextmanager
def _hooked(model: nn.Module, hooks: dict[str, Callable[..., Any]]) -> Iterator[None]:
    """Forward hooks on the named modules for the duration of the block, removed even on error."""
    handles = []
    try:
        for name, fn in hooks.items():
            handles.append(model.get_submodule(name).register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _unit_axis(owner: str, name: str, act: torch.Tensor, units: str) -> int | None:
    if units == "node":
        return None
    if act.dim() < 2:
        raise ConfigError(f"`{owner}`: node {name!r} has output shape {tuple(act.shape)}: no neuron axis besides the batch. HINT: units='node'.")
    return 1 if act.dim() >= 4 else act.dim() - 1


def _width(act: torch.Tensor, axis: int | None) -> int:
    return 1 if axis is None else int(act.shape[axis])


def _capture(owner: str, model: nn.Module, x: Any, names: list[str], *, grad: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward pass: the logits, each node's output (detached) and, with ``grad``, a zero tensor added to
    each node's output whose gradient is the gradient with respect to that output."""
    import torch

    acts: dict[str, torch.Tensor] = {}
    zeros: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            if not isinstance(out, torch.Tensor):
                raise ConfigTypeError(f"`{owner}`: node {name!r} returns {type(out).__name__}, expected a tensor.")
            if name in acts:
                raise ConfigError(f"`{owner}`: node {name!r} runs more than once in a forward pass; patching a reused module is not supported.")
            acts[name] = out.detach()
            if grad:
                zeros[name] = torch.zeros_like(out, requires_grad=True)
                return out + zeros[name]
            return None

        return hook

    with _hooked(model, {n: hook_for(n) for n in names}), torch.set_grad_enabled(grad):
        logits = _logits(owner, model, x)
    missing = [n for n in names if n not in acts]
    if missing:
        raise ConfigError(f"`{owner}`: nodes {missing} did not run in the forward pass.")
    return logits, acts, zeros


def _metric_value(metric: Metric | None, patched: Any, clean: Any, corrupted: Any) -> Any:
    return logit_difference(patched, clean, corrupted) if metric is None else metric(patched, clean, corrupted)


def _effect(score: float, m_corr: float, m_clean: float) -> float:
    gap = m_corr - m_clean
    return (m_corr - score) / gap if gap != 0 else float("nan")


def _sorted(rows: list[tuple[str, int, float, float]]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=COLUMNS).astype({"unit": "int64", "score": "float64", "effect": "float64"})
    return table.sort_values("effect", ascending=False, kind="stable", na_position="last").reset_index(drop=True)


# ------------------------------------------------------------------------------------------ exact patching


class _Patcher:
    """The clean and corrupted runs of one (model, clean, corrupted), and patched passes on top of them."""

    def __init__(self, owner: str, model: nn.Module, clean: Any, corrupted: Any, names: list[str], units: str, metric: Metric | None):
        self.owner, self.model, self.corrupted, self.names, self.metric = owner, model, corrupted, names, metric
        self.batch = _check_inputs(owner, clean, corrupted)
        self.logits_clean, self.clean_acts, _ = _capture(owner, model, clean, names)
        self.logits_corr, corr_acts, _ = _capture(owner, model, corrupted, names)
        for name in names:
            if self.clean_acts[name].shape != corr_acts[name].shape:
                raise ConfigError(f"`{owner}`: node {name!r} has output shape {tuple(self.clean_acts[name].shape)} on `clean` and {tuple(corr_acts[name].shape)} on `corrupted`.")
            if self.clean_acts[name].dim() == 0 or self.clean_acts[name].shape[0] != self.batch:
                raise ConfigError(f"`{owner}`: node {name!r} has output shape {tuple(self.clean_acts[name].shape)}, expected the batch ({self.batch}) on its first axis.")
        self.axis = {n: _unit_axis(owner, n, self.clean_acts[n], units) for n in names}
        self.width = {n: _width(self.clean_acts[n], self.axis[n]) for n in names}
        self.m_clean = float(_metric_value(metric, self.logits_clean, self.logits_clean, self.logits_corr))
        self.m_corr = float(_metric_value(metric, self.logits_corr, self.logits_clean, self.logits_corr))

    def units_of(self, name: str) -> list[int]:
        return [-1] if self.axis[name] is None else list(range(self.width[name]))

    def run(self, copies: list[tuple[str, int] | None], fixed: Mapping[str, list[int]] | None = None) -> torch.Tensor:
        """Logits ``(P, B, ...)`` of the corrupted input repeated P times; copy p patched at ``copies[p]``
        (None: not patched), every copy also at the units in ``fixed``."""
        import torch

        fixed = fixed or {}
        n_copies, batch = len(copies), self.batch
        masks: dict[str, torch.Tensor] = {}
        for name in set(fixed) | {c[0] for c in copies if c is not None}:
            mask = torch.zeros(n_copies, self.width[name], dtype=torch.bool)
            for unit in fixed.get(name, []):
                mask[:, unit if unit >= 0 else slice(None)] = True
            for p, c in enumerate(copies):
                if c is not None and c[0] == name:
                    mask[p, c[1] if c[1] >= 0 else slice(None)] = True
            act, axis = self.clean_acts[name], self.axis[name]
            shape = [n_copies] + [1] * act.dim()  # (P, B, ...) with the units at axis + 1
            if axis is not None:
                shape[axis + 1] = self.width[name]
            masks[name] = mask.view(shape).to(act.device)

        def hook_for(name: str) -> Callable[..., Any]:
            def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
                live = out.reshape(n_copies, batch, *out.shape[1:])  # (P, B, ...)
                return torch.where(masks[name], self.clean_acts[name].unsqueeze(0), live).reshape(out.shape)

            return hook

        with _hooked(self.model, {n: hook_for(n) for n in masks}), torch.no_grad():
            logits = _logits(self.owner, self.model, _repeat(self.corrupted, n_copies))
        if logits.shape[0] != n_copies * batch:
            raise ConfigError(f"`{self.owner}`: expected logits with {n_copies * batch} rows for {n_copies} copies of the batch, got shape {tuple(logits.shape)}. HINT: batched=False.")
        return logits.reshape(n_copies, batch, *logits.shape[1:])

    def scores(self, logits: torch.Tensor) -> list[float]:
        """The metric of each copy of ``(P, B, ...)`` logits."""
        import torch

        if self.metric is None:
            diff = logits - self.logits_clean.unsqueeze(0)
            return torch.linalg.vector_norm(diff, dim=-1).reshape(len(logits), -1).mean(1).tolist()
        return [float(self.metric(copy, self.logits_clean, self.logits_corr)) for copy in logits]

    def sweep(self, names: list[str], *, batched: bool, chunk: int, fixed: Mapping[str, list[int]] | None = None) -> pd.DataFrame:
        per_pass = max(1, min(chunk, MAX_ROWS // self.batch)) if batched else 1
        # With several copies per pass, the first copy of the first pass is left unpatched: it must score what
        # the corrupted batch alone scored, or the copies influence each other.
        check = per_pass > 1 and not fixed
        todo: list[tuple[str, int] | None] = ([None] if check else []) + [(n, u) for n in names for u in self.units_of(n)]
        rows: list[tuple[str, int, float, float]] = []
        for start in range(0, len(todo), per_pass):
            part = todo[start : start + per_pass]
            for copy, score in zip(part, self.scores(self.run(part, fixed))):
                if copy is not None:
                    rows.append((copy[0], copy[1], score, _effect(score, self.m_corr, self.m_clean)))
                elif abs(score - self.m_corr) > 1e-4 * (1.0 + abs(self.m_corr)):
                    raise ConfigError(
                        f"`{self.owner}(batched=True)`: the model is not batch-independent: an unpatched copy of `corrupted` in a "
                        f"repeated batch scored {score:.6g}, alone {self.m_corr:.6g}. HINT: model.eval() (dropout, batch norm), or batched=False."
                    )
        return _sorted(rows)


def _check_options(owner: str, units: Any, metric: Any, batched: Any, chunk: Any) -> None:
    from comgra_callbacks.validation import boolean, one_of, optional_callable, positive_int

    one_of(owner, "units", units, ("neuron", "node"))
    optional_callable(owner, "metric", metric)
    boolean(owner, "batched", batched)
    positive_int(owner, "chunk", chunk)


def activation_patching(
    model: nn.Module,
    clean: Any,
    corrupted: Any,
    nodes: str | list[str],
    *,
    metric: Metric | None = None,
    units: Units = "neuron",
    batched: bool = True,
    chunk: int = 256,
) -> pd.DataFrame:
    """Patch each unit of each node from the clean run into the corrupted run, one at a time, and score it.

    Args:
        model: the model, used as it is (call ``model.eval()`` first: dropout or batch norm in training mode
            make runs differ). Its parameters are not changed and no gradient is computed.
        clean / corrupted: paired inputs with a leading batch axis, same shape: a tensor, or a dict of
            tensors passed as keyword arguments. Several examples: each unit is patched in all of them.
        nodes: a module name or a list of names (``model.get_submodule(name)``), each returning a tensor.
        metric: ``metric(logits_patched, logits_clean, logits_corrupted) -> float`` of one patched run (its
            logits have the batch axis); default :func:`logit_difference`, averaged over the batch.
        units: ``"neuron"`` (one row per neuron of each node) or ``"node"`` (the whole node; unit -1).
        batched: run the corrupted batch repeated P times in one forward pass, a different unit patched in
            each copy. This assumes that the model treats examples independently (no batch norm in training
            mode, no attention across the batch); the first pass checks it with one unpatched copy and raises
            if it differs. ``batched=False``: one forward pass per unit.
        chunk: at most this many copies per forward pass, and at most ``MAX_ROWS`` (16 384) rows of copies
            times batch.

    Returns:
        A DataFrame with columns ``node``, ``unit``, ``score``, ``effect``, one row per (node, unit), sorted by
        ``effect`` (the fraction of the clean-corrupted gap closed), highest first.

    Raises:
        NodeNotFoundError: a node name is not a module of the model (the message lists them).
        ConfigError: clean and corrupted differ in shape; a node has no neuron axis; the model is not
            batch-independent under ``batched=True``.
        ConfigTypeError: an argument, the model's output or a node's output has a wrong type.

    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    >>> table = activation_patching(model, torch.randn(5, 4), torch.randn(5, 4), ["0", "1"])
    >>> table.shape, list(table.columns)
    ((16, 4), ['node', 'unit', 'score', 'effect'])
    >>> activation_patching(model, torch.randn(5, 4), torch.randn(5, 4), "fc")
    Traceback (most recent call last):
    ...
    comgra_callbacks.errors.NodeNotFoundError: `activation_patching(nodes=...)`: the model has no module 'fc'. Available: '0', '1', '2'.
    """
    owner = "activation_patching"
    _check_options(owner, units, metric, batched, chunk)
    names = _resolve_nodes(owner, model, nodes)
    patcher = _Patcher(owner, model, clean, corrupted, names, units, metric)
    return patcher.sweep(names, batched=batched, chunk=chunk)


def attribution_patching(
    model: nn.Module,
    clean: Any,
    corrupted: Any,
    nodes: str | list[str],
    *,
    metric: Metric | None = None,
    units: Units = "neuron",
) -> pd.DataFrame:
    """The table of :func:`activation_patching` estimated from one clean forward, one corrupted forward and one
    backward: ``score ~ m_corr + sum((a_clean - a_corr) * dm/da)`` over the unit's elements (first-order
    Taylor expansion of the metric around the corrupted run; Nanda's attribution patching).

    Cheap for any number of units; exact for a unit whose effect on the metric is linear, an approximation
    otherwise (large patches, saturated nonlinearities). Use it to rank, then patch the top units exactly.

    Args:
        metric: as in :func:`activation_patching`, but built from torch operations and returning a 0-d tensor
            (it is differentiated). Default: :func:`logit_difference`.
        Other arguments: as in :func:`activation_patching`. The model's parameter gradients are not touched.

    Returns:
        A DataFrame with columns ``node``, ``unit``, ``score``, ``effect``, sorted by ``effect``, highest first.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    >>> exact = activation_patching(model, torch.ones(1, 4), torch.zeros(1, 4), "2", units="node")
    >>> approx = attribution_patching(model, torch.ones(1, 4), torch.zeros(1, 4), "2", units="node")
    >>> round(float(exact.effect[0]), 4), round(float(approx.effect[0]), 4)  # the output is linear in itself
    (1.0, 1.0)
    """
    import torch

    owner = "attribution_patching"
    _check_options(owner, units, metric, True, 1)
    names = _resolve_nodes(owner, model, nodes)
    _check_inputs(owner, clean, corrupted)
    logits_clean, clean_acts, _ = _capture(owner, model, clean, names)
    logits_corr, corr_acts, zeros = _capture(owner, model, corrupted, names, grad=True)
    with torch.enable_grad():
        m = _metric_value(metric, logits_corr, logits_clean.detach(), logits_corr.detach())
        if not isinstance(m, torch.Tensor) or m.dim() != 0 or not m.requires_grad:
            raise ConfigTypeError(f"{_where(owner, 'metric')}: expected a 0-d tensor that depends on the patched logits, got {type(m).__name__}.")
        grads = torch.autograd.grad(m, [zeros[n] for n in names], allow_unused=True)
    m_corr = float(m.detach())
    m_clean = float(_metric_value(metric, logits_clean, logits_clean, logits_corr.detach()))
    rows: list[tuple[str, int, float, float]] = []
    for name, grad in zip(names, grads):
        if clean_acts[name].shape != corr_acts[name].shape:
            raise ConfigError(f"`{owner}`: node {name!r} has output shape {tuple(clean_acts[name].shape)} on `clean` and {tuple(corr_acts[name].shape)} on `corrupted`.")
        axis = _unit_axis(owner, name, clean_acts[name], units)
        term = torch.zeros_like(clean_acts[name]) if grad is None else grad * (clean_acts[name] - corr_acts[name])
        if axis is None:
            deltas = [float(term.sum())]
        else:
            deltas = term.movedim(axis, -1).reshape(-1, term.shape[axis]).sum(0).tolist()
        for unit, delta in enumerate(deltas):
            score = m_corr + delta
            rows.append((name, unit if axis is not None else -1, score, _effect(score, m_corr, m_clean)))
    return _sorted(rows)


# ------------------------------------------------------------------------------------------ circuits


@dataclass(frozen=True, eq=False)
class Circuit:
    """The result of :func:`circuit`.

    Attributes:
        units: ``{node: [unit, ...]}`` kept per node, best first.
        table: the kept units, columns ``node``, ``unit``, ``score``, ``effect`` as scored when chosen (with
            the units of earlier nodes already patched), in node order.
        score / effect: the metric with every circuit unit patched at once, and the gap fraction it closes.
        logit_difference: ``mean_b ||L_circuit - L_clean||_2`` (equals ``score`` for the default metric).
        sparsity: the fraction of the nodes' units left out of the circuit (units, not edges).
        seconds: the wall time of the discovery.
    """

    units: dict[str, list[int]]
    table: pd.DataFrame
    score: float
    effect: float
    logit_difference: float
    sparsity: float
    seconds: float

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {len(u)}" for n, u in self.units.items())
        return f"Circuit({{{sizes}}}, logit_difference={self.logit_difference:.4g}, effect={self.effect:.3f}, sparsity={self.sparsity:.3f}, seconds={self.seconds:.3g})"


def circuit(
    model: nn.Module,
    clean: Any,
    corrupted: Any,
    nodes: str | list[str],
    *,
    k: int | Mapping[str, int] = 5,
    metric: Metric | None = None,
    batched: bool = True,
    chunk: int = 256,
) -> Circuit:
    """Recursive activation patching: the top-``k`` neurons of each node, node by node in the order given.

    For each node, every neuron is patched from the clean run into the corrupted run *while the circuit's
    units of the earlier nodes stay patched*; the ``k`` with the highest effect (lowest logit difference by
    default) join the circuit. Give the nodes from input to output. The circuit is then scored with all its
    units patched at once. Arguments are as in :func:`activation_patching`; ``k`` is an int or ``{node: k}``.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    >>> found = circuit(model, torch.ones(2, 4), torch.zeros(2, 4), ["1", "3"], k=8)  # every neuron: exact
    >>> round(found.effect, 6), found.sparsity
    (1.0, 0.0)
    """
    owner = "circuit"
    _check_options(owner, "neuron", metric, batched, chunk)
    started = time.perf_counter()
    names = _resolve_nodes(owner, model, nodes)
    patcher = _Patcher(owner, model, clean, corrupted, names, "neuron", metric)
    ks = {n: (k.get(n) if isinstance(k, Mapping) else k) for n in names}
    for name, value in ks.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= patcher.width[name]:
            raise ConfigError(f"{_where(owner, 'k')}: expected an int from 1 to {patcher.width[name]} (the neurons of {name!r}), got {value!r}.")
    fixed: dict[str, list[int]] = {}
    chosen = []
    for name in names:
        top = patcher.sweep([name], batched=batched, chunk=chunk, fixed=fixed).head(ks[name])
        fixed[name] = top["unit"].tolist()
        chosen.append(top)
    logits = patcher.run([None], fixed)
    score = patcher.scores(logits)[0]
    logit_diff = float(logit_difference(logits[0], patcher.logits_clean))
    total = sum(patcher.width.values())
    return Circuit(
        units=fixed,
        table=pd.concat(chosen, ignore_index=True),
        score=score,
        effect=_effect(score, patcher.m_corr, patcher.m_clean),
        logit_difference=logit_diff,
        sparsity=1.0 - sum(len(u) for u in fixed.values()) / total,
        seconds=time.perf_counter() - started,
    )


# ------------------------------------------------------------------------------------------ over training


def tracked_circuit(scores: pd.DataFrame, step: int | None = None, *, k: int = 5) -> pd.DataFrame:
    """The circuit tracked during training as it was at ``step``: the ``k`` units of each node with the highest
    ``effect`` at the last evaluated step at or before ``step`` (the first evaluated step when ``step`` comes
    before it; None: the last evaluated step).

    Args:
        scores: ``run.circuit_scores()`` (columns step, node, unit, score, effect).
        step: a training step. k: units kept per node.

    Returns:
        Columns node, unit, score, effect, rank (0 = the node's best unit), sorted by node then rank;
        ``attrs["step"]`` is the evaluated step used. Empty (no ``attrs["step"]``) for empty scores.

    >>> scores = pd.DataFrame({"step": [0, 0, 10, 10], "node": ["h"] * 4, "unit": [0, 1, 0, 1],
    ...                        "score": [1.0, 1.0, 0.9, 0.1], "effect": [0.0, 0.0, 0.1, 0.9]})
    >>> found = tracked_circuit(scores, 12, k=1)
    >>> found.attrs["step"], found[["node", "unit", "effect"]].values.tolist()
    (10, [['h', 1, 0.9]])
    """
    from comgra_callbacks.validation import positive_int

    positive_int("tracked_circuit", "k", k)
    missing = [c for c in ("step", "node", "unit", "score", "effect") if c not in scores.columns]
    if missing:
        raise ConfigError(f"`tracked_circuit(scores=...)`: expected the columns of run.circuit_scores() (step, node, unit, score, effect); missing {missing}.")
    if scores.empty:
        return pd.DataFrame({"node": pd.Series(dtype=object), "unit": pd.Series(dtype="int64"), "score": pd.Series(dtype="float64"),
                             "effect": pd.Series(dtype="float64"), "rank": pd.Series(dtype="int64")})
    evaluated = sorted(int(s) for s in scores["step"].unique())
    if step is None:
        chosen = evaluated[-1]
    else:
        before = [s for s in evaluated if s <= step]
        chosen = before[-1] if before else evaluated[0]
    at = scores[scores["step"] == chosen].sort_values(["node", "effect"], ascending=[True, False], kind="stable", na_position="last")
    at = at.assign(rank=at.groupby("node", sort=False).cumcount())
    table = at[at["rank"] < k][["node", "unit", "score", "effect", "rank"]].reset_index(drop=True)
    table.attrs["step"] = chosen
    return table
