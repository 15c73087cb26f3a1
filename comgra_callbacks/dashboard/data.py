"""Where the dashboard gets its numbers: the runs it serves, and a bounded cache in front of the reader.

A :class:`Catalog` opens the runs under a root (or a single run) once per server process and is shared by
every browser session. A :class:`RunData` wraps one :class:`~comgra_callbacks.store.reader.Run` with an LRU
cache: each answer is keyed by the question and by the number of committed records, so a live run's new
records invalidate nothing that is still right, and memory stays under a byte budget. No method reads the
whole run; each reads the chunks its question needs (see the reader).

>>> cache = LRU(max_items=2)
>>> cache.get_or_compute("a", lambda: 1), cache.get_or_compute("b", lambda: 2), cache.get_or_compute("c", lambda: 3)
(1, 2, 3)
>>> "a" in cache, len(cache)
(False, 2)
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from comgra_callbacks import analysis
from comgra_callbacks.errors import (
    ComgraError,
    ConfigError,
    CorruptStoreError,
    NodeNotFoundError,
    StepNotFoundError,
)
from comgra_callbacks.store import format as fmt
from comgra_callbacks.store.reader import Run
from comgra_callbacks.store.storage import is_url, open_root, split_run_uri


def _size(value: Any) -> int:
    if isinstance(value, dict):
        return sum(_size(v) for v in value.values())
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, pd.DataFrame | pd.Series):
        return int(value.memory_usage(deep=False).sum()) if isinstance(value, pd.DataFrame) else int(value.memory_usage())
    return 256


class LRU:
    """A least-recently-used cache bounded by entries and by (approximate) bytes; thread-safe."""

    def __init__(self, max_items: int = 1024, max_bytes: int = 256 << 20) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0]
        self.misses += 1
        value = compute()
        size = _size(value)
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key)[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._items and (len(self._items) > self.max_items or self._bytes > self.max_bytes):
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped
        return value


@dataclass(frozen=True)
class Missing:
    """A cached "not recorded" answer: the reader's message, shown on the page instead of a plot."""

    message: str


class RunData:
    """One run behind a cache. Every method answers one selector's question.

    Methods that can find nothing (a node not recorded at that step, at a lower detail) return
    :class:`Missing` with the reader's message rather than raising, so views can show it.
    """

    def __init__(self, run: Run, cache: LRU) -> None:
        self.run = run
        self.cache = cache

    @property
    def name(self) -> str:
        return self.run.name

    def _key(self, *parts: Any) -> tuple[Any, ...]:
        return (self.run.uri, self.run.manifest.rows, len(self.run.manifest.series), *parts)

    def _cached(self, key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        def guarded() -> Any:
            try:
                return compute()
            except (StepNotFoundError, NodeNotFoundError, CorruptStoreError, ConfigError) as exc:
                return Missing(str(exc))

        return self.cache.get_or_compute(self._key(*key), guarded)

    # ------------------------------------------------------------------------------- the index
    def steps_of(self, step_type: str | None) -> np.ndarray:
        """The recorded steps of a step type (all types for None), ascending and unique."""

        def compute() -> np.ndarray:
            steps = self.run.steps
            if step_type is not None:
                steps = steps[steps["step_type"] == step_type]
            return np.unique(steps["step"].to_numpy())

        return self.cache.get_or_compute(self._key("steps_of", step_type), compute)

    def graph(self, step_type: str | None) -> Any:
        """The dependency graph for a step type (the union when the type has no graph of its own)."""

        def compute() -> Any:
            if step_type is not None:
                try:
                    return self.run.graph_for(step_type)
                except NodeNotFoundError:
                    pass
            return self.run.graph

        return self.cache.get_or_compute(self._key("graph", step_type), compute)

    def has_data(self, node: str) -> bool:
        try:
            return bool(self.run.views(node))
        except NodeNotFoundError:
            return False

    # -------------------------------------------------------------------------------- the data
    def stats(self, node: str, view: str, role: str | None, iteration: int | None, step_type: str | None) -> pd.DataFrame | Missing:
        """One node's batch statistics over training. All views of the node are read in one pass and cached
        together, so a step change or a view change costs nothing here."""
        every = self._cached(
            ("node_stats", node, role, iteration, step_type),
            lambda: self.run.node_stats(node, role=role, iteration=iteration, step_type=step_type),
        )
        if isinstance(every, Missing):
            return every
        if view not in every:
            return Missing(f"`view`: node {node!r} of run {self.name!r} has no view {view!r}; it has {list(every)}.")
        return every[view]

    def entry_stats(self, node: str, step: int, role: str | None, iteration: int | None, step_type: str | None) -> pd.DataFrame | Missing:
        """Every view's statistics of one node at one step (one row of the stats array)."""
        return self._cached(
            ("entry", node, step, role, iteration, step_type),
            lambda: self.run.entry_stats(node, step, role=role, iteration=iteration, step_type=step_type),
        )

    def neurons(self, node: str, step: int, view: str, role: str | None, iteration: int | None, step_type: str | None) -> pd.DataFrame | Missing:
        return self._cached(
            ("neurons", node, step, view, role, iteration, step_type),
            lambda: self.run.neurons(node, step, view=view, role=role, iteration=iteration, step_type=step_type),
        )

    def samples(self, node: str, step: int, view: str, role: str | None, iteration: int | None, step_type: str | None) -> np.ndarray | Missing:
        return self._cached(
            ("samples", node, step, view, role, iteration, step_type),
            lambda: self.run.samples(node, step, view=view, role=role, iteration=iteration, step_type=step_type),
        )

    def range_stats(self, first: int, last: int, view: str, step_type: str | None) -> pd.DataFrame | Missing:
        """Every node's mean statistics over a range of steps (one slab of rows, read block by block)."""
        return self._cached(
            ("range", int(first), int(last), view, step_type),
            lambda: analysis.range_stats(self.run, int(first), int(last), view=view, step_type=step_type),
        )


def open_checked(location: Any) -> Run:
    """Open a run and read everything every page shows at once (index, module tree, notes, scalars), so a
    damaged run is listed with its error when the server starts rather than breaking a page later."""
    run = Run(location)
    run.steps, run.modules, run.notes, run.scalars, run.graph  # noqa: B018 - read for their validation
    return run


class Catalog:
    """The runs the server shows: every run under a root, or one run.

    Problems are kept as messages for the page, never raised: :attr:`problem` when there is nothing to
    show at all (the path does not exist, no runs), :attr:`skipped` for runs that could not be opened (an
    unknown store format version, a damaged run).

    Args:
        target: a root of runs or one run: a local path or an fsspec URL.
        storage_options: passed to fsspec for a URL (endpoint, credentials).
        cache: the cache shared by every run (default: 256 MiB).
    """

    def __init__(self, target: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, cache: LRU | None = None) -> None:
        self.target = os.fspath(target)
        self.storage_options = dict(storage_options or {})
        self.cache = cache or LRU()
        self.runs: dict[str, RunData] = {}
        self.skipped: dict[str, str] = {}
        self.problem: str | None = None
        self._single: str | None = None
        self._root: Any = None
        self._candidate: Any = None
        self._open()

    def _open(self) -> None:
        try:
            self._candidate = open_root(self.target, self.storage_options or None)
        except ComgraError as exc:
            self.problem = str(exc)
            return
        self._attach_or_say_why()

    def _attach_or_say_why(self) -> bool:
        try:
            return self._attach()
        except ComgraError as exc:  # e.g. the object store's endpoint cannot be reached (yet): look again later
            self.problem = str(exc)
            return False

    def _attach(self) -> bool:
        """Use the target once it exists (a dashboard may be started before the training creates it)."""
        if not self._candidate.exists():
            where = "URL" if is_url(self.target) else "path"
            self.problem = (
                f"The {where} {self.target!r} does not exist (yet). Expected a directory of runs (the `root` given "
                f"to ComgraCallback, default 'comgra_runs') or one run inside it; this page looks again every few seconds."
            )
            return False
        if self._is_run(self.target):
            head, name = split_run_uri(self.target)
            self._root = open_root(head, self.storage_options or None)
            self._single = name
        else:
            self._root = self._candidate
        self.refresh_list()
        return True

    def _is_run(self, target: str) -> bool:
        head, name = split_run_uri(target)
        try:
            return open_root(head, self.storage_options or None).run(name).read_bytes(fmt.META_FILE) is not None
        except Exception:
            return False

    def refresh_list(self) -> bool:
        """Look for runs that appeared since the last call; True when there is a new one."""
        if self._root is None:
            if self._candidate is None or not self._attach_or_say_why():
                return False
            return bool(self.runs)
        names = [self._single] if self._single else self._root.list_run_names()
        new = False
        for name in names:
            if name in self.runs:
                continue
            try:
                self.runs[name] = RunData(open_checked(self._root.run(name)), self.cache)
                self.skipped.pop(name, None)
                new = True
            except ComgraError as exc:
                self.skipped[name] = str(exc)
            except Exception as exc:  # a damage the reader does not know yet: list the run, serve the others
                self.skipped[name] = f"run {name!r} could not be opened: {type(exc).__name__}: {exc}"
        if self.runs:
            self.problem = None
        elif self.skipped:
            self.problem = "No run could be opened. " + " ".join(f"{name}: {msg}" for name, msg in self.skipped.items())
        else:
            self.problem = (
                f"No runs under {self.target!r} yet. Runs appear here when a training with ComgraCallback(root="
                f"{self.target!r}) starts; this page looks again every few seconds."
            )
        return new

    @property
    def can_list(self) -> bool:
        """True when runs may still appear (the target could be opened, even if it does not exist yet)."""
        return self._candidate is not None

    @property
    def names(self) -> list[str]:
        return sorted(self.runs)

    def default_run(self) -> str | None:
        """The run a page opens on: the most recently created run that has records (else any)."""
        if not self.runs:
            return None

        def created(name: str) -> tuple[bool, float, str]:
            run = self.runs[name].run
            return (run.manifest.rows > 0, float(run.meta.get("created", 0.0) or 0.0), name)

        return max(self.runs, key=created)

    def __getitem__(self, name: str) -> RunData:
        return self.runs[name]


_CATALOGS: dict[str, Catalog] = {}
_CATALOG_LOCK = threading.Lock()


def shared_catalog(target: str, storage_options: dict[str, Any] | None = None) -> Catalog:
    """The catalog for ``target``, created once per server process and shared by every browser session."""
    key = json.dumps([os.fspath(target), storage_options or {}], sort_keys=True, default=str)
    with _CATALOG_LOCK:
        catalog = _CATALOGS.get(key)
        if catalog is None or catalog.problem is not None:
            catalog = Catalog(target, storage_options)
            _CATALOGS[key] = catalog
        return catalog


def parse_storage_options(text: str | None) -> dict[str, Any] | None:
    """Parse ``--storage-options`` JSON.

    >>> parse_storage_options('{"anon": true}')
    {'anon': True}
    >>> parse_storage_options("endpoint=x")
    Traceback (most recent call last):
    ...
    comgra_callbacks.errors.ConfigError: `serve(--storage-options=...)`: expected a JSON object such as '{"endpoint_url": "http://127.0.0.1:9000"}', got 'endpoint=x'.
    """
    if text is None or text == "":
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ConfigError(
            f"`serve(--storage-options=...)`: expected a JSON object such as "
            f"'{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}', got {text!r}."
        )
    return value
