"""The dashboard: a Panel app to explore recorded runs (``comgra-callbacks serve ROOT``).

State lives in :mod:`~comgra_callbacks.dashboard.state` (``param.Parameterized`` classes), each view is a
``panel.viewable.Viewer`` built on it, and :mod:`~comgra_callbacks.dashboard.app` only composes them.
Panel and HoloViews are optional dependencies (the ``dashboard`` extra); they are imported only inside this
package, and a missing one is reported with the command that installs it.
"""

from __future__ import annotations

import importlib.util

from comgra_callbacks.errors import missing_extra

for _package in ("panel", "holoviews", "bokeh", "param"):
    if importlib.util.find_spec(_package) is None:
        raise missing_extra(_package, "dashboard", "the dashboard")
