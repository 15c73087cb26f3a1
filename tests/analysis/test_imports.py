"""The analysis layer stays light: no torch, Panel or param at import time (a notebook without them works)."""

from __future__ import annotations

import subprocess
import sys


def test_analysis_imports_neither_torch_nor_panel():
    code = (
        "import sys; from comgra_callbacks import analysis; import comgra_callbacks;"
        "assert comgra_callbacks.analysis is analysis;"
        "print(sorted(m for m in ('torch', 'panel', 'param', 'lightning', 'bokeh') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
