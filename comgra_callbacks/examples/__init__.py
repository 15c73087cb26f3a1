"""Runnable examples (``python -m comgra_callbacks.examples.<name>``)."""
