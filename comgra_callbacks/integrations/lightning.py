"""ComgraCallback: record what happens inside a LightningModule while it trains.

A thin adapter: it translates Lightning's events into calls on the framework-free
:class:`~comgra_callbacks.recording.recorder.Recorder` and keeps nothing of the trainer or the model after
the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from comgra_callbacks.circuit_tracking import CircuitTracking
from comgra_callbacks.integrations.common import (
    RecordingOptions,
    agree_on_problem,
    default_run_name,
    json_safe,
    versions,
)
from comgra_callbacks.names import NameFilter, describe_filter
from comgra_callbacks.recording.interventions import Intervention, run_interventions
from comgra_callbacks.recording.recorder import Recorder
from comgra_callbacks.recording.sampling import SampleSelector
from comgra_callbacks.recording.schedules import Schedule
from comgra_callbacks.recording.triggers import Trigger
from comgra_callbacks.store.format import FORMAT_VERSION


class ComgraCallback(Callback):
    r"""Record activations, gradients, parameters and their updates of a LightningModule into a Zarr store.

    On a recorded step it captures the batch's tensors (inputs and targets), the outputs of the chosen
    modules, anything passed to :func:`comgra_callbacks.record`, the loss passed to backward, and every
    parameter: values, gradients (also of each extra loss), and the update the optimizer made. Statistics are
    computed off the training thread and written by a background thread. A step that is not recorded costs
    nothing (no hooks are attached). Under DDP only global rank zero records, unless ``ranks="all"``.

    Args:
        root: directory (or fsspec URL such as ``s3://bucket/prefix``) holding the runs.
        run_name: the run's group name under ``root``; default: a unique name sorting by start time.
            After resuming from a checkpoint the default is the checkpoint's run, continued.
        every_n_steps: record every n-th step; short for ``schedule=Every(n)``. A step is an optimizer step
            (``trainer.global_step``) under automatic optimization, and a training batch under manual
            optimization (where ``global_step`` counts every ``optimizer.step()``: two per batch for a GAN).
        schedule: which steps are recorded: a schedule (``Every``, ``Steps``, ``Decaying``, ``LogSpaced``,
            ``Spaced``, ``Budget``, combined with ``|`` / ``&``), or a dict ``{step_type: schedule}`` with an
            optional ``"*"`` for the other types.
        step_type: what kind of batch this is: a batch field name, or a function ``(batch, batch_idx) -> str``;
            default ``"train"``. Stored with every record; the graph is kept per step type.
        triggers: decide after the batch whether an *armed* step is kept: ``LossSpike()``, ``NonFinite()``,
            ``GradNorm(t)``, ``Predicate(fn)``. The record's ``reason`` names the trigger.
        arm_every: arm every n-th step the schedule does not record (default 1 when there are triggers).
            An armed step costs about as much as a recorded one on the training thread.
        detail: ``{name glob: level}`` with levels ``"stats"``, ``"neurons"``, ``"samples"``, ``"full"``
            (first match wins). Default: statistics and per-neuron statistics for every node, and samples for
            inputs, targets, outputs and losses.
        samples: which samples are kept: ``"first"``, ``Indices(field, ids)``, ``TopK(node)``,
            ``Balanced(labels)``; the same batch positions for every node.
        modules: which modules' outputs are captured. None (the default): every module whose output is a new
            tensor (attention modules, residual blocks and transformer layers are captured; a container
            that returns its last child's output adds nothing). ``"leaves"``: leaf modules only. A list of
            globs that all start with ``"+"`` / ``"-"``: the default plus / minus those (``["-*.dropout"]``).
            Otherwise exactly the matching modules: a glob (``"encoder.*"``), a list of globs, or a callable
            ``name -> bool``. Names are ``named_modules()`` names, without the ``_orig_mod`` of
            ``torch.compile``.
        parameters: which parameters are recorded (a glob, a list of globs, a callable; None = all).
        buffers: which buffers are recorded (e.g. ``"*running_mean"`` for BatchNorm running statistics), by
            name; None (the default) = none. A buffer is recorded as it is after the forward pass.
        neuron_axis: ``{name glob: axis}``: which axis of matching activations holds their neurons for
            per-neuron statistics. Default: the channels (axis 1) of convolution, batch-norm and pooling
            outputs and of any tensor with four or more dimensions, else the last axis. The axis used is
            stored with each node (``run.nodes``).
        interventions: ``{name: Ablate(...) | Patch(...)}``: on intervention steps, after the batch's backward
            and before the optimizer step, one extra forward and backward of the same batch per intervention,
            with the same parameters, recorded as step type ``name`` at the same step; the gradients, random
            generators and buffers are restored and no optimizer step follows (``training_step`` runs again,
            with ``self.log`` silenced). Automatic optimization only.
        intervention_schedule: which steps get the interventions (default: every step the schedule records);
            the normal record of such a step is kept too.
        measures: ``{name: measure}``: callables of the model (or of the model and the trainer), such as
            ``Accuracy(test_data)``, ``Loss(test_data)``, ``WeightNorm()``, ``FourierSparsity(...)`` from
            :mod:`comgra_callbacks.measures`, evaluated before the forward pass of the steps the schedule
            records, in eval mode and without gradients, and stored with the run (``run.measures``).
        measure_schedule: evaluate the measures on these steps instead.
        attribution: parameters (a name filter, e.g. ``"mlp.*.weight"``) whose update is split into per-sample
            shares on recorded steps: for ``nn.Linear`` the layer's input and output gradient of every sample,
            for other modules per-sample gradients through ``torch.func``; with each sample's dataset index
            (see docs/attribution.md).
        index_field: the batch field holding each sample's dataset index (a dict key or attribute name, or a
            position in a tuple batch); default: a field named ``idx`` or ``index``, else the batch position.
        attribution_keep: ``"factors"`` (default: the exact per-sample factors) or ``"contributions"`` (reduced
            at the step's end to each sample's contribution to each neuron's update, ``B·d_out`` numbers; enough
            for ``contributions``, ``top_items`` and ``influence`` through a ``TestGradient`` measure).
        attribution_projection: ``k`` (a positive int): store the ``torch.func`` parameters' per-sample
            gradients projected by a fixed seeded Gaussian matrix to ``(B, k)``, next to the exact per-sample
            contributions (``nn.Linear`` parameters keep their factors); ``influence`` with supplied test
            gradients is then approximate, relative error about ``1/sqrt(k)`` (docs/attribution.md).
        circuit_tracking: ``CircuitTracking(clean, corrupted, nodes, schedule=None)`` (or a dict ``{name: ...}``):
            attribution-patching scores of every unit of ``nodes`` for a fixed clean/corrupted pair, evaluated
            before the forward pass of the steps the schedule records (or of its own ``schedule``), in eval mode,
            leaving the model's mode, gradients and random generators as they were; read back with
            ``run.circuit_scores()`` (columns step, node, unit, score, effect). See
            :mod:`comgra_callbacks.circuit_tracking`.
        n_samples: how many individual samples are kept (where the detail asks for samples).
        neurons: keep per-neuron statistics.
        grads: record gradients. ``updates``: record parameter updates (costs a copy of the parameters on
            recorded steps). ``per_loss_grads``: gradients of every extra recorded loss (one backward each).
        val_batches: record the first ``val_batches`` batches of every validation run (step type ``"val"``)
            and of every test run (``"test"``), also under ``inference_mode``.
        batch_fn: ``batch -> {name: tensor}``, to name the batch's tensors yourself.
        max_neurons / max_sample_numel: limits above which per-neuron statistics / samples are skipped.
        storage_options: passed to fsspec for a URL ``root`` (endpoint, credentials).
        flush_secs: longest time before a record is visible to readers.
        max_queue_mb: bound on the memory of records waiting to be written.
        on_write_error: ``"warn"`` (stop recording, keep training) or ``"raise"``.
        log_scalars: store the loss of every training batch (scalar ``loss``; under manual optimization
            ``loss``, ``loss.1``, ... for the backward passes of a batch) and the trainer's logged metrics
            (training metrics every ``log_every_n_steps``, validation metrics after each validation run),
            each stamped with the step of the batch it belongs to (validation: the step whose forward pass
            would see the model that was validated).
        ranks: under distributed training, ``"zero"`` (global rank 0 records) or ``"all"`` (every rank records
            into its own run group ``<run_name>/rank<r>`` of the same root).
        writer: ``"process"`` (default): a separate writer process reduces and writes recorded steps, so that
            recording does not compete with training for the GIL; ``"thread"``: a thread of this process (for
            environments that cannot start processes).

    Raises:
        ConfigError: an argument has a wrong value (the message names it and what is expected).
        ConfigTypeError: an argument has a wrong type.
        StoreError: at setup, when ``root`` cannot be written (before training starts; on every rank).

    Example::

        >>> import lightning.pytorch as pl
        >>> from comgra_callbacks import ComgraCallback
        >>> cb = ComgraCallback("comgra_runs", every_n_steps=10, modules="net.*")
        >>> trainer = pl.Trainer(callbacks=[cb], logger=False)  # doctest: +SKIP
        >>> ComgraCallback(every_n_steps=0)
        Traceback (most recent call last):
        ...
        comgra_callbacks.errors.ConfigError: `ComgraCallback(every_n_steps=...)`: expected a positive int, got 0.
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
        self._explicit_name = run_name is not None
        self._restored: dict[str, Any] | None = None
        self._recorder: Recorder | None = None
        self._opened_before = False
        self._last_recorded: tuple[int, str] | None = None
        self._batches = 0  # training batches seen: the step under manual optimization
        self._batch_step = 0  # the step of the running training batch
        self._backwards = 0  # backward passes of the running batch (manual optimization)
        self._losses: dict[str, Any] = {}  # loss name -> the running step's loss (detached, summed over micro-batches)
        self._loss_queue: list[tuple[int, str, Any]] = []  # (step, name, loss tensor): turned into floats in batches
        self._val_before: dict[str, int] = {}
        self._val_keys: set[str] = set()
        self._intervene: tuple[Any, int] | None = None  # (batch, batch_idx) of a step that gets the interventions

    @property
    def state_key(self) -> str:
        # Lightning asks for it on every hook call (~6 a step: ~0.1 ms, 4 % of a small model's step), so it is
        # made once for the inputs it depends on
        inputs = (self.options.root, self.run_name if self._explicit_name else None, self.options.every_n_steps, self.options.modules)
        cached = self.__dict__.get("_state_key")
        if cached is None or cached[0] != inputs:
            key = self._generate_state_key(root=inputs[0], run_name=inputs[1], every_n_steps=inputs[2], modules=describe_filter(inputs[3]))
            cached = self.__dict__["_state_key"] = (inputs, key)
        return str(cached[1])

    @property
    def recorder(self) -> Recorder | None:
        """The recorder of the running fit (None on ranks other than zero and outside a fit)."""
        return self._recorder

    # -------------------------------------------------------------------------------- set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        self.run_name = strategy.broadcast(self.run_name, src=0)
        agree_on_problem(
            self.options.root_problem(trainer.global_rank),
            ranks=self.options.ranks,
            broadcast=lambda obj: strategy.broadcast(obj, src=0),
            all_ok=lambda ok: strategy.reduce_boolean_decision(ok, all=True),
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.options.interventions and not pl_module.automatic_optimization:
            from comgra_callbacks.errors import ConfigError

            raise ConfigError(
                f"`{type(self).__name__}(interventions=...)`: expected a LightningModule with automatic optimization, got "
                f"{type(pl_module).__name__} with automatic_optimization=False (its training_step steps the optimizers itself)."
            )
        self._open(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.options.val_batches and not trainer.sanity_checking and self._recorder is None and trainer.state.fn != "fit":
            self._open(trainer, pl_module)
        self._val_before = {str(k): id(v) for k, v in trainer.callback_metrics.items()}

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.options.val_batches and self._recorder is None:
            self._open(trainer, pl_module)

    def _open(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.options.records_on(trainer.global_rank) or self._recorder is not None:
            return
        resume = self._opened_before or (self._restored is not None and self._restored.get("run_name") == self.run_name)
        meta = {
            "config": self.options.describe(),
            "versions": versions(),
            "hparams": json_safe(dict(getattr(pl_module, "hparams", {}) or {})),
            "framework": "lightning",
            "model_class": type(pl_module).__name__,
            "trainer": json_safe(
                {
                    "max_epochs": trainer.max_epochs,
                    "max_steps": trainer.max_steps,
                    "accumulate_grad_batches": trainer.accumulate_grad_batches,
                    "precision": trainer.precision,
                    "world_size": trainer.world_size,
                }
            ),
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
        }
        run_name = self.options.run_name_for(self.run_name, trainer.global_rank)
        self._recorder = self.options.open_recorder(run_name, pl_module, resume=resume, meta=meta)
        self._recorder.writer.op("start_segment", trainer.global_step)
        self._opened_before = True

    # ------------------------------------------------------------------------------- training
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        recorder = self._recorder
        if recorder is None:
            return
        manual = not pl_module.automatic_optimization
        step, epoch = self._step_now(trainer, pl_module), trainer.current_epoch
        self._batch_step, self._backwards = step, 0
        step_type = self.options.policy.step_type_of(batch, batch_idx)
        recorder.set_context(step=step, step_type=step_type, epoch=epoch, batch_idx=batch_idx, batch=batch)
        if not (manual or _optimizer_steps_now(trainer, batch_idx)) or self._last_recorded == (step, step_type):
            return
        plan = self.options.plan(step, step_type)
        self._intervene = (batch, batch_idx) if step_type == "train" and self.options.intervenes(step, plan) else None
        if plan is None and self._intervene is None:
            self.options.measure(recorder, pl_module, trainer, step, plan)
            return
        self._last_recorded = (step, step_type)
        self.options.measure(recorder, pl_module, trainer, step, plan)
        reason = "schedule" if plan is not None else "intervention"
        recorder.begin_step(step=step, step_type=step_type, epoch=epoch, batch_idx=batch_idx, batch=batch, armed=plan == "arm", reason=reason)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        recorder = self._recorder
        if recorder is None:
            return
        scaler = _active_scaler(trainer)  # float16 mixed precision: the loss here is multiplied by the scale
        if self.options.log_scalars and getattr(loss, "numel", lambda: 0)() == 1:
            # every batch's loss is kept (a detached tensor; turned into floats in batches, not one sync a step)
            name = "loss" if pl_module.automatic_optimization or self._backwards == 0 else f"loss.{self._backwards}"
            value = loss.detach().float().reshape(())
            if scaler is not None:
                scale = getattr(scaler, "_scale", None)  # the scale as a tensor on the device: no synchronisation
                value = value / (scale.to(value.device).reshape(()) if scale is not None else scaler.get_scale())
            self._losses[name] = value if name not in self._losses else self._losses[name] + value
        self._backwards += 1
        if recorder.recording:
            recorder.before_backward(loss, scale=scaler.get_scale() if scaler is not None else None)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        recorder = self._recorder
        if recorder is not None and recorder.recording:
            groups = getattr(optimizer, "param_groups", None)
            params = [p for g in groups for p in g.get("params", ())] if groups else None
            recorder.before_optimizer_step(params, optimizer=optimizer)
        if recorder is not None and self._intervene is not None and self.options.interventions:
            batch, batch_idx = self._intervene
            self._intervene = None
            run_interventions(
                recorder,
                pl_module,
                self.options.interventions,
                step=self._batch_step,
                epoch=trainer.current_epoch,
                batch_idx=batch_idx,
                batch=batch,
                loss_of=lambda b: _training_loss(trainer, pl_module, b, batch_idx),
                own_run=self.options.own_run(recorder, self.options.run_name_for(self.run_name, trainer.global_rank)),
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        recorder = self._recorder
        if recorder is None:
            return
        manual = not pl_module.automatic_optimization
        if manual:
            self._batches += 1
        step = self._batch_step
        if recorder.recording and (manual or _optimizer_steps_now(trainer, batch_idx)):
            recorder.end_step(outputs=outputs, batch=batch)
        if not self.options.log_scalars or not (manual or _optimizer_steps_now(trainer, batch_idx)):
            return
        losses, self._losses = self._losses, {}
        self._loss_queue.extend((step, name, value) for name, value in losses.items())
        if len(self._loss_queue) >= 64:
            self._flush_losses()
        every = getattr(trainer, "log_every_n_steps", 50)  # set by Lightning's logger connector
        if every and step % every == 0:
            metrics = {k: v for k, v in _scalars(trainer).items() if k not in self._val_keys and k not in losses}
            if metrics:
                recorder.log_scalars(step, metrics)

    def _step_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """The step of the next batch: optimizer steps so far, or batches so far under manual optimization."""
        return trainer.global_step if pl_module.automatic_optimization else self._batches

    def _flush_losses(self) -> None:
        """Turn the queued losses into scalars: one host transfer for many steps."""
        queue, self._loss_queue = self._loss_queue, []
        recorder = self._recorder
        if not queue or recorder is None:
            return
        import torch

        values = torch.stack([v.to(queue[0][2].device) for _, _, v in queue]).tolist()
        recorder.log_scalar_rows([(step, name, value) for (step, name, _), value in zip(queue, values)])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        recorder = self._recorder
        if recorder is None or trainer.sanity_checking or not self.options.log_scalars:
            return
        before = self._val_before
        changed = {k: v for k, v in trainer.callback_metrics.items() if before.get(str(k)) != id(v)}
        self._val_keys.update(str(k) for k in changed)
        metrics = {k: v for k, v in _scalars(trainer).items() if k in changed}
        if metrics:
            recorder.log_scalars(self._step_now(trainer, pl_module), metrics)

    # ----------------------------------------------------------------------------- validation
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._begin_eval("val", trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._recorder is not None and self._recorder.recording:
            self._recorder.end_step()

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._begin_eval("test", trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._recorder is not None and self._recorder.recording:
            self._recorder.end_step()

    def _begin_eval(self, kind: str, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        """Record an evaluation batch (under ``no_grad`` or ``inference_mode``: values only, no gradients)."""
        recorder = self._recorder
        if recorder is None or trainer.sanity_checking or batch_idx >= self.options.val_batches:
            return
        step_type = kind if dataloader_idx == 0 else f"{kind}/{dataloader_idx}"
        step = self._step_now(trainer, pl_module)
        recorder.begin_step(step=step, step_type=step_type, epoch=trainer.current_epoch, batch_idx=batch_idx, batch=batch, grads=False)

    # --------------------------------------------------------------------------------- ending
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close("failed", f"{type(exception).__name__}: {exception}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close("finished")

    def _close(self, status: str, error: str | None = None) -> None:
        if self._recorder is not None:
            try:
                self._flush_losses()
            except Exception:  # a failed device must not hide the run's own end
                self._loss_queue = []
        recorder, self._recorder = self._recorder, None
        self._losses = {}
        if recorder is not None:
            recorder.close(status, error)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------ resuming
    def state_dict(self) -> dict[str, Any]:
        return {
            "run_name": self.run_name,
            "root": self.options.root,
            "format_version": FORMAT_VERSION,
            "policy": self.options.policy.state_dict(),
            "batches": self._batches,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
        self.options.policy.load_state_dict(state_dict.get("policy", {}))
        batches = state_dict.get("batches")
        if isinstance(batches, int) and not isinstance(batches, bool) and batches >= 0:
            self._batches = batches
        if not self._explicit_name and isinstance(state_dict.get("run_name"), str):
            self.run_name = state_dict["run_name"]


def _training_loss(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Any:
    """The loss of ``training_step`` on ``batch`` (in the precision's autocast context), without logging."""
    import contextlib

    context = getattr(trainer.precision_plugin, "forward_context", None)
    saved = {name: pl_module.__dict__.get(name) for name in ("log", "log_dict")}
    pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        with context() if context is not None else contextlib.nullcontext():
            out = pl_module.training_step(batch, batch_idx)
    finally:
        for name, value in saved.items():
            if value is None:
                pl_module.__dict__.pop(name, None)
            else:
                pl_module.__dict__[name] = value
    return out.get("loss") if isinstance(out, Mapping) else out


def _active_scaler(trainer: pl.Trainer) -> Any:
    """The gradient scaler of float16 mixed precision, when one is in use (None for bf16 and full precision)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    return scaler


def _optimizer_steps_now(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether the optimizer steps after this batch (the last micro-batch under gradient accumulation)."""
    k = trainer.accumulate_grad_batches
    if k <= 1:
        return True
    total = trainer.num_training_batches
    return (batch_idx + 1) % k == 0 or (not math.isinf(total) and batch_idx + 1 >= total)


def _scalars(trainer: pl.Trainer) -> dict[str, float]:
    """The trainer's logged metrics that are numbers."""
    found: dict[str, float] = {}
    for name, value in trainer.callback_metrics.items():
        try:
            if getattr(value, "numel", lambda: 1)() == 1:
                found[str(name)] = float(value)
        except (TypeError, ValueError, RuntimeError):
            continue
    return found
