"""Finding tensors: in a batch, in a module's inputs and outputs; and the module hooks that find them.

Hooks are global state on the model. :class:`ModuleHooks` attaches forward hooks only for a recorded step
and removes every handle it made, in ``finally`` blocks and on errors: after it is closed, the model has
exactly the hooks it had before.

>>> import torch
>>> {name: kind for name, (kind, _) in batch_tensors((torch.zeros(2, 3), torch.zeros(2))).items()}
{'input': 'input', 'target': 'target'}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
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
