"""Measures: quantities computed from the model on recorded steps (progress measures, in the grokking
papers' sense), stored with the run and read back as ``run.measures``.

A measure is any callable ``fn(model)`` or ``fn(model, trainer)`` returning a float, a dict of floats
(stored as ``name.key``) or a small tensor (stored as ``name.0``, ``name.1``, ...). The callbacks evaluate
each one on the steps they record (or on ``measure_schedule``), *before* the step's forward pass: a measure
stamped with step ``s`` sees the model the forward pass of step ``s`` sees, like the record's parameters. It
runs in eval mode and without gradients (unless it sets ``needs_grad = True``); the model's mode is put back.

>>> import torch
>>> model = torch.nn.Linear(2, 2, bias=False)
>>> with torch.no_grad():
...     _ = model.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 2.0]]))
>>> WeightNorm()(model)
{'weight': 9.0, 'total': 9.0}
>>> flatten("acc", 0.5), flatten("f", {"gini": 0.25}), flatten("v", torch.tensor([1.0, 2.0]))
({'acc': 0.5}, {'f.gini': 0.25}, {'v.0': 1.0, 'v.1': 2.0})
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from comgra_callbacks.errors import ConfigError, ConfigTypeError, RecordingError
from comgra_callbacks.names import NameFilter, name_predicate

MAX_TENSOR_VALUES = 64  # a measure returning a tensor: at most this many values are stored


class Measure:
    """Base class of the shipped measures: ``__call__(model, trainer=None)``."""

    needs_grad = False

    def __call__(self, model: Any, trainer: Any = None) -> Any:
        raise NotImplementedError


def _batches(data: Any, owner: str) -> list[tuple[Any, Any]]:
    """``data`` as a list of ``(inputs, targets)`` batches: a pair of tensors, or an iterable of pairs."""
    import torch

    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return [(data[0], data[1])]
    if isinstance(data, Iterable):
        return data  # type: ignore[return-value]  # a DataLoader: iterated on every evaluation
    raise ConfigTypeError(f"`{owner}(data=...)`: expected a pair (inputs, targets) of tensors or an iterable of such pairs (a DataLoader), got {type(data).__name__}.")


def _device(model: Any) -> Any:
    for p in model.parameters():
        return p.device
    return None


def _pairs(data: Any, owner: str) -> Iterable[tuple[Any, Any]]:
    for batch in _batches(data, owner):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise RecordingError(f"`{owner}(data=...)`: expected batches (inputs, targets), got {type(batch).__name__}.")
        yield batch[0], batch[1]


class Loss(Measure):
    """The mean loss of the model on ``data`` (``loss_fn(model(x), y)``, default cross-entropy over the last
    axis), weighted by batch size.

    Args:
        data: ``(inputs, targets)`` tensors or an iterable of such batches (e.g. a DataLoader).
        loss_fn: ``(outputs, targets) -> scalar tensor``; default ``cross_entropy``.
    """

    def __init__(self, data: Any, loss_fn: Callable[[Any, Any], Any] | None = None) -> None:
        _batches(data, "Loss")
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigTypeError(f"`Loss(loss_fn=...)`: expected a callable (outputs, targets) -> loss, got {loss_fn!r}.")
        self.data, self.loss_fn = data, loss_fn

    def __call__(self, model: Any, trainer: Any = None) -> float:
        import torch

        fn = self.loss_fn or (lambda out, y: torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)))
        device, total, count = _device(model), 0.0, 0
        for x, y in _pairs(self.data, "Loss"):
            x, y = (x.to(device), y.to(device)) if device is not None else (x, y)
            n = int(y.shape[0]) if y.dim() else 1
            total += float(fn(model(x), y)) * n
            count += n
        return total / count if count else math.nan

    def __repr__(self) -> str:
        return f"Loss(<data>, loss_fn={getattr(self.loss_fn, '__name__', None)})"


class Accuracy(Measure):
    """The fraction of ``data`` whose ``argmax`` over the last axis of ``model(x)`` equals the target."""

    def __init__(self, data: Any) -> None:
        _batches(data, "Accuracy")
        self.data = data

    def __call__(self, model: Any, trainer: Any = None) -> float:
        device, right, count = _device(model), 0, 0
        for x, y in _pairs(self.data, "Accuracy"):
            x, y = (x.to(device), y.to(device)) if device is not None else (x, y)
            predicted = model(x).argmax(dim=-1)
            right += int((predicted == y).sum())
            count += int(y.numel())
        return right / count if count else math.nan

    def __repr__(self) -> str:
        return "Accuracy(<data>)"


class WeightNorm(Measure):
    """Sum of squares of the matching parameters: one entry per parameter and ``total``.

    Args:
        params: a name filter of parameters (glob, list of globs, callable; ``"*"`` = all).
    """

    def __init__(self, params: NameFilter = "*") -> None:
        self.params = params
        self._wanted = name_predicate(params, owner="WeightNorm(params=...)")

    def __call__(self, model: Any, trainer: Any = None) -> dict[str, float]:
        from comgra_callbacks.recording.capture import clean_name

        out: dict[str, float] = {}
        for raw, p in model.named_parameters():
            name = clean_name(raw)
            if self._wanted(name):
                out[name] = float(p.detach().double().pow(2).sum())
        out["total"] = sum(out.values())
        return out

    def __repr__(self) -> str:
        return f"WeightNorm(params={self.params!r})"


class FourierSparsity(Measure):
    """How much of a matrix's structure lies in few frequencies (the grokking seeds' Fourier basis).

    The discrete Fourier transform runs along ``axis`` (e.g. the token axis of an embedding ``(p, d)``); each
    slice along the other axis (a neuron) gets a power spectrum over the frequencies ``1 .. p // 2`` (the
    constant term left out). Returned:

    * ``gini``: the Gini coefficient of the total power per frequency (0: spread evenly, near 1: in one);
    * ``top1_share``: per slice, the share of its power in its strongest frequency, averaged over slices;
    * ``key_share``: the share of the total power in the ``n_key`` strongest frequencies, which are
      ``key.0``, ``key.1``, ... (strongest first).

    Args:
        matrix: a parameter name (``"embed.weight"``) or a function ``model -> 2-D tensor`` (so the
            effective input weights ``E @ W1.T`` are one line: ``lambda m: m.embed.weight @ m.fc1.weight.T``).
        axis: the axis the transform runs along.
        n_key: how many key frequencies are reported.

    >>> import torch
    >>> p = 11
    >>> wave = torch.cos(2 * math.pi * 3 * torch.arange(p) / p).unsqueeze(1).repeat(1, 4)  # frequency 3 only
    >>> result = FourierSparsity(lambda m: wave)(None)
    >>> round(result["top1_share"], 6), result["key.0"], round(result["gini"], 3)
    (1.0, 3.0, 0.8)
    """

    def __init__(self, matrix: str | Callable[[Any], Any], axis: int = 0, n_key: int = 5) -> None:
        if not (isinstance(matrix, str) and matrix) and not callable(matrix):
            raise ConfigTypeError(f"`FourierSparsity(matrix=...)`: expected a parameter name or a function model -> 2-D tensor, got {matrix!r}.")
        if axis not in (0, 1, -1, -2):
            raise ConfigError(f"`FourierSparsity(axis=...)`: expected 0 or 1 (an axis of a 2-D matrix), got {axis!r}.")
        if isinstance(n_key, bool) or not isinstance(n_key, int) or n_key < 1:
            raise ConfigError(f"`FourierSparsity(n_key=...)`: expected a positive int, got {n_key!r}.")
        self.matrix, self.axis, self.n_key = matrix, axis, n_key

    def _tensor(self, model: Any) -> Any:
        if callable(self.matrix):
            return self.matrix(model)
        from comgra_callbacks.recording.capture import clean_name

        params = {clean_name(n): p for n, p in model.named_parameters()}
        if self.matrix not in params:
            raise RecordingError(f"`FourierSparsity(matrix={self.matrix!r})`: the model has no such parameter; it has {sorted(params)[:8]}.")
        return params[self.matrix]

    def __call__(self, model: Any, trainer: Any = None) -> dict[str, float]:
        from comgra_callbacks.analysis.fourier import spectrum  # the one definition of the math

        m = self._tensor(model).detach().double().cpu()
        if m.dim() != 2:
            raise RecordingError(f"`FourierSparsity`: expected a 2-D matrix, got shape {list(m.shape)}.")
        return spectrum(m.numpy(), axis=self.axis, n_key=self.n_key).summary()

    def __repr__(self) -> str:
        return f"FourierSparsity({self.matrix if isinstance(self.matrix, str) else '<function>'!r}, axis={self.axis})"


class TestGradient(Measure):
    """A test item's loss, and its gradient for TracIn from the run alone (``analysis.influence(run, param, name)``).

    Evaluated like every measure, before the step's forward pass: the gradient is taken at the parameters
    that step's per-sample gradients are taken at. It is kept in memory, never stored: when the step is
    recorded with ``attribution=``, the step's end turns it into one number per training sample and chosen
    parameter, ``<grad_i * precond, test gradient>`` (series ``attribution:test:<name>``), which is what
    TracIn sums. Stored as the measure itself: the test loss. A gradient is used only on the step it was
    computed for (the parameters' version counters have not moved since).

    Args:
        data: ``(inputs, targets)`` tensors or an iterable of such batches, scored with ``loss_fn`` as
            :class:`Loss` does (the mean over the items: give one item for one item's influence); or a
            function ``model -> scalar loss tensor`` (a language model's own loss, say).
        loss_fn: ``(outputs, targets) -> scalar tensor``; default cross-entropy over the last axis.
        params: a name filter of the parameters to take the gradient of; default: those chosen by
            ``attribution=``.

    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> measure = TestGradient(lambda m: m(torch.ones(1, 2)).sum(), params="weight")
    >>> measure(model) == float(model(torch.ones(1, 2)).sum().detach())
    True
    >>> measure.take({"weight": model.weight})["weight"].tolist()
    [[1.0, 1.0]]
    """

    needs_grad = True
    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, data: Any, loss_fn: Callable[[Any, Any], Any] | None = None, params: NameFilter = None) -> None:
        if not callable(data):
            _batches(data, "TestGradient")
        if loss_fn is not None and not callable(loss_fn):
            raise ConfigTypeError(f"`TestGradient(loss_fn=...)`: expected a callable (outputs, targets) -> loss, got {loss_fn!r}.")
        self.data, self.loss_fn, self.params = data, loss_fn, params
        self._chosen = name_predicate(params, owner="TestGradient(params=...)") if params is not None else None
        self._wanted: set[str] = set()
        self._latest: dict[str, tuple[Any, int]] = {}  # parameter name -> (gradient, the parameter's _version then)

    def want(self, names: Iterable[str]) -> None:
        """The parameters with attribution (the default ``params``); called when the recorder is set up."""
        self._wanted.update(names)

    def _loss(self, model: Any) -> Any:
        import torch

        if callable(self.data) and not isinstance(self.data, Iterable):
            return self.data(model)
        fn = self.loss_fn or (lambda out, y: torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)))
        device, total, count = _device(model), None, 0
        for x, y in _pairs(self.data, "TestGradient"):
            x, y = (x.to(device), y.to(device)) if device is not None else (x, y)
            n = int(y.shape[0]) if y.dim() else 1
            part = fn(model(x), y) * n
            total, count = (part if total is None else total + part), count + n
        if total is None:
            raise RecordingError("`TestGradient(data=...)`: expected at least one batch, got none.")
        return total / count

    def __call__(self, model: Any, trainer: Any = None) -> float:
        import torch

        from comgra_callbacks.recording.capture import clean_name

        named = [(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
        chosen = [(n, p) for n, p in named if (self._chosen(n) if self._chosen is not None else n in self._wanted)]
        loss = self._loss(model)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise RecordingError(f"`TestGradient`: expected the loss to be a scalar tensor, got {type(loss).__name__}.")
        grads = torch.autograd.grad(loss, [p for _, p in chosen], allow_unused=True) if chosen else ()
        self._latest = {n: (g.detach(), p._version) for (n, p), g in zip(chosen, grads) if g is not None}
        return float(loss.detach())

    def take(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The latest gradients of ``params`` (``{name: parameter}``) whose parameters have not changed since
        they were computed; each is handed out once."""
        out = {}
        for name, p in params.items():
            found = self._latest.pop(name, None)
            if found is not None and found[1] == p._version:
                out[name] = found[0]
        return out

    def __repr__(self) -> str:
        return f"TestGradient({'<function>' if callable(self.data) and not isinstance(self.data, Iterable) else '<data>'}, params={self.params!r})"


# ------------------------------------------------------------------------------ evaluating measures
def check_measures(owner: str, measures: Any) -> dict[str, Callable[..., Any]] | None:
    """Validate ``measures=`` (a dict ``{name: callable}``)."""
    if measures is None:
        return None
    if not isinstance(measures, Mapping):
        raise ConfigTypeError(f"`{owner}(measures=...)`: expected a dict {{name: measure}}, got {measures!r}. HINT: measures={{'test': Accuracy(test_data)}}.")
    for name, fn in measures.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"`{owner}(measures=...)`: expected non-empty names without '/', got {name!r}.")
        if not callable(fn):
            raise ConfigTypeError(f"`{owner}(measures=...)`: expected a callable model -> float for {name!r}, got {fn!r}.")
    return dict(measures)


def flatten(name: str, value: Any) -> dict[str, float]:
    """A measure's result as ``{name: float}`` entries (see the module docstring)."""
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for key, item in value.items():
            out.update(flatten(f"{name}.{key}", item))
        return out
    if hasattr(value, "detach") and hasattr(value, "numel"):
        if value.numel() == 1:
            return {name: float(value)}
        if value.numel() > MAX_TENSOR_VALUES:
            raise RecordingError(f"measure {name!r}: returned a tensor of {value.numel()} values; at most {MAX_TENSOR_VALUES} are stored. HINT: return a statistic of it.")
        return {f"{name}.{i}": float(v) for i, v in enumerate(value.detach().reshape(-1).tolist())}
    if type(value).__module__ == "numpy" and getattr(value, "ndim", 0) > 0:  # an array (derive() returns numpy)
        import numpy as np

        flat = np.asarray(value, dtype=np.float64).reshape(-1)
        if flat.size == 1:
            return {name: float(flat[0])}
        if flat.size > MAX_TENSOR_VALUES:
            raise RecordingError(f"measure {name!r}: returned an array of {flat.size} values; at most {MAX_TENSOR_VALUES} are stored. HINT: return a statistic of it.")
        return {f"{name}.{i}": float(v) for i, v in enumerate(flat.tolist())}
    try:
        return {name: float(value)}
    except (TypeError, ValueError):
        raise RecordingError(f"measure {name!r}: expected a float, a dict of floats or a small tensor, got {type(value).__name__}.") from None


def evaluate(measures: Mapping[str, Callable[..., Any]], model: Any, trainer: Any = None) -> dict[str, float]:
    """Evaluate every measure on ``model`` (eval mode, no gradients unless asked for); the model's mode and
    gradients are left as they were."""
    import torch

    values: dict[str, float] = {}
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    model.eval()
    try:
        for name, fn in measures.items():
            with torch.enable_grad() if getattr(fn, "needs_grad", False) else torch.no_grad():
                result = fn(model, trainer) if _takes_two(fn) else fn(model)
            values.update(flatten(name, result))
    finally:
        for m, mode in modes:
            m.training = mode
        for p, g in grads:
            p.grad = g
    return values


def _takes_two(fn: Callable[..., Any]) -> bool:
    if isinstance(fn, Measure):
        return True
    try:
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values())
