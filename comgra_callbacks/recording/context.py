"""Functions a model calls from its own code: :func:`record` and :func:`connect`.

They reach every *active* recorder (one per callback taking part in the running fit). This is global state,
as hooks are: a recorder registers itself when training starts and unregisters when it closes. When no
recorder is active, or the current step is not recorded, :func:`record` returns after a type check.

>>> import torch
>>> t = torch.ones(2)
>>> record("helper", t) is t   # no recorder active: nothing happens, the tensor comes back
True
>>> record("helper", t, kind="weird")
Traceback (most recent call last):
...
comgra_callbacks.errors.ConfigError: `record(kind=...)`: expected one of ['input', 'target', 'parameter', 'intermediate', 'output', 'loss'], got 'weird'.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from comgra_callbacks.errors import ConfigError, ConfigTypeError
from comgra_callbacks.store.format import KINDS

if TYPE_CHECKING:
    from comgra_callbacks.recording.recorder import Recorder

_ACTIVE: list[Recorder] = []
_KINDS = frozenset(KINDS)
_PENDING_EDGES: set[tuple[str, str]] = set()


def activate(recorder: Recorder) -> None:
    """Make ``recorder`` receive :func:`record` and :func:`connect` calls."""
    if recorder not in _ACTIVE:
        _ACTIVE.append(recorder)
        for src, dst in _PENDING_EDGES:
            recorder.connect(src, dst)


def deactivate(recorder: Recorder) -> None:
    if recorder in _ACTIVE:
        _ACTIVE.remove(recorder)


def active_recorders() -> list[Recorder]:
    return list(_ACTIVE)


def record(name: str, tensor: Any, *, kind: str = "intermediate", role: str | None = None) -> Any:
    """Record any tensor on the current step, from inside ``forward`` or ``training_step``.

    Several calls with one ``name`` and different ``role`` values share one node of the graph (one role per
    token position, say). Calling it again with the same name and role in one step stores a new *iteration*
    (a recurrent loop); the reader's ``iteration=`` picks one (default: the last).

    Args:
        name: the node's name, e.g. ``"attention_weights"``.
        tensor: the tensor; its gradient is recorded too when it requires grad.
        kind: one of ``input``, ``target``, ``parameter``, ``intermediate``, ``output``, ``loss``. Every tensor
            of kind ``loss`` other than the one passed to backward also gets its own gradient view
            ``"grad:<name>"`` on every recorded tensor.
        role: which of several tensors of the node this is.

    Returns:
        ``tensor``, unchanged, so the call can wrap an expression.

    Inside a region compiled by ``torch.compile`` the call does nothing (it is not traced into the graph);
    the recorder runs compiled code eagerly on the steps it records, where the call records as usual.

    Raises:
        ConfigError: ``kind`` is not a known kind.
        ConfigTypeError: ``name`` is not a non-empty string, ``role`` is not a string, or ``tensor`` is not
            a ``torch.Tensor`` (checked on every step, recorded or not).
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.compiler.is_compiling():
        return tensor
    if torch is None or not isinstance(tensor, torch.Tensor):
        raise ConfigTypeError(f"`record({name!r}, tensor=...)`: expected a torch.Tensor, got {type(tensor).__name__}.")
    if kind not in _KINDS:
        raise ConfigError(f"`record(kind=...)`: expected one of {list(KINDS)}, got {kind!r}.")
    if not isinstance(name, str) or not name:
        raise ConfigTypeError(f"`record(name=...)`: expected a non-empty string, got {name!r}.")
    if role is not None and not isinstance(role, str):
        raise ConfigTypeError(f"`record(role=...)`: expected a string or None, got {role!r}. HINT: use role=str(i).")
    for recorder in _ACTIVE:
        if recorder.recording:
            recorder.capture(name, tensor, kind=kind, role=role, explicit=True)
    return tensor


def connect(src_name: str, dst_name: str) -> None:
    """Add a dependency edge that autograd cannot see (across a ``detach``, from an integer input).

    May be called at any time: in ``__init__`` of a model (it then applies to every run started later in
    this process) or during training. The edge is drawn when both nodes exist.

    Raises:
        ConfigTypeError: a name is not a non-empty string.
    """
    for which, value in (("src_name", src_name), ("dst_name", dst_name)):
        if not isinstance(value, str) or not value:
            raise ConfigTypeError(f"`connect({which}=...)`: expected a non-empty node name, got {value!r}.")
    if not _ACTIVE:
        _PENDING_EDGES.add((src_name, dst_name))
    for recorder in _ACTIVE:
        recorder.connect(src_name, dst_name)


def clear_connections() -> None:
    """Forget the edges :func:`connect` stored while no recorder was active (for tests and notebooks)."""
    _PENDING_EDGES.clear()


def record_this_step() -> None:
    """Keep the current training step, whatever the schedule says (its reason is ``"forced"``).

    Call it from ``training_step`` or ``forward``. If the step was not being recorded, recording starts at
    the call: the batch, tensors recorded after it, the loss, gradients and parameters are kept; module
    outputs computed before the call are not (call it early, or arm steps with triggers).
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.compiler.is_compiling():
        return
    for recorder in _ACTIVE:
        recorder.force()


def note(text: str) -> None:
    """Store a free-text note with the current step (shown in the dashboard's Notes tab).

    Raises:
        ConfigTypeError: ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise ConfigTypeError(f"`note(text=...)`: expected a string, got {text!r} of type {type(text).__name__}.")
    for recorder in _ACTIVE:
        recorder.note(text)
