"""``make bench``: every benchmark, one after the other, results in ``benchmarks/results/``.

    python benchmarks/run_all.py                 # recording (with the original comgra 0.11.5) and dashboard
    python benchmarks/run_all.py --quick         # fewer steps and changes, no comgra: a smoke run

1. ``recording_bench.py``: what recording costs training (side by side in one process), and the original
   comgra package on the same workload (it installs itself into ``benchmarks/.venv-comgra`` the first time,
   which takes a few minutes).
2. ``dashboard_bench.py``: store open time and selector-change latency on a 10 000-record synthetic store.
3. ``compile_bench.py``: what the callback costs a ``torch.compile``'d model on steps it does not record.
4. ``transformer_bench.py``: what recording costs a small GPT-like LM at torch's default thread count, against
   a hand-written hook recorder and the floor (one reduction pass over the bytes a recorded step captures).

Timings on a shared or virtual machine vary from run to run by 10-30 %; run it on a quiet machine, and
compare only figures taken in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def run(script: str, *args: str) -> dict:
    print(f"== {script} {' '.join(args)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{script} failed (exit code {done.returncode})")
    print(f"   {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return json.loads(done.stdout[done.stdout.index("{") :])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (not for the figures in docs/)")
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    if args.quick:
        recording = run("recording_bench.py", "--rounds", "1", "--steps", "80", "--out", str(RESULTS / "recording.json"))
        dashboard = run("dashboard_bench.py", "--records", "1000", "--nodes", "20", "--changes", "60", "--render-changes", "10")
        compiled = run("compile_bench.py", "--steps", "40", "--rounds", "1")
        transformer = run("transformer_bench.py", "--quick", "--out", str(RESULTS / "transformer.json"))
    else:
        recording = run("recording_bench.py", "--rounds", "3", "--comgra", "--out", str(RESULTS / "recording.json"))
        dashboard = run("dashboard_bench.py")
        compiled = run("compile_bench.py")
        transformer = run("transformer_bench.py", "--out", str(RESULTS / "transformer.json"))
    (RESULTS / "dashboard.json").write_text(json.dumps(dashboard, indent=2))
    (RESULTS / "compile.json").write_text(json.dumps(compiled, indent=2))
    print(json.dumps({"recording": {k: recording[k] for k in ("median_step_ms", "ratio_to_no_callback", "loop_ratio")},
                      "comgra_0_11_5_ratio": recording.get("comgra_0_11_5", {}).get("ratio"),
                      "dashboard": {k: dashboard.get(k) for k in ("open_s", "change_ms") if k in dashboard},
                      "compiled": compiled["ratio_to_no_callback"],
                      "transformer": {k: transformer[k] for k in ("ratio_to_no_callback", "floor_ratio")}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
