"""Triggers: decide *after* a batch ran whether an armed step is kept.

An armed step is captured like a recorded one (snapshots, hooks), but whether it is written is decided
after the batch, from what happened in it. Most triggers look at the step's statistics, which the writer
thread computes anyway, so they cost the training thread nothing: :class:`LossSpike`, :class:`NonFinite`,
:class:`GradNorm`. :class:`Predicate` runs your function on the training step's outputs at batch end.
Every armed or recorded step is shown to every trigger, so running statistics see the whole history.

>>> from comgra_callbacks.store.format import SeriesKey
>>> spike = LossSpike(threshold=3.0, min_history=3)
>>> [spike.check(StepSummary.from_stats({("loss", "value"): {"mean": v}})) for v in [1.0, 1.1, 0.9, 1.0, 9.0]]
[False, False, False, False, True]
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from comgra_callbacks.errors import ConfigError, ConfigTypeError


class StepSummary:
    """What a trigger sees of a step: the statistics of every series, and which nodes are parameters."""

    def __init__(
        self,
        stats: Mapping[tuple[str, str], Mapping[str, float]],
        parameters: frozenset[str] = frozenset(),
        step: int | None = None,
        *,
        nonfinite: Callable[[], list[str]] | None = None,
        grad_norm: Callable[[], float] | None = None,
    ) -> None:
        self._stats = stats
        self.parameters = parameters
        self.step = step
        self._nonfinite = nonfinite  # computed on first use: a trigger pays only for what it asks
        self._grad_norm = grad_norm

    @classmethod
    def from_stats(cls, stats: Mapping[tuple[str, str], Mapping[str, float]], parameters: frozenset[str] = frozenset()) -> StepSummary:
        return cls(stats, parameters)

    def stat(self, node: str, stat: str = "mean", view: str = "value") -> float | None:
        values = self._stats.get((node, view))
        return None if values is None else values.get(stat)

    def nonfinite(self) -> list[str]:
        """Names of the nodes (and views) holding NaN or infinite values."""
        if self._nonfinite is not None:
            found = self._nonfinite()
            self._nonfinite = lambda: found
            return list(found)
        return [f"{node}/{view}" for (node, view), s in self._stats.items() if s.get("nan_count", 0) or s.get("inf_count", 0)]

    def grad_norm(self) -> float:
        """Global gradient norm over the parameters (as recorded: before clipping)."""
        if self._grad_norm is not None:
            value = self._grad_norm()
            self._grad_norm = lambda: value
            return value
        total = sum(s["l2"] ** 2 for (node, view), s in self._stats.items() if view == "grad" and node in self.parameters and math.isfinite(s.get("l2", math.nan)))
        return math.sqrt(total)


class Trigger:
    """Base class. ``check(summary)`` runs on the writer thread; ``check_batch(outputs, batch)`` at batch end
    on the training thread. Either returns True to keep the step. ``name`` is stored as the record's reason."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def check(self, summary: StepSummary) -> bool:
        return False

    def check_batch(self, outputs: Any, batch: Any) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class LossSpike(Trigger):
    """Keeps a step whose loss exceeds the running mean by ``threshold`` running standard deviations.

    Args:
        threshold: how many standard deviations above the mean count as a spike.
        window: how many recent (non-spike) losses make the running mean and std.
        min_history: no decision before this many losses were seen.
        node: the loss node to watch (default ``"loss"``, the one passed to backward).
    """

    def __init__(self, threshold: float = 3.0, window: int = 100, min_history: int = 20, node: str = "loss") -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ConfigError(f"`LossSpike(threshold=...)`: expected a positive number of standard deviations, got {threshold!r}.")
        for arg, value in (("window", window), ("min_history", min_history)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"`LossSpike({arg}=...)`: expected a positive int, got {value!r}.")
        if min_history > window:
            raise ConfigError(f"`LossSpike(min_history=...)`: expected at most window={window}, got {min_history}.")
        self.threshold, self.window, self.min_history, self.node = float(threshold), window, min_history, node
        self._history: deque[float] = deque(maxlen=window)

    def check(self, summary: StepSummary) -> bool:
        loss = summary.stat(self.node, "mean")
        if loss is None or not math.isfinite(loss):
            return False
        if len(self._history) >= self.min_history:
            mean = sum(self._history) / len(self._history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self._history) / max(len(self._history) - 1, 1))
            if loss > mean + self.threshold * max(std, 1e-12 * max(abs(mean), 1.0)):
                return True  # a spike does not enter the history it is judged against
        self._history.append(loss)
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self._history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._history = deque((float(x) for x in state.get("history", [])), maxlen=self.window)

    def __repr__(self) -> str:
        return f"LossSpike(threshold={self.threshold}, window={self.window}, min_history={self.min_history}, node={self.node!r})"


class NonFinite(Trigger):
    """Keeps a step in which any recorded tensor (value or gradient) holds NaN or an infinity.

    Once a NaN is in the weights every later step holds one too; ``once=True`` keeps only the first step of
    such a run of non-finite steps (a finite step ends the run), and ``after=k`` also the ``k`` steps shown to
    the trigger after it (armed or recorded steps), whatever they hold. The kept step has samples of every
    node, the batch positions with non-finite values first (see ``ComgraCallback(triggers=...)``).

    Args:
        once: keep only the first step of a run of non-finite steps.
        after: also keep this many steps after a kept non-finite step.

    >>> t = NonFinite(once=True, after=1)
    >>> [t.check(StepSummary.from_stats({("x", "value"): {"nan_count": n}})) for n in [0, 1, 1, 1, 0, 1]]
    [False, True, True, False, False, True]
    """

    def __init__(self, *, once: bool = False, after: int = 0) -> None:
        if not isinstance(once, bool):
            raise ConfigTypeError(f"`NonFinite(once=...)`: expected True or False, got {once!r}.")
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ConfigError(f"`NonFinite(after=...)`: expected an int >= 0 (steps kept after a non-finite one), got {after!r}.")
        self.once, self.after = once, after
        self._in_run = False  # the previous step shown was non-finite
        self._left = 0  # steps still to keep after the last kept non-finite step

    def check(self, summary: StepSummary) -> bool:
        bad = bool(summary.nonfinite())
        if bad and not self._in_run:
            self._in_run, self._left = True, self.after
            return True
        if self._left > 0:
            self._left -= 1
            return True
        if not bad:
            self._in_run = False
            return False
        if not self.once:
            self._left = self.after
        return not self.once

    def state_dict(self) -> dict[str, Any]:
        return {"in_run": self._in_run, "left": self._left}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._in_run = bool(state.get("in_run", False))
        self._left = int(state.get("left", 0))

    def __repr__(self) -> str:
        args = ([f"once={self.once}"] if self.once else []) + ([f"after={self.after}"] if self.after else [])
        return f"NonFinite({', '.join(args)})"


class GradNorm(Trigger):
    """Keeps a step whose global gradient norm (over the recorded parameters, before clipping) exceeds
    ``threshold``."""

    def __init__(self, threshold: float) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ConfigError(f"`GradNorm(threshold=...)`: expected a positive number, got {threshold!r}.")
        self.threshold = float(threshold)

    def check(self, summary: StepSummary) -> bool:
        norm = summary.grad_norm()
        return math.isfinite(norm) and norm > self.threshold

    def __repr__(self) -> str:
        return f"GradNorm(threshold={self.threshold})"


class Predicate(Trigger):
    """Keeps a step when ``fn(outputs, batch)`` returns True; ``outputs`` is what ``training_step`` returned
    (Lightning) or the model's output (HuggingFace). Runs on the training thread at batch end.

    Args:
        fn: the predicate.
        name: the reason stored with kept records (default: the function's name).
    """

    def __init__(self, fn: Callable[[Any, Any], bool], name: str | None = None) -> None:
        if not callable(fn):
            raise ConfigTypeError(f"`Predicate(fn=...)`: expected a callable (outputs, batch) -> bool, got {fn!r}.")
        self.fn = fn
        self._name: str = name or str(getattr(fn, "__name__", "Predicate"))

    @property
    def name(self) -> str:
        return self._name

    def check_batch(self, outputs: Any, batch: Any) -> bool:
        return bool(self.fn(outputs, batch))

    def __repr__(self) -> str:
        return f"Predicate({self._name})"
