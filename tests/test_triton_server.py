"""The embedded Triton server and the client wrapper, against a real tritonserver (no mocks).

The repository is written by hand here: an `echo` python-backend model (upper-cases its TEXT, echoes the
request parameters, INVALID_ARG on bytes that are not UTF-8), a `broken` one whose initialize raises, and a
native-flavour `echo__native` config the embedded server must not try to load.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import psutil
import pytest

from dyngate_build.errors import ConfigError, InputError, ServingError, TritonUnreachable
from dyngate_serving.client import Answer, AsyncTritonClient, TritonClient, model_control_client, parse_address
from dyngate_build.repository import python_backend_models
from dyngate_serving.launcher import TritonServer, TritonServerConfig, repository_models
from dyngate_serving.net import DIRECT, free_ports
from tests.conftest import run_in_own_loop

ECHO_MODEL = textwrap.dedent('''
    import json

    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                values = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
                params = json.loads(request.parameters() or "{}")
                try:
                    texts = [v.decode("utf-8") for v in values]
                except UnicodeDecodeError as e:
                    responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        f"TEXT is not UTF-8: {e}", pb_utils.TritonError.INVALID_ARG)))
                    continue
                result = np.array([[json.dumps({"text": t.upper(), "params": params}).encode()] for t in texts],
                                  dtype=np.object_)
                logits = np.array([[len(t), float(params.get("scale", 1.0))] for t in texts], dtype=np.float32)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("RESULT", result), pb_utils.Tensor("LOGITS", logits)]))
            return responses
''')

ECHO_CONFIG = '''
name: "{name}"
backend: "python"
max_batch_size: 8
input [{{ name: "TEXT" data_type: TYPE_STRING dims: [1] }}]
output [
  {{ name: "RESULT" data_type: TYPE_STRING dims: [1] }},
  {{ name: "LOGITS" data_type: TYPE_FP32 dims: [2] }}
]
instance_group [{{ kind: KIND_CPU count: 1 }}]
dynamic_batching {{}}
'''

BROKEN_MODEL = textwrap.dedent('''
    class TritonPythonModel:
        def initialize(self, args):
            raise RuntimeError("planted failure in initialize")

        def execute(self, requests):
            return []
''')

NATIVE_CONFIG = '''
name: "echo__native"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [{ name: "input_ids" data_type: TYPE_INT64 dims: [-1] }]
output [{ name: "LOGITS" data_type: TYPE_FP32 dims: [2] }]
'''


def _write_model(repository, name, model_py, config):
    (repository / name / "1").mkdir(parents=True)
    if model_py is not None:
        (repository / name / "1" / "model.py").write_text(model_py)
    (repository / name / "config.pbtxt").write_text(config)  # config last, as the repository writer does


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    repo = tmp_path_factory.mktemp("model_repository")
    _write_model(repo, "echo", ECHO_MODEL, ECHO_CONFIG.format(name="echo"))
    _write_model(repo, "broken", BROKEN_MODEL, ECHO_CONFIG.format(name="broken"))
    _write_model(repo, "echo__native", None, NATIVE_CONFIG)
    return repo


def _config(repository, **kwargs) -> TritonServerConfig:
    http, grpc, metrics = free_ports(3)
    return TritonServerConfig(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                              startup_timeout_s=60, **kwargs)


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    """All python-backend models of the repository; `broken` fails to load, which strict=False tolerates."""
    log = tmp_path_factory.mktemp("logs") / "triton.log"
    with TritonServer(_config(repository, strict=False, log_file=log)) as server:
        yield server


def _dead(pids) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def test_repository_scan_picks_python_backend_models(repository):
    assert repository_models(repository) == {"broken": "python", "echo": "python",
                                             "echo__native": "onnxruntime_onnx"}
    assert python_backend_models(repository) == ["broken", "echo"]


def test_server_ready_over_http_grpc_and_metrics(server):
    assert server.is_alive()
    assert server.ready_models() == ["echo"]
    errors = server.model_errors()
    assert "planted failure" in errors["broken"]
    assert "echo__native" not in errors  # never asked to load: explicit model control
    for protocol in ("http", "grpc"):
        client = TritonClient(server.endpoints[protocol])
        assert client.is_ready()
        assert client.ready_models() == ["echo"]
        assert client.model_input_name("echo") == "TEXT"
    with DIRECT.open(server.endpoints["metrics"], timeout=10) as response:
        assert b"nv_inference_count" in response.read()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_predict_and_batch(server, protocol):
    client = TritonClient(server.endpoints[protocol].split("://")[1], protocol=protocol)
    answer = client.predict("echo", "héllo".encode(), {"scale": 2.5, "mode": "fast", "steps": 3, "on": True})
    assert isinstance(answer, Answer) and answer.model == "echo"
    assert answer.answer == {"text": "HÉLLO", "params": {"scale": 2.5, "mode": "fast", "steps": 3, "on": True}}
    np.testing.assert_array_equal(answer.logits, np.array([5, 2.5], dtype=np.float32))
    assert answer.latency_ms > 0

    answers = client.predict_batch("echo", [b"a", b"bb", b"ccc"])
    assert [a.answer["text"] for a in answers] == ["A", "BB", "CCC"]
    assert [float(a.logits[0]) for a in answers] == [1, 2, 3]
    assert len({a.latency_ms for a in answers}) == 1  # one request

    with pytest.raises(InputError, match="max_batch_size 8"):
        client.predict_batch("echo", [b"x"] * 9)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_input_is_input_error_and_next_request_succeeds(server, protocol):
    client = TritonClient(server.endpoints[protocol])
    with pytest.raises(InputError, match="TEXT is not UTF-8"):
        client.predict("echo", b"\xff\xfe")
    with pytest.raises(InputError, match="TEXT is not UTF-8"):
        client.predict_batch("echo", [b"fine", b"\xff"])
    assert client.predict("echo", b"still here").answer["text"] == "STILL HERE"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unknown_or_unloaded_model_is_serving_error(server, protocol):
    client = TritonClient(server.endpoints[protocol])
    for model in ("nope", "echo__native", "broken"):
        with pytest.raises(ServingError, match=rf"model '{model}' is not ready.*ready models: echo"):
            client.predict(model, b"x")


def test_loading_a_native_model_names_the_reason(server):
    with pytest.raises(ServingError, match=r"echo__native.*onnxruntime"):
        server.load_model("echo__native")
    assert server.ready_models() == ["echo"]


# AsyncTritonClient's inference routes: gRPC stub, HTTP beside a gRPC url (infer_url, as the gateway runs with
# --triton-http), and an http:// url
ASYNC_ROUTES = {"grpc": lambda s: {"url": s.endpoints["grpc"]},
                "http beside grpc": lambda s: {"url": s.endpoints["grpc"], "infer_url": s.endpoints["http"]},
                "http": lambda s: {"url": s.endpoints["http"]}}


@pytest.mark.parametrize("route", ASYNC_ROUTES)
def test_async_client_answers_alike_on_every_route(server, route):
    """Same answers, parameters with their JSON types, merged requests and errors whichever way inference goes."""
    async def main():
        client = AsyncTritonClient(**ASYNC_ROUTES[route](server), timeout_s=10)
        try:
            answer = await client.predict("echo", "héllo".encode(), {"scale": 2.5, "mode": "fast", "steps": 3,
                                                                      "on": True})
            merged = await asyncio.gather(*(client.predict("echo", t) for t in [b"a", b"bb", b"ccc"] * 4))
            errors = []
            for model, raw, params in (("echo", b"\xff\xfe", None), ("nope", b"x", None),
                                       ("echo", b"x", {"scale": float("nan")})):
                try:
                    await client.predict(model, raw, params)
                except Exception as e:
                    errors.append(e)
            after = await client.predict("echo", b"still here")
            return answer, merged, errors, after
        finally:
            await client.close()

    answer, merged, errors, after = run_in_own_loop(main())
    assert answer.answer == {"text": "HÉLLO", "params": {"scale": 2.5, "mode": "fast", "steps": 3, "on": True}}
    np.testing.assert_array_equal(answer.logits, np.array([5, 2.5], dtype=np.float32))
    assert [a.answer["text"] for a in merged] == ["A", "BB", "CCC"] * 4
    assert [float(a.logits[0]) for a in merged] == [1, 2, 3] * 4
    assert isinstance(errors[0], InputError) and "TEXT is not UTF-8" in str(errors[0])
    assert isinstance(errors[1], ServingError) and "model 'nope' is not ready" in str(errors[1])
    assert isinstance(errors[2], InputError) and "finite float" in str(errors[2])
    assert after.answer["text"] == "STILL HERE"


def test_async_client_keeps_its_http_connections(server):
    """Sequential calls share one kept-alive connection; concurrent ones open one each and keep them; a kept
    connection the server closed meanwhile is replaced without failing the call."""
    async def main():
        client = AsyncTritonClient(server.endpoints["grpc"], infer_url=server.endpoints["http"], timeout_s=10,
                                   in_flight=0)
        try:
            for _ in range(5):
                await client.predict("echo", b"x")
            sequential = len(client._http._idle)
            await asyncio.gather(*(client.predict("echo", b"x") for _ in range(3)))
            concurrent = len(client._http._idle)
            for _, writer in client._http._idle:  # as if the server had closed them while idle
                writer.transport.abort()
            answer = await client.predict("echo", b"again")
            return sequential, concurrent, answer
        finally:
            await client.close()

    sequential, concurrent, answer = run_in_own_loop(main())
    assert (sequential, concurrent) == (1, 3)
    assert answer.answer["text"] == "AGAIN"


def _predict_error(server, infer_url: str) -> ServingError:
    """The error of one predict of `echo` with inference sent to `infer_url` (metadata from the server's gRPC)."""
    async def main():
        client = AsyncTritonClient(server.endpoints["grpc"], infer_url=infer_url, timeout_s=5)
        try:
            await client.predict("echo", b"x")
        except ServingError as e:
            return e
        finally:
            await client.close()
        raise AssertionError(f"a predict with inference to {infer_url} was answered")

    return run_in_own_loop(main())


def test_async_client_names_an_unreachable_http_endpoint(server):
    (port,) = free_ports(1)
    grpc_port = server.endpoints["grpc"].rsplit(":", 1)[1]
    closed = _predict_error(server, f"127.0.0.1:{port}")
    assert isinstance(closed, TritonUnreachable)
    assert f"Triton at http://127.0.0.1:{port} is not reachable" in str(closed) and "--triton-http" in str(closed)
    wrong = str(_predict_error(server, f"127.0.0.1:{grpc_port}"))
    assert "its answer is not HTTP/1.1" in wrong and "it is Triton's gRPC port, not its HTTP port" in wrong


def test_triton_metrics_port_as_http_endpoint_is_named_so(server):
    """Found in a new user's trial: --triton-http on the metrics port showed a green status (it answers every GET
    with 200) while every predict failed with "Triton at <gRPC address> ... Method Not Allowed"."""
    from dyngate_gateway.handlers import ClientPool, triton_status

    metrics = server.endpoints["metrics"].split("://")[1].split("/")[0]
    message = str(_predict_error(server, metrics))
    assert f"http://{metrics} answered HTTP 405" in message and "not as Triton does (GET /v2" in message, message
    ready, line = triton_status(ClientPool(server.endpoints["grpc"], infer_url=metrics), {})
    assert not ready and "--triton-http" in line and "metrics port" in line, line
    ready, line = triton_status(ClientPool(server.endpoints["grpc"], infer_url=server.endpoints["http"]), {})
    assert ready, line


def test_a_call_the_server_cancels_is_triton_unreachable_not_a_crash(server):
    """Found in a new user's trial: while Triton shut down, grpc.aio raised asyncio.CancelledError out of a
    metadata call (a BaseException: no `except Exception` caught it) and the gateway answered a plain-text 500.
    A cancellation of the calling task itself stays a cancellation."""
    async def cancelled_by_the_server():
        raise asyncio.CancelledError()

    async def main():
        client = AsyncTritonClient(server.endpoints["grpc"], timeout_s=5)
        try:
            try:
                await client._call(cancelled_by_the_server())
            except TritonUnreachable as e:
                served = str(e)
            task = asyncio.ensure_future(client._call(asyncio.sleep(10)))
            await asyncio.sleep(0.05)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return served, "cancelled"
            return served, "not cancelled"
        finally:
            await client.close()

    served, own = run_in_own_loop(main())
    assert "cancelled the call (shutting down or restarting)" in served and own == "cancelled"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unreachable_server(protocol):
    (port,) = free_ports(1)
    client = TritonClient(f"127.0.0.1:{port}", protocol=protocol, timeout_s=5)
    assert client.is_ready() is False
    with pytest.raises(ServingError, match=rf"Triton at 127.0.0.1:{port} is not reachable"):
        client.ready_models()
    with pytest.raises(ServingError, match="is not reachable"):
        client.predict("echo", b"x")


def test_http_port_given_as_grpc_says_so(server):
    """Found in a trial: Triton's HTTP port given where gRPC is expected said only "Socket closed"."""
    http = server.endpoints["http"].split("://", 1)[1]
    for client in (TritonClient(http, protocol="grpc", timeout_s=10), model_control_client(http)):
        with pytest.raises(TritonUnreachable, match="may be Triton's HTTP port .* gRPC") as caught:
            client.ready_models()
        assert f"{http.rsplit(':', 1)[0]}:8001" in str(caught.value)

    async def aio():
        client = AsyncTritonClient(http, protocol="grpc", timeout_s=10)
        try:
            await client.ready_models()
        finally:
            await client.close()

    with pytest.raises(TritonUnreachable, match="may be Triton's HTTP port"):
        run_in_own_loop(aio())
    with pytest.raises(TritonUnreachable) as caught:  # a closed port is not called an HTTP port
        TritonClient(f"127.0.0.1:{free_ports(1)[0]}", timeout_s=5).ready_models()
    assert "HTTP port" not in str(caught.value)


def test_gateway_status_names_the_http_port_given_as_grpc(server):
    """Found by a new user: `dyngate gateway --triton HOST:8000` (Triton's HTTP port) said only that Triton was
    down or restarting; its status line (page and /api/status) now says the port answers HTTP, and the fix."""
    from dyngate_gateway.handlers import ClientPool, triton_status

    http = server.endpoints["http"].split("://", 1)[1]
    ready, line = triton_status(ClientPool(http), {})
    assert not ready
    assert f"{http} answers HTTP, not gRPC" in line and "down or restarting" not in line
    assert f"{http.rsplit(':', 1)[0]}:8001" in line and f"http://{http}" in line
    ready, line = triton_status(ClientPool(f"127.0.0.1:{free_ports(1)[0]}"), {})  # nothing there: down
    assert not ready and "down or restarting" in line and "answers HTTP" not in line


def test_a_port_that_is_not_triton_is_named_so(server):
    """Found in a trial: `dyngate predict --triton HOST:8002` (Triton's metrics port) or a gateway's port was
    called "Triton's HTTP port" with an http:// url as the fix, which failed too; and `dyngate load --triton
    HOST:8000` said only that the model was not ready."""
    from dyngate_serving.endpoints import protocol_mismatch

    metrics = server.endpoints["metrics"].split("://", 1)[1].split("/", 1)[0]
    hint = protocol_mismatch(metrics, "grpc")
    assert "not as Triton does" in hint and "answers HTTP, not gRPC" not in hint
    http = server.endpoints["http"].split("://", 1)[1]
    done = subprocess.run([sys.executable, "-m", "dyngate_cli", "load", "--triton", http, "--clients", "1",
                           "--duration", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and f"{http} answers HTTP, not gRPC" in done.stderr, done.stderr


def test_http_scheme_on_the_grpc_port_says_so(server, capsys):
    """Found by a new user: `dyngate predict --triton http://HOST:8001` said "answered with an error: ('Expected
    HTTP/, RTSP/ or ICE/', 8)"; every HTTP client now names the gRPC port and the fix."""
    from dyngate_cli import main as cli_main

    grpc = server.endpoints["grpc"].split("://", 1)[1]
    hint = f"{grpc} answers gRPC (HTTP/2), not HTTP/1.1"
    with pytest.raises(TritonUnreachable, match=re.escape(hint)) as caught:
        TritonClient(f"http://{grpc}", timeout_s=10).ready_models()
    assert f"http://{grpc.rsplit(':', 1)[0]}:8000" in str(caught.value)

    async def aio():
        client = AsyncTritonClient(f"http://{grpc}", timeout_s=10)
        try:
            await client.ready_models()
        finally:
            await client.close()

    with pytest.raises(TritonUnreachable, match=re.escape(hint)):
        run_in_own_loop(aio())
    assert cli_main(["predict", "--model", "echo", "--text", "x", "--triton", f"http://{grpc}"]) == 2
    err = capsys.readouterr().err
    assert hint in err and "drop http://" in err and "Expected HTTP/" in err
    with pytest.raises(TritonUnreachable) as caught:  # a closed port is not called a gRPC port
        TritonClient(f"http://127.0.0.1:{free_ports(1)[0]}", timeout_s=5).ready_models()
    assert "answers gRPC" not in str(caught.value)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1", ("127.0.0.1:8001", "grpc")),  # no port: Triton's gRPC port, not gRPC's 443
    ("grpc://127.0.0.1:9001/", ("127.0.0.1:9001", "grpc")), ("http://127.0.0.1", ("127.0.0.1:8000", "http")),
    ("[::1]", ("[::1]:8001", "grpc")), ("localhost:18001", ("localhost:18001", "grpc"))])
def test_one_parser_for_triton_addresses(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "127.0.0.1:", "h:abc", "h:70000", "h:0", "https://h:8001", "::1",
                                  "h:8001/v2", "[::1"])
def test_malformed_triton_addresses_are_refused_by_name(text):
    with pytest.raises(ConfigError, match="--triton"):
        parse_address(text, what="--triton")


def test_every_subcommand_reads_triton_addresses_alike(server, tmp_path, capsys):
    """One parser for --triton: gateway and load refuse an http:// URL as build and reload do; predict takes
    --triton (and --url, its alias), and the HTTP port given as gRPC is named as such."""
    from dyngate_cli import main as cli_main, make_parser

    http = server.endpoints["http"]
    for argv in (["build", "--model", "distilbert-tiny", "--triton", http], ["reload", "--model", "m", "--variant",
                 "v", "--triton", http], ["gateway", "--repository", str(tmp_path), "--triton", http],
                 ["load", "--model", "m", "--triton", http]):
        assert cli_main(argv) == 2, argv
        assert "is Triton's HTTP endpoint" in capsys.readouterr().err, argv
    assert cli_main(["gateway", "--repository", str(tmp_path), "--triton", "127.0.0.1:x"]) == 2
    assert "--triton='127.0.0.1:x': port 'x' is not a number" in capsys.readouterr().err
    parser = make_parser(["predict"])
    assert parser.parse_args(["predict", "--model", "m", "--triton", "h:1"]).triton == "h:1"
    assert parser.parse_args(["predict", "--model", "m", "--url", "h:1"]).triton == "h:1"
    assert cli_main(["predict", "--model", "echo", "--text", "x", "--triton", http.split("://")[1]]) == 2
    assert "may be Triton's HTTP port" in capsys.readouterr().err


def test_busy_port_is_serving_error(repository, tmp_path):
    config = _config(repository, models=["echo"], log_file=tmp_path / "triton.log")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", config.grpc_port))
        busy.listen()
        server = TritonServer(config)
        with pytest.raises(ServingError, match=rf"grpc port {config.grpc_port} .*already in use"):
            server.start()
        assert not server.is_alive()


def test_strict_start_fails_on_a_broken_model_with_the_log_tail(repository, tmp_path):
    server = TritonServer(_config(repository, models=["broken"], log_file=tmp_path / "triton.log"))
    with pytest.raises(ServingError, match=r"(?s)failed to load.*broken.*planted failure.*Last lines of"):
        server.start()
    assert not server.is_alive()


def test_a_temporary_log_is_removed_after_a_clean_stop_and_kept_when_triton_fails(repository, tmp_path,
                                                                                  monkeypatch):
    """Found in a new user's trial: every `dyngate serve` left a /tmp/dyngate-triton-<port>-*.log behind. Without
    a log_file the log is a temporary file: gone after a stop of a server that ran; kept, and named in the error,
    when the start fails or the server exits on its own (a log_file given is never removed: the other tests)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkstemp puts it
    with TritonServer(_config(repository, models=["echo"])) as server:
        log = server.log_path
        assert log.parent == tmp_path and log.name.startswith("dyngate-triton-") and log.stat().st_size > 0
    assert not log.exists()

    server = TritonServer(_config(repository, models=["broken"]))
    with pytest.raises(ServingError, match="failed to load") as failed:
        server.start()
    assert f"Last lines of {server.log_path}:" in str(failed.value) and server.log_path.exists()

    server = TritonServer(_config(repository, models=["echo"])).start()
    try:
        server._process.send_signal(signal.SIGKILL)  # dies on its own, as far as the launcher knows
        server._process.wait(30)
    finally:
        server.stop()
    assert server.log_path.exists()
    assert len(list(tmp_path.glob("dyngate-triton-*.log"))) == 2  # the two failures' logs, not the clean one's


def test_reload_and_stop_leave_no_processes(repository, tmp_path):
    server = TritonServer(_config(repository, models=["echo"], log_file=tmp_path / "triton.log"))
    with server:
        client = TritonClient(server.endpoints["grpc"])
        assert client.predict("echo", b"one").answer["text"] == "ONE"  # caches the model's signature
        server.unload_model("echo")
        with pytest.raises(ServingError, match="model 'echo' is not ready"):
            client.predict("echo", b"two")
        server.load_model("echo")
        assert client.predict("echo", b"three").answer["text"] == "THREE"
        pids = [server.pid] + [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
        names = {psutil.Process(pid).name() for pid in pids}
        assert {"tritonserver", "triton_python_backend_stub"} <= names
    assert not server.is_alive()
    assert _dead(pids)
    server.stop()  # idempotent
    assert not TritonClient(server.endpoints["http"]).is_ready()


def test_log_file_holds_the_server_output(server):
    text = server.log_path.read_text()
    assert "Started GRPCInferenceService" in text
    assert json.loads(json.dumps(server.endpoints))["grpc"].startswith("grpc://127.0.0.1:")
