"""scripts/demo.sh (`make demo`) with the real `dyngate serve` and gateway on free ports.

Found in a new user's trial: the gateway went on in front of nothing after `dyngate serve` gave up, and the log
tail serve printed ended with Triton's harmless "Failed to initialize NVML" line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from dyngate_serving.net import free_ports
from tests.conftest import ROOT

NAME = "distilbert-tiny__fp32"
WAIT_S = 240  # upper bound for a start or restart on a loaded 2-core machine (a bound, never an assertion)


def _wait_for(condition, what: str, detail=lambda: ""):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"gave up waiting {WAIT_S} s for {what}{detail()}")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_demo_stops_the_gateway_and_says_why_when_serve_gives_up(text_repository, tmp_path):
    repository = tmp_path / "repo"
    repository.mkdir()
    shutil.copytree(text_repository / NAME, repository / NAME)
    dyngate = tmp_path / "dyngate"
    dyngate.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m dyngate_cli "$@"\n')
    dyngate.chmod(0o755)
    http, grpc, metrics, gateway_port = free_ports(4)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DYNGATE": str(dyngate), "REPOSITORY": str(repository),
           "TMPDIR": str(tmp_path),  # the kept logs of the killed Tritons stay here
           "PYTHONPATH": os.pathsep.join([str(ROOT / "build"), str(ROOT / "gateway")]),
           "HTTP_PORT": str(http), "GRPC_PORT": str(grpc), "METRICS_PORT": str(metrics),
           "GATEWAY_PORT": str(gateway_port)}
    out_path = tmp_path / "demo.out"
    with open(out_path, "wb") as out:
        demo = subprocess.Popen(["bash", "scripts/demo.sh"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)

    def said() -> str:
        return out_path.read_text(errors="replace")

    def tritons() -> list[int]:
        return [int(p) for p in re.findall(r"Triton ready \(pid (\d+)\)", said())]

    try:
        _wait_for(lambda: _answers(f"http://127.0.0.1:{gateway_port}/") or demo.poll() is not None,
                  "the demo's gateway", detail=lambda: f"; the demo said:\n{said()}")
        assert demo.poll() is None, said()
        gateway = [p.pid for p in psutil.Process(demo.pid).children(recursive=True)
                   if "gateway" in p.cmdline()]
        assert len(gateway) == 1, gateway
        for deaths in range(1, 5):  # serve restarts Triton 3 times, then gives up
            pid = _wait_for(lambda: len(tritons()) >= deaths and tritons()[deaths - 1], f"Triton start {deaths}",
                            detail=lambda: f"; the demo said:\n{said()}")
            os.kill(pid, signal.SIGKILL)
        code = demo.wait(WAIT_S)
        text = said()
        assert code == 1, text
        reason = text.split("dyngate serve stopped (exit status 2), so the demo stops")[1]
        assert "error: Triton" in reason and "giving up" in reason and "Look at the log for the cause (" in reason, text
        assert "Last lines of" in text, text  # Triton's log tail, shown once as serve printed it
        assert "NVML" not in text and "DCGM" not in text, text
        assert _gone(gateway[0]) and _answers(f"http://127.0.0.1:{gateway_port}/") is False
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGTERM)
            demo.wait(60)


def test_demo_refuses_a_taken_gateway_port_before_starting_anything(tmp_path):
    """Found in a trial: with the gateway's port taken, `make demo` started Triton first and then failed with a
    message about `--port`. Every port is checked first, and the message names the make variable."""
    import socket

    dyngate = tmp_path / "dyngate"  # records any start: nothing may be started
    dyngate.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path / "started"}"\n')
    dyngate.chmod(0o755)
    http, grpc, metrics = free_ports(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "DYNGATE": str(dyngate), "REPOSITORY": str(tmp_path / "repo"), "HTTP_PORT": str(http),
               "GRPC_PORT": str(grpc), "METRICS_PORT": str(metrics), "GATEWAY_PORT": str(port)}
        done = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip() == (f"port {port} on 127.0.0.1 (GATEWAY_PORT) is already in use; "
                                   "stop what listens there or choose another: make demo GATEWAY_PORT=<free port>")
    assert not (tmp_path / "started").exists()


def test_demo_names_every_bad_port_variable_before_the_build(tmp_path):
    """Found in a new user's trial: `make demo` checked ports only after its build, named only the first taken
    port, and GATEWAY_PORT=abc started Triton before failing (HTTP_PORT=99999 named `http_port`, not the
    variable). The check runs before the build and names every bad variable."""
    dyngate = tmp_path / "dyngate"
    dyngate.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path / "started"}"\n')
    dyngate.chmod(0o755)
    (grpc,) = free_ports(1)
    env = {**os.environ, "DYNGATE": str(dyngate), "REPOSITORY": str(tmp_path / "repo"), "HTTP_PORT": "99999",
           "GRPC_PORT": str(grpc), "METRICS_PORT": "0", "GATEWAY_PORT": "abc"}
    done = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and not (tmp_path / "started").exists()
    lines = done.stderr.strip().splitlines()
    assert [line.split("=")[0] for line in lines] == ["HTTP_PORT", "METRICS_PORT", "GATEWAY_PORT"], lines
    assert all("is not a TCP port; use an integer in [1, 65535]: make demo" in line for line in lines)
    a, b = free_ports(2)  # equal ports (a trial: serve failed on them only after the build)
    env.update(HTTP_PORT=str(a), GRPC_PORT=str(a), METRICS_PORT=str(b), GATEWAY_PORT=str(b))
    done = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and not (tmp_path / "started").exists()
    assert done.stderr.strip().splitlines() == [
        f"GRPC_PORT={a} is the same port as HTTP_PORT; the four ports must differ: make demo GRPC_PORT=<free port>",
        f"GATEWAY_PORT={b} is the same port as METRICS_PORT; the four ports must differ: make demo "
        "GATEWAY_PORT=<free port>"], done.stderr
    plan = subprocess.run(["make", "-n", "demo", "DYNGATE=dyngate"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60).stdout.splitlines()
    check = next(i for i, line in enumerate(plan) if "demo.sh --check-ports" in line)
    build = next(i for i, line in enumerate(plan) if "dyngate build" in line)
    assert check < build, plan
