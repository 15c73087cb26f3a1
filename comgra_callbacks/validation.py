"""Argument checks with one message form: the class and argument, the value received, what is expected.

>>> positive_int("ComgraCallback", "every_n_steps", 0)
Traceback (most recent call last):
...
comgra_callbacks.errors.ConfigError: `ComgraCallback(every_n_steps=...)`: expected a positive int, got 0.
>>> one_of("ComgraCallback", "on_write_error", "warn", ("warn", "raise"))
'warn'
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from comgra_callbacks.errors import ConfigError, ConfigTypeError

T = TypeVar("T")


def _where(owner: str, arg: str) -> str:
    return f"`{owner}({arg}=...)`"


def positive_int(owner: str, arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{_where(owner, arg)}: expected a positive int, got {value!r} of type {type(value).__name__}.")
    if value <= 0:
        raise ConfigError(f"{_where(owner, arg)}: expected a positive int, got {value!r}.")
    return value


def non_negative_int(owner: str, arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{_where(owner, arg)}: expected an int >= 0, got {value!r} of type {type(value).__name__}.")
    if value < 0:
        raise ConfigError(f"{_where(owner, arg)}: expected an int >= 0, got {value!r}.")
    return value


def positive_number(owner: str, arg: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigTypeError(f"{_where(owner, arg)}: expected a positive number, got {value!r} of type {type(value).__name__}.")
    if not value > 0:
        raise ConfigError(f"{_where(owner, arg)}: expected a positive number, got {value!r}.")
    return float(value)


def boolean(owner: str, arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigTypeError(f"{_where(owner, arg)}: expected True or False, got {value!r} of type {type(value).__name__}.")
    return value


def one_of(owner: str, arg: str, value: T, choices: Iterable[T]) -> T:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{_where(owner, arg)}: expected one of {list(choices)}, got {value!r}.")
    return value


def optional_callable(owner: str, arg: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise ConfigTypeError(f"{_where(owner, arg)}: expected a callable or None, got {value!r} of type {type(value).__name__}.")
    return value


def optional_mapping(owner: str, arg: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigTypeError(f"{_where(owner, arg)}: expected a dict or None, got {value!r} of type {type(value).__name__}.")
    return dict(value)
