"""The dashboard's options, shared by ``panel serve app.py --args …`` and ``comgra-callbacks serve``.

>>> opts = parse_app_args(["comgra_runs", "--custom", "fourier", "--poll", "5"])
>>> opts.target, opts.custom, opts.poll_secs
('comgra_runs', 'fourier', 5.0)
>>> parse_app_args([])
Traceback (most recent call last):
...
comgra_callbacks.errors.ConfigError: `panel serve app.py --args ...`: the following arguments are required: ROOT. Expected: panel serve app.py --address 127.0.0.1 --args ROOT [--custom FILE] [--storage-options JSON] [--poll SECONDS].
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from comgra_callbacks.dashboard.data import parse_storage_options
from comgra_callbacks.errors import ConfigError


@dataclass
class DashboardOptions:
    """What the dashboard serves.

    Attributes:
        target: a root of runs, or one run: a local path or an fsspec URL (``s3://bucket/prefix``).
        storage_options: fsspec options for a URL target (endpoint, credentials).
        custom: the user's custom-view file (``view(selection, run)``), or a shipped example's name.
        poll_secs: how often a page looks for new runs and records (0: only with the Refresh button).
    """

    target: str = "comgra_runs"
    storage_options: dict[str, Any] | None = None
    custom: str | None = None
    poll_secs: float = 3.0


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments both entry points take."""
    parser.add_argument("root", metavar="ROOT", help="directory (or fsspec URL, e.g. s3://bucket/prefix) holding the runs, or one run")
    parser.add_argument("--custom", metavar="FILE", default=None, help="Python file defining view(selection, run) for the Custom tab ('fourier': the shipped example)")
    parser.add_argument("--storage-options", metavar="JSON", default=None, help='fsspec options for a URL root, e.g. \'{"endpoint_url": "http://127.0.0.1:9000", "key": "...", "secret": "..."}\'')
    parser.add_argument("--poll", metavar="SECONDS", type=float, default=3.0, help="how often open pages look for new records (default 3; 0 = only the Refresh button)")


def options_from(args: argparse.Namespace) -> DashboardOptions:
    return DashboardOptions(
        target=args.root,
        storage_options=parse_storage_options(args.storage_options),
        custom=args.custom,
        poll_secs=max(0.0, float(args.poll)),
    )


class _Parser(argparse.ArgumentParser):
    """An argument parser that raises instead of exiting (the page shows the message)."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(
            f"`panel serve app.py --args ...`: {message}. Expected: panel serve app.py --address 127.0.0.1 --args "
            f"ROOT [--custom FILE] [--storage-options JSON] [--poll SECONDS]."
        )


def parse_app_args(argv: Sequence[str]) -> DashboardOptions:
    """Parse the arguments after ``--args`` of ``panel serve app.py --args ROOT [...]``.

    Raises:
        ConfigError: the arguments are wrong (the message says what was expected).
    """
    parser = _Parser(prog="panel serve app.py --args", description="comgra_callbacks dashboard", add_help=False)
    add_app_arguments(parser)
    return options_from(parser.parse_args(list(argv)))
