"""What a recorded step captures of the parameters: their values and gradients at the optimizer step, their
updates at the end of the step, the buffers, and the gradients of each extra loss.

:class:`ParameterCapture` is a mixin of :class:`~.recorder.Recorder` (like :class:`~.step_state.StepBookkeeping`):
the recorder holds the state these methods read (its configuration, the model's parameters and buffers, the
step being recorded) and the step's lifecycle; this module holds what happens to the parameters in it.
Module outputs and their gradients are captured by the recorder's hooks (:mod:`.recorder`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from comgra_callbacks.recording.pending import Snapshot, series_key, updated
from comgra_callbacks.recording.reduce import cpu_threads

if TYPE_CHECKING:
    from comgra_callbacks.recording.recorder import RecorderConfig
    from comgra_callbacks.recording.step_state import _Step

_DTYPE_NAMES: dict[Any, str] = {}


def dtype_name(t: Any) -> str:
    """A tensor's dtype as the store names it (``float32``), cached per dtype."""
    name = _DTYPE_NAMES.get(t.dtype)
    if name is None:
        name = _DTYPE_NAMES[t.dtype] = str(t.dtype).replace("torch.", "")
    return name


def private_copy(t: Any) -> Any:
    """A private copy of ``t`` that numpy can read (half precision widened to float32)."""
    import torch

    x = t.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.to(torch.float32, memory_format=torch.contiguous_format)
    return x.clone(memory_format=torch.contiguous_format)


def gradient_view(t: Any) -> Any:
    """A gradient as given to a hook: autograd does not change it afterwards, so no copy (unless widened)."""
    import torch

    x = t.detach()
    return x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x


class ParameterCapture:
    """The recorder's capture of parameters, buffers and per-loss gradients; a mixin of
    :class:`~.recorder.Recorder`, which holds the state these methods use (set in ``Recorder.__init__`` and
    ``Recorder.attach``)."""

    if TYPE_CHECKING:  # what the capture uses of the recorder (defined by Recorder in recorder.py)
        config: RecorderConfig
        _step: _Step | None
        _params: list[tuple[str, Any]]
        _buffers: list[tuple[str, Any, str]]
        _stable: dict[str, bool]

        def park(self) -> Any: ...
        def unpark(self, parked: Any) -> None: ...
        def _warn_once(self, key: str, message: str) -> None: ...

    def _per_loss_grads(self, step: _Step, total: Any) -> None:
        """Gradients of each recorded loss that is not backpropagated (yet), as the view ``grad:<loss>``.

        A loss already passed to backward is left out (its graph is gone); a loss whose graph was freed by an
        earlier backward is skipped with a warning once, never retried."""
        import torch

        extra = [(n, t) for n, t in step.losses if t is not total and n not in step.backwarded]
        if not extra:
            return
        params = [(n, p) for n, p in self._params if p.requires_grad]
        leaves = [(r.name, r.leaf) for r in step.recorded if r.leaf is not None]
        inputs = params + leaves
        if not inputs:
            return
        try:
            for loss_name, loss_tensor in extra:
                if not loss_tensor.requires_grad:
                    self._warn_once(f"nograd-loss:{loss_name}", f"comgra: loss {loss_name!r} does not require grad; it has no gradient view.")
                    continue
                step.grad_view = f"grad:{loss_name}"
                try:
                    grads = torch.autograd.grad(loss_tensor, [t for _, t in inputs], retain_graph=True, allow_unused=True)
                except RuntimeError as exc:
                    if "second time" not in str(exc) and "freed" not in str(exc):
                        raise
                    self._warn_once(
                        f"freed-loss:{loss_name}",
                        f"comgra: the graph of loss {loss_name!r} was freed by an earlier backward; its gradient view "
                        f"'grad:{loss_name}' is not recorded. HINT: record it after the other backward, or pass per_loss_grads=False.",
                    )
                    continue
                for (pname, _), g in zip(params, grads):
                    if g is not None:
                        step.add(Snapshot(series_key(pname, None, 0, step.grad_view), gradient_view(g), dtype_name(g), True))
        finally:
            step.grad_view = "grad"

    def before_optimizer_step(self, params: Any = None, *, updates: bool = True, optimizer: Any = None) -> None:
        """Parameters and their gradients as the forward pass saw them (before clipping and the step).

        Args:
            params: the parameters the optimizer about to step updates (e.g. from its ``param_groups``);
                None: all. Each parameter is captured once per step, at the first optimizer step that
                updates it, so that under manual optimization each gradient is the one its own optimizer
                applies and each update is the one its own step made.
            optimizer: the optimizer about to step (its learning rate and state, for ``attribution=``).
        """
        step = self._step
        if step is None:
            return
        if step.attribution is not None:  # torch.func reruns modules: with this step's hooks off meanwhile
            parked = self.park() if step.attribution.reruns_modules else None
            try:
                step.attribution.before_optimizer_step(optimizer)
            finally:
                if parked is not None:
                    self.unpark(parked)
        ids = None if params is None else {id(p) for p in params}
        chosen = [(n, p) for n, p in self._params if n not in step.params_seen and (ids is None or id(p) in ids)]
        with cpu_threads(self._copy_threads()):
            if chosen:
                self._capture_parameters(step, chosen, keep_before=self.config.updates and updates)
            if not step.params_done and self.config.updates and updates and ids is not None:
                # the other trainable parameters as they are now: their update, if no optimizer of theirs steps on
                # this step, is what changed them by the end of the step (zero for parameters no optimizer holds)
                for name, p in self._params:
                    if name not in step.params_seen and p.requires_grad:
                        step.before[name] = private_copy(p)
        step.params_done = True

    def _copy_threads(self) -> int | None:
        """One torch thread for the recorder's copies and differences of a CPU model's parameters (short
        operations whose parallel barriers stall on a busy machine: see ``reduce.cpu_threads``); None
        (unchanged) on an accelerator."""
        return 1 if self._params and self._params[0][1].is_cpu else None

    def _capture_parameters(self, step: _Step, params: list[tuple[str, Any]], *, keep_before: bool) -> None:
        for name, p in params:
            step.params_seen.add(name)
            value = private_copy(p)
            dtype = dtype_name(p)
            step.add(Snapshot(series_key(name, None, 0, "value"), value, dtype, True))
            if step.grads and p.grad is not None:
                # gradient clipping changes .grad in place after this point: copied until a step has shown
                # that it stays (the same learning as for module outputs)
                grad_key = f"{name}#grad"
                if self._stable.get(grad_key):
                    step.add(Snapshot(series_key(name, None, 0, "grad"), p.grad.detach(), dtype, True, version=p.grad._version))
                else:
                    step.add(Snapshot(series_key(name, None, 0, "grad"), private_copy(p.grad), dtype, True))
                step.versions.append((grad_key, p.grad, p.grad._version))
            if keep_before and p.requires_grad:  # frozen weights (requires_grad=False) cannot have updates
                step.before[name] = value

    def _capture_updates(self, step: _Step) -> None:
        """Each update as the weight now and the weight before the step: the difference is taken where the step
        is reduced (``Snapshot.deferred``), when the step's value of the weight is that weight before; else here."""
        snaps, index = step.pending.snapshots, step.index
        with cpu_threads(self._copy_threads()):
            for name, p in self._params:
                before = step.before.get(name)
                if before is None:
                    continue
                snap = Snapshot(series_key(name, None, 0, "update"), p.detach(), dtype_name(p), True, reference=before, deferred=True)
                at = index.get(series_key(name, None, 0, "value"))
                if at is None or snaps[at].tensor is not before:  # the writer subtracts only the value it has anyway
                    snap.tensor, snap.deferred = updated(snap), False
                step.add(snap)

    def _capture_buffers(self, step: _Step) -> None:
        for name, module, attr in self._buffers:
            b = getattr(module, attr, None)
            if b is not None and hasattr(b, "shape") and not b.is_complex():
                step.add(Snapshot(series_key(name, None, 0, "value"), private_copy(b), dtype_name(b), True))
