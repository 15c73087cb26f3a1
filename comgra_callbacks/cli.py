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
import errno
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

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


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line (what was wrong and where to look), not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}. HINT: `{self.prog} --help` lists the arguments.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="comgra-callbacks", description="Record and explore what happens inside a network while it trains.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
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
    except OSError as exc:  # the port is taken, the address is not this machine's, ...: one line, no traceback
        parser.exit(1, f"comgra-callbacks {args.command}: {exc}\n")


# ------------------------------------------------------------------------------------------ serve


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from comgra_callbacks.dashboard.options import add_app_arguments

    add_app_arguments(parser)
    parser.add_argument("--port", type=_port, default=5006, help="port to listen on (default 5006; 0 picks a free one)")
    parser.add_argument("--address", type=_address, default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; the dashboard has no authentication)")
    parser.add_argument("--allow-websocket-origin", action="append", default=[], metavar="HOST[:PORT]", help="further origins allowed to connect (needed when --address is not 127.0.0.1)")
    parser.add_argument("--no-show", action="store_true", help="do not open a browser")


def _port(text: str) -> int:
    """``--port``: an int from 0 to 65535.

    >>> _port("70000")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a port from 0 to 65535 (0: any free port), got '70000'
    """
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535 (0: any free port), got {text!r}")
    return port


def _address(text: str) -> str:
    """``--address``: an IP address, or a host name (checked when the server binds).

    >>> _address("999.1.1.1")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected an IP address of this machine such as 127.0.0.1 or 0.0.0.0 (or a host name), got '999.1.1.1'
    """
    import ipaddress
    import re

    looks_numeric = re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]*:[0-9a-fA-F:.]*", text) is not None
    if looks_numeric or not text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an IP address of this machine such as 127.0.0.1 or 0.0.0.0 (or a host name), got {text!r}"
            ) from None
    return text


def _is_loopback(address: str) -> bool:
    import ipaddress

    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _cannot_listen(address: str, port: int, exc: OSError) -> int:
    reason = exc.strerror or str(exc)
    hint = "choose another --port (0 picks a free one)" if exc.errno == errno.EADDRINUSE else "pass an address of this machine, e.g. --address 127.0.0.1"
    print(f"comgra-callbacks serve: cannot listen on {address}:{port}: {reason}. HINT: {hint}.", file=sys.stderr, flush=True)
    return 1


def _free_port(address: str) -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def _serve(args: argparse.Namespace) -> int:
    from comgra_callbacks.dashboard.custom import load_custom
    from comgra_callbacks.dashboard.options import options_from

    options = options_from(args)  # a bad --storage-options raises ConfigError with the expected form
    _check_target(options.target)
    if options.custom:
        load_custom(options.custom)  # fail now, on the console, rather than on every page
    import panel as pn

    from comgra_callbacks.dashboard.app import TITLE, build_app
    from comgra_callbacks.dashboard.data import shared_catalog

    try:
        port = args.port or _free_port(args.address)
    except OSError as exc:
        return _cannot_listen(args.address, args.port, exc)
    if not _is_loopback(args.address):
        print(
            f"comgra-callbacks serve: warning: listening on {args.address}:{port}, not only on this machine. The dashboard "
            f"has no authentication: anyone who can reach this port can read every run under {options.target!r}. "
            f"HINT: keep the default --address 127.0.0.1 and use an SSH tunnel (ssh -L {port}:127.0.0.1:{port} HOST).",
            file=sys.stderr, flush=True,
        )
    origins = [f"{args.address}:{port}", f"localhost:{port}", *args.allow_websocket_origin]
    try:
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
    except OSError as exc:  # the port is taken, the address is not this machine's
        return _cannot_listen(args.address, port, exc)
    catalog = shared_catalog(options.target, options.storage_options)  # after binding: a taken port is the only line
    if catalog.problem:
        print(f"comgra-callbacks serve: {catalog.problem}", file=sys.stderr)
    for name, message in catalog.skipped.items():
        print(f"comgra-callbacks serve: skipping run {name!r}: {message}", file=sys.stderr)
    print(f"comgra_callbacks dashboard on http://{args.address}:{port}/ (Ctrl+C to stop)", flush=True)
    try:
        server.start()
        server.io_loop.start()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _check_target(target: str) -> None:
    """A local target must be a directory (a root of runs, or one run) or not exist yet (a training may
    create it later); a file is a mistake worth one line."""
    import os

    from comgra_callbacks.errors import ConfigError
    from comgra_callbacks.store.storage import is_url

    if not is_url(target) and os.path.exists(target) and not os.path.isdir(target):
        raise ConfigError(
            f"`serve(ROOT=...)`: expected a directory of runs (or one run's directory), got {target!r}, which is a file. "
            f"HINT: pass the directory that holds it, e.g. {os.path.dirname(os.path.abspath(target))!r}."
        )


register("serve", "open the dashboard on a root of runs, one run, or an fsspec URL", _serve_arguments, _serve)


# ------------------------------------------------------------------------------------------- demo


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from comgra_callbacks.demo import add_arguments

    add_arguments(parser)


def _demo(args: argparse.Namespace) -> int:
    from comgra_callbacks.demo import run

    return run(args)


register("demo", "train a small model with the callback (a few hundred steps), then open the dashboard on it", _demo_arguments, _demo)
