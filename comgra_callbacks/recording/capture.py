"""Finding tensors: in a batch, in a module's inputs and outputs; and the module hooks that find them.

Hooks are global state on the model. :class:`ModuleHooks` attaches forward hooks only for a recorded step
and removes every handle it made, in ``finally`` blocks and on errors: after it is closed, the model has
exactly the hooks it had before.

>>> import torch
>>> {name: kind for name, (kind, _) in batch_tensors((torch.zeros(2, 3), torch.zeros(2))).items()}
{'input': 'input', 'target': 'target'}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

TARGET_NAMES = frozenset({"labels", "label", "target", "targets", "y", "start_positions", "end_positions"})


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _target_like(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1].lower()
    return leaf in TARGET_NAMES or leaf.startswith(("target", "label"))


def batch_tensors(batch: Any, batch_fn: Callable[[Any], Mapping[str, Any]] | None = None) -> dict[str, tuple[str, Any]]:
    """Name the tensors of a batch: ``{node name: (kind, tensor)}``.

    * a tensor: ``input``; a pair ``(x, y)``: ``input`` and ``target``;
    * another sequence: ``batch.0``, ``batch.1``, ... (kind ``input``);
    * a mapping: ``batch.<key>``, kind ``target`` for keys such as ``labels`` / ``target`` / ``y``;
    * ``batch_fn(batch) -> {name: tensor}``: your names; a name like ``target*`` / ``label*`` is a target.

    >>> import torch
    >>> sorted(batch_tensors({"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.zeros(2)}))
    ['batch.input_ids', 'batch.labels']
    """
    found: dict[str, tuple[str, Any]] = {}
    if batch_fn is not None:
        named = batch_fn(batch)
        if not isinstance(named, Mapping):
            from comgra_callbacks.errors import ConfigTypeError

            raise ConfigTypeError(f"`batch_fn`: expected it to return a mapping name -> tensor, got {type(named).__name__}.")
        for name, value in named.items():
            if _is_tensor(value):
                found[str(name)] = ("target" if _target_like(str(name)) else "input", value)
        return found
    if _is_tensor(batch):
        return {"input": ("input", batch)}
    if isinstance(batch, (tuple, list)):
        tensors = [v for v in batch if _is_tensor(v)]
        if len(batch) == 2 and len(tensors) == 2:
            return {"input": ("input", batch[0]), "target": ("target", batch[1])}
        for name, value in _walk(batch, "batch", depth=3):
            found[name] = ("target" if _target_like(name) else "input", value)
        return found
    for name, value in _walk(batch, "batch", depth=3):
        found[name] = ("target" if _target_like(name) else "input", value)
    return found


def _walk(value: Any, prefix: str, depth: int) -> Iterator[tuple[str, Any]]:
    if _is_tensor(value):
        yield prefix, value
        return
    if depth == 0:
        return
    if isinstance(value, Mapping) or (hasattr(value, "items") and hasattr(value, "keys")):
        try:
            items = list(value.items())
        except Exception:
            return
        for key, item in items:
            yield from _walk(item, f"{prefix}.{key}", depth - 1)
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _walk(item, f"{prefix}.{i}", depth - 1)


def output_tensors(output: Any) -> list[tuple[str, Any]]:
    """Name suffixes for the tensors a module returned: ``""`` for a single tensor, ``":0"``, ``":1.0"``,
    ``":logits"`` for tuples and mappings.

    >>> import torch
    >>> [s for s, _ in output_tensors((torch.zeros(1), (torch.zeros(1), torch.zeros(1))))]
    [':0', ':1.0', ':1.1']
    >>> [s for s, _ in output_tensors((torch.zeros(1), None))]
    ['']
    """
    if _is_tensor(output):
        return [("", output)]
    found = [(name[len("out") :], value) for name, value in _walk(output, "out", depth=2)]
    found = [(":" + suffix[1:] if suffix.startswith(".") else suffix, value) for suffix, value in found]
    if len(found) == 1:
        return [("", found[0][1])]
    return found


def input_tensors(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Iterator[Any]:
    """Tensors among a module's positional and keyword inputs (one level into tuples, lists and dicts)."""
    for value in list(args) + list(kwargs.values()):
        if _is_tensor(value):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from (v for v in value if _is_tensor(v))
        elif isinstance(value, Mapping):
            yield from (v for v in value.values() if _is_tensor(v))


class ModuleHooks:
    """Forward hooks on chosen modules for the duration of one recorded step.

    Args:
        modules: ``[(dotted name, module)]`` to hook.
        on_forward: called as ``on_forward(name, args, kwargs, output)`` for every call of a hooked module.
    """

    def __init__(self, modules: list[tuple[str, Any]], on_forward: Callable[[str, tuple[Any, ...], dict[str, Any], Any], None]) -> None:
        self._modules = modules
        self._on_forward = on_forward
        self._handles: list[Any] = []

    def attach(self) -> None:
        try:
            for name, module in self._modules:
                self._handles.append(module.register_forward_hook(self._make_hook(name), with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    def _make_hook(self, name: str) -> Callable[..., None]:
        on_forward = self._on_forward

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            on_forward(name, args, kwargs, output)

        return hook

    def remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __len__(self) -> int:
        return len(self._handles)


# ------------------------------------------------------------------------- which modules, by name
def clean_name(name: str) -> str:
    """A module or parameter name without the ``_orig_mod`` level that ``torch.compile`` inserts.

    >>> clean_name("net._orig_mod.0.weight"), clean_name("_orig_mod.head"), clean_name("net.0")
    ('net.0.weight', 'head', 'net.0')
    """
    if "_orig_mod" not in name:
        return name
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _is_compile_wrapper(module: Any) -> bool:
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


def select_modules(model: Any, spec: Any, *, owner: str = "modules") -> list[tuple[str, Any, bool]]:
    """The modules whose outputs are captured: ``[(clean dotted name, module, forced)]``.

    ``spec`` is the ``modules=`` option:

    * ``None`` (the default): every module whose output is a new tensor. At run time an output that is a
      tensor already captured on the step adds nothing when a container (``nn.Sequential``,
      ``nn.ModuleList``, ``nn.ModuleDict``) passes on its last child's output, or a module returns its input
      unchanged (``nn.Identity``); it is skipped. Attention modules, residual blocks and transformer layers
      are captured (a block whose ``forward`` ends with a child's output, such as a post-norm transformer
      layer, gets its own node too, fed by that child's).
    * ``"leaves"``: modules without children only (what was captured before attention and blocks were).
    * a list whose every entry starts with ``"+"`` or ``"-"``: the default, plus / minus those globs. A
      module added with ``"+"`` is captured under its own name even when it returns a tensor already
      captured.
    * anything else (a glob, a list of globs, a callable): exactly the matching modules, each captured
      under its own name.

    ``forced`` says that a module's output is captured even when it is a tensor already captured.
    The compile wrapper of ``torch.compile`` is not a module of its own here (its inner module is).
    """
    from comgra_callbacks.errors import ConfigError
    from comgra_callbacks.names import name_predicate

    found: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for raw, module in model.named_modules():
        name = clean_name(raw)
        if not name or _is_compile_wrapper(module) or name in seen:
            continue
        seen.add(name)
        found.append((name, module))
    if spec is None:
        return [(n, m, False) for n, m in found]
    if spec == "leaves":
        return [(n, m, False) for n, m in found if next(m.children(), None) is None]
    if not isinstance(spec, str) and not callable(spec) and isinstance(spec, Iterable):
        items = list(spec)
        relative = [i for i in items if isinstance(i, str) and i[:1] in ("+", "-")]
        if relative and len(relative) != len(items):
            raise ConfigError(
                f"`{owner}`: expected either globs (exactly these modules) or globs that all start with '+' / '-' "
                f"(added to / removed from the default), got a mix: {items!r}."
            )
        if relative:
            plus = name_predicate([i[1:] for i in items if i[0] == "+"], owner=owner)
            minus = name_predicate([i[1:] for i in items if i[0] == "-"], owner=owner)
            return [(n, m, plus(n)) for n, m in found if not minus(n) or plus(n)]
        spec = items
    wanted = name_predicate(spec, owner=owner)
    return [(n, m, True) for n, m in found if wanted(n)]


def check_modules_spec(spec: Any, *, owner: str) -> None:
    """Validate a ``modules=`` option without a model (for the callbacks' constructors)."""
    import torch

    select_modules(torch.nn.Module(), spec, owner=owner)


# ---------------------------------------------------------------------------------------- neurons
_CHANNEL_FIRST = ("Conv", "BatchNorm", "InstanceNorm", "GroupNorm", "LazyConv", "SyncBatchNorm", "Dropout1d", "Dropout2d", "Dropout3d", "Pool1d", "Pool2d", "Pool3d")


def channel_first_module(module: Any) -> bool:
    """Whether a module's ``[N, C, ...]`` output has its neurons (channels) on axis 1.

    >>> import torch
    >>> channel_first_module(torch.nn.Conv1d(2, 3, 1)), channel_first_module(torch.nn.BatchNorm2d(3))
    (True, True)
    >>> channel_first_module(torch.nn.Linear(2, 3)), channel_first_module(torch.nn.LayerNorm(3))
    (False, False)
    """
    if module is None:
        return False
    import torch

    if isinstance(module, (torch.nn.modules.conv._ConvNd, torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm)):
        return True
    kind = type(module).__name__
    return kind.startswith(_CHANNEL_FIRST) or kind.endswith(("Pool1d", "Pool2d", "Pool3d"))


def default_neuron_axis(shape: tuple[int, ...], *, module: Any = None, inherited: int | None = None) -> int | None:
    """Which axis of an activation holds its neurons: None for a scalar or a per-sample vector (one neuron).

    Axis 1 (channels) for the ``[N, C, ...]`` outputs of convolutions, normalisations over channels and
    pooling, for any tensor of four or more dimensions (images and volumes are channel-first in torch), and
    for an output of the same shape as an input that had its neurons on axis 1 (an activation function
    after a ``Conv1d``); otherwise the last axis (``[B, C]``, ``[B, T, C]``).

    >>> default_neuron_axis((8, 16, 5, 5)), default_neuron_axis((8, 5, 16)), default_neuron_axis((8,))
    (1, 2, None)
    >>> import torch
    >>> default_neuron_axis((8, 16, 30), module=torch.nn.Conv1d(4, 16, 3))
    1
    """
    ndim = len(shape)
    if ndim <= 1:
        return None
    if ndim >= 3 and (channel_first_module(module) or inherited == 1):
        return 1
    if ndim >= 4:
        return 1
    return ndim - 1
