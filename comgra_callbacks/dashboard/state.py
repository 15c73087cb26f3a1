"""The dashboard's state: what is selected (:class:`Selection`) and what is compared (:class:`Comparison`).

Both are ``param.Parameterized`` stores that every view watches; no view keeps state of its own. The
selectors are linked: changing the run, the step type or the node re-resolves everything that depends on it
(the steps of that type, the node's views, roles and iterations), and all changes land in one batch so each
view redraws once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import param

from comgra_callbacks.dashboard.data import Catalog, RunData
from comgra_callbacks.store import format as fmt

DETAILS = {"statistics": "batch statistics", "neurons": "per-neuron", "sample": "individual sample"}
NO_ROLE = "(single)"
LAST = "last"
STATISTICS = list(fmt.STAT_NAMES)
COMPARE_MODES = ["steps", "ranges", "step types", "runs"]
LIST_EVERY = 10  # polls between two listings of the root (a listing is a LIST request on object stores)


def nearest(values: list[int], target: int) -> int:
    """The value of a sorted list closest to ``target`` (ties: the lower one).

    >>> nearest([0, 10, 20], 14), nearest([0, 10, 20], 15), nearest([5], -3)
    (10, 10, 5)
    """
    i = int(np.searchsorted(values, target))
    candidates = values[max(i - 1, 0) : i + 1]
    return min(candidates, key=lambda v: (abs(v - target), v))


def role_label(role: str | None) -> str:
    return NO_ROLE if role is None else role


@dataclass(frozen=True)
class SelectionSnapshot:
    """The current selection as plain values: what a custom view receives.

    ``role`` and ``iteration`` are what the reader takes (``None``: the default role / the last iteration).
    """

    run: str | None
    step_type: str | None
    step: int
    node: str | None
    view: str
    detail: str
    sample: int
    role: str | None
    iteration: int | None
    statistic: str


class Selection(param.Parameterized):
    """What the user looks at. Views read it; selectors, the graph and the keyboard write it."""

    run: param.Selector[str | None] = param.Selector(default=None, objects=[], allow_None=True, doc="The run shown.")
    step_type: param.Selector[str | None] = param.Selector(default=None, objects=[], allow_None=True, label="Step type")
    steps = param.List(default=[], doc="Recorded steps of the step type, ascending.")
    step = param.Integer(default=0, doc="The trainer's global step.")
    node: param.Selector[str | None] = param.Selector(default=None, objects=[], allow_None=True)
    view: param.Selector[str] = param.Selector(default="value", objects=["value"], doc="value, grad, grad:<loss> or update.")
    detail: param.Selector[str] = param.Selector(default="statistics", objects=list(DETAILS))
    sample = param.Integer(default=0, bounds=(0, None))
    n_samples = param.Integer(default=0, doc="Samples recorded for the selection at this step (set by the tensor view).")
    role: param.Selector[str] = param.Selector(default=NO_ROLE, objects=[NO_ROLE])
    iteration: param.Selector[str] = param.Selector(default=LAST, objects=[LAST])
    statistic: param.Selector[str] = param.Selector(default="abs_mean", objects=STATISTICS, doc="Plotted over training and compared.")
    status = param.String(default="", doc="One line about the run: status, records, last write.")
    revision = param.Integer(default=0, doc="Bumped when the run got new records (live runs).")

    def __init__(self, catalog: Catalog, **params: Any) -> None:
        super().__init__(**params)
        self.catalog = catalog
        self._resolving = False
        self.param.run.objects = catalog.names
        if catalog.names:
            first = self.run if self.run in catalog.names else catalog.default_run()
            with param.parameterized.discard_events(self):
                self.run = first
            self.resolve()

    # ------------------------------------------------------------------------------ accessors
    @property
    def data(self) -> RunData | None:
        return self.catalog.runs.get(self.run) if self.run is not None else None

    @property
    def role_value(self) -> str | None:
        return None if self.role == NO_ROLE else self.role

    @property
    def iteration_value(self) -> int | None:
        return None if self.iteration == LAST else int(self.iteration)

    def snapshot(self) -> SelectionSnapshot:
        return SelectionSnapshot(
            self.run, self.step_type, self.step, self.node, self.view, self.detail, self.sample,
            self.role_value, self.iteration_value, self.statistic,
        )

    # ------------------------------------------------------------------------------ resolving
    @param.depends("run", "step_type", "node", watch=True)
    def _on_key_change(self) -> None:
        if not self._resolving:
            self.resolve()

    def resolve(self) -> None:
        """Make every selector consistent with the run, step type and node, in one batch of changes."""
        data = self.data
        if data is None:
            return
        run = data.run
        types = run.step_types
        default_type = "train" if "train" in types else (types[0] if types else None)  # an intervention may be written first
        step_type = self.step_type if self.step_type in types else default_type
        steps = [int(s) for s in data.steps_of(step_type)]
        step = nearest(steps, self.step) if steps else 0
        graph = data.graph(step_type)
        nodes = [n for n in run.nodes if n in graph] or list(run.nodes)
        node = self.node if self.node in nodes else self.default_node(data, nodes)
        has = node is not None and data.has_data(node)
        views = run.views(node) if node is not None and has else ["value"]
        view = self.view if self.view in views else ("value" if "value" in views else views[0])
        roles = [role_label(r) for r in run.roles(node)] if node is not None and has else [NO_ROLE]
        role = self.role if self.role in roles else roles[0]
        iterations = run.iterations(node) if node is not None and has else []
        iteration_options = [LAST] + [str(i) for i in iterations] if len(iterations) > 1 else [LAST]
        iteration = self.iteration if self.iteration in iteration_options else LAST
        self._resolving = True
        try:
            self.param.step_type.objects = types
            self.param.node.objects = nodes
            self.param.view.objects = views
            self.param.role.objects = roles
            self.param.iteration.objects = iteration_options
            values = dict(step_type=step_type, steps=steps, step=step, node=node, view=view, role=role, iteration=iteration, status=self.describe_status())
            self.param.update(**{k: v for k, v in values.items() if getattr(self, k) != v})
        finally:
            self._resolving = False
        self._seen = self._seen_key()

    @staticmethod
    def default_node(data: RunData, nodes: list[str]) -> str | None:
        """The node selected when a run opens: the first output with data, else the first node with data."""
        graph = data.run.graph
        for kind in ("output", "loss", "intermediate"):
            for node in nodes:
                if graph.nodes[node].get("kind") == kind and data.has_data(node):
                    return node
        return next((n for n in nodes if data.has_data(n)), nodes[0] if nodes else None)

    # ------------------------------------------------------------------------------ navigation
    def move_step(self, delta: int) -> None:
        """Go ``delta`` recorded steps forward (negative: back), staying within the recorded steps."""
        if not self.steps:
            return
        i = int(np.searchsorted(self.steps, self.step))
        if i >= len(self.steps) or self.steps[i] != self.step:
            i = self.steps.index(nearest(self.steps, self.step))
        self.step = self.steps[min(max(i + delta, 0), len(self.steps) - 1)]

    # ------------------------------------------------------------------------------ live runs
    def describe_status(self) -> str:
        data = self.data
        if data is None:
            return ""
        run = data.run
        status = run.status
        text = f"{status} · {len(run.steps)} records · {len(run.nodes)} nodes"
        if status == "running" and run.heartbeat:
            age = max(0.0, time.time() - run.heartbeat)
            text += f" · last write {age:.0f} s ago"
            if age > 300:
                text += " (the training may have stopped without closing the run)"
        if status == "failed" and run.meta.get("error"):
            text += f" · {run.meta['error']}"
        return text

    def _seen_key(self) -> tuple[Any, ...]:
        data = self.data
        if data is None:
            return ()
        m = data.run.manifest
        return (data.run.uri, m.rows, len(m.series), data.run.status)

    def poll(self, *, force: bool = False) -> bool:
        """Look for new records of the shown run (and, every tenth call or when forced, for new runs).

        Returns True when something changed. Runs are shared by every browser session, so what this
        session has seen is compared with the run itself, not with what the last refresh returned.
        """
        changed = False
        self._polls = getattr(self, "_polls", 0) + 1
        if force or self._polls % LIST_EVERY == 1:
            if self.catalog.refresh_list():
                self.param.run.objects = self.catalog.names
                changed = True
                if self.run is None:
                    self.run = self.catalog.default_run()
        data = self.data
        if data is not None and (data.run.status == "running" or force):
            at_end = bool(self.steps) and self.step == self.steps[-1]
            data.run.refresh()
            if self._seen_key() != getattr(self, "_seen", None):
                self.resolve()
                if at_end and self.steps and self.step != self.steps[-1]:
                    self.step = self.steps[-1]  # follow the training while looking at its last step
                self.revision += 1
                changed = True
        self._seen = self._seen_key()
        status = self.describe_status()
        if status != self.status:
            self.status = status
        return changed


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a run, a step type and an inclusive range of steps."""

    run: str
    step_type: str | None
    first: int
    last: int

    @property
    def label(self) -> str:
        steps = f"step {self.first}" if self.first == self.last else f"steps {self.first}–{self.last}"
        kind = f" · {self.step_type}" if self.step_type else ""
        return f"{self.run}{kind} · {steps}"


class Comparison(param.Parameterized):
    """Two selections compared side by side: two steps, two ranges, two step types or two runs.

    Side A is always the selected run; what varies between the sides depends on ``mode``.
    """

    mode: param.Selector[str] = param.Selector(default="ranges", objects=COMPARE_MODES)
    step_a = param.Integer(default=0, label="Step A")
    step_b = param.Integer(default=0, label="Step B")
    range_a = param.Range(default=(0, 0), label="Steps A")
    range_b = param.Range(default=(0, 0), label="Steps B")
    type_a: param.Selector[str | None] = param.Selector(default=None, objects=[], allow_None=True, label="Step type A")
    type_b: param.Selector[str | None] = param.Selector(default=None, objects=[], allow_None=True, label="Step type B")
    run_b: param.Selector[str | None] = param.Selector(default=None, objects=[], allow_None=True, label="Run B")
    rank_by: param.Selector[str] = param.Selector(default="relative", objects=["relative", "absolute", "spread"], label="Rank by change")

    def __init__(self, selection: Selection, **params: Any) -> None:
        super().__init__(**params)
        self.selection = selection
        self.reset()
        selection.param.watch(lambda _: self.reset(), ["run"])

    def reset(self) -> None:
        """Defaults for the selected run: the first and the last 30 % of training, first vs last step."""
        sel = self.selection
        steps = sel.steps
        types = sel.param.step_type.objects
        runs = sel.catalog.names
        if not steps:
            return
        lo, hi = steps[0], steps[-1]
        cut_a = steps[max(0, int(len(steps) * 0.3) - 1)]
        cut_b = steps[min(len(steps) - 1, int(len(steps) * 0.7))]
        self.param.type_a.objects = types
        self.param.type_b.objects = types
        self.param.run_b.objects = runs
        others = [r for r in runs if r != sel.run]
        self.param.update(
            step_a=lo,
            step_b=hi,
            range_a=(lo, cut_a),
            range_b=(cut_b, hi),
            type_a=sel.step_type,
            type_b=next((t for t in types if t != sel.step_type), sel.step_type),
            run_b=others[0] if others else sel.run,
        )

    def sides(self) -> tuple[Side, Side]:
        sel = self.selection
        run, st = sel.run or "", sel.step_type
        lo, hi = (sel.steps[0], sel.steps[-1]) if sel.steps else (0, 0)
        if self.mode == "steps":
            return Side(run, st, self.step_a, self.step_a), Side(run, st, self.step_b, self.step_b)
        a, b = _int_range(self.range_a), _int_range(self.range_b)
        if self.mode == "ranges":
            return Side(run, st, *a), Side(run, st, *b)
        if self.mode == "step types":
            data = sel.data
            if data is not None and len(data.run.steps):
                lo, hi = int(data.run.steps["step"].min()), int(data.run.steps["step"].max())
            return Side(run, self.type_a, lo, hi), Side(run, self.type_b, lo, hi)
        return Side(run, st, *a), Side(self.run_b or run, st, *a)


def _int_range(pair: Any) -> tuple[int, int]:
    lo, hi = pair
    return int(lo), int(hi)
