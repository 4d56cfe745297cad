"""The load test (gateway/dyngate_measure/load_test.py, `make load`) with small numbers against the embedded Triton and a real
gateway: no errors, and the report's counts agree with Triton's statistics API. No timing assertions.

Fixtures from tests/conftest.py: `built_repository` and `triton`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dyngate_build.errors import ConfigError
from dyngate_measure import load_test
from tests.conftest import running_gateway

ROOT = Path(__file__).resolve().parents[1]
MODEL, VARIANT = "distilbert-tiny", "fp32"
CLIENTS, SECONDS = 20, 5


@pytest.fixture(scope="module")
def gateway(built_repository, triton):
    with running_gateway(built_repository, triton, server_pid=triton.pid) as running:
        yield running


def test_load_run_against_triton_and_gateway(triton, gateway, data_dir, tmp_path):
    from dyngate_serving.client import TritonClient

    name = f"{MODEL}__{VARIANT}"
    with TritonClient(triton.endpoints["grpc"]) as client:
        before = _items(client, name)
    command = [sys.executable, "-m", "dyngate_cli", "load", "--triton", triton.endpoints["grpc"], "--gateway",
               gateway.url, "--model", MODEL, "--variant", VARIANT, "--clients", str(CLIENTS), "--duration",
               str(SECONDS), "--max-requests", "5000", "--data", str(data_dir), "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "load.json").read_text())
    markdown = (tmp_path / "load.md").read_text()
    runs = {r["target"]: r for r in report["runs"]}
    assert set(runs) == {"triton", "gateway"}
    for target, run in runs.items():
        assert run["clients"] == CLIENTS and run["triton_model"] == name
        assert run["errors"] == 0, run["error_messages"]
        assert run["requests"] == run["ok"] > 0
        assert run["p50_ms"] <= run["p99_ms"]
        stats = run["triton"]
        # every answered request reached Triton as exactly one item (policy "variant"); direct clients send one
        # Triton request each, the gateway may merge concurrent ones (AsyncTritonClient) into fewer; executions
        # can only merge requests, never add any
        assert stats["inference_count"] == run["ok"], (target, stats)
        if target == "triton":
            assert stats["success_count"] == run["ok"], (target, stats)
        else:
            assert 1 <= stats["success_count"] <= run["ok"], (target, stats)
        assert 1 <= stats["execution_count"] <= stats["inference_count"]
        assert stats["batching_ratio"] == pytest.approx(stats["inference_count"] / stats["execution_count"], abs=1e-3)
        assert f"| {target} | {CLIENTS} |" in markdown
    # the two runs (plus 5 warm-up requests each) are all of this variant's traffic in the meantime
    with TritonClient(triton.endpoints["grpc"]) as client:
        after = _items(client, name)
    assert after - before == sum(r["ok"] for r in runs.values()) + 2 * 5


def _items(client, model: str) -> int:
    """Items Triton has inferred for `model` (its statistics' inference_count: merged requests count each item)."""
    return sum(int(s.get("inference_count", 0)) for s in client.statistics(model).get("model_stats", []))


def test_load_test_refuses_other_hosts_and_bad_bounds():
    with pytest.raises(ConfigError, match="only targets servers on this machine"):
        load_test.run_load("10.1.2.3:8001", MODEL, targets=("triton",), clients=1, duration_s=1)
    with pytest.raises(ConfigError, match="only targets servers on this machine"):
        load_test.run_load("127.0.0.1:8001", MODEL, gateway_url="http://example.com:7860", clients=1, duration_s=1)
    with pytest.raises(ConfigError, match="needs --gateway"):
        load_test.run_load("127.0.0.1:8001", MODEL, targets=("gateway",), clients=1, duration_s=1)
    with pytest.raises(ConfigError, match="clients=0"):
        load_test.run_load("127.0.0.1:8001", MODEL, clients=0)
    with pytest.raises(ConfigError, match="duration"):
        load_test.run_load("127.0.0.1:8001", MODEL, duration_s=0)
    with pytest.raises(ConfigError, match="needs its scheme"):
        load_test.run_load("127.0.0.1:8001", MODEL, gateway_url="127.0.0.1:7860", clients=1, duration_s=1)
    done = subprocess.run([sys.executable, "-m", "dyngate_cli", "load", "--triton", "192.0.2.1:8001"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "only targets servers on this machine" in done.stderr
    # found in a trial: an --out that cannot be written failed with a traceback after the whole run
    done = subprocess.run([sys.executable, "-m", "dyngate_cli", "load", "--out", "/proc/dyngate-nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--out /proc/dyngate-nope" in done.stderr and "Traceback" not in done.stderr


def test_the_report_folder_is_made_in_one_place_before_the_run(tmp_path):
    """`run_from_args` and `write_report` each created --out; `report_folder` is the one place now, called before
    the run (an --out that cannot be written is refused then), and write_report writes into what it made."""
    out = load_test.report_folder(tmp_path / "reports" / "today")
    assert out.is_dir()
    run = load_test.LoadRun("triton", "127.0.0.1:8001", f"{MODEL}__{VARIANT}", clients=1, duration_s=1, max_requests=1)
    json_path, md_path = load_test.write_report([run], out, "x", "dyngate load")
    assert json.loads(json_path.read_text())["runs"][0]["target"] == "triton" and md_path.parent == out
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    with pytest.raises(ConfigError, match=f"--out {afile / 'sub'}: the report cannot be written there"):
        load_test.report_folder(afile / "sub")


def test_load_drives_a_gateway_with_a_login(built_repository, triton, data_dir, tmp_path):
    """Found by a new user: `dyngate load` sent no login, so a gateway started with one (README's login section)
    answered 401 to every request. It now reads the login as `dyngate gateway` does (environment, else the
    config file) and refuses to start when the gateway answers 401. A handful of requests: no load measured."""
    with running_gateway(built_repository, triton, server_pid=triton.pid, auth=("ada", "s3cret")) as gateway:
        command = [sys.executable, "-m", "dyngate_cli", "load", "--triton", triton.endpoints["grpc"], "--gateway",
                   gateway.url, "--targets", "gateway", "--model", MODEL, "--variant", VARIANT, "--clients", "1",
                   "--duration", "10", "--rounds", "1", "--max-requests", "8", "--data", str(data_dir),
                   "--out", str(tmp_path)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DYNGATE_GATEWAY_")}

        def load(*extra, **login):
            return subprocess.run([*command, *extra], cwd=ROOT, capture_output=True, text=True, timeout=300,
                                  env={**env, **login})

        done = load()
        assert done.returncode == 2 and "asks for a login and none was given (HTTP 401)" in done.stderr, done.stderr
        done = load(DYNGATE_GATEWAY_USER="ada", DYNGATE_GATEWAY_PASSWORD="wrong")
        assert done.returncode == 2 and "refused the login of user 'ada'" in done.stderr, done.stderr
        assert "wrong" not in done.stderr  # the password is never printed
        config = tmp_path / "gateway.json"
        config.write_text(json.dumps({"auth": {"user": "ada", "password": "s3cret"}}))
        for done in (load(DYNGATE_GATEWAY_USER="ada", DYNGATE_GATEWAY_PASSWORD="s3cret"),
                     load("--gateway-config", str(config))):
            assert done.returncode == 0, done.stdout + done.stderr
            run = json.loads((tmp_path / "load.json").read_text())["runs"][0]
            assert run["target"] == "gateway" and run["errors"] == 0, run["error_messages"]
            assert run["requests"] == run["ok"] == 8
