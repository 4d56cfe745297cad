"""Seconds from SIGTERM to the exit of `dyngate serve`, idle (nothing in flight), with and without a client
connected, for one or more serve commands, interleaved in rounds.

    .venv/bin/python scripts/bench_serve_stop.py --repository model_repository --rounds 2
    # before/after: serve from another checkout (git worktree add /tmp/before <commit>), same run
    .venv/bin/python scripts/bench_serve_stop.py --repository R --before-pythonpath /tmp/before/build:/tmp/before/gateway

Each run starts `dyngate serve --repository R` on free loopback ports (its temporary files in a folder of its own,
TMPDIR), waits until it says "Ctrl-C stops", leaves a client connected that made one request (`--clients`:
none; grpc: dyngate_serving.client.TritonClient over gRPC; http: the same over HTTP, whose kept-alive connection
stays open and idle), waits 2 s, sends SIGTERM and times the exit. Triton's stop waits for open HTTP
connections up to its --exit-timeout-secs (`dyngate serve --exit-timeout`), which is what the http runs show.
Prints one line per run and the median per (serve, client).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build"))
sys.path.insert(0, str(ROOT / "gateway"))

from dyngate_build.repository import python_backend_models  # noqa: E402
from dyngate_serving.client import TritonClient  # noqa: E402
from dyngate_serving.net import free_ports  # noqa: E402

START_S = 240  # a bound for a start on a loaded machine, not a measurement


def stop_seconds(repository: Path, pythonpath: str, client_kind: str, flags: list[str]) -> float:
    """One run (see the module docstring): seconds from SIGTERM to the exit of `dyngate serve`."""
    http, grpc, metrics = free_ports(3)
    scratch = Path(tempfile.mkdtemp(prefix="bench-serve-stop-"))
    out_path = scratch / "serve.out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(scratch), "PYTHONPATH": pythonpath}
    with open(out_path, "wb") as out:
        serve = subprocess.Popen([sys.executable, "-m", "dyngate_cli", "serve", "--repository", str(repository),
                                  "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                                  *flags], stdout=out, stderr=subprocess.STDOUT, env=env)
    client = None
    try:
        deadline = time.monotonic() + START_S
        while "Ctrl-C stops" not in out_path.read_text(errors="replace"):
            if serve.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"dyngate serve did not start:\n{out_path.read_text(errors='replace')}")
            time.sleep(0.2)
        if client_kind != "none":
            client = TritonClient(f"{client_kind}://127.0.0.1:{grpc if client_kind == 'grpc' else http}")
            model = python_backend_models(repository)[0]
            client.predict(model, b"a fine film" if client.model_input_name(model) == "TEXT" else b"")
        time.sleep(2)
        started = time.monotonic()
        serve.send_signal(signal.SIGTERM)
        serve.wait(120)
        return time.monotonic() - started
    finally:
        if client is not None:
            client.close()
        if serve.poll() is None:
            serve.kill()
            serve.wait(60)
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="a built repository (text models)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", default="http,none", help="comma-separated: none, grpc, http")
    parser.add_argument("--before-pythonpath", action="append", default=[],
                        help="also time serve run with this PYTHONPATH (another checkout); repeat for more")
    parser.add_argument("--serve-flags", default="", help="flags added to this checkout's serve, e.g. "
                                                          "'--exit-timeout 10'")
    args = parser.parse_args(argv)
    serves = {"this checkout": (f"{ROOT / 'build'}:{ROOT / 'gateway'}", args.serve_flags.split())}
    for i, pythonpath in enumerate(args.before_pythonpath):
        serves[f"before {i + 1}"] = (pythonpath, [])
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    seconds: dict[tuple[str, str], list[float]] = {}
    for round_ in range(1, args.rounds + 1):
        for name, (pythonpath, flags) in serves.items():
            for kind in clients:
                value = stop_seconds(args.repository, pythonpath, kind, flags)
                seconds.setdefault((name, kind), []).append(value)
                print(f"round {round_}: {name}, client {kind}: {value:.2f} s from SIGTERM to exit", flush=True)
    print()
    for (name, kind), values in seconds.items():
        print(f"{name}, client {kind}: median {statistics.median(values):.2f} s "
              f"({', '.join(f'{v:.2f}' for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
