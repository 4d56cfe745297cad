"""The served path: serving settings in one place (ServingOptions -> config.pbtxt, runtime.json, metadata.json),
the empty floor model the bench measures against, and Triton staying healthy under abuse (a client that
disconnects mid-request, a slow client, 1,000 requests queued at once). Counts and health only, no timings."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import numpy as np
import pytest

from dyngate_build.errors import ConfigError, RepositoryError
from dyngate_build.metadata import ServingRecord
from dyngate_build.repository import (FLOOR_NAME, ServingOptions, instances_for, native_config, python_config,
                                      read_config, threads_for, triton_name, write_floor_model)
from dyngate_serving.client import TritonClient
from tests.conftest import run_in_own_loop, running_triton

MODEL = triton_name("distilbert-tiny", "fp32")


@pytest.mark.parametrize("cores, threads, instances", [(1, 1, 1), (2, 1, 1), (4, 2, 1), (8, 4, 1), (16, 4, 2),
                                                       (64, 4, 8)])
def test_threads_and_instances_follow_the_cores(cores, threads, instances):
    assert (threads_for(cores), instances_for(cores)) == (threads, instances)
    assert threads * instances <= max(cores, 1)  # never more engine threads than cores


@pytest.mark.parametrize("field, value", [("threads", 0), ("instances", 0), ("max_batch_size", 0),
                                          ("queue_delay_us", -1), ("threads", 1.5), ("kind", "KIND_TPU")])
def test_serving_options_refuse_bad_values_by_name(field, value):
    with pytest.raises(ConfigError, match=field):
        ServingOptions(**{field: value})


def test_configs_carry_the_serving_options():
    from dyngate_build.families import family_for

    options = ServingOptions(instances=3, threads=2, queue_delay_us=0)
    config = python_config("m__v", "TEXT", 1, options)
    assert config["instance_group"] == [{"count": 3, "kind": "KIND_CPU"}]
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 0}
    for platform, keys in (("onnxruntime_onnx", ("intra_op_thread_count", "inter_op_thread_count")),
                           ("pytorch_libtorch", ("INTRA_OP_THREAD_COUNT", "INTER_OP_THREAD_COUNT"))):
        native = native_config("m__v__native", platform, family_for("distilbert"), 2, None, options)
        assert {k: v["string_value"] for k, v in native["parameters"].items()} == {keys[0]: "2", keys[1]: "1"}
    assert options.as_dict() == {"max_batch_size": 32, "queue_delay_us": 0, "instances": 3, "threads": 2,
                                 "kind": "KIND_CPU"}


def test_built_variants_say_how_they_are_served(built_repository, triton):
    """Every python-backend variant: instances in config.pbtxt, threads in runtime.json, both in metadata.json
    and in the Models tab, all from the one ServingOptions of the build."""
    from dyngate_gateway import models_view
    from dyngate_gateway.handlers import ClientPool

    expected = ServingOptions()
    folder = built_repository / MODEL
    config = read_config(folder)
    assert config.instance_group[0].count == expected.instances
    assert config.dynamic_batching.max_queue_delay_microseconds == expected.queue_delay_us
    runtime = json.loads(next(folder.glob("[0-9]*/runtime.json")).read_text())
    assert runtime["threads"] == expected.threads >= 1
    assert json.loads((folder / "metadata.json").read_text())["serving"] == expected.as_dict()
    rows = [dict(zip(models_view.HEADERS, r))
            for r in models_view.model_rows(built_repository, ClientPool(triton.endpoints["grpc"]))]
    shown = next(r["serving"] for r in rows if r["triton model"] == MODEL)
    assert shown == models_view.serving_text(ServingRecord(**expected.as_dict()))
    assert f"{expected.instances} instance" in shown and f"{expected.threads} thread" in shown


@pytest.fixture(scope="module")
def floor_server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("floor-repo")
    write_floor_model(repository, "TEXT", (3,))
    write_floor_model(repository, "IMAGE", (1, 5), name="token-floor")
    with running_triton(repository, tmp_path_factory.mktemp("floor-log") / "triton.log") as server:
        yield server


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_floor_model_answers_a_constant_with_a_variants_shapes(floor_server, protocol):
    client = TritonClient(floor_server.endpoints[protocol])
    answers = client.predict_batch(FLOOR_NAME, [b"a", "any text at all".encode(), b"\xff"])  # bytes are not read
    assert [a.answer for a in answers] == [{"label": "floor", "score": 1.0}] * 3
    assert all(a.logits.shape == (3,) and not a.logits.any() for a in answers)
    assert client.model_input_name("token-floor") == "IMAGE"
    assert client.predict("token-floor", b"\x89PNG").logits.shape == (1, 5)


def test_floor_model_refuses_to_overwrite(tmp_path):
    write_floor_model(tmp_path)
    with pytest.raises(RepositoryError, match="exists already"):
        write_floor_model(tmp_path)


# ---------------------------------------------------------------------------------------------- faults

def _healthy(server) -> None:
    """Triton answers ready, still lists the variant READY, and answers it over both protocols."""
    for protocol in ("grpc", "http"):
        client = TritonClient(server.endpoints[protocol])
        try:
            assert client.is_ready()
            assert MODEL in client.ready_models()
            assert client.predict(MODEL, b"a fine, warm film").answer["label"]
        finally:
            client.close()


def _success_count(server) -> int:
    client = TritonClient(server.endpoints["http"])
    try:
        stats = client._client.get_inference_statistics(MODEL)["model_stats"][0]["inference_stats"]
        return int(stats["success"]["count"])
    finally:
        client.close()


def test_thousand_requests_queued_at_once_are_all_answered(triton):
    import tritonclient.grpc.aio as grpcaio

    before = _success_count(triton)

    async def main():
        client = grpcaio.InferenceServerClient(triton.endpoints["grpc"].split("://")[1])
        try:
            async def one(i: int):
                tensor = grpcaio.InferInput("TEXT", [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[f"request {i}: a fine film".encode()]], dtype=np.object_))
                result = await client.infer(MODEL, [tensor], client_timeout=300)
                return json.loads(result.as_numpy("RESULT")[0, 0])["label"]

            return await asyncio.gather(*(one(i) for i in range(1000)), return_exceptions=True)
        finally:
            await client.close()

    labels = run_in_own_loop(main())
    failed = [x for x in labels if isinstance(x, BaseException)]
    assert not failed, failed[:3]
    assert len(labels) == 1000 and all(isinstance(x, str) for x in labels)
    deadline = time.monotonic() + 30  # Triton counts a success after the answer has left: the count may lag
    while _success_count(triton) - before < 1000 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _success_count(triton) - before >= 1000
    _healthy(triton)


def test_clients_that_disconnect_mid_request_leave_triton_healthy(triton):
    import tritonclient.grpc.aio as grpcaio

    async def main():
        client = grpcaio.InferenceServerClient(triton.endpoints["grpc"].split("://")[1])
        try:
            tensor = grpcaio.InferInput("TEXT", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([["a long sentence " * 20]], dtype=np.object_))
            tasks = [asyncio.ensure_future(client.infer(MODEL, [tensor])) for _ in range(50)]
            await asyncio.sleep(0.005)
            for task in tasks:  # cancelled in flight: gRPC sends RST_STREAM for each
                task.cancel()
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await client.close()  # and the whole channel goes away with requests still queued

    results = run_in_own_loop(main())
    assert len(results) == 50
    host, port = triton.endpoints["http"].split("://")[1].split(":")
    body = json.dumps({"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["x" * 50]}]})
    request = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
    for _ in range(20):  # HTTP clients that send a whole request and hang up before the answer
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(request)
    _healthy(triton)


def test_a_slow_client_does_not_block_others(triton):
    host, port = triton.endpoints["http"].split("://")[1].split(":")
    body = json.dumps({"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES", "data": ["slow"]}]})
    head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    slow = socket.create_connection((host, int(port)), timeout=30)
    try:
        slow.sendall(head + body[:10].encode())  # the rest comes later, byte by byte
        answered = 0
        for protocol in ("grpc", "http"):
            client = TritonClient(triton.endpoints[protocol])
            try:
                for _ in range(5):
                    assert client.predict(MODEL, b"others are served meanwhile").answer["label"]
                    answered += 1
            finally:
                client.close()
        for char in body[10:]:
            slow.sendall(char.encode())
            time.sleep(0.001)
        reply = b""
        while b"\r\n\r\n" not in reply and (chunk := slow.recv(65536)):
            reply += chunk
        assert answered == 10
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    finally:
        slow.close()
    _healthy(triton)


# ---------------------------------------------------------------------------------------------- the gateway

@pytest.fixture(scope="module")
def gateway(built_repository, triton):
    from tests.conftest import running_gateway

    with running_gateway(built_repository, triton, server_pid=triton.pid) as running:
        yield running


BODY = json.dumps({"model": "distilbert-tiny", "text": "a fine, warm film", "policy": "variant",
                   "variant": "fp32"}).encode()


def _gateway_request(url: str, body: bytes = BODY) -> bytes:
    host, port = url.split("://")[1].split(":")
    return (f"POST /api/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _gateway_healthy(gateway, triton) -> None:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{gateway.url}/api/status", timeout=30) as response:
        assert json.loads(response.read())["triton_ready"] is True
    request = urllib.request.Request(f"{gateway.url}/api/predict", data=BODY,
                                     headers={"content-type": "application/json"})
    with opener.open(request, timeout=30) as response:
        assert json.loads(response.read())["served_by"] == "fp32"
    _healthy(triton)


def test_gateway_answers_a_thousand_requests_queued_at_once(gateway, triton):
    import aiohttp

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False,
                                         timeout=aiohttp.ClientTimeout(total=600)) as session:
            async def one():
                async with session.post(f"{gateway.url}/api/predict", data=BODY,
                                        headers={"content-type": "application/json"}) as response:
                    return response.status, await response.json()

            return await asyncio.gather(*(one() for _ in range(1000)), return_exceptions=True)

    results = run_in_own_loop(main())
    failed = [r for r in results if isinstance(r, BaseException) or r[0] != 200]
    assert not failed, failed[:3]
    assert all(answer["served_by"] == "fp32" for _, answer in results)
    _gateway_healthy(gateway, triton)


def test_gateway_survives_clients_that_hang_up_mid_request_and_slow_clients(gateway, triton):
    host, port = gateway.url.split("://")[1].split(":")
    request = _gateway_request(gateway.url)
    for _ in range(50):  # the whole request, then gone before the answer
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(request)
    for cut in (10, len(request) - 5):  # half a request, then gone
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(request[:cut])
    slow = socket.create_connection((host, int(port)), timeout=60)
    try:
        slow.sendall(request[:len(request) // 2])
        _gateway_healthy(gateway, triton)  # others are answered while the slow one dawdles
        for byte in request[len(request) // 2:]:
            slow.sendall(bytes([byte]))
            time.sleep(0.002)
        reply = b""
        while b"\r\n\r\n" not in reply and (chunk := slow.recv(65536)):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    finally:
        slow.close()
    _gateway_healthy(gateway, triton)


# ------------------------------------------------------------------------- merged requests (AsyncTritonClient)

TEXTS = [f"{word} film, scene {i}" for i, word in enumerate(["a fine", "a dull", "a warm", "a grim"] * 12)]
EMPTY = "\u200d"  # tokenizes to nothing: Triton answers INVALID_ARG "TEXT is empty" (test_inputs_as_hf.py)


def _counts(server) -> tuple[int, int]:
    """(items inferred, requests executed) of MODEL so far, from Triton's statistics."""
    with TritonClient(server.endpoints["http"]) as client:
        stats = client.statistics(MODEL)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["inference_stats"]["success"]["count"])


def _alone(server, texts: list[str]):
    """Each text's Answer from a request of its own."""
    with TritonClient(server.endpoints["grpc"]) as client:
        return [client.predict(MODEL, text.encode()) for text in texts]


def _assert_same(answer: dict, alone: dict) -> None:
    """The same answer up to float rounding (FP32 is batch-invariant: padding is masked)."""
    assert answer.keys() == alone.keys(), (answer, alone)
    for key, value in answer.items():
        if isinstance(value, float):
            assert value == pytest.approx(alone[key], abs=1e-6), (key, answer, alone)
        elif isinstance(value, list) and value and isinstance(value[0], float):
            np.testing.assert_allclose(value, alone[key], rtol=0, atol=1e-6)
        else:
            assert value == alone[key], (key, answer, alone)


def test_gateway_merges_concurrent_requests_for_one_variant_each_answered_as_alone(gateway, triton):
    import aiohttp

    alone = {text: a.answer for text, a in zip(TEXTS, _alone(triton, TEXTS))}
    _, requests = _counts(triton)

    async def main():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False,
                                         timeout=aiohttp.ClientTimeout(total=120)) as session:
            async def one(text):
                body = json.dumps({"model": "distilbert-tiny", "text": text, "policy": "variant", "variant": "fp32"})
                async with session.post(f"{gateway.url}/api/predict", data=body,
                                        headers={"content-type": "application/json"}) as response:
                    return response.status, await response.json()

            return await asyncio.gather(*(one(text) for text in TEXTS))

    results = run_in_own_loop(main())
    for text, (status, answer) in zip(TEXTS, results):
        assert status == 200, answer
        _assert_same(answer["answer"], alone[text])
    _, requests_after = _counts(triton)
    # 48 texts reached Triton in fewer requests: some requests carried several texts
    assert requests_after - requests < len(TEXTS), "the gateway sent every request on its own"


def test_one_bad_input_in_a_merged_request_fails_only_its_own_caller(triton):
    from dyngate_build.errors import InputError
    from dyngate_serving.client import AsyncTritonClient

    texts = TEXTS[:6] + [EMPTY] + TEXTS[6:12]
    alone = _alone(triton, TEXTS[:12])
    items, requests = _counts(triton)

    async def main():
        client = AsyncTritonClient(triton.endpoints["grpc"], protocol="grpc", timeout_s=30, in_flight=1)
        try:
            await client.predict(MODEL, b"warm up")  # the model's signature, so the calls below start together
            # one call in flight: the first text goes alone, the 12 after it wait and go as one merged request
            return await asyncio.gather(*(client.predict(MODEL, text.encode()) for text in texts),
                                        return_exceptions=True)
        finally:
            await client.close()

    results = run_in_own_loop(main())
    bad = results.pop(texts.index(EMPTY))
    assert isinstance(bad, InputError) and "TEXT is empty" in str(bad), bad
    for result, lone in zip(results, alone):
        assert not isinstance(result, BaseException), result
        _assert_same(result.answer, lone.answer)
        np.testing.assert_allclose(result.logits, lone.logits, rtol=0, atol=1e-6)
    items_after, requests_after = _counts(triton)
    # the warm-up and the first text alone, the merged request of 12 that failed, the 12 again one by one
    # (Triton's statistics count a request the model answered with an error as a success)
    assert (items_after - items, requests_after - requests) == (2 + 12 + 12, 2 + 1 + 12)
