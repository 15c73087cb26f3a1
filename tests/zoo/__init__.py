"""The model zoo of issue 8: one module per family, each compared with an independent oracle."""
