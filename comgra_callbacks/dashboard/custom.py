"""The Custom tab: a view written by the user, loaded from the Python file they pass with ``--custom FILE``.

The file defines ``view(selection, run)`` and may set ``TITLE`` (the tab's name)::

    TITLE = "Fourier"

    def view(selection, run):
        # selection: SelectionSnapshot (run, step_type, step, node, view, detail, sample, role, iteration,
        #            statistic); run: comgra_callbacks.Run (the reader)
        return holoviews_or_panel_object

It is called again whenever the selection changes, while the tab is visible. Only the file named on the
command line is ever executed: nothing in a store can cause code to run. ``--custom fourier`` names the
example shipped in :mod:`comgra_callbacks.examples.fourier_view`.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import panel as pn
from panel.viewable import Viewer

from comgra_callbacks.dashboard import safe
from comgra_callbacks.dashboard.state import Selection
from comgra_callbacks.errors import ConfigError

EXAMPLES = {"fourier": Path(__file__).resolve().parent.parent / "examples" / "fourier_view.py"}
_WATCHED = ["run", "step_type", "step", "node", "view", "detail", "sample", "role", "iteration", "statistic", "revision"]


@dataclass(frozen=True)
class CustomPlugin:
    """A loaded custom view: its title, its function and the file it came from."""

    title: str
    function: Callable[..., Any]
    path: str


def load_custom(path: str | os.PathLike[str]) -> CustomPlugin:
    """Load the user's custom-view file. It is executed once per process: later calls (every browser
    session asks) return the same :class:`CustomPlugin`.

    Raises:
        ConfigError: the file does not exist, fails to import, or defines no ``view(selection, run)``.

    >>> load_custom("/nonexistent/view.py")
    Traceback (most recent call last):
    ...
    comgra_callbacks.errors.ConfigError: `serve(--custom=...)`: expected a Python file that defines view(selection, run), got '/nonexistent/view.py' (no such file). Shipped examples: ['fourier'].
    """
    text = os.fspath(path)
    file = EXAMPLES.get(text, Path(text).expanduser())
    where = "`serve(--custom=...)`: expected a Python file that defines view(selection, run), got"
    if not file.is_file():
        raise ConfigError(f"{where} {text!r} (no such file). Shipped examples: {sorted(EXAMPLES)}.")
    key = str(file.resolve())
    with _LOCK:
        loaded = _LOADED.get(key)
        if loaded is None:
            loaded = _LOADED[key] = _load(file, text, where)
    return loaded


_LOADED: dict[str, CustomPlugin] = {}
_LOCK = threading.Lock()


def _load(file: Path, text: str, where: str) -> CustomPlugin:
    """Execute the file (once per server process: every browser session shares the loaded view)."""
    spec = importlib.util.spec_from_file_location(f"comgra_custom_view_{abs(hash(str(file)))}", file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{where} {text!r} (not a Python file).")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigError(f"{where} {text!r}, which failed to import: {type(exc).__name__}: {exc}") from exc
    function = getattr(module, "view", None)
    if not callable(function):
        found = sorted(n for n in vars(module) if not n.startswith("_"))
        raise ConfigError(f"{where} {text!r}, which defines no function `view`; it defines {found}.")
    title = str(getattr(module, "TITLE", "Custom"))
    return CustomPlugin(title, function, str(file))


class CustomView(Viewer):
    """Shows what the user's ``view(selection, run)`` returns; re-renders when the selection changes."""

    def __init__(self, selection: Selection, plugin: CustomPlugin, **params: Any) -> None:
        super().__init__(**params)
        self.selection = selection
        self.plugin = plugin
        self.active = False
        self.error: str | None = None
        self.body = pn.Column(sizing_mode="stretch_width")
        self.caption = pn.pane.Markdown(f"{safe.code('view()')} from {safe.code(plugin.path)}", margin=(0, 10), styles={"color": "#666"})
        selection.param.watch(self.refresh, _WATCHED)

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(self.caption, self.body, sizing_mode="stretch_width")

    def activate(self, active: bool = True) -> None:
        self.active = active
        if active:
            self.refresh()

    def refresh(self, *_: Any) -> None:
        if not self.active:
            return
        data = self.selection.data
        if data is None:
            return
        try:
            result = self.plugin.function(self.selection.snapshot(), data.run)
            shown = pn.panel(result, sizing_mode="stretch_width") if not isinstance(result, pn.viewable.Viewable) else result
            self.error = None
            self.body.objects = [shown]
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
            self.body.objects = [
                pn.pane.Alert(f"The custom view {safe.code(self.plugin.path)} raised **{safe.text(self.error)}**", alert_type="danger"),
                pn.Card(pn.pane.Markdown(safe.block("".join(lines[-12:]))), title="Where (your file's traceback)", collapsed=True),
            ]
