"""Text from a run or from user code, made safe to show: the one helper every view uses.

Names of runs, nodes, step types, scalars and module types, notes, error messages (which quote such
names), and the ``--custom`` file's title and exceptions all end up in Markdown panes, alerts and choice
widgets, which render HTML. A run directory named ``<img src=x onerror=alert(7)>`` would run script in the
viewer's browser. :func:`text` turns any value into Markdown that shows exactly that value and nothing else;
:func:`code` does the same as inline code. Bokeh canvases (titles, labels, legends), Bokeh tooltips
(``@field``), Select options, ``pn.pane.DataFrame`` (``escape=True``) and Tabulator cells (Bokeh's
``StringFormatter``) escape on their own; :func:`label` is for the widgets that do not (``MultiChoice``).

>>> text("<img src=x onerror=alert(7)>")
'&lt;img src=x onerror=alert(7)&gt;'
>>> text("layers.0*2_a")
'layers.0\\\\*2_a'
>>> code("a<b>")
'<code>a&lt;b&gt;</code>'
"""

from __future__ import annotations

import html
import re
from typing import Any

# Markdown punctuation that can format text in the middle of a line (emphasis, links, code, tables, math);
# values never start a line (line breaks become spaces), so headings and list markers need no escape.
# "_" is left alone: inside a word it never formats, and names are full of it (``aux_loss``).
_MARKDOWN = re.compile(r"([\\`*\[\]|~$])")


def text(value: Any) -> str:
    """Markdown (or HTML) that shows ``str(value)`` as plain text: HTML special characters become entities
    and Markdown punctuation is backslash-escaped, so no value can become a tag, a link or formatting."""
    escaped = _MARKDOWN.sub(r"\\\1", str(value))
    return html.escape(escaped, quote=True).replace("\n", " ")


def code(value: Any) -> str:
    """Inline code showing ``str(value)`` (an HTML ``<code>`` element: Markdown backticks cannot hold
    entities)."""
    return f"<code>{html.escape(str(value), quote=True)}</code>"


def block(value: Any) -> str:
    """A preformatted block showing ``str(value)`` with its line breaks (for tracebacks)."""
    return f"<pre>{html.escape(str(value), quote=True)}</pre>"


def label(value: Any) -> str:
    """A label for widgets that render their option labels as HTML (Bokeh's ``MultiChoice``)."""
    return html.escape(str(value), quote=True)
