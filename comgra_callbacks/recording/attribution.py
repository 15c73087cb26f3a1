"""Per-sample attribution of parameter updates: what each sample of a recorded step contributed.

For the weight ``W`` (``(d_out, d_in)``) of an ``nn.Linear`` the gradient of a batch is a sum of outer
products, one per sample ``i`` and position ``t``: ``dL/dW = sum_i sum_t g_it ⊗ x_it``, with ``x`` the layer's
input and ``g`` the gradient of the loss with respect to its output. Keeping ``x`` and ``g`` (the *factors*,
``B·T·(d_in + d_out)`` numbers) keeps every per-sample gradient exactly, at a fraction of ``B·d_out·d_in``.
A bias keeps ``g`` only (its per-sample gradient is ``sum_t g_it``). A parameter of another module
(``nn.Embedding``, ``nn.LayerNorm``, ...) gets its per-sample gradients from ``torch.func`` instead: a
vector-Jacobian product of the module at each sample's recorded input with that sample's output gradient,
computed at the optimizer step (see :func:`choose_targets`).

What one recorded step stores for each chosen parameter ``p`` (series of node ``p``, each kept whole):

* ``attribution:input`` ``(B, T, d_in)``: ``x`` (weights only; ``T`` = 1 for inputs without positions);
* ``attribution:grad_output`` ``(B, T, d_out)``: ``g``, as the backward before the optimizer step saw it;
* ``attribution:index`` ``(B, 2)``: each sample's dataset index as ``hi * 2**24 + lo`` (float32 is exact below 2**24);
* ``attribution:optimizer``: the vector of ``OPTIMIZER_FIELDS`` (learning rate, optimizer kind, share, ...);
* ``attribution:precond`` (Adam, AdamW): ``1 / (sqrt(v_hat) + eps)`` after the step, shaped like ``p``;
* ``attribution:update``: the parameter's change over the step, shaped like ``p``;
* ``attribution:per_sample_grad`` ``(B, *p.shape)``: for ``torch.func`` parameters, instead of the factors;
  with ``projection=k`` (``attribution_projection=`` of the callbacks) ``attribution:per_sample_grad_projected``
  ``(B, k)`` instead, ``G_flat @ R`` with the seeded Gaussian ``R`` of
  :func:`~comgra_callbacks.store.attribution.projection_chunks`, next to the exact contributions of the compact
  mode below (``attribution:contribution``, ``attribution:update_norm``);
* ``attribution:test:<measure>`` ``(B,)``: for each :class:`~comgra_callbacks.measures.TestGradient` measure
  evaluated on the step, ``<grad_i * precond, test gradient>`` per sample (what TracIn needs, B numbers).

With ``keep="contributions"`` (``attribution_keep=`` of the callbacks) the step's end reduces the factors, on
the training thread, to what :func:`~comgra_callbacks.analysis.contributions` and ``top_items`` read:
``attribution:contribution`` ``(B, rows)``, each sample's signed share of each row's (neuron's) update along
that row's update, ``<u_ij, Δ_j> / |Δ_j|`` (one matmul per layer), and ``attribution:update_norm`` ``(rows,)``,
``|Δ_j|``; input, grad_output, per_sample_grad, precond and update are not kept (``B·rows`` numbers instead
of ``B·T·(d_in + d_out) + 2·rows·d_in``).

A sample's share of the update is then ``-lr * share * (sum_t g_it ⊗ x_it) * precond`` (see
:mod:`comgra_callbacks.analysis.attribution` and docs/attribution.md for what momentum, weight decay and Adam
do to it). Hooks exist only on recorded steps and are removed when the step ends or is aborted.

This module is the recording side: the options, the hooks of a step (:class:`StepFactors`) and the
snapshots; the tensor mathematics (which parameter keeps what, per-sample gradients with ``torch.func``,
row products, the projection, the optimizer's share) is in :mod:`comgra_callbacks.recording.per_sample`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from comgra_callbacks.errors import ConfigError, ConfigTypeError
from comgra_callbacks.names import NameFilter
from comgra_callbacks.recording.pending import FULL, Snapshot
from comgra_callbacks.recording.per_sample import (
    PROJECTION_CACHE_BYTES,  # noqa: F401 - re-exported
    Call,
    OptimizerInfo,
    Target,
    choose_targets,
    contributions,
    func_per_sample,
    optimizer_fields,
    optimizer_kind,
    project,
    row_dots,
    unwrap_optimizer,
)
from comgra_callbacks.store.attribution import (
    INDEX_SPLIT,
    KEEP_CHOICES,
    OPTIMIZER_FIELDS,
    PREFIX,
    PROJECTION_SEED,
    TEST_PREFIX,
)
from comgra_callbacks.store.format import SeriesKey

INPUT, GRAD_OUTPUT, INDEX, OPTIMIZER, PRECOND, UPDATE, PER_SAMPLE, CONTRIBUTION, UPDATE_NORM, PROJECTED = (
    PREFIX + v
    for v in (
        "input", "grad_output", "index", "optimizer", "precond", "update", "per_sample_grad", "contribution", "update_norm",
        "per_sample_grad_projected",
    )
)
INDEX_FIELDS = ("idx", "index")
"""Batch fields taken as the dataset index of each sample when ``index_field`` is not given."""


def check_index_field(owner: str, value: Any) -> str | int | None:
    """``index_field=``: a batch key or attribute name, a position in a tuple batch, or None (the default).

    >>> check_index_field("ComgraCallback", 1.5)
    Traceback (most recent call last):
    ...
    comgra_callbacks.errors.ConfigTypeError: `ComgraCallback(index_field=...)`: expected a batch field name (str), a position in a tuple batch (int) or None, got 1.5 of type float.
    """
    if value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ConfigTypeError(
        f"`{owner}(index_field=...)`: expected a batch field name (str), a position in a tuple batch (int) or None, "
        f"got {value!r} of type {type(value).__name__}."
    )


def check_keep(owner: str, value: Any) -> str:
    """``attribution_keep=``: what a recorded step keeps of the per-sample factors.

    >>> check_keep("ComgraCallback", "contribution")
    Traceback (most recent call last):
    ...
    comgra_callbacks.errors.ConfigError: `ComgraCallback(attribution_keep=...)`: expected one of ('factors', 'contributions'), got 'contribution'.
    """
    if value in KEEP_CHOICES:
        return str(value)
    raise ConfigError(f"`{owner}(attribution_keep=...)`: expected one of {KEEP_CHOICES}, got {value!r}.")


def check_projection(owner: str, value: Any) -> int | None:
    """``attribution_projection=``: None (the default: full per-sample gradients) or ``k``, a positive int,
    the dimension ``torch.func`` parameters' per-sample gradients are randomly projected to.

    >>> check_projection("ComgraCallback", 0)
    Traceback (most recent call last):
    ...
    comgra_callbacks.errors.ConfigError: `ComgraCallback(attribution_projection=...)`: expected None or a positive int (the projected dimension k, e.g. 1024), got 0.
    >>> check_projection("ComgraCallback", "512")
    Traceback (most recent call last):
    ...
    comgra_callbacks.errors.ConfigTypeError: `ComgraCallback(attribution_projection=...)`: expected None or a positive int (the projected dimension k, e.g. 1024), got '512' of type str.
    """
    if value is None:
        return None
    expected = f"`{owner}(attribution_projection=...)`: expected None or a positive int (the projected dimension k, e.g. 1024), got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{expected} of type {type(value).__name__}.")
    if value < 1:
        raise ConfigError(f"{expected}.")
    return int(value)


@dataclass
class StepFactors:
    """The factors of one recorded step; created by :meth:`Attribution.begin`, read by :meth:`finish`."""

    owner: Attribution
    is_current: Callable[[], bool]
    calls: dict[str, list[Call]] = field(default_factory=dict)  # module name -> its calls, in order
    forward_handles: list[Any] = field(default_factory=list)
    grad_handles: list[Any] = field(default_factory=list)
    optimizer: dict[str, OptimizerInfo] = field(default_factory=dict)  # parameter name -> its optimizer then
    per_sample: dict[str, Any] = field(default_factory=dict)  # torch.func targets: (B, *shape) per-sample gradients
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)  # measure name -> parameter name -> test gradient

    # ------------------------------------------------------------------------------------ hooks
    def attach(self) -> None:
        for module_name, module in self.owner.modules.items():
            self.calls[module_name] = []
            raw = module_name in self.owner.func_modules
            self.forward_handles.append(module.register_forward_hook(self._forward_hook(module_name, raw)))

    def _forward_hook(self, module_name: str, raw: bool = False) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            import torch

            if not self.is_current() or not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                return
            x = args[0]
            if x.dim() == 0 or not output.requires_grad:
                return
            batch = int(x.shape[0]) if x.dim() > 1 else 1
            if raw:  # a module for torch.func: its input as it was (token ids stay integers)
                call = Call(x.detach().clone(), batch, raw=True)
            else:
                call = Call(x.detach().to(torch.float32, copy=True).reshape(batch, -1, x.shape[-1]), batch)  # (B, T, d_in)
            self.calls[module_name].append(call)
            self.grad_handles.append(output.register_hook(self._grad_hook(call)))

        return hook

    def _grad_hook(self, call: Call) -> Callable[[Any], None]:
        def hook(grad: Any) -> None:
            import torch

            if grad is not None and self.is_current():
                g = grad.detach()
                call.g = g.clone() if call.raw else g.to(torch.float32).reshape(call.batch, -1, grad.shape[-1])  # (B, T, d_out)

        return hook

    def stop_forward(self) -> None:
        """No more forward calls are captured (the gradients of those captured still are)."""
        handles, self.forward_handles = self.forward_handles, []
        for handle in handles:
            handle.remove()

    def remove(self) -> None:
        """Every hook off (the step ended or was aborted)."""
        self.stop_forward()
        handles, self.grad_handles = self.grad_handles, []
        for handle in handles:
            handle.remove()

    @property
    def reruns_modules(self) -> bool:
        """Whether :meth:`before_optimizer_step` calls modules again (``torch.func``), so that hooks must be off."""
        return bool(self.owner.func_modules)

    # -------------------------------------------------------------------------------- optimizer
    def before_optimizer_step(self, optimizer: Any) -> None:
        """Learn each chosen parameter's learning rate and optimizer, and keep its value before the step."""
        optimizer = unwrap_optimizer(optimizer)
        if optimizer is None:
            return
        import torch

        groups = {id(p): g for g in getattr(optimizer, "param_groups", ()) for p in g.get("params", ())}
        kind = optimizer_kind(optimizer)
        for target in self.owner.targets:
            group = groups.get(id(target.param))
            if group is None or target.name in self.optimizer:
                continue
            lr = group.get("lr", math.nan)
            lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
            state = optimizer.state.get(target.param, {}) if hasattr(optimizer, "state") else {}
            first = state.get("momentum_buffer") is None
            before = target.param.detach().to(torch.float32, copy=True)
            self.optimizer[target.name] = OptimizerInfo(kind, lr, group, optimizer, first, before)
            if target.how == "func":  # before the step changes the parameter the gradient is taken at
                self.per_sample[target.name] = func_per_sample(target, self.calls.get(target.module_name, []))

    # ----------------------------------------------------------------------------------- finish
    def finish(self, batch: Any, values: Mapping[str, Any], grad_scale: float = 1.0) -> list[Snapshot]:
        """The step's snapshots (call after the optimizer step); nothing for a step without one."""
        import torch

        self.remove()
        out: list[Snapshot] = []
        factors: dict[str, tuple[Any, Any]] = {}
        for module_name, calls in self.calls.items():
            done = [c for c in calls if c.g is not None and not c.raw]
            if not done or len({c.batch for c in done}) > 1:
                continue
            # one call (the usual case): x is already a private copy; g may be autograd's own buffer, so cat copies it
            x = torch.cat([c.x for c in done], dim=1) if len(done) > 1 else done[0].x
            g = torch.cat([c.g for c in done], dim=1)
            if grad_scale != 1.0:
                g = g / grad_scale
            factors[module_name] = (x, g)
        index_rows: Any = None
        for target in self.owner.targets:
            info = self.optimizer.get(target.name)
            per_sample = self.per_sample.get(target.name)
            if info is None or (target.module_name not in factors and per_sample is None):
                continue
            size = int(per_sample.shape[0]) if per_sample is not None else int(factors[target.module_name][0].shape[0])
            if index_rows is None:
                index_rows, from_batch = self.owner.dataset_index(batch, values, size)
            if index_rows.shape[0] != size:
                continue
            fields, precond = optimizer_fields(target.param, info)
            fields[OPTIMIZER_FIELDS.index("index_from_batch")] = float(from_batch)
            update = target.param.detach().to(torch.float32) - info.before
            key = target.name
            x, g = factors.get(target.module_name, (None, None))
            for name, grads in self.tests.items():  # TracIn's inner products, B numbers per test measure
                test = grads.get(target.name)
                if test is not None and tuple(test.shape) == tuple(target.param.shape):
                    test = test.to(torch.float32) * precond if precond is not None else test.to(torch.float32)
                    dots = row_dots(target, x, g, per_sample, test).reshape(size, -1).sum(dim=1)
                    out.append(_full(key, TEST_PREFIX + name, dots))
            projection = self.owner.projection
            if self.owner.keep == "contributions":
                out.extend(_contribution_snapshots(target, x, g, per_sample, update, precond, fields))
            elif per_sample is not None and projection is not None:  # exact contributions, projected gradients
                fields[OPTIMIZER_FIELDS.index("projection_seed")] = float(PROJECTION_SEED)
                out.extend(_contribution_snapshots(target, x, g, per_sample, update, precond, fields))
                out.append(_full(key, PROJECTED, self.owner.project(target.name, per_sample.reshape(size, -1))))
            elif per_sample is not None:
                out.append(_full(key, PER_SAMPLE, per_sample))
            else:
                if target.is_weight:
                    out.append(_full(key, INPUT, x))
                out.append(_full(key, GRAD_OUTPUT, g))
            out.append(_full(key, INDEX, index_rows, dtype="int64"))
            out.append(_full(key, OPTIMIZER, torch.tensor(fields, dtype=torch.float32)))
            if self.owner.keep == "factors":
                if precond is not None:
                    out.append(_full(key, PRECOND, precond))
                out.append(_full(key, UPDATE, update))
        self.calls.clear()
        self.optimizer.clear()
        self.per_sample.clear()
        self.tests.clear()
        return out


def _contribution_snapshots(target: Target, x: Any, g: Any, per_sample: Any, update: Any, precond: Any, fields: list[float]) -> list[Snapshot]:
    """``keep="contributions"``: the snapshots of :func:`~comgra_callbacks.recording.per_sample.contributions`."""
    contribution, norms = contributions(target, x, g, per_sample, update, precond, fields)
    return [_full(target.name, CONTRIBUTION, contribution), _full(target.name, UPDATE_NORM, norms)]


def _full(node: str, view: str, tensor: Any, dtype: str = "float32") -> Snapshot:
    return Snapshot(SeriesKey(node, None, 0, view), tensor, dtype, neurons=False, samples=FULL)



class Attribution:
    """Per-sample attribution of the updates of the chosen parameters of one model.

    Args:
        model: the model being trained.
        spec: which parameters (a name filter, e.g. ``"mlp.*.weight"``).
        index_field: where a batch keeps each sample's dataset index (see :meth:`dataset_index`).
        keep: ``"factors"`` (exact per-sample gradients) or ``"contributions"`` (reduced at the step's end,
            see the module docstring).
        tests: ``{name: TestGradient}`` measures whose test gradients are turned into TracIn's inner
            products on the steps they were evaluated on.
        projection: ``k``: with ``keep="factors"``, a ``torch.func`` parameter's per-sample gradients are
            stored projected, ``(B, k)`` (see :meth:`project`), next to the exact contributions; None keeps
            them whole. ``nn.Linear`` parameters keep their factors either way.

    Raises:
        ConfigError: ``spec`` chooses no parameter of ``model`` that can be attributed (the message lists them).
    """

    def __init__(
        self,
        model: Any,
        spec: NameFilter,
        index_field: str | int | None = None,
        keep: str = "factors",
        tests: Mapping[str, Any] | None = None,
        projection: int | None = None,
    ) -> None:
        self.targets = choose_targets(model, spec)
        self.projection = check_projection("Attribution", projection)
        self._matrices: dict[str, Any] = {}  # parameter name -> its projection matrix, when small enough to keep
        self.modules = {t.module_name: t.module for t in self.targets}
        self.func_modules = {t.module_name for t in self.targets if t.how == "func"}
        self.index_field = index_field
        self.keep = check_keep("Attribution", keep)
        self.tests = dict(tests or {})
        for test in self.tests.values():
            test.want([t.name for t in self.targets])
        self._warned = False

    def project(self, name: str, flat: Any) -> Any:
        """``(B, k)``: per-sample gradients ``flat`` (``(B, numel)``) of parameter ``name`` times its random
        projection ``R`` (:func:`~comgra_callbacks.recording.per_sample.project`; ``R`` kept between steps
        when small enough)."""
        assert self.projection is not None
        return project(name, flat, self.projection, self._matrices)

    def begin(self, is_current: Callable[[], bool]) -> StepFactors:
        """Hooks on the chosen modules for one step; ``is_current()`` says whether a call belongs to it. The
        test gradients the measures computed for this step (the parameters unchanged since) come along."""
        factors = StepFactors(self, is_current)
        for name, test in self.tests.items():
            grads = test.take({t.name: t.param for t in self.targets})
            if grads:
                factors.tests[name] = grads
        factors.attach()
        return factors

    def dataset_index(self, batch: Any, values: Mapping[str, Any], size: int) -> tuple[Any, bool]:
        """``(B, 2)`` halves of each sample's dataset index, and whether the batch held them.

        The index is the batch field ``index_field`` (a key of a dict batch, an attribute, a position in a
        tuple batch, or a model input of that name as the HuggingFace integration records it); by default a
        field named ``idx`` or ``index``; otherwise the position in the batch (0 .. B-1)."""
        import torch

        wanted = (self.index_field,) if self.index_field is not None else INDEX_FIELDS
        found: Any = None
        field_name: str | int | None = wanted[0]
        for field_name in wanted:
            found = _field(batch, field_name)
            if found is None and isinstance(field_name, str):
                found = values.get(f"batch.{field_name}", values.get(field_name))
            if found is not None:
                break
        ok = isinstance(found, torch.Tensor) and found.numel() == size and not found.is_floating_point()
        if found is not None and not ok and not self._warned:
            self._warned = True
            warnings.warn(
                f"comgra: the batch field {field_name!r} holds {type(found).__name__} "
                f"{tuple(found.shape) if isinstance(found, torch.Tensor) else ''}; expected an integer tensor of one "
                f"index per sample ({size}). Batch positions are recorded as dataset indices instead.",
                RuntimeWarning,
                stacklevel=4,
            )
        elif found is None and self.index_field is not None and not self._warned:
            self._warned = True
            warnings.warn(
                f"comgra: `index_field={self.index_field!r}`: the batch has no such field; batch positions are recorded "
                "as dataset indices instead.",
                RuntimeWarning,
                stacklevel=4,
            )
        index = found.detach().reshape(-1).to("cpu", torch.int64) if ok else torch.arange(size, dtype=torch.int64)
        return torch.stack([index // INDEX_SPLIT, index % INDEX_SPLIT], dim=1).to(torch.float32), ok


def _field(batch: Any, name: str | int) -> Any:
    if batch is None:
        return None
    if isinstance(name, int):
        return batch[name] if isinstance(batch, (tuple, list)) and -len(batch) <= name < len(batch) else None
    if isinstance(batch, Mapping):
        return batch.get(name)
    value = getattr(batch, name, None)  # a namedtuple's or dataclass's field; never a method (list.index)
    return None if callable(value) else value
