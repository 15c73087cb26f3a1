"""Interventions while training: an ablation or a patch applied on an extra pass of a scheduled batch.

On a step the intervention schedule picks, after the batch's normal forward and backward and before the
optimizer steps, the callback runs one extra forward and backward pass of the same batch per intervention,
with the same parameters, and records it as its own step type (the intervention's name) at the same step.
Nothing of that pass reaches training: the parameters' gradients, the random number generators and the
module buffers (BatchNorm running statistics) are put back as they were, and no optimizer step follows it.

An intervention changes a module's output through a forward hook placed before every other hook of that
module, so the recorded value of the intervened node is the value after the intervention.

>>> import torch
>>> out = torch.ones(2, 3)
>>> Ablate("net.0", units=[1]).apply(out, module=None).tolist()
[[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from comgra_callbacks.errors import ConfigError, ConfigTypeError, RecordingError
from comgra_callbacks.recording.capture import clean_name, default_neuron_axis

if TYPE_CHECKING:
    from comgra_callbacks.recording.recorder import Recorder

RESERVED_TYPES = frozenset({"train", "val", "test"})


class Intervention:
    """Base class: ``change(tensor, module=...)`` returns the changed output tensor of the module ``node``.

    A module returning a tuple or list (HF attention: ``(attn_output, weights)``) has its first element
    changed."""

    node: str

    def prepare(self, model: Any, forward: Callable[[Any], Any], *, own_run: Callable[[], Any] | None = None) -> None:
        """Called before the intervention's pass (a patch computes or reads its source here); ``own_run()``
        returns a reader of the run being written, flushed."""

    def apply(self, output: Any, *, module: Any) -> Any:
        import torch

        if isinstance(output, torch.Tensor):
            return self.change(output, module=module)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            return type(output)([self.change(output[0], module=module), *output[1:]]) if isinstance(output, list) else (self.change(output[0], module=module), *output[1:])
        raise RecordingError(
            f"`{type(self).__name__}({self.node!r})`: the module returned {type(output).__name__}; expected a tensor, or a tuple "
            "whose first element is one."
        )

    def change(self, output: Any, *, module: Any) -> Any:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "node": self.node}


def _check_node(owner: str, node: Any) -> str:
    if not isinstance(node, str) or not node:
        raise ConfigTypeError(f"`{owner}(node=...)`: expected a module name such as 'blocks.1.mlp', got {node!r}.")
    return node


def _units_axis(t: Any, module: Any) -> int:
    axis = default_neuron_axis(tuple(t.shape), module=module)
    return t.dim() - 1 if axis is None else axis


class Ablate(Intervention):
    """Replace units of a module's output.

    Args:
        node: the module, by its ``named_modules()`` name.
        units: which units (neurons: the last axis, the channels of convolution outputs); None = all.
        mode: ``"zero"``; ``"mean"`` (each unit's mean over the batch); ``"resample"`` (each sample takes the
            value of the next sample of the batch, the last one the first's).
    """

    def __init__(self, node: str, *, units: Iterable[int] | None = None, mode: Literal["zero", "mean", "resample"] = "zero") -> None:
        self.node = _check_node("Ablate", node)
        if units is not None:
            try:
                units = [int(u) for u in units]
            except (TypeError, ValueError):
                raise ConfigTypeError(f"`Ablate(units=...)`: expected an iterable of unit indices or None, got {units!r}.") from None
            if not units:
                raise ConfigError("`Ablate(units=...)`: expected at least one unit, got none. HINT: units=None ablates the whole node.")
        self.units = units
        if mode not in ("zero", "mean", "resample"):
            raise ConfigError(f"`Ablate(mode=...)`: expected one of ['zero', 'mean', 'resample'], got {mode!r}.")
        self.mode = mode

    def change(self, output: Any, *, module: Any) -> Any:
        import torch

        axis = _units_axis(output, module)
        if self.units is not None and output.dim() and max(self.units) >= output.shape[axis]:
            raise RecordingError(f"`Ablate({self.node!r}, units=...)`: unit {max(self.units)} does not exist; the node has {output.shape[axis]} units on axis {axis}.")
        if self.mode == "zero":
            replacement = torch.zeros_like(output)
        elif self.mode == "mean":
            replacement = output.mean(dim=0, keepdim=True).expand_as(output)
        else:
            replacement = torch.roll(output, shifts=-1, dims=0)
        if self.units is None:
            return replacement if self.mode != "zero" else replacement + 0 * output  # stays in the graph
        mask = torch.zeros(output.shape[axis], dtype=torch.bool, device=output.device)
        mask[self.units] = True
        shape = [1] * output.dim()
        shape[axis] = output.shape[axis]
        return torch.where(mask.reshape(shape), replacement, output)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "units": self.units, "mode": self.mode}

    def __repr__(self) -> str:
        return f"Ablate({self.node!r}, units={self.units!r}, mode={self.mode!r})"


@dataclass(frozen=True)
class RecordedStep:
    """A patch source: the values a node had at a recorded step, read back from a store.

    Args:
        step: the recorded step.
        step_type: its step type (``"train"``, or an intervention's name).
        run: ``None`` (the run being written: the step must be recorded already, i.e. earlier), or a finished
            run: a :class:`~comgra_callbacks.store.reader.Run`, or its path or URL.
        iteration: which iteration of a node that ran several times (None: the last).

    The node must have been recorded with ``detail={node: "full"}`` (every sample of the batch) at that step,
    and the batch must have the same shape as the batch being patched.

    >>> RecordedStep(120)
    RecordedStep(step=120, step_type='train', run=None, iteration=None)
    >>> RecordedStep(-1)
    Traceback (most recent call last):
    ...
    comgra_callbacks.errors.ConfigError: `RecordedStep(step=...)`: expected a non-negative int, got -1.
    """

    step: int
    step_type: str = "train"
    run: Any = None
    iteration: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ConfigError(f"`RecordedStep(step=...)`: expected a non-negative int, got {self.step!r}.")
        if not isinstance(self.step_type, str) or not self.step_type:
            raise ConfigTypeError(f"`RecordedStep(step_type=...)`: expected a step type such as 'train', got {self.step_type!r}.")
        if self.run is not None and not isinstance(self.run, (str, os.PathLike)) and not hasattr(self.run, "samples"):
            raise ConfigTypeError(f"`RecordedStep(run=...)`: expected None (this run), a Run or a run's path or URL, got {type(self.run).__name__}.")
        if self.iteration is not None and (isinstance(self.iteration, bool) or not isinstance(self.iteration, int)):
            raise ConfigTypeError(f"`RecordedStep(iteration=...)`: expected None or an int, got {self.iteration!r}.")

    def read(self, node: str, own_run: Callable[[], Any] | None) -> Any:
        """The node's recorded values at this step, as a float tensor (first axis: the samples)."""
        import torch

        from comgra_callbacks.errors import ComgraError

        where = f"`Patch({node!r}, source={self!r})`"
        if self.run is None:
            if own_run is None:
                raise RecordingError(f"{where}: this run cannot be read here. HINT: pass run= (a finished run's path).")
            run = own_run()
        elif isinstance(self.run, (str, os.PathLike)):
            from comgra_callbacks.store.reader import open_run

            run = open_run(self.run)
        else:
            run = self.run
        try:
            values = run.samples(node, self.step, step_type=self.step_type, iteration=self.iteration)
        except ComgraError as exc:
            raise RecordingError(
                f"{where}: no recorded values of {node!r} at step {self.step} ({self.step_type!r}) in run {run.name!r}: {exc} "
                f"HINT: record the node in full on that step (detail={{{node!r}: 'full'}}); a step of this run must come before the patched one."
            ) from exc
        return torch.as_tensor(values, dtype=torch.float32)


class Patch(Intervention):
    """Set a module's output to its value on another input.

    Args:
        node: the module, by its ``named_modules()`` name.
        source: a batch (the module's output on it is computed with the same parameters, just before the
            pass), a tensor holding the value itself, or :class:`RecordedStep` (the node's values recorded at
            another step of this run or of another run, with ``detail={node: "full"}``). Its shape must be the
            output's.
        units: patch only these units (None = all).
    """

    def __init__(self, node: str, *, source: Any, units: Iterable[int] | None = None) -> None:
        self.node = _check_node("Patch", node)
        if source is None:
            raise ConfigError("`Patch(source=...)`: expected a batch, a tensor or RecordedStep(step), got None.")
        self.source = source
        self.units = None if units is None else [int(u) for u in units]
        self._value: Any = None

    def prepare(self, model: Any, forward: Callable[[Any], Any], *, own_run: Callable[[], Any] | None = None) -> None:
        import torch

        if isinstance(self.source, RecordedStep):
            self._value = self.source.read(self.node, own_run)
            return
        if isinstance(self.source, torch.Tensor):
            self._value = self.source.detach()
            return
        module = _module(model, self.node)
        seen: list[Any] = []
        def keep(m: Any, a: Any, out: Any) -> None:
            first = out[0] if isinstance(out, (tuple, list)) and out else out
            if isinstance(first, torch.Tensor):
                seen.append(first.detach())

        handle = module.register_forward_hook(keep)
        try:
            with torch.no_grad():
                forward(self.source)
        finally:
            handle.remove()
        if not seen:
            raise RecordingError(f"`Patch({self.node!r}, source=...)`: the module did not run on the source batch (or did not return a tensor).")
        self._value = seen[0]

    def change(self, output: Any, *, module: Any) -> Any:
        import torch

        value = self._value
        if value is None or tuple(value.shape) != tuple(output.shape):
            got = None if value is None else list(value.shape)
            hint = ""
            if isinstance(self.source, RecordedStep):
                hint = (f" HINT: the values recorded at step {self.source.step} ({self.source.step_type!r}) are {got}: record the node with "
                        f"detail={{{self.node!r}: 'full'}} (every sample, not n_samples), from batches of the same size.")
            raise RecordingError(f"`Patch({self.node!r})`: the source has shape {got}, the output {list(getattr(output, 'shape', []))}; they must match.{hint}")
        value = value.to(output.device, output.dtype)
        if self.units is None:
            return value + 0 * output
        axis = _units_axis(output, module)
        mask = torch.zeros(output.shape[axis], dtype=torch.bool, device=output.device)
        mask[self.units] = True
        shape = [1] * output.dim()
        shape[axis] = output.shape[axis]
        return torch.where(mask.reshape(shape), value, output)

    def describe(self) -> dict[str, Any]:
        source: Any = type(self.source).__name__
        if isinstance(self.source, RecordedStep):
            source = {"step": self.source.step, "step_type": self.source.step_type, "run": None if self.source.run is None else str(getattr(self.source.run, "uri", self.source.run))}
        return {**super().describe(), "units": self.units, "source": source}

    def __repr__(self) -> str:
        source = repr(self.source) if isinstance(self.source, RecordedStep) else f"<{type(self.source).__name__}>"
        return f"Patch({self.node!r}, source={source}, units={self.units!r})"


def _module(model: Any, node: str) -> Any:
    modules = {clean_name(n): m for n, m in model.named_modules() if n}
    found = modules.get(node)
    if found is None:
        close = [n for n in modules if node.split(".")[-1] in n][:5]
        raise ConfigError(f"intervention on {node!r}: the model has no such module. HINT: modules with a similar name: {close}.")
    return found


def check_interventions(owner: str, interventions: Any) -> dict[str, Intervention] | None:
    """Validate ``interventions=`` (a dict ``{step type: Ablate / Patch}``)."""
    if interventions is None:
        return None
    if not isinstance(interventions, Mapping):
        raise ConfigTypeError(f"`{owner}(interventions=...)`: expected a dict {{name: Ablate(...) or Patch(...)}}, got {interventions!r}.")
    for name, item in interventions.items():
        if not isinstance(name, str) or not name or name in RESERVED_TYPES:
            raise ConfigError(f"`{owner}(interventions=...)`: expected names other than {sorted(RESERVED_TYPES)} (each is a step type), got {name!r}.")
        if not isinstance(item, Intervention):
            raise ConfigTypeError(f"`{owner}(interventions=...)`: expected Ablate(...) or Patch(...) for {name!r}, got {item!r}.")
    return dict(interventions)


def run_interventions(
    recorder: Recorder,
    model: Any,
    interventions: Mapping[str, Intervention],
    *,
    step: int,
    epoch: int,
    batch_idx: int,
    batch: Any,
    loss_of: Callable[[Any], Any],
    own_run: Callable[[], Any] | None = None,
) -> None:
    """One extra forward and backward of ``batch`` per intervention, each recorded as its own step type.

    ``loss_of(batch)`` runs the model's forward and returns the loss (Lightning: ``training_step``; HF: the
    model's ``output.loss``). ``own_run()`` returns a reader of the run being written, flushed (for a patch
    from a :class:`RecordedStep` of this run). The step being recorded, if any, is set aside and resumed afterwards; the
    parameters' gradients, the random number generators and the module buffers are restored.
    """
    import torch

    parked = recorder.park()
    params = [p for p in model.parameters()]
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        for name, intervention in interventions.items():
            module = _module(model, intervention.node)
            intervention.prepare(model, loss_of, own_run=own_run)
            for p in params:
                p.grad = None
            handle = module.register_forward_hook(lambda m, a, out, iv=intervention: iv.apply(out, module=m), prepend=True)
            try:
                recorder.begin_step(step=step, step_type=name, epoch=epoch, batch_idx=batch_idx, batch=batch, reason="intervention", decided=True)
                with torch.enable_grad():
                    loss = loss_of(batch)
                    if loss is None or not isinstance(loss, torch.Tensor):
                        raise RecordingError(f"intervention {name!r}: the forward pass returned no loss tensor ({type(loss).__name__}).")
                    recorder.before_backward(loss)
                    if loss.requires_grad:
                        loss.backward()
                recorder.before_optimizer_step(updates=False)
                recorder.end_step()
            finally:
                handle.remove()
                recorder.abort_step()
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        recorder.unpark(parked)
