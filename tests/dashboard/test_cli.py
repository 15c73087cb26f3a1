"""`comgra-callbacks serve`: argument errors, the subcommand registry, and a real server on 127.0.0.1."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from comgra_callbacks import cli


def test_bad_storage_options_exit_with_the_expected_form(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", str(tmp_path), "--storage-options", "[1, 2]"])
    assert exit_info.value.code == 2
    assert "expected a JSON object such as" in capsys.readouterr().err


def test_a_missing_custom_file_exits_before_serving(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", str(tmp_path), "--custom", str(tmp_path / "missing.py"), "--no-show"])
    assert exit_info.value.code == 2
    assert "missing.py' (no such file)" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "serve" in capsys.readouterr().out


def test_other_modules_can_register_subcommands(capsys):
    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--times", type=int, default=1)

    def run(args: argparse.Namespace) -> int:
        print("hello " * args.times)
        return 7

    cli.register("hello", "say hello", arguments, run)
    try:
        assert cli.main(["hello", "--times", "2"]) == 7
        assert "hello hello" in capsys.readouterr().out
    finally:
        del cli.COMMANDS["hello"]


def _listening(port: int) -> list[str]:
    """Addresses with a socket listening on ``port``, from /proc/net/tcp and tcp6 (Linux)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                if len(address) == 8:
                    found.append(".".join(str(b) for b in reversed(bytes.fromhex(address))))
                else:
                    found.append("ipv6:" + address)
    return found


@pytest.mark.slow
def test_serve_binds_127_0_0_1_and_answers(runs_root):
    root, _ = runs_root
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", "from comgra_callbacks.cli import main; raise SystemExit(main())", "serve", str(root), "--port", str(port), "--no-show"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [process.stdout.readline().strip() for _ in range(2)]
        assert f"comgra_callbacks dashboard on http://127.0.0.1:{port}/ (Ctrl+C to stop)" in lines
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
                    body = response.read().decode()
                break
            except OSError:
                assert process.poll() is None and time.time() < deadline, "the server did not answer"
                time.sleep(0.3)
        assert "comgra_callbacks" in body
        if os.path.exists("/proc/net/tcp"):
            assert _listening(port) == ["127.0.0.1"], "the server listens on the loopback address only"
    finally:
        process.terminate()
        process.wait(timeout=15)
