"""Per-sample gradients of the chosen parameters and what the optimizer made of them: the tensor mathematics
of attribution, apart from the hooks that capture its inputs on a recorded step and the snapshots its results
become (:mod:`comgra_callbacks.recording.attribution`, which re-exports the public names here).

How each chosen parameter's per-sample gradients are kept is decided once (:func:`choose_targets`): an
``nn.Linear`` keeps its factors ``x`` and ``g``, another module's parameter gets them from ``torch.func``
(:func:`func_per_sample`). From those, without building a ``Linear``'s per-sample gradients: each sample's
inner product with a direction, row by row (:func:`row_dots`; TracIn's test gradients and the compact mode's
:func:`contributions`); the random projection of ``torch.func`` gradients (:func:`project`); and what the
optimizer did to a sample's gradient, its share and preconditioner (:func:`optimizer_fields`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from comgra_callbacks.errors import ConfigError
from comgra_callbacks.names import NameFilter, name_predicate
from comgra_callbacks.store.attribution import OPTIMIZER_FIELDS, OPTIMIZER_KINDS, projection_chunks

PROJECTION_CACHE_BYTES = 256 << 20
"""A projection matrix up to this size is kept (on the parameter's device) between recorded steps; a larger
one is regenerated chunk by chunk on each recorded step instead of being held."""


@dataclass(frozen=True)
class Target:
    """One chosen parameter: its node name, the module that owns it, and how its per-sample gradient is kept:
    ``"weight"`` / ``"bias"`` of an ``nn.Linear`` (factors), or ``"func"`` (computed with ``torch.func``)."""

    name: str
    module_name: str
    module: Any
    param: Any
    how: str
    attr: str = ""

    @property
    def is_weight(self) -> bool:
        return self.how == "weight"


def choose_targets(model: Any, spec: NameFilter, owner: str = "attribution") -> list[Target]:
    """The parameters ``spec`` names, and how each one's per-sample gradient is kept.

    The weight and bias of an ``nn.Linear`` keep factors. A parameter of another module that is called with
    one tensor and returns one (``nn.Embedding``, ``nn.LayerNorm``, a convolution) gets per-sample gradients
    from ``torch.func`` (a vector-Jacobian product per sample of the module's recorded input and output
    gradient); modules that mix the samples of a batch (batch normalization) cannot, and are skipped with a
    warning.

    Raises:
        ConfigError: no parameter of ``model`` matches; the message lists the parameters there are.
    """
    import torch

    from comgra_callbacks.recording.capture import clean_name

    keep = name_predicate(spec, owner=f"{owner}=...")
    modules = {clean_name(n): m for n, m in model.named_modules()}
    names = [clean_name(n) for n, _ in model.named_parameters()]
    params = {clean_name(n): p for n, p in model.named_parameters()}
    matched = [n for n in names if keep(n)]
    if not matched:
        raise ConfigError(
            f"`{owner}={spec!r}`: it matches no parameter; expected a filter of parameter names such as {names[:8]}"
            f"{' ...' if len(names) > 8 else ''}. HINT: attribution=\"*.weight\" chooses every weight."
        )
    chosen, skipped = [], []
    for name in matched:
        module_name, _, attr = name.rpartition(".")
        module = modules.get(module_name)
        if module is None or params[name] is not getattr(module, attr, None):
            skipped.append(name)
        elif isinstance(module, torch.nn.Linear) and attr in ("weight", "bias"):
            chosen.append(Target(name, module_name, module, params[name], attr, attr))
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            skipped.append(name)
        else:
            chosen.append(Target(name, module_name, module, params[name], "func", attr))
    if skipped:
        warnings.warn(
            f"comgra: `{owner}={spec!r}` matches parameters whose per-sample gradients cannot be taken from their "
            f"module's input and output gradient (batch normalization mixes the samples); they get no attribution: "
            f"{skipped[:8]}{' ...' if len(skipped) > 8 else ''}.",
            RuntimeWarning,
            stacklevel=3,
        )
    if not chosen:
        raise ConfigError(f"`{owner}={spec!r}`: of the parameters it matches ({matched[:8]}), none can be attributed. HINT: choose nn.Linear weights, e.g. \"*.weight\".")
    return chosen


@dataclass
class Call:
    """One forward call of a chosen module on the step: its input and, after backward, its output's gradient."""

    x: Any
    batch: int
    raw: bool = False
    g: Any = None


@dataclass
class OptimizerInfo:
    """What the optimizer step of a chosen parameter was, learnt just before it: ``kind`` (an index of
    ``OPTIMIZER_KINDS``), its group's learning rate and settings, whether its momentum buffer starts now, and
    the parameter's value before the step (the update is the difference)."""

    kind: int
    lr: float
    group: dict[str, Any]
    optimizer: Any
    first_momentum: bool
    before: Any


def optimizer_kind(optimizer: Any) -> int:
    """The index in ``OPTIMIZER_KINDS`` of a torch optimizer (0, "other", for any other: treated like plain SGD)."""
    import torch

    if isinstance(optimizer, torch.optim.AdamW):
        return OPTIMIZER_KINDS.index("adamw")
    if isinstance(optimizer, torch.optim.Adam):
        return OPTIMIZER_KINDS.index("adam")
    if isinstance(optimizer, torch.optim.SGD):
        return OPTIMIZER_KINDS.index("sgd")
    return 0


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer behind a framework's wrapper (Lightning's ``LightningOptimizer``; accelerate's
    ``AcceleratedOptimizer``, itself an ``Optimizer`` subclass, holds the real one as ``.optimizer``)."""
    import torch

    for _ in range(3):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "param_groups") else None


def row_dots(target: Target, x: Any, g: Any, per_sample: Any, d: Any) -> Any:
    """``(B, rows)``: ``<grad_i[j], d[j]>`` per sample ``i`` and row (neuron) ``j`` of the parameter, from the
    factors without building the per-sample gradients: ``<sum_t g_t ⊗ x_t, D> = sum_t g_t · (D x_t)``."""
    if per_sample is not None:  # (B, *shape) from torch.func
        return (per_sample * d.unsqueeze(0)).reshape(per_sample.shape[0], d.shape[0], -1).sum(dim=2)
    if target.is_weight:
        projected = (x.reshape(-1, x.shape[-1]) @ d.T).reshape(g.shape)  # one GEMM: (B*T, d_in) @ (d_in, d_out)
        return (g * projected).sum(dim=1)  # (B, T, d_out) -> (B, d_out)
    return g.sum(dim=1) * d.unsqueeze(0)  # a bias


def contributions(target: Target, x: Any, g: Any, per_sample: Any, update: Any, precond: Any, fields: list[float]) -> tuple[Any, Any]:
    """``keep="contributions"``: each sample's signed share of each row's update along that row's update,
    ``c_ij = -lr * share * <grad_ij * precond_j, Δ_j> / |Δ_j|`` ``(B, rows)``, and the rows' norms ``|Δ_j|``."""
    import torch

    lr, share = fields[OPTIMIZER_FIELDS.index("lr")], fields[OPTIMIZER_FIELDS.index("share")]
    direction = update * precond if precond is not None else update
    dots = row_dots(target, x, g, per_sample, direction)  # (B, rows)
    rows = update.reshape(update.shape[0], -1) if update.dim() > 1 else update.reshape(-1, 1)
    norms = rows.norm(dim=1)  # (rows,)
    contribution = -lr * share * dots / torch.where(norms > 0, norms, torch.ones_like(norms)).unsqueeze(0)
    return contribution, norms


def func_per_sample(target: Target, calls: list[Call]) -> Any:
    """``(B, *param.shape)``: each sample's gradient of ``target``'s parameter, summed over the module's calls,
    from a vector-Jacobian product of the module at each sample's input with that sample's output gradient."""
    import torch
    from torch.func import functional_call, vjp, vmap

    done = [c for c in calls if c.g is not None and c.raw]
    if not done or len({c.batch for c in done}) > 1:
        return None
    param = target.param.detach()

    def one(xi: Any, gi: Any) -> Any:
        pulled = vjp(lambda p: functional_call(target.module, {target.attr: p}, (xi.unsqueeze(0),)), param)
        return pulled[1](gi.unsqueeze(0).to(param.dtype))[0]

    total = None
    with torch.enable_grad():
        for call in done:
            grads = vmap(one)(call.x, call.g).to(torch.float32)
            total = grads if total is None else total + grads
    return total


def optimizer_fields(param: Any, info: OptimizerInfo) -> tuple[list[float], Any]:
    """The ``attribution:optimizer`` vector and, for Adam, the preconditioner, read after the step.

    ``share``: the factor of this step's gradient in the step's update direction: 1 for plain SGD; with
    momentum ``1 - dampening`` (1 on the buffer's first step), ``1 + momentum * that`` with Nesterov; for Adam
    ``(1 - beta1) / (1 - beta1**t)``. Negative under ``maximize``."""
    import torch

    group, kind = info.group, OPTIMIZER_KINDS[info.kind]
    fields = [float(info.kind), info.lr, 1.0, 0.0, 0.0, 0.0, float(group.get("weight_decay", 0.0) or 0.0), 0.0, 0.0]
    precond = None
    if kind == "sgd":
        momentum = float(group.get("momentum", 0.0) or 0.0)
        share = 1.0
        if momentum:
            share = 1.0 if info.first_momentum else 1.0 - float(group.get("dampening", 0.0) or 0.0)
            if group.get("nesterov"):
                share = 1.0 + momentum * share
        fields[2], fields[5] = share, momentum
    elif kind in ("adam", "adamw"):
        state = info.optimizer.state.get(param, {})
        v = state.get("max_exp_avg_sq") if group.get("amsgrad") else state.get("exp_avg_sq")
        t = state.get("step")
        if v is not None and t is not None:
            t = float(t.item() if isinstance(t, torch.Tensor) else t)
            beta1, beta2 = (float(b) for b in group["betas"])
            eps = float(group["eps"])
            denom = (v.detach().to(torch.float32) / (1.0 - beta2**t)).sqrt() + eps
            precond = 1.0 / denom
            fields[2], fields[3], fields[5], fields[7] = (1.0 - beta1) / (1.0 - beta1**t), 1.0, beta1, t
    if group.get("maximize"):
        fields[2] = -fields[2]
    return fields, precond


def project(name: str, flat: Any, k: int, kept: dict[str, Any]) -> Any:
    """``(B, k)``: per-sample gradients ``flat`` (``(B, numel)``) of parameter ``name`` times its random
    projection ``R`` (``(numel, k)``, N(0, 1/k) entries), generated from the seed and the name by
    :func:`~comgra_callbacks.store.attribution.projection_chunks`, so that the reader rebuilds it. ``kept``
    holds ``R`` by parameter name between calls, up to :data:`PROJECTION_CACHE_BYTES` each."""
    import torch

    matrix = kept.get(name)
    if matrix is not None and matrix.device == flat.device:
        return flat @ matrix
    numel = int(flat.shape[1])
    keep = numel * k * 4 <= PROJECTION_CACHE_BYTES
    out = torch.zeros(flat.shape[0], k, dtype=torch.float32, device=flat.device)
    parts = []
    for start, rows in projection_chunks(name, numel, k):
        r = torch.from_numpy(rows).to(flat.device)
        out += flat[:, start : start + r.shape[0]] @ r
        if keep:
            parts.append(r)
    if keep:
        kept[name] = torch.cat(parts)
    return out
