"""Errors raised by comgra_callbacks.

Every error derives from :class:`ComgraError`; each subclass also inherits the builtin it resembles, so
``except ValueError`` or ``except FileNotFoundError`` catch ours too.

>>> issubclass(ConfigError, ValueError) and issubclass(ConfigError, ComgraError)
True
>>> issubclass(RunNotFoundError, FileNotFoundError)
True
"""

from __future__ import annotations


class ComgraError(Exception):
    """Base class of every error raised by comgra_callbacks."""


class ConfigError(ComgraError, ValueError):
    """An argument has a wrong value, e.g. ``ComgraCallback(every_n_steps=0)``."""


class ConfigTypeError(ComgraError, TypeError):
    """An argument has a wrong type, e.g. ``ComgraCallback(modules=3)``."""


class RecordingError(ComgraError, RuntimeError):
    """Recording a step failed, e.g. ``record()`` got something that is not a tensor."""


class StoreError(ComgraError, OSError):
    """The store could not be written or read (I/O, permissions, bucket missing)."""


class RunNotFoundError(ComgraError, FileNotFoundError):
    """No run exists at the given path or URL."""


class FormatVersionError(ComgraError, ValueError):
    """The run was written in a store format this version cannot read."""


class CorruptStoreError(ComgraError, ValueError):
    """A run is damaged: a file is not valid JSON or not of the format's types, an array is shorter than the
    manifest promises, a code or pointer is out of range, a chunk was deleted, or a file is a link out of the
    run, a special file or too large. The message names the run and the file; no data is returned from it
    (see docs/reliability.md)."""


class NodeNotFoundError(ComgraError, KeyError):
    """The requested node, role, view or iteration does not exist in the run."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0]) if self.args else ""


class StepNotFoundError(ComgraError, KeyError):
    """The requested step was not recorded (or not for that node)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(ComgraError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


def missing_extra(package: str, extra: str, feature: str) -> MissingDependencyError:
    """Build the error for a missing optional dependency.

    >>> str(missing_extra("panel", "dashboard", "the dashboard"))
    "the dashboard needs the optional package 'panel'. HINT: pip install 'comgra-callbacks[dashboard]'"
    """
    return MissingDependencyError(
        f"{feature} needs the optional package {package!r}. HINT: pip install 'comgra-callbacks[{extra}]'"
    )
