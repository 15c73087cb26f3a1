"""ComgraTrainerCallback: record what happens inside a model trained by the HuggingFace ``Trainer``.

A thin adapter over the framework-free :class:`~comgra_callbacks.recording.recorder.Recorder`, like
:class:`~comgra_callbacks.integrations.lightning.ComgraCallback`. The ``Trainer`` gives callbacks neither the
batch nor the loss, so two hooks on the model fill the gap while ``train()`` runs: a forward pre-hook sees the
keyword arguments the model is called with (``input_ids``, ``attention_mask``, ``labels``, ...), and a forward
hook sees its output (``output.loss``, before backward).

What a recorded step holds (step ``s`` = ``state.global_step`` when the step begins, from 0):

* **Gradient accumulation**: the forward pass of the *first* micro-batch only: its inputs, module outputs,
  ``record()`` calls, loss, and the gradients of those tensors from its backward. Then the step stops
  capturing (:meth:`Recorder.end_forward`); the other micro-batches run without any hook. Parameters, their
  gradients and updates are taken at the optimizer step, so the gradients are those summed over all the
  step's micro-batches: the ones the optimizer uses.
* **The loss** is ``output.loss`` as the model returned it for that micro-batch, *before* the ``Trainer``
  scales it (divides by the accumulation steps when the model does not normalise by ``num_items_in_batch``;
  multiplies by the number of processes with ``average_tokens_across_devices``). Gradients of activations
  are those of the loss the ``Trainer`` actually backpropagated.
* **Gradient clipping**: ``on_pre_optimizer_step`` comes after ``clip_grad_norm_`` in transformers 5, so the
  parameter gradients are recorded *after clipping* (what the optimizer applies; unlike the Lightning
  callback, which records them before). The norm before clipping is the ``Trainer``'s logged ``grad_norm``,
  stored as a scalar when ``log_scalars=True``.

Hooks exist only while they are needed: the two model hooks from ``on_step_begin`` of a recorded step to the
end of its first forward pass (and around evaluations when ``val_batches`` is set), the module hooks of the
recorder likewise. A step that is not recorded runs without any hook.

The ``Trainer`` has no exception event. An exception raised in a recorded forward pass reaches the forward
hook (registered with ``always_call=True``), which removes every hook and marks the run ``failed`` with the
error. Any other exception leaves no hook behind (none is attached at that time); the run is marked
``failed`` when the exception ends the program (a chained ``sys.excepthook``, then the queued records are
written too), at exit (queued records are flushed by the writer's exit hook, then ``atexit`` writes the
status), or at the next ``train()`` of this callback, which then
continues the same run (as after an ``auto_find_batch_size`` restart).
"""

from __future__ import annotations

import atexit
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal

from comgra_callbacks.circuit_tracking import CircuitTracking
from comgra_callbacks.errors import RecordingError, missing_extra
from comgra_callbacks.integrations.common import (
    RecordingOptions,
    agree_on_problem,
    default_run_name,
    json_safe,
    versions,
)
from comgra_callbacks.integrations.dist import all_ok, broadcast_object
from comgra_callbacks.names import NameFilter
from comgra_callbacks.recording.capture import batch_tensors
from comgra_callbacks.recording.interventions import Intervention, run_interventions
from comgra_callbacks.recording.recorder import Recorder
from comgra_callbacks.recording.sampling import SampleSelector
from comgra_callbacks.recording.schedules import Schedule
from comgra_callbacks.recording.triggers import Trigger

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without transformers
    raise missing_extra("transformers", "hf", "ComgraTrainerCallback") from exc

# Keyword arguments the Trainer passes to the model that are not part of the batch.
_NOT_INPUTS = frozenset({"num_items_in_batch", "return_dict", "output_attentions", "output_hidden_states", "use_cache"})
_OPEN: weakref.WeakSet[ComgraTrainerCallback] = weakref.WeakSet()


class ComgraTrainerCallback(TrainerCallback):
    r"""Record activations, gradients, parameters and their updates of a model trained by ``transformers.Trainer``.

    Takes the same options as :class:`~comgra_callbacks.ComgraCallback` (see there for each one) and writes the
    same store; read it with :func:`comgra_callbacks.open_run`. The module docstring says exactly what a step
    holds under gradient accumulation and clipping. ``batch_fn`` receives the keyword arguments the model is
    called with (a dict). ``val_batches`` records the first batches of the evaluations run inside ``train()``
    (step type ``"val"``, at most ``val_batches`` per training step). ``step_type`` sees the same dict (of the
    step's first micro-batch), as do ``Predicate`` triggers (``(output, inputs)``).

    Args:
        root: directory or fsspec URL (``s3://bucket/prefix``) holding the runs.
        run_name: the run's name; default: unique, sorting by start time (agreed across ranks).
        every_n_steps: record every n-th optimizer step (short for ``schedule=Every(n)``).
        schedule, step_type, triggers, arm_every, detail, samples: as for :class:`~comgra_callbacks.ComgraCallback`.
        ranks: ``"zero"`` (only the process of global rank 0 records) or ``"all"`` (each rank writes the run
            group ``<run_name>/rank<r>``).
        attribution, index_field, attribution_keep, attribution_projection: as for :class:`~comgra_callbacks.ComgraCallback`; the index is a model input
            of that name (the ``Trainer`` drops dataset columns the model's ``forward`` does not take).
        measures, measure_schedule, interventions, intervention_schedule, circuit_tracking: as for
            :class:`~comgra_callbacks.ComgraCallback`; the extra pass
            calls the model with the first micro-batch's keyword arguments and uses its ``output.loss``, after
            clipping and before the optimizer step (outside the ``Trainer``'s autocast context).
        modules, parameters, buffers, neuron_axis, n_samples, neurons, grads, updates, per_loss_grads, val_batches, batch_fn,
        max_neurons, max_sample_numel, storage_options, flush_secs, max_queue_mb, on_write_error,
        log_scalars, writer: as for :class:`~comgra_callbacks.ComgraCallback`.

    Raises:
        ConfigError: an argument has a wrong value. ConfigTypeError: a wrong type.
        StoreError: at ``on_train_begin`` (before the first step, on every rank) when ``root`` cannot be
            written.
        MissingDependencyError: transformers is not installed (``pip install 'comgra-callbacks[hf]'``).

    Example::

        >>> from comgra_callbacks import ComgraTrainerCallback
        >>> cb = ComgraTrainerCallback("comgra_runs", every_n_steps=50)
        >>> trainer = transformers.Trainer(model=model, args=args, callbacks=[cb])  # doctest: +SKIP
        >>> ComgraTrainerCallback(ranks="some")
        Traceback (most recent call last):
        ...
        comgra_callbacks.errors.ConfigError: `ComgraTrainerCallback(ranks=...)`: expected one of ['zero', 'all'], got 'some'.
    """

    def __init__(
        self,
        root: str = "comgra_runs",
        *,
        run_name: str | None = None,
        every_n_steps: int = 1,
        schedule: Schedule | dict[str, Schedule] | None = None,
        step_type: str | Callable[[Any, int], str] | None = None,
        triggers: list[Trigger] | None = None,
        arm_every: int | None = None,
        detail: dict[str, str] | None = None,
        samples: str | SampleSelector = "first",
        modules: NameFilter = None,
        parameters: NameFilter = None,
        buffers: NameFilter = None,
        neuron_axis: dict[str, int] | None = None,
        interventions: dict[str, Intervention] | None = None,
        intervention_schedule: Schedule | None = None,
        measures: dict[str, Callable[..., Any]] | None = None,
        measure_schedule: Schedule | None = None,
        attribution: NameFilter = None,
        index_field: str | int | None = None,
        attribution_keep: Literal["factors", "contributions"] = "factors",
        attribution_projection: int | None = None,
        circuit_tracking: CircuitTracking | dict[str, CircuitTracking] | None = None,
        n_samples: int = 4,
        neurons: bool = True,
        grads: bool = True,
        updates: bool = True,
        per_loss_grads: bool = True,
        val_batches: int = 0,
        batch_fn: Callable[[Any], Mapping[str, Any]] | None = None,
        max_neurons: int = 8192,
        max_sample_numel: int = 65536,
        storage_options: dict[str, Any] | None = None,
        flush_secs: float = 2.0,
        max_queue_mb: int = 256,
        on_write_error: Literal["warn", "raise"] = "warn",
        log_scalars: bool = True,
        ranks: Literal["zero", "all"] = "zero",
        writer: Literal["process", "thread"] = "process",
    ) -> None:
        arguments = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        super().__init__()
        self.options = RecordingOptions.validated(type(self).__name__, **arguments)
        self.run_name: str = run_name or default_run_name()
        self._recorder: Recorder | None = None
        self._handles: list[Any] = []
        self._capturing = False  # from on_step_begin of a recorded step to the end of its first forward
        self._deciding = False  # step types come from the batch: decide in the first forward of the step
        self._last_output: Any = None
        self._last_inputs: Any = None
        self._val_open = False
        self._val_seen = 0
        self._step = 0
        self._epoch = 0
        self._steps_in_epoch = 0
        self._accumulation = 1
        self._opened_before = False
        self._stopped: str | None = None
        self._intervene = False  # this step gets the interventions
        self._intervene_inputs: dict[str, Any] | None = None  # the first micro-batch's keyword arguments

    @property
    def recorder(self) -> Recorder | None:
        """The recorder of the running ``train()`` (None on ranks that do not record and outside training)."""
        return self._recorder

    # -------------------------------------------------------------------------------- set-up
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._recorder is not None:  # the previous train() of this callback raised outside a recorded forward
            self._close("failed", "trainer.train() ended without on_train_end (an exception, or an interrupt)")
        self._detach()  # an inert hook left by an exception in the forward (see _fail_in_forward)
        self._stopped = None
        rank = int(args.process_index)
        self.run_name = broadcast_object(self.run_name)
        agree_on_problem(self.options.root_problem(rank), ranks=self.options.ranks, broadcast=broadcast_object, all_ok=all_ok)
        if not self.options.records_on(rank):
            return
        model = kwargs.get("model")
        if model is None:
            raise RecordingError("`ComgraTrainerCallback.on_train_begin`: the Trainer passed no `model`; nothing to record.")
        meta = {
            "config": self.options.describe(),
            "versions": versions(),
            "hparams": json_safe(_model_config(model)),
            "framework": "transformers",
            "model_class": type(model).__name__,
            "trainer": json_safe(
                {
                    "max_steps": state.max_steps,
                    "num_train_epochs": args.num_train_epochs,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps,
                    "max_grad_norm": args.max_grad_norm,
                    "per_device_train_batch_size": args.per_device_train_batch_size,
                    "learning_rate": args.learning_rate,
                    "world_size": args.world_size,
                }
            ),
            "recorded": {
                "micro_batch": "first of each optimizer step",
                "loss": "output.loss as returned by the model, before the Trainer scales it",
                "parameter_grads": "summed over the step's micro-batches, after clipping",
            },
            "rank": rank,
            "world_size": int(args.world_size),
        }
        run_name = self.options.run_name_for(self.run_name, rank)
        recorder = self.options.open_recorder(run_name, model, resume=self._opened_before, meta=meta)
        recorder.writer.op("start_segment", int(state.global_step))
        self._recorder, self._opened_before = recorder, True
        self._run_group = run_name  # the group being written (a patch may read an earlier step of it)
        self._step, self._accumulation = state.global_step, max(int(args.gradient_accumulation_steps), 1)
        _OPEN.add(self)
        _install_exit_hooks()

    # ------------------------------------------------------------------------------- training
    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._steps_in_epoch = 0
        self._epoch = int(state.epoch or 0)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._step = step = state.global_step
        self._detach()  # hooks left for an evaluation that did not come
        recorder = self._recorder
        if recorder is None:
            if self._stopped is not None:
                warnings.warn(f"comgra: {self._stopped}; training goes on without recording.", RuntimeWarning, stacklevel=2)
                self._stopped = None  # warn once
            return
        batch_idx = self._steps_in_epoch * self._accumulation  # the first micro-batch: the one recorded
        recorder.set_context(step=step, epoch=self._epoch, batch_idx=batch_idx)
        self._last_output = self._last_inputs = None
        if self.options.policy.step_type is not None:  # the type is in the batch: decide in the forward
            self._deciding = True
            self._attach(kwargs.get("model"))
            return
        plan = self.options.plan(step, "train")
        if kwargs.get("model") is not None:
            self.options.measure(recorder, kwargs["model"], None, step, plan)
        self._intervene, self._intervene_inputs = self.options.intervenes(step, plan), None
        if plan is None and not self._intervene:
            return
        reason = "schedule" if plan is not None else "intervention"
        recorder.begin_step(step=step, step_type="train", epoch=self._epoch, batch_idx=batch_idx, armed=plan == "arm", reason=reason)
        self._capturing = True
        self._attach(kwargs.get("model"))

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        recorder = self._recorder
        if recorder is None:
            return
        recorder.before_optimizer_step(optimizer=kwargs.get("optimizer"))
        inputs, self._intervene_inputs = self._intervene_inputs, None
        model = kwargs.get("model")
        if inputs is not None and model is not None and self.options.interventions:
            try:
                self._run_interventions(recorder, model, inputs)
            except BaseException as exc:  # the Trainer has no exception event: close the run here
                self._close("failed", f"{type(exc).__name__}: {exc} (raised in an intervention at step {self._step})")
                raise

    def _run_interventions(self, recorder: Recorder, model: Any, inputs: dict[str, Any]) -> None:
        if self.options.interventions:
            run_interventions(
                recorder,
                model,
                self.options.interventions,
                step=self._step,
                epoch=self._epoch,
                batch_idx=self._steps_in_epoch * self._accumulation,
                batch=inputs,
                loss_of=lambda batch: _loss_of(model(**batch)),
                own_run=self.options.own_run(recorder, self._run_group),
            )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._detach()  # normally gone already, after the first forward
        self._capturing = self._deciding = False
        self._steps_in_epoch += 1
        self._step, self._val_seen = state.global_step, 0
        recorder = self._recorder
        if recorder is not None and recorder.recording:
            recorder.end_step(outputs=self._last_output, batch=self._last_inputs)
        self._last_output = self._last_inputs = None
        self._expect_evaluation(control, kwargs.get("model"))

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._expect_evaluation(control, kwargs.get("model"))

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._detach()
        self._capturing = self._val_open = False
        if self._recorder is not None and self._recorder.recording:
            self._recorder.abort_step()  # a val batch whose forward never finished

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        recorder = self._recorder
        if recorder is None or not self.options.log_scalars or not logs:
            return
        numbers = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # Training logs come after the step that made them (``global_step`` already counts it): they belong to
        # step ``global_step - 1``. Evaluation logs describe the model the next step's forward pass sees.
        evaluation = any(k.startswith(("eval_", "test_")) for k in numbers)
        recorder.log_scalars(state.global_step if evaluation else max(state.global_step - 1, 0), numbers)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._close("finished")

    def _expect_evaluation(self, control: TrainerControl, model: Any) -> None:
        """Attach the model hooks when the Trainer is about to evaluate and validation batches are wanted."""
        if self._recorder is not None and self.options.val_batches and control.should_evaluate:
            self._attach(model)

    # ---------------------------------------------------------------------------- model hooks
    def _attach(self, model: Any) -> None:
        """Hooks on the model itself, present only around a forward pass that is recorded."""
        if self._handles or model is None:
            return
        self._handles.append(model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._after_forward, with_kwargs=True, always_call=True))

    def _detach(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def _before_forward(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        recorder = self._recorder
        if recorder is None:
            return
        if self._deciding:  # the first forward of a training step whose type comes from its inputs
            self._deciding = False
            self._decide(recorder, module, args, kwargs)
        if not self._capturing:  # an evaluation batch?
            if module.training or recorder.recording or self._val_seen >= self.options.val_batches:
                return
            recorder.begin_step(step=self._step, step_type="val", epoch=self._epoch, batch_idx=self._val_seen, grads=False)
            self._val_seen += 1
            self._capturing = self._val_open = True
        named = _named_inputs(args, kwargs)
        self._last_inputs = named
        if self._intervene and self._intervene_inputs is None and module.training and not args:
            self._intervene_inputs = {k: v for k, v in kwargs.items() if k not in ("return_dict", "output_attentions", "output_hidden_states")}
        for name, (kind, tensor) in batch_tensors(named, self.options.batch_fn).items():
            recorder.capture(name, tensor, kind=kind)

    def _decide(self, recorder: Recorder, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Step type from the first micro-batch's inputs, then the plan; begin the step when it is wanted."""
        named = _named_inputs(args, kwargs)
        batch_idx = self._steps_in_epoch * self._accumulation
        step_type = self.options.policy.step_type_of(named, batch_idx)
        recorder.set_context(step=self._step, step_type=step_type, epoch=self._epoch, batch_idx=batch_idx, batch=named)
        plan = self.options.plan(self._step, step_type) if module.training else None
        if plan is not None:
            recorder.begin_step(step=self._step, step_type=step_type, epoch=self._epoch, batch_idx=batch_idx, armed=plan == "arm")
            self._capturing = True

    def _after_forward(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        recorder = self._recorder
        if recorder is None:
            return
        error = sys.exc_info()[1]
        if output is None and error is not None:  # torch calls an always_call hook after the forward raised
            self._fail_in_forward(error)
            return
        if not self._capturing:
            return
        self._capturing = False
        self._last_output = output
        try:
            loss = _loss_of(output)
            if loss is not None:
                recorder.before_backward(loss)
        finally:
            if self._val_open:
                self._val_open = False
                recorder.end_step()
                if self._val_seen >= self.options.val_batches:
                    self._detach()
            else:
                recorder.end_forward()
                self._detach()

    # --------------------------------------------------------------------------------- ending
    def _fail_in_forward(self, error: BaseException) -> None:
        """Mark the run failed from inside the forward hook that torch calls while the exception propagates.

        Torch is iterating over the model's forward hooks at that moment: removing this hook is safe only when
        it is the last one (else the iteration raises and hides the user's exception). When another hook
        follows, this one stays attached, inert (the recorder is gone), until the next ``train()`` or exit.
        """
        post = self._handles[-1] if self._handles else None
        hooks = post.hooks_dict_ref() if post is not None else None
        keep = post is not None and hooks is not None and next(reversed(hooks), None) != post.id
        self._handles = self._handles[:-1] if keep else self._handles
        self._close("failed", f"{type(error).__name__}: {error} (raised in the model's forward at step {self._step})")
        self._handles = [post] if keep else []
        self._stopped = f"recording stopped at step {self._step} after an exception in the model's forward"

    def _close(self, status: Literal["finished", "failed"], error: str | None = None) -> None:
        self._detach()
        self._capturing = self._val_open = False
        _OPEN.discard(self)
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.close(status, error)


def _named_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The model's inputs by name: positional ones as ``"0"``, ``"1"``, ...; keyword ones by their names."""
    named = {str(i): value for i, value in enumerate(args)}
    named.update((k, v) for k, v in kwargs.items() if k not in _NOT_INPUTS)
    return named


def _loss_of(output: Any) -> Any:
    """The loss in a model's output: ``output["loss"]`` or, for a tuple, a scalar first element (the
    ``Trainer``'s own convention); None when the model computed none."""
    import torch

    if isinstance(output, Mapping):
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)) and output:
        loss = output[0]
    else:
        loss = None
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


def _model_config(model: Any) -> dict[str, Any]:
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    try:
        return dict(to_dict()) if callable(to_dict) else {}
    except Exception:  # a custom config that cannot describe itself: the run still records
        return {}


def _close_unfinished(reason: str) -> None:
    """Mark every run whose ``train()`` never reached ``on_train_end`` as failed, with ``reason``."""
    for callback in list(_OPEN):
        try:
            callback._close("failed", f"training did not finish: {reason}")
        except Exception:  # the store may be unreachable by now; the records already committed stay valid
            pass


def _excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    _close_unfinished(f"{kind.__name__}: {value}")
    _previous_excepthook(kind, value, tb)


def _at_exit() -> None:
    uncaught = getattr(sys, "last_value", None)
    with warnings.catch_warnings():  # the writers flushed their records in their own (earlier) exit hook
        warnings.simplefilter("ignore")
        _close_unfinished(f"{type(uncaught).__name__}: {uncaught}" if uncaught is not None else "the process ended during training")


_previous_excepthook = sys.excepthook


def _install_exit_hooks() -> None:
    """Once per process: close unfinished runs when an exception ends the program, or at exit.

    ``sys.excepthook`` (chained to the previous hook) runs while the interpreter is still whole, so the
    queued records are written. An ``atexit`` handler catches the rest (``sys.exit`` during training) and
    writes the status; the queued records were flushed before that by the background writer's exit hook
    (which runs before Python stops the thread pools zarr writes with). Installed when the first run opens,
    after zarr was imported, so that it runs before zarr's own ``atexit`` clean-up.
    """
    global _previous_excepthook
    if _installed:
        return
    _installed.append(True)
    _previous_excepthook = sys.excepthook
    sys.excepthook = _excepthook
    atexit.register(_at_exit)


_installed: list[bool] = []
