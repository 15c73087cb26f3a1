"""Examples shipped with comgra_callbacks: runnable scripts (``python -m comgra_callbacks.examples.<name>``) and custom dashboard views."""
