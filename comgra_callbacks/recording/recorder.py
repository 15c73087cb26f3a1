"""The recorder: what happens on a recorded step, independent of any training framework.

An integration (Lightning, HuggingFace) translates its events into these calls::

    recorder.begin_step(step=..., step_type=..., epoch=..., batch_idx=..., batch=batch)   # hooks attached
    # forward: module hooks and record() calls capture tensors (snapshots; gradient hooks registered)
    recorder.before_backward(loss)       # the loss; dependency graph; gradients of each extra loss
    recorder.end_forward()               # optional: ignore further forward passes (gradient accumulation)
    # backward: gradient hooks capture gradients
    recorder.before_optimizer_step()     # parameters and their gradients, as the forward pass saw them
    # optimizer step
    recorder.end_step()                  # parameter updates; hooks removed; the step goes to the writer

Any of the middle calls may be missing (validation has no backward and no optimizer step). A step that is
not begun costs nothing: no hooks exist and :func:`comgra_callbacks.record` returns at once. The training
thread only takes snapshots; statistics are computed on the writer thread (:mod:`.pending`).

This module holds the lifecycle and what is captured of the forward pass (hooks, values, their gradients).
The parameters (values and gradients at the optimizer step, updates), buffers and the gradients of each
extra loss are in :mod:`.parameters`. A step's state (``_Step``) and the bookkeeping over it (new nodes and
module edges in the forward pass, versions, the triggers' summary, the graph, samples and details) are in
:mod:`.step_state`.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from comgra_callbacks.errors import RecordingError
from comgra_callbacks.names import NameFilter, name_predicate
from comgra_callbacks.recording import context, graph
from comgra_callbacks.recording.capture import (
    ModuleHooks,
    batch_tensors,
    clean_name,
    default_neuron_axis,
    select_modules,
)
from comgra_callbacks.recording.detail import Detail, DetailChooser
from comgra_callbacks.recording.memory import keep_freed
from comgra_callbacks.recording.modules import module_tree
from comgra_callbacks.recording.parameters import ParameterCapture, dtype_name, gradient_view, private_copy
from comgra_callbacks.recording.pending import (
    PendingStep,
    Snapshot,
    estimate_bytes,
    resolve_updates,
    series_key,
)
from comgra_callbacks.recording.policy import RecordingPolicy
from comgra_callbacks.recording.reduce import cpu_threads
from comgra_callbacks.recording.sampling import First, SampleSelector
from comgra_callbacks.recording.step_state import StepBookkeeping, _Step
from comgra_callbacks.store.format import SeriesKey

if TYPE_CHECKING:
    from comgra_callbacks.store.sink import Sink

log = logging.getLogger(__name__)


@dataclass
class RecorderConfig:
    """What a recorder captures. The callbacks validate these and pass them on.

    Attributes:
        modules: which modules' outputs are captured (see :func:`~.capture.select_modules`); None = every
            module whose output is a tensor not captured already; ``"leaves"`` = leaf modules only.
        parameters: which parameters are recorded; None = all.
        n_samples: individual samples kept for non-parameter tensors.
        neurons: whether per-neuron statistics are kept.
        max_neurons: per-neuron statistics are skipped (with a warning) for wider tensors.
        max_sample_numel: samples are skipped (with a warning) when one sample has more elements.
        grads / updates / per_loss_grads: record gradients; parameter updates; gradients of each extra loss.
        batch_fn: names the tensors of a batch (see :func:`~.capture.batch_tensors`).
        detail: ``{name glob: level}`` with levels ``stats``, ``neurons``, ``samples``, ``full``; the first
            matching glob wins. Default: statistics and per-neuron statistics for every node, and
            ``n_samples`` samples for inputs, targets, outputs and losses.
        samples: which samples are kept (:mod:`~.sampling`: first, Indices, TopK, Balanced).
        detail_fn: ``(name, kind) -> Detail | None`` overrides everything else (for integrations).
        buffers: which buffers (BatchNorm running statistics, ...) are recorded, by name; None = none.
        neuron_axis: ``{name glob: axis}``: the axis holding the neurons of matching activations (first
            match wins); default :func:`~.capture.default_neuron_axis` (channels of convolutions, else the
            last axis).
    """

    modules: NameFilter = None
    parameters: NameFilter = None
    n_samples: int = 4
    neurons: bool = True
    max_neurons: int = 8192
    max_sample_numel: int = 65536
    grads: bool = True
    updates: bool = True
    per_loss_grads: bool = True
    batch_fn: Callable[[Any], Mapping[str, Any]] | None = None
    detail: Mapping[str, str] | None = None
    samples: SampleSelector | None = None
    detail_fn: Callable[[str, str], Detail | None] | None = None
    buffers: NameFilter = None
    neuron_axis: Mapping[str, int] | None = None
    attribution: NameFilter = None  # parameters whose per-sample update shares are kept (:mod:`.attribution`)
    index_field: str | int | None = None
    attribution_options: Mapping[str, Any] | None = None  # further keywords of :class:`.attribution.Attribution`


class Recorder(StepBookkeeping, ParameterCapture):
    """Records steps of one model into one run.

    Args:
        config: what to capture.
        writer: the run's writer, a :class:`~comgra_callbacks.store.sink.Sink` (the recorder closes it).
        policy: decides whether armed steps are kept (None: every begun step is kept).
    """

    def __init__(self, config: RecorderConfig, writer: Sink, policy: RecordingPolicy | None = None) -> None:
        self.config = config
        self.writer = writer
        self.policy = policy
        self._selector = config.samples or First()
        self._context: dict[str, Any] = {"step": 0, "step_type": "train", "epoch": 0, "batch_idx": 0, "batch": None}
        self._notes: list[dict[str, Any]] = []
        self._step: _Step | None = None
        self._model: Any = None
        self._hook_modules: list[tuple[str, Any]] = []
        self._forced: frozenset[str] = frozenset()  # modules captured even when they pass a captured tensor on
        self._module_of: dict[str, Any] = {}
        self._buffers: list[tuple[str, Any, str]] = []  # (node name, owning module, attribute name)
        self._axis_rules = [(name_predicate(glob, owner="neuron_axis"), int(axis)) for glob, axis in (config.neuron_axis or {}).items()]
        self._axes: dict[tuple[str, tuple[int, ...]], int | None] = {}
        self._stance: Any = None  # torch.compiler stance forced to eager while a step is recorded
        self._params: list[tuple[str, Any]] = []
        self._param_ids: dict[int, str] = {}
        self._param_nodes: dict[str, dict[str, Any]] = {}
        self._manual_edges: set[tuple[str, str]] = set()
        self._graphs: dict[str, dict[str, Any]] = {}
        self._graph_signatures: dict[str, frozenset[str]] = {}
        self._node_attrs: dict[str, dict[str, Any]] = {}
        self._warned: set[str] = set()
        self._details = DetailChooser(config, self._warn_once)
        self._stable: dict[str, bool] = {}  # node -> its recorded value was never changed in place later in a step
        self._hooks: ModuleHooks | None = None
        self._attribution: Any = None
        self.closed = False
        self.steps_recorded = 0
        self.steps_dropped = 0  # armed steps that no trigger kept

    # -------------------------------------------------------------------------------- lifecycle
    @property
    def recording(self) -> bool:
        """True between :meth:`begin_step` and :meth:`end_step` of a recorded step."""
        return self._step is not None

    def attach(self, model: Any) -> None:
        """Learn the model's modules and parameters, write the module tree, and start receiving ``record()``."""
        self._model = model
        chosen = select_modules(model, self.config.modules, owner="modules")
        self._hook_modules = [(n, m) for n, m, _ in chosen]
        self._forced = frozenset(n for n, _, forced in chosen if forced)
        self._module_of = {clean_name(n): m for n, m in model.named_modules()}
        keep = name_predicate(self.config.parameters, owner="parameters")
        self._params = [(clean_name(n), p) for n, p in model.named_parameters() if keep(clean_name(n))]
        self._buffers = []
        if self.config.buffers is not None:
            wanted = name_predicate(self.config.buffers, owner="buffers")
            for raw, _ in model.named_buffers():
                name = clean_name(raw)
                owner_name, _, attr = raw.rpartition(".")
                if wanted(name):
                    self._buffers.append((name, model.get_submodule(owner_name) if owner_name else model, attr))
        self._param_ids = {id(p): n for n, p in self._params}
        self._param_nodes = {
            n: {"kind": "parameter", "module": n.rpartition(".")[0], "shape": list(p.shape), "dtype": dtype_name(p), "roles": [None], "iterations": 1}
            for n, p in self._params
        }
        for name, module, attr in self._buffers:
            b = getattr(module, attr)
            self._param_nodes[name] = {"kind": "parameter", "module": name.rpartition(".")[0], "shape": list(b.shape), "dtype": dtype_name(b), "roles": [None], "iterations": 1, "buffer": True}
        if self.config.attribution is not None:
            from comgra_callbacks.recording.attribution import Attribution

            self._attribution = Attribution(model, self.config.attribution, self.config.index_field, **(self.config.attribution_options or {}))
        self.writer.op("write_modules", module_tree(model))
        context.activate(self)

    def begin_step(
        self,
        *,
        step: int,
        step_type: str = "train",
        epoch: int = 0,
        batch_idx: int = 0,
        batch: Any = None,
        reason: str = "schedule",
        grads: bool = True,
        armed: bool = False,
        decided: bool = False,
    ) -> None:
        """Start recording a step: attach the module hooks and capture the batch's tensors.

        An ``armed`` step is captured the same way, but the policy's triggers decide after the batch whether
        it is kept (its ``reason`` is then the trigger's name). A ``decided`` step is kept without asking the
        policy (its triggers never see it): an intervention's extra pass.
        """
        if self.closed:
            raise RecordingError("the recorder is closed; it cannot record another step.")
        if self._step is not None:
            self.abort_step()
        pending = PendingStep(step, step_type, epoch, batch_idx, time.time(), None if armed else reason)
        self._step = _Step(pending, grads=grads and self.config.grads, batch=batch, decided=decided)
        try:
            self._force_eager()
            self._hooks = ModuleHooks(self._hook_modules, self._on_module_forward)
            self._hooks.attach()
            if self._attribution is not None and self._step.grads:
                current = self._step
                current.attribution = self._attribution.begin(lambda: self._step is current and current.grad_view == "grad")
            if batch is not None:
                for name, (kind, tensor) in batch_tensors(batch, self.config.batch_fn).items():
                    self.capture(name, tensor, kind=kind)
                    if pending.batch_size is None and tensor.dim() > 0:
                        pending.batch_size = int(tensor.shape[0])
        except BaseException:
            self.abort_step()
            raise

    # ------------------------------------------------------------------ context, forcing, notes
    def set_context(self, *, step: int, step_type: str = "train", epoch: int = 0, batch_idx: int = 0, batch: Any = None) -> None:
        """Where training is now, recorded or not (cheap): for ``record_this_step()`` and ``note()``."""
        self._context = {"step": step, "step_type": step_type, "epoch": epoch, "batch_idx": batch_idx, "batch": batch}
        if self._notes:
            self._flush_notes()

    def force(self) -> None:
        """Keep the current step (``record_this_step()``). Not recorded yet: start now, from this point on."""
        step = self._step
        if step is not None:
            step.pending.reason = "forced"
            return
        if self.closed:
            return
        c = self._context
        self.begin_step(step=c["step"], step_type=c["step_type"], epoch=c["epoch"], batch_idx=c["batch_idx"], batch=c["batch"], reason="forced")

    def note(self, text: str) -> None:
        """A free-text note stored with the current step."""
        self._notes.append({"step": int(self._context["step"]), "time": time.time(), "text": str(text)})
        if len(self._notes) >= 100:
            self._flush_notes()

    def _flush_notes(self) -> None:
        notes, self._notes = self._notes, []
        self.writer.op("add_notes", notes)

    def capture(
        self,
        name: str,
        tensor: Any,
        *,
        kind: str,
        role: str | None = None,
        module: str | None = None,
        explicit: bool = False,
        inherited_axis: int | None = None,
    ) -> None:
        """Capture one tensor on the current step (used by the hooks and by ``record()``)."""
        step = self._step
        if step is None or step.forward_done:
            return
        import torch

        if not isinstance(tensor, torch.Tensor):
            raise RecordingError(f"`record({name!r}, ...)`: expected a torch.Tensor, got {type(tensor).__name__}.")
        if tensor.is_sparse or tensor.is_complex() or tensor.is_meta or tensor.is_nested:
            self._warn_once(f"unsupported:{name}", f"comgra: node {name!r} is a sparse, nested, complex or meta tensor; it is not recorded.")
            return
        slot = (name, role)
        iteration = step.iterations.get(slot, 0)
        step.iterations[slot] = iteration + 1
        axis = self._neuron_axis(name, tuple(tensor.shape), module, inherited_axis)
        node = step.nodes.get(name)
        if node is None:
            node = {"kind": kind, "module": module, "shape": list(tensor.shape), "dtype": dtype_name(tensor), "roles": [], "iterations": 0}
            if axis is not None:
                node["neuron_axis"] = axis
            if explicit:
                node["explicit"] = True  # a record() call: its kind is the user's, never promoted to "output"
                if kind != "intermediate":
                    node["kind_explicit"] = True
            step.nodes[name] = node
        if role not in node["roles"]:
            node["roles"].append(role)
        node["iterations"] = max(node["iterations"], iteration + 1)
        inference = tensor.is_inference()  # no version counter: always copied (see _value)
        step.add(self._value(series_key(name, role, iteration, "value"), tensor, axis))
        if not inference:
            step.versions.append((name, tensor, tensor._version))
            step.version_of[id(tensor)] = tensor._version
        step.recorded.append(graph.Tensor_.of(name, tensor))
        step.names_by_id[id(tensor)] = name
        if not tensor.requires_grad and tensor.numel():
            # autograd cannot see how this tensor is used (integer ids): remember its memory, so that a module
            # consuming a view of it (GPT-2's ``input_ids.view(...)``) is still connected to it
            try:
                step.storages.setdefault(tensor.untyped_storage().data_ptr(), name)
            except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
                pass
        step.keep_alive.append(tensor)
        step.values[name] = tensor
        if node["kind"] == "loss":
            step.losses.append((name, tensor))
        if step.grads and tensor.requires_grad:
            step.handles.append(tensor.register_hook(self._grad_hook(step, name, role, iteration, dtype_name(tensor), axis)))

    def _neuron_axis(self, name: str, shape: tuple[int, ...], module: str | None, inherited: int | None) -> int | None:
        """The axis holding a node's neurons (cached per node and shape; see ``neuron_axis=``)."""
        key = (name, shape)
        if key in self._axes:
            return self._axes[key]
        axis: int | None = None
        for matches, wanted in self._axis_rules:
            if matches(name):
                if len(shape) > 1 and -len(shape) <= wanted < len(shape):
                    axis = wanted % len(shape)
                else:
                    self._warn_once(f"axis:{name}", f"comgra: `neuron_axis` gives axis {wanted} for node {name!r} of shape {list(shape)}; it has no such axis, so the default is used.")
                    axis = default_neuron_axis(shape, module=self._module_of.get(module or ""), inherited=inherited)
                break
        else:
            axis = default_neuron_axis(shape, module=self._module_of.get(module or ""), inherited=inherited)
        self._axes[key] = axis
        return axis

    def _value(self, key: SeriesKey, tensor: Any, axis: int | None = None) -> Snapshot:
        """A value's snapshot: a copy, unless the node is known to keep its value until the step ends.

        A module output can be changed in place later in the same forward pass (``ReLU(inplace=True)``), so a
        node is copied until a step has shown that its value stays as it was; from then on the tensor itself
        is kept (its ``_version`` is checked again at the end of every step)."""
        if self._stable.get(key.node) and not tensor.is_inference():
            return Snapshot(key, tensor.detach(), dtype_name(tensor), version=tensor._version, neuron_axis=axis)
        return Snapshot(key, private_copy(tensor), dtype_name(tensor), neuron_axis=axis)

    def _grad_hook(self, step: _Step, name: str, role: str | None, iteration: int, dtype: str, axis: int | None) -> Callable[[Any], None]:
        def hook(grad: Any) -> None:
            if self._step is step and grad is not None:
                g = gradient_view(grad)
                if step.grad_scale != 1.0 and step.grad_view == "grad":  # a scaled loss's backward
                    g = g / step.grad_scale
                step.add(Snapshot(series_key(name, role, iteration, step.grad_view), g, dtype, neuron_axis=axis))

        return hook

    def end_forward(self) -> None:
        """Stop capturing the forward pass of the current step; the step itself stays open.

        The module hooks come off, and later module outputs and ``record()`` calls are ignored until
        :meth:`end_step`. Gradient hooks of the tensors already captured stay: their backward is still to come.
        Under gradient accumulation this records the first micro-batch only, while the parameters, their
        gradients and updates are still taken at the optimizer step. Call it after :meth:`before_backward`.
        """
        step = self._step
        if step is None:
            return
        step.forward_done = True
        if step.attribution is not None:
            step.attribution.stop_forward()
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            hooks.remove()

    def connect(self, src: str, dst: str) -> None:
        if (src, dst) not in self._manual_edges:
            self._manual_edges.add((src, dst))
            self._graph_signatures.clear()  # redraw the graphs with the new edge

    def before_backward(self, loss: Any, *, scale: float | None = None) -> None:
        """A loss about to be backpropagated: record it and compute the gradients of the other losses.

        ``scale``: the factor a gradient scaler (float16 mixed precision) multiplied the loss by; the loss
        and the gradients of the backward that follows are recorded divided by it, as the model computed them.

        Every backward of a step has its loss recorded: a tensor already recorded as a loss (``record(name,
        t, kind="loss")``) keeps its name; otherwise the first is ``loss`` and later ones (manual
        optimization: one backward per optimizer) ``loss.1``, ``loss.2``, ...
        """
        step = self._step
        if step is None:
            return
        if scale is not None and scale != 1.0:
            step.grad_scale = float(scale)
            unscaled = loss / scale
            step.keep_alive.append(loss)
            loss_to_record = unscaled
        else:
            step.grad_scale = 1.0
            loss_to_record = loss
        name = next((n for n, t in step.losses if t is loss), None)
        if name is None:
            name = "loss" if "loss" not in step.nodes else f"loss.{len(step.backwarded)}"
            while name in step.nodes:
                name += "_"
            self.capture(name, loss_to_record, kind="loss")
            if name not in step.nodes:  # not capturable (e.g. after end_forward): nothing more to do
                return
        if step.backward_loss is None:
            step.backward_loss = name
        step.backwarded.append(name)
        if self.config.per_loss_grads and step.grads:
            self._per_loss_grads(step, loss)

    def park(self) -> Any:
        """Set the step being recorded aside (its module hooks off) to record another one meanwhile."""
        step, hooks = self._step, self._hooks
        self._step, self._hooks = None, None
        if hooks is not None:
            hooks.remove()
        self._restore_stance()
        return (step, hooks)

    def unpark(self, parked: Any) -> None:
        """Resume the step :meth:`park` set aside."""
        step, hooks = parked
        if self._step is not None:
            self.abort_step()
        if step is None:
            return
        self._step = step
        self._force_eager()
        if hooks is not None and not step.forward_done:
            self._hooks = hooks
            hooks.attach()

    def end_step(self, outputs: Any = None, batch: Any = None) -> bool:
        """Finish the step: parameter updates, hooks off, hand the step to the writer. True if it was queued.

        ``outputs`` and ``batch`` feed the policy's batch triggers (e.g. :class:`~.triggers.Predicate`).
        """
        step = self._step
        if step is None:
            return False
        try:
            self._remove_hooks(step)
            with cpu_threads(self._copy_threads()):
                rest = [(n, p) for n, p in self._params if n not in step.params_seen]
                if rest:  # not stepped by any optimizer on this step (frozen, validation, no optimizer step)
                    early = {n: step.before[n] for n, _ in rest if n in step.before}
                    self._capture_parameters(step, rest, keep_before=False)
                    step.before.update(early)
                self._capture_buffers(step)
            if step.attribution is not None:
                for snap in step.attribution.finish(step.batch, step.values, step.grad_scale):
                    step.add(snap)
            self._capture_updates(step)
            self._build_graph(step)
            self._check_versions(step)
            host = sum(s.tensor.nbytes for s in step.pending.snapshots if s.tensor.is_cpu)  # not .device.type: ~1 us a tensor
            keep_freed(host)  # what this step frees is reused by the next one, not mapped again (recording/memory.py)
            pending = step.pending
            if self.policy is not None and not step.decided:
                fired = self.policy.batch_reasons(outputs, batch if batch is not None else step.batch)
                if fired and pending.reason is None:
                    pending.reason = fired[0]
                if self.policy.triggers or pending.reason is None:
                    pending.reason = self.policy.decide(self._summary(step), pending.reason)
                if pending.reason is None:  # an armed step no trigger wanted: nothing more is computed
                    self.steps_dropped += 1
                    return False
            triggered = self.policy is not None and pending.reason in {t.name for t in self.policy.triggers}
            self._select_samples(step, triggered=triggered)
            self._finalize_details(step, triggered=triggered)
            self._step = None
            if self.policy is not None and self.policy.wants_bytes:
                self.policy.kept(pending.step, estimate_bytes(pending))
            if not getattr(self.writer, "deferred_updates", False):  # a sink of its own: differences taken here
                resolve_updates(pending.snapshots)
            queued = self.writer.submit(pending)  # where it is reduced is the sink's placement (store/sink.py)
            if queued:
                self.steps_recorded += 1
            return queued
        finally:
            self._step = None

    def abort_step(self) -> None:
        """Drop the current step (an exception in training): remove hooks, write nothing."""
        step = self._step
        self._step = None
        if step is not None:
            self._remove_hooks(step)

    def _remove_hooks(self, step: _Step) -> None:
        hooks, self._hooks = self._hooks, None
        try:
            if hooks is not None:
                hooks.remove()
        finally:
            handles, step.handles = step.handles, []
            for handle in handles:
                handle.remove()
            if step.attribution is not None:
                step.attribution.remove()
            self._restore_stance()

    def _force_eager(self) -> None:
        """Run compiled code eagerly while a step is recorded, so that hooks and ``record()`` see every tensor.

        Steps that are not recorded run the compiled code unchanged: no hook is attached then, and
        ``record()`` is a no-op inside a compiled region, so nothing of the recorder is traced into a graph
        and nothing recompiles. Only when ``torch.compile`` has been used in this process (Dynamo loaded)."""
        import sys

        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is None or self._stance is not None:
            return
        try:
            self._stance = dynamo.set_stance("force_eager")
        except RuntimeError:  # called from inside a compiled region: leave the stance alone
            self._stance = None

    def _restore_stance(self) -> None:
        stance, self._stance = self._stance, None
        if stance is not None:
            try:
                stance.__exit__(None, None, None)
            except RuntimeError:
                self._stance = stance  # inside a compiled region now: try again when the step ends

    def log_scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Store logged scalars (loss curves, metrics) for ``step``; cheap, written in the background."""
        self.log_scalar_rows([(int(step), str(name), float(value)) for name, value in values.items()])

    def log_scalar_rows(self, rows: list[tuple[int, str, float]]) -> None:
        """Store ``(step, name, value)`` scalars of any steps at once."""
        rows = [(int(step), str(name), float(value)) for step, name, value in rows]
        if rows and not self.closed:
            self.writer.op("add_scalars", rows)
            self.writer.op("commit")

    def close(self, status: Literal["finished", "failed"], error: str | None = None) -> None:
        """Stop recording, flush everything and mark the run. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self.abort_step()
        if self._notes:
            self._flush_notes()
        context.deactivate(self)
        self._model = None
        self._hook_modules, self._params = [], []
        self.writer.close(status, error)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
