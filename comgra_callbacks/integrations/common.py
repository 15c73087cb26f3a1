"""What every integration shares: its options, validated once; run names; opening a run for recording.

The Lightning and HuggingFace callbacks both hold a :class:`RecordingOptions` and differ only in how they
translate their framework's events into :class:`~comgra_callbacks.recording.recorder.Recorder` calls.
"""

from __future__ import annotations

import os
import platform
import secrets
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from comgra_callbacks import validation as v
from comgra_callbacks._version import __version__
from comgra_callbacks.circuit_tracking import CircuitTracking, check_circuit_tracking
from comgra_callbacks.errors import ComgraError, ConfigError, ConfigTypeError, StoreError
from comgra_callbacks.measures import check_measures
from comgra_callbacks.measures import evaluate as evaluate_measures
from comgra_callbacks.names import NameFilter, describe_filter, name_predicate
from comgra_callbacks.recording.attribution import check_index_field, check_keep, check_projection
from comgra_callbacks.recording.capture import check_modules_spec
from comgra_callbacks.recording.interventions import Intervention, check_interventions
from comgra_callbacks.recording.policy import Plan, RecordingPolicy, detail_rules
from comgra_callbacks.recording.recorder import Recorder, RecorderConfig
from comgra_callbacks.recording.sampling import SampleSelector, as_selector
from comgra_callbacks.recording.schedules import Every, Schedule
from comgra_callbacks.store.background import BackgroundWriter
from comgra_callbacks.store.format import MEASURE_PREFIX
from comgra_callbacks.store.sink import Sink
from comgra_callbacks.store.storage import check_run_name, open_root
from comgra_callbacks.store.writer import RunWriter

Ranks = Literal["zero", "all"]


def default_run_name() -> str:
    """A unique name that sorts by start time, e.g. ``20261121-201305-3fa9c2``."""
    return time.strftime("%Y%m%d-%H%M%S", time.localtime()) + "-" + secrets.token_hex(3)


@dataclass
class RecordingOptions:
    """The options of a recording callback, validated (see ``ComgraCallback`` for their meaning)."""

    root: str
    run_name: str | None
    every_n_steps: int
    modules: NameFilter
    parameters: NameFilter
    n_samples: int
    neurons: bool
    grads: bool
    updates: bool
    per_loss_grads: bool
    val_batches: int
    batch_fn: Callable[[Any], Mapping[str, Any]] | None
    max_neurons: int
    max_sample_numel: int
    storage_options: dict[str, Any] | None
    flush_secs: float
    max_queue_mb: int
    on_write_error: str
    log_scalars: bool
    ranks: Ranks = "zero"
    writer: Literal["process", "thread"] = "process"
    detail: Mapping[str, str] | None = None
    samples: SampleSelector | None = None
    policy: RecordingPolicy = field(default_factory=RecordingPolicy)
    buffers: NameFilter = None
    neuron_axis: dict[str, int] | None = None
    interventions: dict[str, Intervention] | None = None
    intervention_schedule: Schedule | None = None
    measures: dict[str, Callable[..., Any]] | None = None
    measure_schedule: Schedule | None = None
    attribution: NameFilter = None
    index_field: str | int | None = None
    attribution_keep: Literal["factors", "contributions"] = "factors"
    attribution_projection: int | None = None
    circuit_tracking: dict[str, CircuitTracking] | None = None

    @classmethod
    def validated(cls, owner: str, **kw: Any) -> RecordingOptions:
        root = kw["root"]
        if not isinstance(root, (str, os.PathLike)):
            raise ConfigTypeError(f"`{owner}(root=...)`: expected a directory path or an fsspec URL, got {root!r} of type {type(root).__name__}.")
        run_name = kw["run_name"]
        if run_name is not None:
            check_run_name(run_name, owner=f"{owner}(run_name=...)")
        check_modules_spec(kw["modules"], owner=f"{owner}(modules=...)")
        name_predicate(kw["parameters"], owner=f"{owner}(parameters=...)")
        if kw.get("attribution") is not None:
            name_predicate(kw["attribution"], owner=f"{owner}(attribution=...)")
        if kw.get("buffers") is not None:
            name_predicate(kw["buffers"], owner=f"{owner}(buffers=...)")
        neuron_axis = kw.get("neuron_axis")
        if neuron_axis is not None:
            if not isinstance(neuron_axis, Mapping) or not all(isinstance(k, str) and isinstance(a, int) and not isinstance(a, bool) for k, a in neuron_axis.items()):
                raise ConfigTypeError(
                    f"`{owner}(neuron_axis=...)`: expected a dict {{name glob: axis (int)}}, got {neuron_axis!r}. "
                    'HINT: neuron_axis={"encoder.conv*": 1}.'
                )
        every_n_steps = v.positive_int(owner, "every_n_steps", kw["every_n_steps"])
        schedule = kw.get("schedule")
        if schedule is not None and every_n_steps != 1:
            raise ConfigError(
                f"`{owner}(every_n_steps=..., schedule=...)`: expected one of them, got every_n_steps={every_n_steps} and "
                f"schedule={schedule!r}. HINT: every_n_steps=n is short for schedule=Every(n)."
            )
        policy = RecordingPolicy(
            schedule=Every(every_n_steps) if schedule is None else schedule,
            step_type=kw.get("step_type"),
            triggers=kw.get("triggers") or (),
            arm_every=kw.get("arm_every"),
            owner=owner,
        )
        detail_rules(kw.get("detail"), owner)
        interventions = check_interventions(owner, kw.get("interventions"))
        measures = check_measures(owner, kw.get("measures"))
        measure_schedule = kw.get("measure_schedule")
        if measure_schedule is not None and not isinstance(measure_schedule, Schedule):
            raise ConfigTypeError(f"`{owner}(measure_schedule=...)`: expected a schedule such as Every(100), got {measure_schedule!r}.")
        if measure_schedule is not None and not measures:
            raise ConfigError(f"`{owner}(measure_schedule=...)`: expected measures= too, got none. HINT: measures={{'wnorm': WeightNorm()}}.")
        intervention_schedule = kw.get("intervention_schedule")
        if intervention_schedule is not None:
            if not isinstance(intervention_schedule, Schedule):
                raise ConfigTypeError(f"`{owner}(intervention_schedule=...)`: expected a schedule such as Every(100), got {intervention_schedule!r}.")
            if not interventions:
                raise ConfigError(f"`{owner}(intervention_schedule=...)`: expected interventions= too, got none. HINT: interventions={{'ablate': Ablate('net.0')}}.")
        return cls(
            root=os.fspath(root),
            run_name=run_name,
            every_n_steps=every_n_steps,
            modules=kw["modules"],
            parameters=kw["parameters"],
            n_samples=v.non_negative_int(owner, "n_samples", kw["n_samples"]),
            neurons=v.boolean(owner, "neurons", kw["neurons"]),
            grads=v.boolean(owner, "grads", kw["grads"]),
            updates=v.boolean(owner, "updates", kw["updates"]),
            per_loss_grads=v.boolean(owner, "per_loss_grads", kw["per_loss_grads"]),
            val_batches=v.non_negative_int(owner, "val_batches", kw["val_batches"]),
            batch_fn=v.optional_callable(owner, "batch_fn", kw["batch_fn"]),
            max_neurons=v.positive_int(owner, "max_neurons", kw["max_neurons"]),
            max_sample_numel=v.positive_int(owner, "max_sample_numel", kw["max_sample_numel"]),
            storage_options=v.optional_mapping(owner, "storage_options", kw["storage_options"]),
            flush_secs=v.positive_number(owner, "flush_secs", kw["flush_secs"]),
            max_queue_mb=v.positive_int(owner, "max_queue_mb", kw["max_queue_mb"]),
            on_write_error=v.one_of(owner, "on_write_error", kw["on_write_error"], ("warn", "raise")),
            log_scalars=v.boolean(owner, "log_scalars", kw["log_scalars"]),
            ranks=v.one_of(owner, "ranks", kw.get("ranks", "zero"), ("zero", "all")),
            writer=v.one_of(owner, "writer", kw.get("writer", "process"), ("process", "thread")),
            detail=dict(kw["detail"]) if kw.get("detail") is not None else None,
            samples=as_selector(kw.get("samples", "first"), owner),
            policy=policy,
            buffers=kw.get("buffers"),
            neuron_axis=dict(neuron_axis) if neuron_axis is not None else None,
            interventions=interventions,
            intervention_schedule=intervention_schedule,
            measures=measures,
            measure_schedule=measure_schedule,
            attribution=kw.get("attribution"),
            index_field=check_index_field(owner, kw.get("index_field")),
            attribution_keep=check_keep(owner, kw.get("attribution_keep", "factors")),  # type: ignore[arg-type]
            attribution_projection=check_projection(owner, kw.get("attribution_projection")),
            circuit_tracking=check_circuit_tracking(owner, kw.get("circuit_tracking")),
        )

    def plan(self, step: int, step_type: str) -> Plan | None:
        """Whether the training step ``step`` (the optimizer step about to run, from 0) of ``step_type`` is
        recorded, armed (kept only if a trigger fires) or skipped. The one place every integration asks."""
        return self.policy.plan(step, step_type)

    def intervenes(self, step: int, plan: Plan | None) -> bool:
        """Whether the interventions run on training step ``step``: on the steps of ``intervention_schedule``,
        by default on every step the schedule records."""
        if not self.interventions:
            return False
        if self.intervention_schedule is None:
            return plan == "record"
        return self.intervention_schedule.wants(step)

    def measure(self, recorder: Recorder, model: Any, trainer: Any, step: int, plan: Plan | None) -> None:
        """Evaluate the measures when step ``step`` wants them (``measure_schedule``, by default every step the
        schedule records) and store them with the run, stamped ``step``; the same for the tracked circuits
        (``circuit_tracking=``)."""
        for name, tracking in (self.circuit_tracking or {}).items():
            if tracking.wants(step, plan == "record"):
                recorder.log_scalar_rows(tracking.rows(name, step, model))
        if not self.measures:
            return
        wanted = plan == "record" if self.measure_schedule is None else self.measure_schedule.wants(step)
        if wanted:
            values = evaluate_measures(self.measures, model, trainer)
            recorder.log_scalar_rows([(step, MEASURE_PREFIX + name, value) for name, value in values.items()])

    def recorder_config(self) -> RecorderConfig:
        return RecorderConfig(
            modules=self.modules,
            parameters=self.parameters,
            n_samples=self.n_samples,
            neurons=self.neurons,
            max_neurons=self.max_neurons,
            max_sample_numel=self.max_sample_numel,
            grads=self.grads,
            updates=self.updates,
            per_loss_grads=self.per_loss_grads,
            batch_fn=self.batch_fn,
            detail=self.detail,
            samples=self.samples,
            buffers=self.buffers,
            neuron_axis=self.neuron_axis,
            attribution=self.attribution,
            index_field=self.index_field,
            attribution_options={"keep": self.attribution_keep, "tests": self.test_gradients(), "projection": self.attribution_projection},
        )

    def test_gradients(self) -> dict[str, Any]:
        """The ``TestGradient`` measures, whose gradients the attribution turns into TracIn's products."""
        from comgra_callbacks.measures import TestGradient

        return {name: m for name, m in (self.measures or {}).items() if isinstance(m, TestGradient)}

    def describe(self) -> dict[str, Any]:
        """JSON-safe description for the run metadata."""
        return {
            "root": self.root,
            "every_n_steps": self.every_n_steps,
            "modules": describe_filter(self.modules),
            "parameters": describe_filter(self.parameters),
            "n_samples": self.n_samples,
            "neurons": self.neurons,
            "grads": self.grads,
            "updates": self.updates,
            "per_loss_grads": self.per_loss_grads,
            "val_batches": self.val_batches,
            "batch_fn": getattr(self.batch_fn, "__qualname__", repr(self.batch_fn)) if self.batch_fn else None,
            "max_neurons": self.max_neurons,
            "max_sample_numel": self.max_sample_numel,
            "ranks": self.ranks,
            "writer": self.writer,
            "detail": dict(self.detail) if self.detail else None,
            "samples": repr(self.samples),
            "buffers": describe_filter(self.buffers),
            "neuron_axis": dict(self.neuron_axis) if self.neuron_axis else None,
            "interventions": {k: v.describe() for k, v in self.interventions.items()} if self.interventions else None,
            "intervention_schedule": repr(self.intervention_schedule) if self.intervention_schedule is not None else None,
            "measures": {k: repr(v) for k, v in self.measures.items()} if self.measures else None,
            "measure_schedule": repr(self.measure_schedule) if self.measure_schedule is not None else None,
            "attribution": describe_filter(self.attribution),
            "index_field": self.index_field,
            "attribution_keep": self.attribution_keep,
            "attribution_projection": self.attribution_projection,
            "circuit_tracking": {k: t.describe() for k, t in self.circuit_tracking.items()} if self.circuit_tracking else None,
            **self.policy.describe(),
        }

    def check_root(self) -> None:
        """Fail early (at setup, before training) when the root cannot be written."""
        open_root(self.root, self.storage_options).ensure_writable()

    def open_recorder(self, run_name: str, model: Any, *, resume: bool, meta: dict[str, Any]) -> Recorder:
        """Open (or resume) the run, attach a recorder to ``model`` and return it.

        The run is written by a separate process (``writer="process"``, the default: no competition for the
        GIL with training) or by a thread of this process (``writer="thread"``)."""
        sink: Sink  # both transports implement the protocol the recorder calls
        writer = self.writer
        if writer == "process" and sys.platform == "win32":  # the writer process waits on pipes with select()
            warnings.warn("comgra: the writer process is not available on Windows; writing from a thread instead.", RuntimeWarning, stacklevel=3)
            writer = "thread"
        if writer == "process":
            from comgra_callbacks.recording.process_writer import ProcessWriter

            sink = ProcessWriter(
                root=self.root,
                run=run_name,
                storage_options=self.storage_options,
                resume=resume,
                meta=json_safe(meta),
                max_queue_bytes=self.max_queue_mb << 20,
                flush_secs=self.flush_secs,
                on_error=self.on_write_error,  # type: ignore[arg-type]
                expected_numel=3 * sum(int(p.numel()) for p in model.parameters()),  # values, gradients, updates
            )
        else:
            location = open_root(self.root, self.storage_options).run(run_name)
            sink = BackgroundWriter(
                RunWriter(location, meta=meta, resume=resume),
                max_queue_bytes=self.max_queue_mb << 20,
                flush_secs=self.flush_secs,
                on_error=self.on_write_error,  # type: ignore[arg-type]
            )
        recorder = Recorder(self.recorder_config(), sink, policy=self.policy)
        recorder.attach(model)
        return recorder

    def own_run(self, recorder: Recorder, run_name: str) -> Callable[[], Any]:
        """A function returning a reader of the run being written, with everything recorded so far flushed
        (read by a patch from a recorded step of this run, on intervention steps only)."""

        def read() -> Any:
            from comgra_callbacks.store.reader import Run

            recorder.writer.flush()
            return Run(open_root(self.root, self.storage_options).run(run_name))

        return read

    def run_exists(self, run_name: str) -> bool:
        return open_root(self.root, self.storage_options).run(run_name).read_bytes("manifest.json") is not None

    # ------------------------------------------------------------------------------ distributed
    def records_on(self, rank: int) -> bool:
        """Whether the process of global rank ``rank`` records (``ranks="zero"``: rank 0 only)."""
        return self.ranks == "all" or rank == 0

    def run_name_for(self, run_name: str, rank: int) -> str:
        """The run group a rank writes: ``run_name``, or ``run_name/rank<r>`` with ``ranks="all"``."""
        return f"{run_name}/rank{rank}" if self.ranks == "all" else run_name

    def root_problem(self, rank: int) -> ComgraError | None:
        """Check the root from a rank that records: the error it would raise, or None.

        Returned rather than raised, so that all ranks can agree to fail together (a rank that raised alone
        would leave the others waiting in the next collective operation).
        """
        if not self.records_on(rank):
            return None
        try:
            self.check_root()
        except ComgraError as exc:
            return exc
        return None


def agree_on_problem(
    problem: ComgraError | None,
    *,
    ranks: Ranks,
    broadcast: Callable[[Any], Any],
    all_ok: Callable[[bool], bool],
) -> None:
    """Raise on every rank when the set-up check failed on a rank that records, else return.

    Args:
        problem: this rank's result of :meth:`RecordingOptions.root_problem`.
        ranks: who records; with ``"zero"`` rank 0's result is broadcast, with ``"all"`` all ranks vote.
        broadcast: sends an object from rank 0 to every rank and returns it (identity on one process).
        all_ok: True on every rank when every rank passed True (identity on one process).

    Raises:
        ComgraError: this rank's own problem, or a :class:`StoreError` saying another rank failed.

    >>> agree_on_problem(None, ranks="zero", broadcast=lambda x: x, all_ok=lambda ok: ok)
    """
    if ranks == "zero":
        text = broadcast(None if problem is None else str(problem))
        if text is None:
            return
        raise problem if problem is not None else StoreError(f"rank 0 could not open the store: {text}")
    if all_ok(problem is None):
        return
    if problem is not None:
        raise problem
    raise StoreError("another rank could not open the store root (see its error); no rank records.")


def versions() -> dict[str, str]:
    """Versions of the packages that shaped the recording."""
    import importlib.metadata as md

    found = {"python": platform.python_version(), "comgra_callbacks": __version__}
    for package in ("torch", "lightning", "transformers", "zarr", "numpy"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return found


def json_safe(value: Any, depth: int = 0) -> Any:
    """Make hyper-parameters JSON-safe: containers kept, everything else as a string (no pickling)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if depth > 5:
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(val, depth + 1) for k, val in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(val, depth + 1) for val in value]
    return str(value)
