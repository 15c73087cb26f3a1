"""Answers computed from a model or a run, as pure functions: no Panel, and no torch at import time.

>>> import comgra_callbacks.analysis as analysis
>>> callable(analysis.activation_patching)
True
"""

from __future__ import annotations

from comgra_callbacks.analysis.patching import activation_patching, attribution_patching, circuit

__all__ = ["activation_patching", "attribution_patching", "circuit"]
