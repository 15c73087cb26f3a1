"""A separate virtual environment with the ORIGINAL ``comgra`` 0.11.5, for reference timings.

The original package must not be installed into the project venv, so the
benchmarks keep it in its own venv (``benchmarks/.venv-comgra/``, git-ignored) and
run ``comgra_reference.py`` there as a subprocess. Only the standard library is
used here, so this module imports from any environment.

How the venv is built (:func:`ensure_comgra_venv`):

1. ``python -m venv`` with the interpreter running this module (Python 3.11);
2. ``pip install torch==2.13.0`` FIRST: on our machines pip resolves exactly this
   version to the local CPU wheel in ``/opt/wheels`` (pip's ``find-links``), while
   any other or unpinned torch means several GB of CUDA wheels;
3. ``pip install -c <constraints: torch==2.13.0> comgra==0.11.5``. comgra declares an
   unpinned ``torch`` (plus dash, dash-svg, dash-bootstrap-components>=1.5.0,
   msgpack, numpy, pandas); the constraint keeps pip on the installed torch. This
   resolves cleanly with torch 2.13, so no ``--no-deps`` workaround is needed;
4. ``import comgra.recorder`` as a smoke test, then a stamp file records the pins.
   A venv whose stamp matches is reused as is; delete the folder to rebuild it.

comgra 0.11.5 is an sdist only (built locally into a wheel) and also installs
top-level packages named ``scripts`` and ``assets``, another reason to keep it out
of the project venv.

Run ``python benchmarks/comgra_env.py [ARGS...]`` to build the venv if needed, run
the reference benchmark (ARGS are passed to ``comgra_reference.py``) and print its
JSON result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TORCH_PIN = "torch==2.13.0"
COMGRA_PIN = "comgra==0.11.5"
BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_VENV = "benchmarks/.venv-comgra"
STAMP_NAME = ".comgra-env-stamp.json"
REFERENCE_SCRIPT = BENCH_DIR / "comgra_reference.py"
PIP_TIMEOUT_S = 1800.0
TAIL_LINES = 25


class ComgraEnvError(RuntimeError):
    """Raised when the comgra venv cannot be built or the reference run fails."""


def _tail(text: str, n: int = TAIL_LINES) -> str:
    """Returns the last ``n`` non-empty lines of ``text``."""
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-n:]) or "<no output>"


def _run(func: str, what: str, cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Runs ``cmd`` and raises a readable :class:`ComgraEnvError` if it fails.

    Args:
        func: Name of the public function, used as the message prefix.
        what: What the command does, e.g. ``"pip could not install torch==2.13.0"``.
        cmd: The command line.
        timeout: Seconds before the command is killed.

    Returns:
        The completed process, with stdout and stderr captured as text.
    """
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=REPO_ROOT, check=False)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise ComgraEnvError(f"`{func}`: {what}: timed out after {timeout:.0f} s:\n{_tail(out)}") from exc
    except OSError as exc:
        raise ComgraEnvError(f"`{func}`: {what}: cannot start {cmd[0]}: {exc}") from exc
    if proc.returncode != 0:
        raise ComgraEnvError(f"`{func}`: {what} (exit {proc.returncode}):\n{_tail(proc.stdout + proc.stderr)}")
    return proc


def _resolve(path: str | os.PathLike[str]) -> Path:
    """Resolves ``path``; a relative path is taken relative to the repository root."""
    p = Path(path)
    return (p if p.is_absolute() else REPO_ROOT / p).resolve()


def venv_python(path: str | os.PathLike[str] = DEFAULT_VENV) -> Path:
    """Returns the interpreter of the comgra venv at ``path`` (it may not exist yet)."""
    venv = _resolve(path)
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _expected_stamp() -> dict[str, str]:
    return {"torch": TORCH_PIN, "comgra": COMGRA_PIN, "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}


def ensure_comgra_venv(path: str | os.PathLike[str] = DEFAULT_VENV, *, quiet: bool = False) -> Path:
    """Creates the comgra venv once, or reuses it when its stamp file matches.

    Args:
        path: Venv folder; relative paths are relative to the repository root.
        quiet: If True, do not report progress on stderr.

    Returns:
        The absolute path of the venv folder.

    Raises:
        ComgraEnvError: If a step fails; the message names the step and shows pip's last lines.
    """
    func = "ensure_comgra_venv"
    venv = _resolve(path)
    stamp = venv / STAMP_NAME
    py = venv_python(venv)
    if stamp.is_file() and py.exists():
        try:
            if json.loads(stamp.read_text()) == _expected_stamp():
                return venv
        except (OSError, ValueError):
            pass  # unreadable stamp: rebuild below

    def say(msg: str) -> None:
        if not quiet:
            print(f"[comgra_env] {msg}", file=sys.stderr, flush=True)

    stamp.unlink(missing_ok=True)
    if not py.exists():
        say(f"creating venv {venv}")
        _run(func, f"could not create the venv at {venv}", [sys.executable, "-m", "venv", str(venv)], 300)
    say(f"installing {TORCH_PIN} (local CPU wheel)")
    _run(func, f"pip could not install {TORCH_PIN}",
         [str(py), "-m", "pip", "install", "--quiet", TORCH_PIN], PIP_TIMEOUT_S)
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    say(f"installing {COMGRA_PIN} with the constraint {TORCH_PIN}")
    _run(func, f"pip could not install {COMGRA_PIN}",
         [str(py), "-m", "pip", "install", "--quiet", "-c", str(constraints), COMGRA_PIN], PIP_TIMEOUT_S)
    probe = ("import importlib.metadata as m, torch, comgra.recorder, comgra.objects; "
             "print(m.version('comgra'), torch.__version__)")
    versions = _run(func, "comgra does not import in the new venv", [str(py), "-c", probe], 300).stdout.split()
    if len(versions) != 2 or f"comgra=={versions[0]}" != COMGRA_PIN or not versions[1].startswith(TORCH_PIN[7:]):
        raise ComgraEnvError(f"`{func}`: wrong versions installed in {venv}: {' '.join(versions)}")
    stamp.write_text(json.dumps(_expected_stamp()))
    say(f"ready: comgra {versions[0]}, torch {versions[1]}")
    return venv


def run_comgra_reference(timeout: float = 3600.0, args: Sequence[str] = (),
                         path: str | os.PathLike[str] = DEFAULT_VENV) -> dict[str, Any]:
    """Runs ``comgra_reference.py`` in the comgra venv (building it if needed).

    Args:
        timeout: Seconds allowed for the benchmark run itself (venv building not included).
        args: Extra command-line arguments for ``comgra_reference.py``, e.g. ``["--all-samples"]``.
        path: Venv folder, as for :func:`ensure_comgra_venv`.

    Returns:
        The JSON object the script printed, as a dict.

    Raises:
        ComgraEnvError: If the venv cannot be built, the script fails or prints no JSON.
    """
    func = "run_comgra_reference"
    py = venv_python(ensure_comgra_venv(path))
    proc = _run(func, "comgra_reference.py failed", [str(py), str(REFERENCE_SCRIPT), *args], timeout)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError) as exc:
        raise ComgraEnvError(f"`{func}`: comgra_reference.py printed no JSON:\n{_tail(proc.stdout)}") from exc
    if not isinstance(result, dict):
        raise ComgraEnvError(f"`{func}`: expected a JSON object, got: {lines[-1][:200]}")
    return result


if __name__ == "__main__":
    try:
        print(json.dumps(run_comgra_reference(args=sys.argv[1:])))
    except ComgraEnvError as err:
        sys.exit(str(err))
