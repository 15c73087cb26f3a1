"""The recording policy: per batch, which step type it is and whether it is recorded, armed or skipped;
after the batch, whether an armed step is kept and why. Framework-free; the integrations ask it.

>>> from comgra_callbacks.recording.schedules import Every
>>> policy = RecordingPolicy(schedule={"rare": Every(1), "*": Every(10)}, step_type="kind")
>>> policy.step_type_of({"kind": "rare"}, 0), policy.plan(3, "rare"), policy.plan(3, "common"), policy.plan(10, "common")
('rare', 'record', None, 'record')
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from comgra_callbacks.errors import ConfigError, ConfigTypeError, RecordingError
from comgra_callbacks.names import name_predicate
from comgra_callbacks.recording.sampling import batch_field
from comgra_callbacks.recording.schedules import Every, Schedule
from comgra_callbacks.recording.triggers import StepSummary, Trigger

Plan = Literal["record", "arm"]
DETAIL_LEVELS = ("stats", "neurons", "samples", "full")
DEFAULT_TYPE = "train"


class RecordingPolicy:
    """Decides what happens to each training batch.

    Args:
        schedule: a :class:`Schedule`, or ``{step_type: Schedule}`` with an optional ``"*"`` for the others
            (types without a schedule are not recorded, only armed).
        step_type: how a batch's step type is found: None (always ``"train"``), a batch field name (its value,
            a string or the first of a list of strings, is the type), or a function ``(batch, batch_idx) -> str``.
        triggers: decide after the batch whether an armed step is kept.
        arm_every: arm every n-th step that the schedule does not record (default: every step when there are
            triggers; arming costs about a recorded step's capture, see docs/benchmarks.md).
    """

    def __init__(
        self,
        schedule: Schedule | Mapping[str, Schedule] | None = None,
        step_type: str | Callable[[Any, int], str] | None = None,
        triggers: Iterable[Trigger] = (),
        arm_every: int | None = None,
        owner: str = "ComgraCallback",
    ) -> None:
        self.owner = owner
        if schedule is None:
            schedule = Every(1)
        if isinstance(schedule, Schedule):
            self.schedules: dict[str, Schedule] = {"*": schedule}
        elif isinstance(schedule, Mapping):
            bad = {k: v for k, v in schedule.items() if not isinstance(k, str) or not isinstance(v, Schedule)}
            if bad:
                raise ConfigTypeError(f"`{owner}(schedule=...)`: expected a schedule or a dict step type -> schedule, got {bad!r}.")
            self.schedules = dict(schedule)
        else:
            raise ConfigTypeError(f"`{owner}(schedule=...)`: expected a schedule such as Every(10) or a dict step type -> schedule, got {schedule!r}.")
        if step_type is not None and not isinstance(step_type, str) and not callable(step_type):
            raise ConfigTypeError(f"`{owner}(step_type=...)`: expected a batch field name or a function (batch, batch_idx) -> str, got {step_type!r}.")
        self.step_type = step_type
        self.triggers = list(triggers or ())
        bad_triggers = [t for t in self.triggers if not isinstance(t, Trigger)]
        if bad_triggers:
            raise ConfigTypeError(f"`{owner}(triggers=...)`: expected triggers such as LossSpike() or NonFinite(), got {bad_triggers[0]!r}.")
        names = [t.name for t in self.triggers]
        if len(set(names)) != len(names):
            raise ConfigError(f"`{owner}(triggers=...)`: two triggers share a name {names}; give Predicate(..., name=) distinct names.")
        if arm_every is not None and (isinstance(arm_every, bool) or not isinstance(arm_every, int) or arm_every <= 0):
            raise ConfigError(f"`{owner}(arm_every=...)`: expected a positive int or None, got {arm_every!r}.")
        if arm_every is not None and not self.triggers:
            raise ConfigError(f"`{owner}(arm_every=...)`: arming needs triggers to decide what to keep. HINT: add triggers=[LossSpike(), NonFinite()].")
        self.arm_every = arm_every if arm_every is not None else (1 if self.triggers else None)
        self._last: dict[str, int] = {}
        self._lock = threading.Lock()
        self.wants_bytes = any(_counts_bytes(s) for s in self.schedules.values())

    # ---------------------------------------------------------------------------- training thread
    def step_type_of(self, batch: Any, batch_idx: int) -> str:
        if self.step_type is None:
            return DEFAULT_TYPE
        if callable(self.step_type):
            value = self.step_type(batch, batch_idx)
        else:
            value = batch_field(batch, self.step_type, f"{self.owner}(step_type=...)")
            if isinstance(value, (list, tuple)) and value:
                value = value[0]
        if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
            value = value.item()
        if not isinstance(value, (str, int)) or isinstance(value, bool) or value == "":
            raise RecordingError(f"`{self.owner}(step_type=...)`: expected a non-empty string per batch, got {value!r}.")
        return str(value)

    def plan(self, step: int, step_type: str) -> Plan | None:
        """``"record"``, ``"arm"`` or None for a training step."""
        schedule = self.schedules.get(step_type, self.schedules.get("*"))
        if schedule is not None and schedule.wants(step, self._last.get(step_type)):
            self._last[step_type] = step
            schedule.counted(step)
            return "record"
        if self.arm_every is not None and step % self.arm_every == 0:
            return "arm"
        return None

    def batch_reasons(self, outputs: Any, batch: Any) -> list[str]:
        """Training-thread triggers (Predicate) that fire on this batch's outputs."""
        return [t.name for t in self.triggers if t.check_batch(outputs, batch)]

    # ------------------------------------------------------------------------------ writer thread
    def decide(self, summary: StepSummary, reason: str | None) -> str | None:
        """Show the step to every trigger; the reason it is kept (``reason`` if it was already decided)."""
        with self._lock:
            fired = [t.name for t in self.triggers if t.check(summary)]
        if reason is not None:
            return reason
        if not fired:
            return None
        for schedule in self._unique_schedules():  # kept by a trigger: a record the schedule did not plan
            schedule.counted(summary.step if summary.step is not None else -1)
        return fired[0]

    def kept(self, step: int, nbytes: int) -> None:
        """A record was kept and took about ``nbytes`` bytes (writer thread)."""
        for schedule in self._unique_schedules():
            schedule.stored(nbytes)

    def _unique_schedules(self) -> list[Schedule]:
        return list({id(s): s for s in self.schedules.values()}.values())

    # ---------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "last": dict(self._last),
                "schedules": {k: s.state_dict() for k, s in self.schedules.items()},
                "triggers": {t.name: t.state_dict() for t in self.triggers},
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            self._last = {str(k): int(v) for k, v in state.get("last", {}).items()}
            for key, sub in state.get("schedules", {}).items():
                if key in self.schedules:
                    self.schedules[key].load_state_dict(sub)
            for trigger in self.triggers:
                trigger.load_state_dict(state.get("triggers", {}).get(trigger.name, {}))

    def describe(self) -> dict[str, Any]:
        return {
            "schedule": {k: repr(v) for k, v in self.schedules.items()},
            "step_type": self.step_type if isinstance(self.step_type, str) or self.step_type is None else getattr(self.step_type, "__qualname__", "callable"),
            "triggers": [repr(t) for t in self.triggers],
            "arm_every": self.arm_every,
        }


def _counts_bytes(schedule: Schedule) -> bool:
    """Whether a schedule (or one inside it) is a budget of bytes: only then are record sizes estimated."""
    from comgra_callbacks.recording.schedules import AnyOf, Budget

    if isinstance(schedule, Budget):
        return schedule.max_bytes is not None or _counts_bytes(schedule.schedule)
    if isinstance(schedule, AnyOf):
        return any(_counts_bytes(s) for s in schedule.schedules)
    return False


def detail_rules(spec: Mapping[str, str] | None, owner: str) -> list[tuple[Callable[[str], bool], str]]:
    """Validate ``detail={glob: level}``; the first matching glob wins.

    >>> [level for _, level in detail_rules({"encoder.*": "samples", "*.weight": "full"}, "X")]
    ['samples', 'full']
    """
    if spec is None:
        return []
    if not isinstance(spec, Mapping):
        raise ConfigTypeError(f"`{owner}(detail=...)`: expected a dict name glob -> level, e.g. {{'encoder.*': 'samples'}}, got {spec!r}.")
    rules = []
    for pattern, level in spec.items():
        if level not in DETAIL_LEVELS:
            raise ConfigError(f"`{owner}(detail=...)`: expected a level in {list(DETAIL_LEVELS)} for {pattern!r}, got {level!r}.")
        rules.append((name_predicate(pattern, owner=f"{owner}(detail=...)"), str(level)))
    return rules
