"""A recorded step's state, and the bookkeeping the recorder keeps over it.

:class:`_Step` is everything a step accumulates between ``begin_step`` and ``end_step``: its snapshots (in a
:class:`~.pending.PendingStep`), the nodes and their iterations, the tensors autograd will connect, the module
edges, the versions of kept tensors, the gradient hooks. :class:`StepBookkeeping` holds the recorder's methods
that read and settle that state rather than capture tensors: which module output is a new node and which
edges a module's forward adds, which nodes kept their value until the step ended, the summary the triggers
decide from, the dependency graph, and, once a step is kept, its samples and each snapshot's detail.

They stand apart from :mod:`~.recorder` (the step's lifecycle and what is captured) so that each module reads
as one concern; :class:`~.recorder.Recorder` inherits them. Nothing here adds work per call: the methods are
the recorder's own, looked up on it as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from comgra_callbacks.recording import graph
from comgra_callbacks.recording.capture import input_tensors, output_tensors
from comgra_callbacks.recording.detail import culprits as find_culprits
from comgra_callbacks.recording.modules import is_container
from comgra_callbacks.recording.pending import FULL, PendingStep, Snapshot, updated
from comgra_callbacks.recording.sampling import First
from comgra_callbacks.recording.triggers import StepSummary
from comgra_callbacks.store.format import SeriesKey

if TYPE_CHECKING:
    from comgra_callbacks.recording.detail import DetailChooser
    from comgra_callbacks.recording.recorder import RecorderConfig
    from comgra_callbacks.recording.sampling import SampleSelector
    from comgra_callbacks.store.sink import Sink


@dataclass
class _Step:
    pending: PendingStep
    grads: bool
    grad_view: str = "grad"
    iterations: dict[tuple[str, str | None], int] = field(default_factory=dict)
    index: dict[SeriesKey, int] = field(default_factory=dict)
    recorded: list[graph.Tensor_] = field(default_factory=list)
    names_by_id: dict[int, str] = field(default_factory=dict)
    keep_alive: list[Any] = field(default_factory=list)
    module_edges: set[tuple[str, str]] = field(default_factory=set)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    losses: list[tuple[str, Any]] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)
    backward_loss: str | None = None  # the first loss passed to backward (targets feed it in the graph)
    backwarded: list[str] = field(default_factory=list)  # every loss passed to backward so far, in order
    storages: dict[int, str] = field(default_factory=dict)
    same_edges: set[tuple[str, str]] = field(default_factory=set)  # (child, block) names of one tensor
    decided: bool = False  # kept whatever the policy says (an intervention's pass)
    grad_scale: float = 1.0  # the gradient scaler's factor on the running backward (float16 mixed precision)
    consumers: dict[str, set[str]] = field(default_factory=dict)
    ran_children: dict[str, set[str]] = field(default_factory=dict)  # module -> its direct children that ran  # node -> modules that consumed it (module edges)
    version_of: dict[int, int] = field(default_factory=dict)  # id of a captured tensor -> its _version then  # storage address -> node, for tensors without grad
    params_seen: set[str] = field(default_factory=set)  # parameters captured at their optimizer's step
    params_done: bool = False
    before: dict[str, Any] = field(default_factory=dict)
    graph_done: bool = False
    forward_done: bool = False
    values: dict[str, Any] = field(default_factory=dict)  # node name -> last recorded value (the original)
    versions: list[tuple[str, Any, int]] = field(default_factory=list)  # (node, original, its _version then)
    batch: Any = None
    attribution: Any = None  # the step's per-sample factors (:class:`.attribution.StepFactors`)

    def add(self, snap: Snapshot) -> None:
        at = self.index.get(snap.key)
        if at is None:
            self.index[snap.key] = len(self.pending.snapshots)
            self.pending.snapshots.append(snap)
        else:  # e.g. a second backward through the same tensor: keep the latest
            self.pending.snapshots[at] = snap


class StepBookkeeping:
    """The recorder's bookkeeping over a :class:`_Step`; a mixin of :class:`~.recorder.Recorder`, which holds
    the state these methods read and update (set in ``Recorder.__init__`` and ``Recorder.attach``)."""

    if TYPE_CHECKING:  # what the bookkeeping uses of the recorder (defined by Recorder in recorder.py)
        config: RecorderConfig
        writer: Sink
        _step: _Step | None
        _forced: frozenset[str]
        _module_of: dict[str, Any]
        _selector: SampleSelector
        _param_ids: dict[int, str]
        _param_nodes: dict[str, dict[str, Any]]
        _manual_edges: set[tuple[str, str]]
        _graphs: dict[str, dict[str, Any]]
        _graph_signatures: dict[str, frozenset[str]]
        _node_attrs: dict[str, dict[str, Any]]
        _details: DetailChooser
        _stable: dict[str, bool]

        def capture(self, name: str, tensor: Any, *, kind: str, role: str | None = None, module: str | None = None, explicit: bool = False, inherited_axis: int | None = None) -> None: ...
        def _warn_once(self, key: str, message: str) -> None: ...

    # ---------------------------------------------------------------------------- forward pass
    def _on_module_forward(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        step = self._step
        if step is None:
            return
        inputs = list(input_tensors(args, kwargs))
        sources = {self._source_of(step, t) for t in inputs}
        inherited = None
        for t in inputs:  # an elementwise module keeps its input's neuron axis (ReLU after Conv1d)
            src = step.names_by_id.get(id(t))
            if src is not None and step.nodes.get(src, {}).get("neuron_axis") == 1:
                inherited = 1
                break
        forced = name in self._forced
        # a wrapper: everything it ran was inside one of its children (nn.TransformerEncoder running its
        # ``layers``, a head around one decoder); such a module passing a child's output on adds nothing
        wrapper = len(step.ran_children.get(name, ())) <= 1
        parent, _, child = name.rpartition(".")
        while True:  # note this module among the children that ran, for each of its ancestors
            step.ran_children.setdefault(parent, set()).add(child)
            if not parent:
                break
            parent, _, child = parent.rpartition(".")[0], None, parent.rpartition(".")[2]
        container = wrapper or is_container(self._module_of.get(name))
        input_ids = {id(t) for t in inputs}
        captured = []
        for suffix, tensor in output_tensors(output):
            earlier = step.names_by_id.get(id(tensor))
            if earlier is not None and not forced and self._unchanged(step, tensor) and (container or id(tensor) in input_ids):
                continue  # nothing new: a container passing on its last child's output, or an input passed through
            if earlier is not None and earlier not in sources:
                step.same_edges.add((earlier, name + suffix))  # a block returning its last child's output
            self.capture(name + suffix, tensor, kind="intermediate", module=name, inherited_axis=inherited if inputs and tuple(tensor.shape) == tuple(inputs[0].shape) else None)
            captured.append(name + suffix)
        prefix = name + "."
        for src in sources:
            if src is None:
                continue
            consumers = step.consumers.setdefault(src, set())
            if any(c.startswith(prefix) for c in consumers):
                continue  # a child module consumed it already: that edge says it, not a shortcut to the block
            for dst in captured:
                if src != dst:
                    step.module_edges.add((src, dst))
            consumers.add(name)

    @staticmethod
    def _unchanged(step: _Step, tensor: Any) -> bool:
        """Whether a captured tensor still holds the value it was captured with (``ReLU(inplace=True)``
        returns its input, changed: a new value)."""
        version = step.version_of.get(id(tensor))
        return version is None or tensor.is_inference() or bool(tensor._version == version)

    @staticmethod
    def _source_of(step: _Step, t: Any) -> str | None:
        """The node a module input is: the recorded tensor itself, or (no grad) a view of its memory."""
        name = step.names_by_id.get(id(t))
        if name is not None or t.requires_grad or not step.storages or not t.numel():
            return name
        try:
            return step.storages.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            return None

    # -------------------------------------------------------------------------- end of a step
    def _check_versions(self, step: _Step) -> None:
        """Learn which nodes keep their value until the step ends; drop a kept reference that changed."""
        changed = set()
        for name, tensor, version in step.versions:
            if tensor._version != version:
                changed.add(name)
        for name, _, _ in step.versions:
            self._stable[name] = name not in changed and self._stable.get(name, True)
        if not changed:
            return
        kept = []
        for snap in step.pending.snapshots:
            slot = f"{snap.key.node}#grad" if snap.is_parameter and snap.key.view == "grad" else snap.key.node
            if snap.version is not None and slot in changed and snap.key.view in ("value", "grad"):
                cause = "gradient clipping" if snap.key.view == "grad" else "e.g. ReLU(inplace=True)"
                self._warn_once(
                    f"inplace:{slot}",
                    f"comgra: the {snap.key.view} of node {snap.key.node!r} was changed in place after it was recorded ({cause}); "
                    "it is dropped from this record and copied when recorded from now on.",
                )
                continue
            kept.append(snap)
        step.pending.snapshots = kept
        step.index = {snap.key: i for i, snap in enumerate(kept)}

    def _summary(self, step: _Step) -> StepSummary:
        """What triggers look at, at little cost: the recorded losses, and on demand whether any recorded value
        or gradient is non-finite (NaN and infinities make a tensor's sum non-finite) and the parameters'
        gradient norm."""
        import torch

        stats: dict[tuple[str, str], dict[str, float]] = {}
        for name, tensor in step.losses:
            if tensor.numel() == 1:
                stats[(name, "value")] = {"mean": float(tensor.detach().float().item())}
        snaps = list(step.pending.snapshots)

        def nonfinite() -> list[str]:
            chosen = [s for s in snaps if s.tensor.is_floating_point() and s.tensor.numel()]
            if not chosen:
                return []
            sums = torch.stack([(updated(s) if s.deferred else s.tensor).sum().float().to(chosen[0].tensor.device) for s in chosen])
            bad = (~torch.isfinite(sums)).nonzero().reshape(-1).tolist()
            return [f"{chosen[i].key.node}/{chosen[i].key.view}" for i in bad]

        def grad_norm() -> float:
            grads = [s.tensor for s in snaps if s.is_parameter and s.key.view == "grad" and s.tensor.is_floating_point()]
            if not grads:
                return 0.0
            return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

        return StepSummary(stats, frozenset(self._param_nodes), step.pending.step, nonfinite=nonfinite, grad_norm=grad_norm)

    # ------------------------------------------------------------------------------------ graph
    def _build_graph(self, step: _Step) -> None:
        step.graph_done = True
        step_type = step.pending.step_type
        signature = frozenset(self._param_nodes).union(step.nodes)
        if self._graph_signatures.get(step_type) == signature:
            return  # the usual case: the same nodes as before, nothing to redraw
        nodes = {n: dict(a) for n, a in self._param_nodes.items()}
        nodes.update({n: dict(a) for n, a in step.nodes.items()})
        edges = graph.autograd_edges(step.recorded, self._param_ids) if step.grads else set()
        sub = graph.assemble(nodes, edges, step.module_edges, self._manual_edges, step.backward_loss, step.same_edges)
        self._graph_signatures[step_type] = signature
        self._graphs[step_type] = sub
        for name, attrs in nodes.items():
            attrs.pop("kind_explicit", None)
            attrs.pop("explicit", None)
            known = self._node_attrs.get(name)
            if known is None:
                self._node_attrs[name] = attrs
            else:
                known["roles"] = list(dict.fromkeys(known["roles"] + attrs["roles"]))
                known["iterations"] = max(known["iterations"], attrs["iterations"])
        document = {"nodes": {n: dict(a) for n, a in self._node_attrs.items()}, "graphs": {k: dict(v) for k, v in self._graphs.items()}}
        self.writer.op("write_graph", document)

    # ----------------------------------------------------------------------------------- detail
    def _finalize_details(self, step: _Step, *, triggered: bool = False) -> None:
        """Decide each snapshot's detail now that the graph has settled the kinds (e.g. ``output``)."""
        for snap in step.pending.snapshots:
            node = snap.key.node
            if snap.key.view.startswith("attribution:"):
                continue  # kept whole, as the attribution module chose
            if node in ("sample_index", "sample_dataset_index") and not snap.is_parameter and step.nodes.get(node, {}).get("selection"):
                snap.neurons, snap.samples = False, FULL
                continue
            attrs = self._node_attrs.get(node) or step.nodes.get(node) or self._param_nodes.get(node) or {}
            detail = self._details.detail(node, str(attrs.get("kind", "intermediate")), tuple(snap.tensor.shape), is_parameter=snap.is_parameter, triggered=triggered, axis=snap.neuron_axis)
            snap.neurons, snap.samples = detail.neurons, detail.samples

    def _select_samples(self, step: _Step, *, triggered: bool = False) -> None:
        """Choose the batch positions kept as samples (one choice for every node) and record them.

        On a step kept by a trigger the samples that made it fire come first: the batch positions holding
        non-finite values, or the largest values of a recorded per-sample loss."""
        pending = step.pending
        k = self.config.n_samples
        if pending.batch_size is None or not k:
            return
        if isinstance(self._selector, First) and not triggered:
            return
        import torch

        positions, dataset_ids = self._selector.select(step.batch, step.values, pending.batch_size, k)
        if triggered:
            culprits = find_culprits(pending.snapshots, step.values, pending.batch_size, self.config.n_samples)
            if culprits:
                chosen = list(dict.fromkeys(culprits + (list(range(pending.batch_size)) if positions is None else [int(p) for p in positions])))
                positions, dataset_ids = torch.as_tensor(chosen[: max(k, len(culprits[:k]))], dtype=torch.int64), None
        if positions is None:
            return
        pending.sample_index = positions
        for name, values in (("sample_index", positions), ("sample_dataset_index", dataset_ids)):
            if values is not None:
                tensor = torch.as_tensor(values).detach().reshape(-1).to("cpu", torch.int64)
                step.nodes[name] = {"kind": "input", "module": None, "shape": list(tensor.shape), "dtype": "int64", "roles": [None], "iterations": 1, "selection": True}
                step.add(Snapshot(SeriesKey(name, None, 0, "value"), tensor, "int64"))
