"""Schedules: which steps are recorded. Small composable objects, usable from Python and from YAML.

A schedule answers ``wants(step)`` for the trainer's global step. ``last`` is the step this step type was
last recorded at (None before the first record), which :class:`Spaced` uses so that a rare step type that
shows up at irregular steps is still recorded.

>>> sorted(s for s in range(40) if Every(10).wants(s))
[0, 10, 20, 30]
>>> schedule = Decaying(every=(1, 10, 100), until=(5, 50))
>>> [s for s in range(300) if schedule.wants(s)]
[0, 1, 2, 3, 4, 10, 20, 30, 40, 100, 200]
>>> Every(10) | Steps([3, 7])
AnyOf(Every(10), Steps([3, 7]))
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from comgra_callbacks.errors import ConfigError, ConfigTypeError
from comgra_callbacks.validation import positive_int


class Schedule:
    """Base class: ``wants(step, last=None) -> bool``; ``|`` and ``&`` combine schedules."""

    def wants(self, step: int, last: int | None = None) -> bool:
        raise NotImplementedError

    def __or__(self, other: Schedule) -> AnyOf:
        return AnyOf(self, other)

    def __and__(self, other: Schedule) -> AllOf:
        return AllOf(self, other)

    def counted(self, step: int) -> None:
        """A record of ``step`` is certain (for budgets; most schedules ignore it). Told on the training thread
        when a scheduled step is planned, so a budget never lags behind the writer."""

    def stored(self, nbytes: int) -> None:
        """A kept record took about ``nbytes`` bytes (told by the writer thread, after the fact)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Every(Schedule):
    """Every ``n``-th step, counting from ``start``: steps ``start, start + n, start + 2n, ...``

    >>> [s for s in range(12) if Every(4, start=2).wants(s)]
    [2, 6, 10]
    """

    def __init__(self, n: int, start: int = 0) -> None:
        self.n = positive_int("Every", "n", n)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ConfigError(f"`Every(start=...)`: expected an int >= 0, got {start!r}.")
        self.start = start

    def wants(self, step: int, last: int | None = None) -> bool:
        return step >= self.start and (step - self.start) % self.n == 0

    def __repr__(self) -> str:
        return f"Every({self.n})" if self.start == 0 else f"Every({self.n}, start={self.start})"


class Spaced(Schedule):
    """At least ``n`` steps after the last record of the same step type (the first time at once).

    Unlike :class:`Every`, it cannot miss a rare step type that happens to fall between multiples of ``n``.

    >>> s = Spaced(5); last = None; kept = []
    >>> for step in [0, 2, 3, 6, 7, 11, 12]:
    ...     if s.wants(step, last):
    ...         kept.append(step); last = step
    >>> kept
    [0, 6, 11]
    """

    def __init__(self, n: int) -> None:
        self.n = positive_int("Spaced", "n", n)

    def wants(self, step: int, last: int | None = None) -> bool:
        return last is None or step - last >= self.n

    def __repr__(self) -> str:
        return f"Spaced({self.n})"


class Steps(Schedule):
    """Explicit steps and ranges: ints, ``[start, stop]`` or ``[start, stop, every]`` lists, or ``range`` objects.

    >>> [s for s in range(30) if Steps([1, 2, [10, 13], [20, 30, 5]]).wants(s)]
    [1, 2, 10, 11, 12, 20, 25]
    """

    def __init__(self, steps: Iterable[int | Sequence[int] | range]) -> None:
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise ConfigTypeError(f"`Steps(steps=...)`: expected a list of steps and [start, stop(, every)] ranges, got {steps!r}.")
        self._singles: set[int] = set()
        self._ranges: list[range] = []
        self._spec: list[Any] = []
        for item in steps:
            if isinstance(item, range):
                self._ranges.append(item)
                self._spec.append([item.start, item.stop] + ([item.step] if item.step != 1 else []))
            elif isinstance(item, bool) or isinstance(item, str):
                raise ConfigTypeError(f"`Steps(steps=...)`: expected an int step or a [start, stop(, every)] range, got {item!r}.")
            elif isinstance(item, int):
                if item < 0:
                    raise ConfigError(f"`Steps(steps=...)`: steps are >= 0, got {item!r}.")
                self._singles.add(item)
                self._spec.append(item)
            elif isinstance(item, Sequence) and len(item) in (2, 3) and all(isinstance(v, int) and not isinstance(v, bool) for v in item):
                if item[0] < 0 or item[1] < item[0] or (len(item) == 3 and item[2] <= 0):
                    raise ConfigError(f"`Steps(steps=...)`: expected [start, stop(, every)] with 0 <= start <= stop and every > 0, got {list(item)!r}.")
                self._ranges.append(range(*item))
                self._spec.append(list(item))
            else:
                raise ConfigTypeError(f"`Steps(steps=...)`: expected an int step or a [start, stop(, every)] range, got {item!r}.")
        # asked on every training step: the ranges by their start, and how far the ranges up to each reach, so
        # that a step looks at the few ranges that can hold it, not at all of them (a generated list of 5 000
        # ranges took 0.54 ms a step so)
        self._ranges = sorted((r if r.step > 0 else r[::-1] for r in self._ranges), key=lambda r: r.start)  # ascending: the same steps
        self._starts = [r.start for r in self._ranges]
        self._reach = list(itertools.accumulate((r.stop for r in self._ranges), max))

    def wants(self, step: int, last: int | None = None) -> bool:
        if step in self._singles:
            return True
        i = bisect.bisect_right(self._starts, step) - 1  # the last range starting at or before the step
        while i >= 0 and self._reach[i] > step:  # ranges before it that reach past the step
            if step in self._ranges[i]:
                return True
            i -= 1
        return False

    def __repr__(self) -> str:
        return f"Steps({self._spec!r})"


class Decaying(Schedule):
    """Dense at the start, ever sparser later: every ``every[i]`` steps until step ``until[i]``, then
    every ``every[-1]`` steps for ever. ``len(every) == len(until) + 1``; ``until`` increases.

    The default records every step until 100, every 10th until 1 000, every 100th until 10 000 and every
    1 000th after that.

    >>> Decaying()
    Decaying(every=(1, 10, 100, 1000), until=(100, 1000, 10000))
    """

    def __init__(self, every: Sequence[int] = (1, 10, 100, 1000), until: Sequence[int] = (100, 1000, 10_000)) -> None:
        every, until = tuple(every), tuple(until)
        for n in every:
            positive_int("Decaying", "every", n)
        if len(every) != len(until) + 1:
            raise ConfigError(f"`Decaying(every=..., until=...)`: expected one more `every` than `until`, got every={list(every)} and until={list(until)}.")
        if any(b <= a for a, b in zip(until, until[1:])) or any(isinstance(u, bool) or not isinstance(u, int) or u <= 0 for u in until):
            raise ConfigError(f"`Decaying(until=...)`: expected increasing positive steps, got {list(until)}.")
        self.every, self.until = every, until

    def wants(self, step: int, last: int | None = None) -> bool:
        phase = bisect.bisect_right(self.until, step)
        return step % self.every[phase] == 0

    def __repr__(self) -> str:
        return f"Decaying(every={self.every}, until={self.until})"


class LogSpaced(Schedule):
    """About ``per_decade`` records per factor of ten: step 0 and every step that is ``round(r ** k)`` for
    some k, with ``r = 10 ** (1 / per_decade)``. Dense at first, log-spaced later.

    >>> [s for s in range(200) if LogSpaced(per_decade=4).wants(s)]
    [0, 1, 2, 3, 6, 10, 18, 32, 56, 100, 178]
    """

    def __init__(self, per_decade: int = 10) -> None:
        self.per_decade = positive_int("LogSpaced", "per_decade", per_decade)
        self._log_ratio = math.log(10) / per_decade

    def wants(self, step: int, last: int | None = None) -> bool:
        if step <= 1:
            return True
        k = round(math.log(step) / self._log_ratio)
        return any(round(math.exp(j * self._log_ratio)) == step for j in (k - 1, k, k + 1))

    def __repr__(self) -> str:
        return f"LogSpaced(per_decade={self.per_decade})"


class AnyOf(Schedule):
    """Steps any of the schedules wants (``a | b``)."""

    def __init__(self, *schedules: Schedule) -> None:
        if not schedules or not all(isinstance(s, Schedule) for s in schedules):
            raise ConfigTypeError(f"`AnyOf(...)`: expected one or more schedules, got {list(schedules)!r}.")
        self.schedules = schedules

    def wants(self, step: int, last: int | None = None) -> bool:
        return any(s.wants(step, last) for s in self.schedules)

    def counted(self, step: int) -> None:
        for s in self.schedules:
            s.counted(step)

    def stored(self, nbytes: int) -> None:
        for s in self.schedules:
            s.stored(nbytes)

    def state_dict(self) -> dict[str, Any]:
        return {"schedules": [s.state_dict() for s in self.schedules]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, sub in zip(self.schedules, state.get("schedules", [])):
            s.load_state_dict(sub)

    def __repr__(self) -> str:
        return f"AnyOf({', '.join(map(repr, self.schedules))})"


class AllOf(AnyOf):
    """Steps all of the schedules want (``a & b``).

    >>> [s for s in range(30) if (Every(2) & Steps([[10, 20]])).wants(s)]
    [10, 12, 14, 16, 18]
    """

    def wants(self, step: int, last: int | None = None) -> bool:
        return all(s.wants(step, last) for s in self.schedules)

    def __repr__(self) -> str:
        return f"AllOf({', '.join(map(repr, self.schedules))})"


class Budget(Schedule):
    """Caps ``schedule`` at ``max_records`` records or ``max_bytes`` bytes, then thins out instead of stopping:
    after the cap, a wanted step is recorded only when the distance to the previous record is at least
    twice the distance before it, so the count grows with the logarithm of the step.

    Every kept record counts (also those kept by triggers). Records are counted when they become certain;
    bytes only once the writer has reduced a record, so a byte budget may overshoot by what is queued.
    The state survives a resume.

    >>> b = Budget(Every(1), max_records=5)
    >>> kept = []
    >>> for step in range(100):
    ...     if b.wants(step):
    ...         kept.append(step); b.counted(step)
    >>> kept
    [0, 1, 2, 3, 4, 6, 10, 18, 34, 66]
    """

    def __init__(self, schedule: Schedule, max_records: int | None = None, max_bytes: int | None = None) -> None:
        if not isinstance(schedule, Schedule):
            raise ConfigTypeError(f"`Budget(schedule=...)`: expected a schedule such as Every(10), got {schedule!r}.")
        if max_records is None and max_bytes is None:
            raise ConfigError("`Budget(...)`: expected max_records or max_bytes (or both), got neither.")
        if max_records is not None:
            positive_int("Budget", "max_records", max_records)
        if max_bytes is not None:
            positive_int("Budget", "max_bytes", max_bytes)
        self.schedule = schedule
        self.max_records, self.max_bytes = max_records, max_bytes
        self._lock = threading.Lock()
        self.records = 0
        self.bytes = 0
        self._last: int | None = None
        self._gap = 1

    @property
    def exhausted(self) -> bool:
        return (self.max_records is not None and self.records >= self.max_records) or (
            self.max_bytes is not None and self.bytes >= self.max_bytes
        )

    def wants(self, step: int, last: int | None = None) -> bool:
        if not self.schedule.wants(step, last):
            return False
        with self._lock:
            if not self.exhausted or self._last is None:
                return True
            return step - self._last >= 2 * self._gap

    def counted(self, step: int) -> None:
        self.schedule.counted(step)
        with self._lock:
            was_exhausted = self.exhausted
            self.records += 1
            if self._last is not None and was_exhausted:
                self._gap = max(step - self._last, 1)
            self._last = step

    def stored(self, nbytes: int) -> None:
        self.schedule.stored(nbytes)
        with self._lock:
            self.bytes += int(nbytes)

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"records": self.records, "bytes": self.bytes, "last": self._last, "gap": self._gap, "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._lock:
            self.records = int(state.get("records", 0))
            self.bytes = int(state.get("bytes", 0))
            self._last = state.get("last")
            self._gap = int(state.get("gap", 1))
        self.schedule.load_state_dict(state.get("schedule", {}))

    def __repr__(self) -> str:
        caps = ", ".join(f"{k}={v}" for k, v in (("max_records", self.max_records), ("max_bytes", self.max_bytes)) if v is not None)
        return f"Budget({self.schedule!r}, {caps})"


class Never(Schedule):
    """No step (e.g. to record only what triggers keep).

    >>> Never().wants(0)
    False
    """

    def wants(self, step: int, last: int | None = None) -> bool:
        return False

    def __repr__(self) -> str:
        return "Never()"
