"""Name filters: one way to say which modules, parameters or nodes something applies to.

A filter is ``None`` (everything), a glob string (``"encoder.*"``), a list of globs (any may match) or a
callable ``name -> bool``. :func:`name_predicate` turns any of these into a predicate.

>>> p = name_predicate(["encoder.*", "head"])
>>> p("encoder.0"), p("head"), p("decoder.1")
(True, True, False)
>>> name_predicate(None)("anything")
True
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable

from comgra_callbacks.errors import ConfigTypeError

NameFilter = str | Iterable[str] | Callable[[str], bool] | None


def name_predicate(spec: NameFilter, *, owner: str = "name filter") -> Callable[[str], bool]:
    """Turn a name filter into a predicate.

    Args:
        spec: ``None`` (match all), a glob string, an iterable of glob strings, or a callable.
        owner: how to name the argument in an error message, e.g. ``"ComgraCallback(modules=...)"``.

    Raises:
        ConfigTypeError: ``spec`` is none of the accepted types.

    >>> name_predicate("*.weight")("net.0.weight")
    True
    >>> name_predicate(lambda n: n.startswith("a"))("abc")
    True
    """
    if spec is None:
        return _match_all
    if isinstance(spec, str):
        pattern = re.compile(fnmatch.translate(spec))
        return lambda name: pattern.match(name) is not None
    if callable(spec):
        return spec
    if isinstance(spec, Iterable):
        items = list(spec)
        bad = [item for item in items if not isinstance(item, str)]
        if bad:
            raise ConfigTypeError(
                f"`{owner}`: expected a glob string, a list of glob strings, a callable or None, "
                f"but the list holds {bad[0]!r} of type {type(bad[0]).__name__}."
            )
        if not items:
            return _match_none
        pattern = re.compile("|".join(f"(?:{fnmatch.translate(item)})" for item in items))
        return lambda name: pattern.match(name) is not None
    raise ConfigTypeError(
        f"`{owner}`: expected a glob string, a list of glob strings, a callable or None, "
        f"got {spec!r} of type {type(spec).__name__}."
    )


def describe_filter(spec: NameFilter) -> str | list[str] | None:
    """A JSON-safe description of a filter, for run metadata (callables are named, not serialised).

    >>> describe_filter(["a.*"]), describe_filter(None)
    (['a.*'], None)
    """
    if spec is None or isinstance(spec, str):
        return spec
    if callable(spec):
        return f"<callable {getattr(spec, '__qualname__', type(spec).__name__)}>"
    return [str(item) for item in spec]


def _match_all(name: str) -> bool:
    return True


def _match_none(name: str) -> bool:
    return False
