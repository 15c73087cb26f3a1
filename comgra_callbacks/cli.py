"""The ``comgra-callbacks`` console command.

    comgra-callbacks serve comgra_runs                 # the dashboard on http://127.0.0.1:5006
    comgra-callbacks serve comgra_runs --port 5007 --custom my_view.py --no-show
    comgra-callbacks serve s3://bucket/runs --storage-options '{"endpoint_url": "http://127.0.0.1:9000"}'

Subcommands live in a registry: a module adds one with :func:`register` (a name, a help line, a function
that declares its arguments and one that runs it), so new commands need no change here.

>>> sorted(COMMANDS)
['demo', 'serve']
>>> main(["serve", "/tmp", "--storage-options", "nope"])
Traceback (most recent call last):
...
SystemExit: 2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from comgra_callbacks.errors import ComgraError


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` declares its arguments, ``run(args)`` returns an exit code."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None], run: Callable[[argparse.Namespace], int]) -> Command:
    """Add a subcommand (a later registration under the same name replaces the earlier one)."""
    command = Command(name, help, add_arguments, run)
    COMMANDS[name] = command
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comgra-callbacks", description="Record and explore what happens inside a network while it trains.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (argument errors exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        return int(run(args))
    except ComgraError as exc:
        parser.exit(2, f"comgra-callbacks {args.command}: {exc}\n")


# ------------------------------------------------------------------------------------------ serve


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from comgra_callbacks.dashboard.options import add_app_arguments

    add_app_arguments(parser)
    parser.add_argument("--port", type=int, default=5006, help="port to listen on (default 5006; 0 picks a free one)")
    parser.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--allow-websocket-origin", action="append", default=[], metavar="HOST[:PORT]", help="further origins allowed to connect (needed when --address is not 127.0.0.1)")
    parser.add_argument("--no-show", action="store_true", help="do not open a browser")


def _free_port(address: str) -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def _serve(args: argparse.Namespace) -> int:
    from comgra_callbacks.dashboard.custom import load_custom
    from comgra_callbacks.dashboard.options import options_from

    options = options_from(args)  # a bad --storage-options raises ConfigError with the expected form
    if options.custom:
        load_custom(options.custom)  # fail now, on the console, rather than on every page
    import panel as pn

    from comgra_callbacks.dashboard.app import TITLE, build_app
    from comgra_callbacks.dashboard.data import shared_catalog

    catalog = shared_catalog(options.target, options.storage_options)
    if catalog.problem:
        print(f"comgra-callbacks serve: {catalog.problem}", file=sys.stderr)
    for name, message in catalog.skipped.items():
        print(f"comgra-callbacks serve: skipping run {name!r}: {message}", file=sys.stderr)
    port = args.port or _free_port(args.address)
    origins = [f"{args.address}:{port}", f"localhost:{port}", *args.allow_websocket_origin]
    server = pn.serve(
        {"/": lambda: build_app(options)},
        port=port,
        address=args.address,
        websocket_origin=origins,
        show=not args.no_show,
        title=TITLE,
        start=False,
        threaded=False,
    )
    print(f"comgra_callbacks dashboard on http://{args.address}:{port}/ (Ctrl+C to stop)", flush=True)
    try:
        server.start()
        server.io_loop.start()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


register("serve", "open the dashboard on a root of runs, one run, or an fsspec URL", _serve_arguments, _serve)


# ------------------------------------------------------------------------------------------- demo


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from comgra_callbacks.demo import add_arguments

    add_arguments(parser)


def _demo(args: argparse.Namespace) -> int:
    from comgra_callbacks.demo import run

    return run(args)


register("demo", "train a small model with the callback (a few hundred steps), then open the dashboard on it", _demo_arguments, _demo)
