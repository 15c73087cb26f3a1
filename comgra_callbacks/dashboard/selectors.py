"""The selectors on top of the main view, and the keyboard.

Every widget is built from a parameter of the :class:`~comgra_callbacks.dashboard.state.Selection`, so the
selectors, the graph, the comparison table and the keyboard all move the same state. Selectors that do not
apply are hidden (sample unless the detail is a sample; role and iteration unless the node has several).

Keyboard (when no text field has the focus): ←/→ follow the graph to an input / output of the selected node,
↑/↓ move within a layer of the graph, Shift+←/→ (or PageUp/PageDown) go to the previous / next recorded step.
"""

from __future__ import annotations

import json
from typing import Any

import panel as pn
import param
from panel.custom import JSComponent
from panel.viewable import Viewer

from comgra_callbacks.dashboard import safe
from comgra_callbacks.dashboard.state import DETAILS, Selection

KEYS = ("ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown", "PageUp", "PageDown")


class KeyListener(JSComponent):
    """Sends arrow-key presses on the page to Python as ``"<key>|<shift>|<count>"`` (the count makes two
    presses of one key two changes). Keys typed into inputs, selects and text areas are left alone."""

    key = param.String(default="", doc="The last key press: name, shift (0/1) and a counter.")

    _esm = """
    export function render({ model }) {
      let count = 0;
      const keys = KEYS_JSON;
      document.addEventListener("keydown", (event) => {
        const path = event.composedPath ? event.composedPath() : [event.target];
        const typing = path.some((el) => el && el.tagName && ["INPUT", "TEXTAREA", "SELECT"].includes(el.tagName));
        if (typing || !keys.includes(event.key) || event.ctrlKey || event.metaKey || event.altKey) return;
        count += 1;
        model.key = `${event.key}|${event.shiftKey ? 1 : 0}|${count}`;
        event.preventDefault();
      });
      return document.createElement("span");
    }
    """.replace("KEYS_JSON", json.dumps(list(KEYS)))


class SelectorBar(Viewer):
    """Run, step type, step (slider, previous / next), node, view, detail, sample, role, iteration, statistic."""

    def __init__(self, selection: Selection, **params: Any) -> None:
        super().__init__(**params)
        self.selection = sel = selection
        p = sel.param
        self.run = pn.widgets.Select.from_param(p.run, label="Run", width=220)
        self.step_type = pn.widgets.Select.from_param(p.step_type, label="Step type", width=130)
        self.slider = pn.widgets.DiscreteSlider(label="Step", options=list(sel.steps) or [0], value=sel.step if sel.steps else 0, width=320)
        self.prev = pn.widgets.Button(label="◀", width=40, description="Previous recorded step (Shift+←)")
        self.next = pn.widgets.Button(label="▶", width=40, description="Next recorded step (Shift+→)")
        self.node = pn.widgets.Select.from_param(p.node, label="Node", width=220)
        self.view = pn.widgets.Select.from_param(p.view, label="View", width=140)
        self.detail = pn.widgets.RadioButtonGroup.from_param(p.detail, label="Detail", options={v: k for k, v in DETAILS.items()})
        self.sample = pn.widgets.Select(label="Sample", options={"0": 0}, value=0, width=190)
        self.role = pn.widgets.Select.from_param(p.role, label="Role", width=110)
        self.iteration = pn.widgets.Select.from_param(p.iteration, label="Iteration", width=90)
        self.statistic = pn.widgets.Select.from_param(p.statistic, label="Statistic", width=110)
        self.status = pn.pane.Markdown("", margin=(0, 10))
        self.refresh = pn.widgets.Button(label="↻ Refresh", width=90, description="Look for new records now")
        self.prev.on_click(lambda _: sel.move_step(-1))
        self.next.on_click(lambda _: sel.move_step(+1))
        self.refresh.on_click(lambda _: None if sel.poll(force=True) else None)
        self.slider.param.watch(self._slider_moved, ["value_throttled"])
        self.sample.param.watch(lambda e: setattr(sel, "sample", int(e.new)), ["value"])
        sel.param.watch(self._sync, ["run", "steps", "step", "detail", "n_samples", "sample", "status"])
        sel.param.watch(self._visibility, ["node", "role", "iteration", "detail"])
        self._sync()
        self._visibility()

    def __panel__(self) -> pn.viewable.Viewable:
        return pn.Column(
            pn.Row(self.run, self.step_type, pn.Column(self.slider, pn.Row(self.prev, self.next)), self.node, self.view, self.statistic, sizing_mode="stretch_width"),
            pn.Row(pn.Column(pn.pane.Markdown("**Detail**", margin=(0, 10)), self.detail), self.sample, self.role, self.iteration, self.refresh, self.status, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )

    def _slider_moved(self, event: Any) -> None:
        if event.new is not None and int(event.new) != self.selection.step:
            self.selection.step = int(event.new)

    def _sync(self, *events: Any) -> None:
        sel = self.selection
        names = {e.name for e in events} if events else {"steps", "step", "n_samples", "status"}
        if "steps" in names:
            options = list(sel.steps) or [0]
            if self.slider.options != options:
                self.slider.param.update(options=options, value=sel.step if sel.step in options else options[0])
        if "step" in names and sel.step in self.slider.options and self.slider.value != sel.step:
            self.slider.value = sel.step
        if names & {"n_samples", "sample", "detail", "step"}:
            labelled = sample_options(sel)
            if sel.sample >= len(labelled):
                sel.sample = len(labelled) - 1
            self.sample.param.update(options=labelled, value=min(sel.sample, len(labelled) - 1))
        if names & {"status", "run"}:  # two runs can have the same status line
            self.status.object = f"**{safe.text(sel.run)}** · {safe.text(sel.status)}" if sel.run else ""
        self.prev.disabled = not sel.steps or sel.step <= sel.steps[0]
        self.next.disabled = not sel.steps or sel.step >= sel.steps[-1]

    def _visibility(self, *events: Any) -> None:
        sel = self.selection
        self.sample.visible = sel.detail == "sample"
        self.role.visible = len(sel.param.role.objects) > 1
        self.iteration.visible = len(sel.param.iteration.objects) > 1


def sample_options(sel: Selection) -> dict[str, int]:
    """The sample selector's choices: label -> index among the recorded samples; a label says the sample's
    batch position and, when recorded, its dataset index (``"0 · batch 5 · item 1207"``)."""
    count = max(sel.n_samples, 1)
    data = sel.data
    if data is None or not sel.n_samples:
        return {str(i): i for i in range(count)}
    from comgra_callbacks.analysis import sample_positions

    positions, items = sample_positions(data.run, sel.step, sel.step_type, sel.n_samples)
    return {
        f"{i} · batch {int(positions[i])}" + (f" · item {int(items[i])}" if items is not None else ""): i
        for i in range(count)
    }


def handle_key(selection: Selection, graph_move: Any, key: str) -> None:
    """Act on a key press from :class:`KeyListener` (``"<key>|<shift>|<count>"``)."""
    name, _, rest = key.partition("|")
    shift = rest.startswith("1")
    if name in ("PageUp", "PageDown") or (shift and name in ("ArrowLeft", "ArrowRight")):
        selection.move_step(-1 if name in ("PageUp", "ArrowLeft") else +1)
    elif name.startswith("Arrow"):
        graph_move(name.removeprefix("Arrow").lower())
