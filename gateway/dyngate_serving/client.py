"""dyngate's one Triton client: inference on dyngate variants and Triton's repository API.

Every dyngate variant takes one BYTES input (TEXT or IMAGE, shape [batch, 1]) and returns RESULT (BYTES, one
JSON answer per item) and LOGITS (FP32). `TritonClient` wraps `tritonclient.http` or `tritonclient.grpc` and
turns Triton's errors into dyngate's:
- server unreachable -> TritonUnreachable("Triton at <url> is not reachable: ...")
- unknown or unloaded model -> ServingError naming the model and listing the ready ones
- INVALID_ARG answered by the model (bad text, undecodable image, batch too large) -> InputError

The repository API (`index`, `versions`, `ready_models`, `model_errors`, `statistics`) works over either
protocol; model control (`load`, `unload`) only over gRPC: Triton 2.51's HTTP front end stalls HTTP inference
on *other* models for 3.9-8.7 s while an HTTP load runs, a gRPC load stalls nothing (DESIGN.md).
`model_control_client(address)` makes the client `dyngate reload`, `dyngate build --triton`, the Models tab
and `dyngate serve` use for it.

tritonclient clients are NOT thread-safe: create one `TritonClient` per thread (they are cheap).

    client = TritonClient("grpc://127.0.0.1:8001")
    answer = client.predict("distilbert-tiny__fp32", b"a fine film", {"exit_threshold": 0.9})
    answer.answer, answer.logits.shape, answer.latency_ms
    client.load("distilbert-tiny__fp32"); client.ready_models()
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import json
import time
from dataclasses import dataclass, field
from typing import Literal

import httptools
import numpy as np

from dyngate_build.errors import ConfigError, InputError, ServingError, TritonUnreachable
from dyngate_serving.endpoints import DEFAULT_PORTS, http_endpoint_problem, protocol_mismatch

PROTOCOLS = ("grpc", "http")
CONTROL_TIMEOUT_S = 600.0  # a load answers once the model is READY or failed: a torch variant takes a while
# AsyncTritonClient: calls in flight per (model, parameters) before requests are merged. Measured (dyngate load,
# distilbert-tiny fp32, one instance, 2 cores): 2 gave 96% of direct Triton's throughput at 32 and 100 clients,
# 1 gave 86% / 81% (Triton idles between calls), 4 gave 85% / 83% (smaller merged requests).
COALESCE_IN_FLIGHT = 2
# ms: the longest a gRPC channel waits between attempts to reach a Triton that went away (gRPC's default: 120 s)
RECONNECT_BACKOFF_MAX_MS = 1000


@dataclass
class Answer:
    """One item's answer: `answer` parsed from RESULT's JSON, its `logits` row, the request's round trip in ms."""

    answer: dict
    logits: np.ndarray
    latency_ms: float
    model: str


@dataclass(frozen=True)
class _Signature:
    input_name: str
    result_name: str
    logits_name: str
    max_batch_size: int


class TritonClient:
    """Talks to one Triton server over gRPC or HTTP. Not thread-safe: one instance per thread.

    url: "host:port", or with a scheme ("grpc://host:port", "http://host:port") that also gives the protocol.
    protocol: "grpc" or "http"; may be left out when the url has a scheme.
    timeout_s: connection and request timeout.
    """

    def __init__(self, url: str, protocol: Literal["grpc", "http"] | None = None, timeout_s: float = 30):
        self.url, self.protocol, self._module, self._client = _make(url, protocol, timeout_s, aio=False)
        self.timeout_s = timeout_s
        self._signatures: dict[str, _Signature] = {}

    # ---- server state

    def is_ready(self) -> bool:
        """True when the server answers ready; never raises."""
        try:
            return bool(self._call(self._client.is_server_ready))
        except Exception:
            return False

    def server_metadata(self) -> dict:
        """Triton's server metadata: {"name", "version", "extensions"}."""
        return self._call(self._client.get_server_metadata, json=True)

    # ---- repository API

    def index(self) -> list[dict]:
        """Triton's repository index: one {"name", "version", "state", "reason"} per model version it knows,
        plus one bare {"name"} per model folder it never loaded."""
        index = self._call(self._client.get_model_repository_index, json=True)
        return list(index.get("models", []) if isinstance(index, dict) else index or [])

    def versions(self, name: str) -> dict[int, dict]:
        """Version -> its index entry, for the versions of model `name` Triton knows."""
        return {int(m["version"]): m for m in self.index()
                if m.get("name") == name and str(m.get("version") or "").isdigit()}

    def ready_models(self) -> list[str]:
        """Names of the models that are loaded and ready, sorted."""
        return sorted({m["name"] for m in self.index() if m.get("state") == "READY"})

    def model_errors(self) -> dict[str, str]:
        """Model -> Triton's reason, for the models Triton tried to load and could not."""
        return {m["name"]: m.get("reason") or m.get("state") for m in self.index()
                if m.get("state") == "UNAVAILABLE" and m.get("reason") and m["reason"] != "unloaded"}

    def statistics(self, model: str) -> dict:
        """Triton's cumulative inference statistics of `model` ({"model_stats": [...]}, Triton's JSON)."""
        if self.protocol == "grpc":
            return self._call(lambda **kw: self._client.get_inference_statistics(model, **kw), json=True)
        return self._call(lambda **kw: self._client.get_inference_statistics(model, **kw))

    def load(self, name: str, timeout_s: float = CONTROL_TIMEOUT_S) -> None:
        """Load (or reload: newest version in, old one out once the new one is READY) one model over gRPC.

        Raises TritonUnreachable, ConfigError on an HTTP client (see the module docstring), or ServingError
        with Triton's reason (without its traceback) when the model does not load; Triton then keeps serving
        the versions it had."""
        self._control("load", name, timeout_s)

    def unload(self, name: str, timeout_s: float = CONTROL_TIMEOUT_S) -> None:
        """Unload one model over gRPC (Triton answers before its instances have stopped); errors as `load`."""
        self._control("unload", name, timeout_s)

    def model_input_name(self, model: str) -> str:
        """The model's input tensor name (TEXT or IMAGE), from its metadata; cached per model."""
        return self._signature(model).input_name

    # ---- inference

    def predict(self, model: str, raw: bytes, params: dict | None = None) -> Answer:
        """Send one input (text as UTF-8 bytes, or encoded image bytes); return its answer."""
        return self.predict_batch(model, [raw], params)[0]

    def predict_batch(self, model: str, raws: list[bytes], params: dict | None = None) -> list[Answer]:
        """Send `raws` as ONE request of shape [n, 1]; one Answer per item, all with the request's latency."""
        if not raws:
            raise InputError("predict_batch got no inputs; pass at least one")
        raws = [r.encode() if isinstance(r, str) else bytes(r) for r in raws]
        signature = self._signature(model)
        if signature.max_batch_size and len(raws) > signature.max_batch_size:
            raise InputError(f"{len(raws)} inputs in one request exceed {model}'s max_batch_size "
                             f"{signature.max_batch_size}; send at most {signature.max_batch_size} at a time")
        tensor, outputs = _request(self._module, self.protocol, signature, raws)
        started = time.perf_counter()
        try:
            if self.protocol == "grpc":
                result = self._client.infer(model, [tensor], outputs=outputs, parameters=params or None,
                                            client_timeout=self.timeout_s)
            else:
                result = self._client.infer(model, [tensor], outputs=outputs, parameters=params or None)
        except Exception as e:
            raise self._infer_error(model, e) from e
        return _answers(result, signature, model, (time.perf_counter() - started) * 1000)

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:
            pass

    def __enter__(self) -> "TritonClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- helpers

    def _control(self, action: str, name: str, timeout_s: float) -> None:
        if self.protocol != "grpc":
            raise ConfigError(f"{action} of {name!r} through Triton's HTTP endpoint {self.url}: model control goes "
                              "over gRPC (an HTTP load stalls HTTP inference on other models for seconds); give "
                              "Triton's gRPC address, e.g. 127.0.0.1:8001")
        method = getattr(self._client, f"{action}_model")
        try:
            method(name, client_timeout=timeout_s)
        except Exception as e:
            if _unreachable(e):
                raise self._unreachable_error(e) from e
            raise ServingError(f"Triton at {self.url} could not {action} {name!r}: {short_reason(_message(e))}") \
                from e

    def _unreachable_error(self, e: Exception) -> TritonUnreachable:
        return _unreachable_error(self.url, e, protocol_mismatch(self.url, self.protocol))

    def _call(self, method, *, json: bool = False):
        """Call one tritonclient method with our timeout; TritonUnreachable when the server cannot be reached,
        ServingError when it answers with an error."""
        kwargs = {}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout_s
            if json:
                kwargs["as_json"] = True
        try:
            return method(**kwargs)
        except Exception as e:
            if _unreachable(e):
                raise self._unreachable_error(e) from e
            raise ServingError(f"Triton at {self.url} answered with an error: {_message(e)}") from e

    def _signature(self, model: str) -> _Signature:
        if model in self._signatures:
            return self._signatures[model]
        try:
            if self.protocol == "grpc":
                meta = self._client.get_model_metadata(model, as_json=True, client_timeout=self.timeout_s)
                config = self._client.get_model_config(model, as_json=True, client_timeout=self.timeout_s)["config"]
            else:
                meta = self._client.get_model_metadata(model)
                config = self._client.get_model_config(model)
        except Exception as e:
            raise self._model_error(model, e) from e
        signature = _signature_from(model, meta, config)
        self._signatures[model] = signature
        return signature

    def _model_error(self, model: str, e: Exception) -> ServingError:
        if _unreachable(e):
            return self._unreachable_error(e)
        try:
            return self._not_ready(model) or ServingError(f"Triton at {self.url} failed on model {model!r}: "
                                                          f"{_message(e)}")
        except ServingError as inner:
            return inner

    def _not_ready(self, model: str) -> ServingError | None:
        """The error for a model Triton does not have READY, or None when it is READY."""
        ready = self.ready_models()
        if model in ready:
            return None
        return ServingError(f"model {model!r} is not ready on Triton at {self.url}; ready models: "
                            f"{', '.join(ready) or 'none'}")

    def _infer_error(self, model: str, e: Exception) -> Exception:
        if _unreachable(e):
            return self._unreachable_error(e)
        status = str(getattr(e, "status", lambda: "")() or "")
        if status in ("StatusCode.INVALID_ARGUMENT", "400"):
            self._signatures.pop(model, None)  # a reloaded model may have changed; look again next time
            try:
                not_ready = self._not_ready(model)
            except ServingError:
                not_ready = None
            return not_ready or InputError(f"{model}: {_message(e)}")
        return self._model_error(model, e)


class AsyncTritonClient:
    """The asyncio twin of `TritonClient` for servers that answer many requests at once (the gateway): one
    `tritonclient.grpc.aio` (or `.http.aio`) client whose connection every request of one event loop shares,
    so no thread waits on Triton and no call blocks the loop. Same answers (`Answer`) and the same errors as
    `TritonClient` (InputError, TritonUnreachable, ServingError). Use it only on the event loop it was first
    used on. Over gRPC, `predict` calls the generated stub on that client's channel with a request made once per
    model (`_LeanInfer`), and merges concurrent requests (`_Lane`): as Triton's own dynamic batcher with no queue
    delay, a request never waits for company, but requests that arrive while `in_flight` calls for the same model
    and parameters are under way are sent together as one [n, 1] request (n ≤ the model's max_batch_size) as soon
    as one of those calls returns. Each caller gets its own item's answer, with the merged call's latency. If a
    merged call fails with an error from Triton (one bad input fails the whole request), its items are sent
    again one by one, so each caller gets its own input's answer or error. FP32 answers do not depend on their
    neighbours (padding is masked); int8-dynamic and early-exit answers do, as under Triton's dynamic batcher.

    Inference over HTTP (`infer_url`, or an http:// `url`) goes through `_HttpConnections`: kept-alive HTTP/1.1
    connections on the event loop itself, Triton's binary tensor extension, answers read by httptools. Measured on
    2 cores (scripts/bench_gateway.py's third check: distilbert-tiny fp32, batch 1, one process, the routes in
    turn, three runs of 800): 1.50-2.26 ms p50 against 1.76-2.58 ms for the same requests as grpc.aio calls
    (whose answers reach the loop from gRPC's poller thread; 0.23-0.31 ms more in each run) and 1.69-2.55 ms for
    tritonclient's blocking gRPC client. Model control and metadata stay on `url`.

    url, protocol, timeout_s: as for `TritonClient`; timeout_s bounds each call (the gRPC deadline of `predict`,
    asyncio.wait_for elsewhere). in_flight: calls in flight per (model, parameters) before requests are merged;
    0 sends every request on its own. infer_url: Triton's HTTP endpoint ("HOST:PORT" or "http://HOST:PORT") for
    `predict` when `url` is its gRPC one; None: `predict` uses `url`'s protocol. ConfigError for a malformed
    address or in_flight.
    """

    def __init__(self, url: str, protocol: Literal["grpc", "http"] | None = None, timeout_s: float = 30,
                 in_flight: int = COALESCE_IN_FLIGHT, infer_url: str | None = None):
        if not isinstance(in_flight, int) or in_flight < 0:
            raise ConfigError(f"in_flight={in_flight!r} must be an integer ≥ 0 (0 sends every request on its own)")
        self.url, self.protocol, _, self._client = _make(url, protocol, timeout_s, aio=True)
        self.timeout_s = timeout_s
        self.in_flight = in_flight
        self._lanes: dict[tuple, _Lane] = {}
        self._tasks: set[asyncio.Task] = set()  # merged calls under way (a reference keeps each task alive)
        self._http: _HttpConnections | None = None
        if infer_url is not None or self.protocol == "http":
            self._http = _HttpConnections(parse_address(infer_url or self.url, "http", "infer_url")[0])
        if self.protocol == "grpc":
            from tritonclient.grpc import service_pb2_grpc

            # Inference goes straight to the generated stub on the client's one channel (`_channel`, tritonclient
            # 2.x): `_LeanInfer` fills a request made once per model; tritonclient's InferInput/InferResult path
            # measured ~0.4 ms more per call (the gateway's largest cost per request).
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._client._channel)
        self._signatures: dict[str, _Signature] = {}
        self._lean: dict[str, _LeanInfer] = {}

    async def is_ready(self) -> bool:
        """True when the server answers ready; never raises."""
        try:
            return bool(await self._call(self._client.is_server_ready()))
        except Exception:
            return False

    async def ready_models(self) -> list[str]:
        """Names of the models that are loaded and ready; ServingError when Triton cannot be reached."""
        if self.protocol == "grpc":
            index = await self._call(self._client.get_model_repository_index(as_json=True))
        else:
            index = await self._call(self._client.get_model_repository_index())
        models = index.get("models", []) if isinstance(index, dict) else index
        return sorted({m["name"] for m in models if m.get("state") == "READY"})

    async def predict(self, model: str, raw: bytes, params: dict | None = None) -> Answer:
        """Send one input (text as UTF-8 bytes, or encoded image bytes); return its answer."""
        raw = raw.encode() if isinstance(raw, str) else bytes(raw)
        signature = await self._signature(model)
        lean = self._lean.get(model)
        if lean is None or lean.signature != signature:
            lean = self._lean[model] = _LeanInfer(model, signature)
        if not self.in_flight or signature.max_batch_size < 2:
            return (await self._infer(lean, [raw], params))[0]
        key = (model, tuple(sorted((k, repr(v)) for k, v in (params or {}).items())))  # 1, 1.0 and True differ
        lane = self._lanes.setdefault(key, _Lane(params))
        if lane.in_flight < self.in_flight and not lane.waiting:
            lane.in_flight += 1
            try:
                return (await self._infer(lean, [raw], params))[0]
            finally:
                lane.in_flight -= 1
                self._drain(key, lane)
        future = asyncio.get_running_loop().create_future()
        lane.waiting.append((raw, future))
        return await future

    def _drain(self, key: tuple, lane: "_Lane") -> None:
        """Send what waits in `lane` as merged calls while it has calls to spare; drop the lane once idle."""
        while lane.waiting and lane.in_flight < self.in_flight:
            lean = self._lean[key[0]]
            batch = []
            while lane.waiting and len(batch) < lean.signature.max_batch_size:
                raw, future = lane.waiting.popleft()
                if not future.done():  # its caller gave up (cancelled) while it waited
                    batch.append((raw, future))
            if batch:
                lane.in_flight += 1
                task = asyncio.get_running_loop().create_task(self._merged(key, lane, lean, batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        if not lane.in_flight and not lane.waiting and self._lanes.get(key) is lane:
            del self._lanes[key]

    async def _merged(self, key: tuple, lane: "_Lane", lean: "_LeanInfer",
                      batch: list[tuple[bytes, asyncio.Future]]) -> None:
        """One merged call for `batch` ((input, its caller's future) pairs); each future gets its item's answer."""
        raws = [raw for raw, _ in batch]
        try:
            try:
                results: list = await self._infer(lean, raws, lane.params)
            except (InputError, ServingError) as e:
                if len(batch) == 1 or isinstance(e, TritonUnreachable):
                    raise
                # Triton failed the whole request (triton_model.py answers it with its first bad item's error):
                # ask again one by one, so one bad input fails only its own caller
                results = await asyncio.gather(*(self._infer(lean, [raw], lane.params) for raw in raws),
                                               return_exceptions=True)
                results = [r if isinstance(r, BaseException) else r[0] for r in results]
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        except asyncio.CancelledError:  # the event loop is shutting down: no caller may wait forever
            for _, future in batch:
                future.cancel()
            raise
        except Exception as e:
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
        finally:
            lane.in_flight -= 1
            self._drain(key, lane)

    async def _infer(self, lean: "_LeanInfer", raws: list[bytes], params: dict | None) -> list[Answer]:
        """One inference request of `raws` as a [n, 1] tensor (HTTP when `_http` is set, else gRPC ModelInfer);
        one Answer per item."""
        if self._http is not None:
            return await self._infer_http(lean, raws, params)
        request = lean.request(raws, params)
        started = time.perf_counter()
        try:
            response = await self._stub.ModelInfer(request, timeout=self.timeout_s)
        except asyncio.CancelledError as e:
            raise self._cancelled(e) from e
        except Exception as e:
            raise await self._infer_error(lean.model, _grpc_error(e)) from e
        return lean.answers(response, len(raws), (time.perf_counter() - started) * 1000)

    async def _infer_http(self, lean: "_LeanInfer", raws: list[bytes], params: dict | None) -> list[Answer]:
        """`_infer` over Triton's HTTP endpoint (binary tensor extension)."""
        request = lean.http_request(raws, params)
        started = time.perf_counter()
        url = f"http://{self._http.address}"
        try:
            status, headers, body = await asyncio.wait_for(self._http.post(request), self.timeout_s)
        except (OSError, EOFError, TimeoutError, httptools.HttpParserError) as e:
            problem = await asyncio.to_thread(http_endpoint_problem, self._http.address)
            reason = "its answer is not HTTP/1.1" if isinstance(e, httptools.HttpParserError) else _message(e)
            raise TritonUnreachable(f"Triton at {url} is not reachable: {reason}"
                                    + (f"; {problem}" if problem else "")) from e
        if status != 200:
            from tritonclient.utils import InferenceServerException

            try:
                message = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                message = body[:400].decode("utf-8", "replace") or f"HTTP {status}"
            if status != 400:  # Triton answers a bad input or an unknown model with 400; is this Triton at all?
                problem = await asyncio.to_thread(http_endpoint_problem, self._http.address)
                if problem:
                    raise ServingError(f"{url} answered HTTP {status} ({message}) to an inference request: {problem}")
            raise await self._infer_error(lean.model, InferenceServerException(msg=message, status=str(status)))
        return lean.http_answers(headers, body, len(raws), (time.perf_counter() - started) * 1000)

    async def close(self) -> None:
        """Close the connections; merged calls under way then fail, and their callers get the error."""
        if self._http is not None:
            self._http.close()
        try:
            await self._client.close()
        except Exception:
            pass

    async def _call(self, awaitable):
        try:
            return await asyncio.wait_for(awaitable, self.timeout_s)
        except asyncio.CancelledError as e:
            raise self._cancelled(e) from e
        except Exception as e:
            if _unreachable(e):
                hint = await asyncio.to_thread(protocol_mismatch, self.url, self.protocol)
                raise _unreachable_error(self.url, e, hint) from e
            raise ServingError(f"Triton at {self.url} answered with an error: {_message(e)}") from e

    def _cancelled(self, e: asyncio.CancelledError) -> BaseException:
        """What to raise for a CancelledError out of a grpc.aio call: grpc.aio raises it when the *server*
        cancels the RPC (Triton shutting down), which is TritonUnreachable (the JSON route's 503); a cancellation
        of the calling task itself (its client hung up, the loop is stopping) stays a CancelledError
        (Task.cancelling(), Python 3.11)."""
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            return e
        return TritonUnreachable(f"Triton at {self.url} cancelled the call (shutting down or restarting); "
                                 "the gateway reconnects once it is back")

    async def _signature(self, model: str) -> _Signature:
        if model in self._signatures:
            return self._signatures[model]
        try:
            if self.protocol == "grpc":
                meta = await asyncio.wait_for(self._client.get_model_metadata(model, as_json=True), self.timeout_s)
                config = (await asyncio.wait_for(self._client.get_model_config(model, as_json=True),
                                                 self.timeout_s))["config"]
            else:
                meta = await asyncio.wait_for(self._client.get_model_metadata(model), self.timeout_s)
                config = await asyncio.wait_for(self._client.get_model_config(model), self.timeout_s)
        except asyncio.CancelledError as e:
            raise self._cancelled(e) from e
        except Exception as e:
            raise await self._model_error(model, e) from e
        self._signatures[model] = _signature_from(model, meta, config)
        return self._signatures[model]

    async def _model_error(self, model: str, e: Exception) -> ServingError:
        if _unreachable(e):
            return TritonUnreachable(f"Triton at {self.url} is not reachable: {_message(e)}")
        try:
            return await self._not_ready(model) or ServingError(f"Triton at {self.url} failed on model {model!r}: "
                                                                f"{_message(e)}")
        except ServingError as inner:
            return inner

    async def _not_ready(self, model: str) -> ServingError | None:
        """The error for a model Triton does not have READY, or None when it is READY."""
        ready = await self.ready_models()
        if model in ready:
            return None
        return ServingError(f"model {model!r} is not ready on Triton at {self.url}; ready models: "
                            f"{', '.join(ready) or 'none'}")

    async def _infer_error(self, model: str, e: Exception) -> Exception:
        if _unreachable(e):
            return TritonUnreachable(f"Triton at {self.url} is not reachable: {_message(e)}")
        status = str(getattr(e, "status", lambda: "")() or "")
        if status in ("StatusCode.INVALID_ARGUMENT", "400"):
            self._signatures.pop(model, None)  # a reloaded model may have changed; look again next time
            try:
                not_ready = await self._not_ready(model)
            except ServingError:
                not_ready = None
            return not_ready or InputError(f"{model}: {_message(e)}")
        return await self._model_error(model, e)


@dataclass
class _Lane:
    """AsyncTritonClient's requests for one (model, parameters): its calls in flight, and the (input, caller's
    future) pairs waiting to be sent together in the next merged call."""

    params: dict | None
    in_flight: int = 0
    waiting: collections.deque = field(default_factory=collections.deque)


class _LeanInfer:
    """One dyngate variant's inference request made once, for gRPC (a ModelInferRequest: model, input tensor
    BYTES, the two outputs; a call copies it, sets the batch size and appends the inputs' bytes) and for HTTP
    (the request line and the JSON header of Triton's binary tensor extension). `answers` / `http_answers` read
    the raw output contents. The same wire requests and the same Answers as tritonclient's InferInput/InferResult
    path, with less Python per call (tritonclient.grpc.service_pb2; BYTES elements are a 4-byte little-endian
    length, then the bytes; the HTTP body is the JSON header, then each binary tensor, its size in the header's
    "binary_data_size": Triton's docs, protocol/extension_binary_data.md)."""

    def __init__(self, model: str, signature: _Signature):
        from urllib.parse import quote

        from tritonclient.grpc import service_pb2
        from tritonclient.utils import triton_to_np_dtype

        self._dtype = triton_to_np_dtype
        self.model, self.signature = model, signature
        self._request_type = service_pb2.ModelInferRequest
        self._template = service_pb2.ModelInferRequest(model_name=model)
        tensor = self._template.inputs.add(name=signature.input_name, datatype="BYTES")
        tensor.shape.extend([1, 1])  # [n, 1]: `request` sets n
        for name in (signature.result_name, signature.logits_name):
            self._template.outputs.add(name=name)
        self._http_path = f"/v2/models/{quote(model, safe='')}/infer"
        self._http_outputs = [{"name": name, "parameters": {"binary_data": True}}
                              for name in (signature.result_name, signature.logits_name)]

    def request(self, raws: list[bytes], params: dict | None):
        """The ModelInferRequest of `raws` as one input tensor [n, 1]; InputError for a parameter of another type
        than str, bool, int or float."""
        request = self._request_type()
        request.CopyFrom(self._template)
        request.inputs[0].shape[0] = len(raws)
        request.raw_input_contents.append(_bytes_tensor(raws))
        for key, value in _checked_parameters(params):  # the types tritonclient maps (its _get_inference_request)
            if isinstance(value, str):
                request.parameters[key].string_param = value
            elif isinstance(value, bool):
                request.parameters[key].bool_param = value
            elif isinstance(value, int):
                request.parameters[key].int64_param = value
            else:
                request.parameters[key].double_param = value
        return request

    def http_request(self, raws: list[bytes], params: dict | None) -> tuple[str, bytes, int]:
        """(path, body, JSON header length) of the HTTP infer request of `raws` as one input tensor [n, 1],
        parameters as Triton's HTTP front end maps JSON values (string, bool, int64, double: the gRPC types);
        InputError as `request`."""
        data = _bytes_tensor(raws)
        header = {"inputs": [{"name": self.signature.input_name, "shape": [len(raws), 1], "datatype": "BYTES",
                              "parameters": {"binary_data_size": len(data)}}],
                  "outputs": self._http_outputs}
        if params:
            header["parameters"] = dict(_checked_parameters(params))
        text = json.dumps(header, allow_nan=False).encode()
        return self._http_path, text + data, len(text)

    def answers(self, response, n: int, latency_ms: float) -> list[Answer]:
        """One Answer per item of a gRPC response to an n-item request: RESULT's n JSON texts, LOGITS' n rows."""
        return self._items({o.name: (o.datatype, tuple(o.shape), raw)
                            for o, raw in zip(response.outputs, response.raw_output_contents)}, n, latency_ms)

    def http_answers(self, headers: dict[bytes, bytes], body: bytes, n: int, latency_ms: float) -> list[Answer]:
        """`answers` for an HTTP response: its JSON header (Inference-Header-Content-Length bytes), then the
        outputs' binary contents in the header's order."""
        try:
            length = int(headers.get(b"inference-header-content-length", len(body)))
            contents, start = {}, length
            for output in json.loads(body[:length])["outputs"]:
                size = output["parameters"]["binary_data_size"]
                contents[output["name"]] = (output["datatype"], tuple(output["shape"]), body[start:start + size])
                start += size
        except (ValueError, KeyError, TypeError) as e:
            raise ServingError(f"{self.model} answered an HTTP body that is not Triton's binary tensor format "
                               f"({type(e).__name__}: {e})") from None
        return self._items(contents, n, latency_ms)

    def _items(self, contents: dict[str, tuple[str, tuple, bytes]], n: int, latency_ms: float) -> list[Answer]:
        """Answers from the outputs' (datatype, shape, raw bytes) by name."""
        try:
            _, _, result = contents[self.signature.result_name]
            logits_type, logits_shape, logits = contents[self.signature.logits_name]
        except KeyError as e:
            raise ServingError(f"{self.model} answered without output {e}; it has {sorted(contents)}") from None
        rows = np.frombuffer(logits, dtype=self._dtype(logits_type)).reshape(logits_shape)
        if rows.shape[0] != n:
            raise ServingError(f"{self.model} answered {rows.shape[0]} rows of {self.signature.logits_name} for a "
                               f"request of {n} items")
        answers, start = [], 0
        for row in rows:
            length = int.from_bytes(result[start:start + 4], "little")
            answers.append(Answer(answer=json.loads(result[start + 4:start + 4 + length]),
                                  logits=row.astype(np.float32, copy=False), latency_ms=latency_ms, model=self.model))
            start += 4 + length
        return answers


def _bytes_tensor(raws: list[bytes]) -> bytes:
    """A BYTES tensor's raw contents: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(len(raw).to_bytes(4, "little") + raw for raw in raws)


def _checked_parameters(params: dict | None):
    """(key, value) of request parameters; InputError for a value that is not a string, boolean, integer or
    finite float (what Triton's parameters carry)."""
    for key, value in (params or {}).items():
        if not isinstance(value, (str, bool, int, float)) or (isinstance(value, float) and not np.isfinite(value)):
            raise InputError(f"request parameter {key}={value!r}: a {type(value).__name__} cannot be sent; "
                             "send a string, boolean, integer or finite float")
        yield key, value


class _HttpConnections:
    """Kept-alive HTTP/1.1 connections to one Triton HTTP endpoint ("host:port"), used by one event loop: `post`
    takes an idle connection (or opens one), sends one request, reads its answer with httptools' parser and
    keeps the connection for the next call. As many connections as calls in flight (HTTP/1.1 answers one
    request at a time per connection). A kept connection the server closed meanwhile is retried once on a new
    one (nothing of the request was answered)."""

    def __init__(self, address: str):
        self.address = address
        self._host, port = address.rsplit(":", 1)
        self._port = int(port)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, request: tuple[str, bytes, int]) -> tuple[int, dict[bytes, bytes], bytes]:
        """(status, headers by lower-case name, body) of POST `request` ((path, body, JSON header length), as
        `_LeanInfer.http_request` makes it). OSError / EOFError when the connection fails, httptools'
        HttpParserError when the port does not answer HTTP/1.1."""
        path, body, header_length = request
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.address}\r\nContent-Type: application/octet-stream\r\n"
                f"Inference-Header-Content-Length: {header_length}\r\nContent-Length: {len(body)}\r\n\r\n")
        message = head.encode() + body
        while self._idle:
            connection = self._idle.pop()
            try:
                return await self._exchange(connection, message)
            except (OSError, EOFError):  # closed by the server while idle: nothing was answered; try the next
                continue
        return await self._exchange(await asyncio.open_connection(self._host.strip("[]"), self._port), message)

    async def _exchange(self, connection, message: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        reader, writer = connection
        answer = _HttpAnswer()
        parser = answer.parser = httptools.HttpResponseParser(answer)
        try:
            writer.write(message)
            while not answer.complete:
                data = await reader.read(65536)
                if not data:
                    raise EOFError(f"{self.address} closed the connection before answering")
                parser.feed_data(data)
        except BaseException:  # failed, timed out or cancelled mid-answer: the connection's state is unknown
            writer.close()
            raise
        if answer.keep_alive:
            self._idle.append(connection)
        else:
            writer.close()
        return answer.status, answer.headers, b"".join(answer.body)

    def close(self) -> None:
        """Close the idle connections (those in use close when their call ends with an error)."""
        while self._idle:
            self._idle.pop()[1].close()


class _HttpAnswer:
    """httptools callbacks collecting one HTTP answer: status, headers (lower-case names), body parts, whether
    the connection stays open (asked while the parser is on the answer's headers: after the answer it is
    reset), completion."""

    parser: httptools.HttpResponseParser

    def __init__(self):
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.status, self.keep_alive, self.complete = 0, False, False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.status, self.keep_alive = self.parser.get_status_code(), self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


def _grpc_error(e: Exception) -> Exception:
    """A grpc.RpcError as tritonclient raises it (InferenceServerException with Triton's message and status), so
    `_infer_error` treats both alike; any other exception as it is."""
    import grpc

    if not isinstance(e, grpc.RpcError):
        return e
    from tritonclient.grpc import InferenceServerException

    return InferenceServerException(msg=e.details(), status=str(e.code()), debug_details=e.debug_error_string())


def parse_address(text: str, protocol: str | None = None, what: str = "url") -> tuple[str, str]:
    """(address "host:port", protocol) of a Triton address: "HOST[:PORT]", "grpc://HOST[:PORT]" or
    "http://HOST[:PORT]" (IPv6 in brackets: "[::1]:8001"). The one parser of Triton addresses: every client and
    every `dyngate` subcommand's `--triton` goes through it.

    protocol: "grpc" or "http"; None takes the scheme's, else gRPC. Without a port, Triton's default port of
    the protocol (gRPC 8001, HTTP 8000; gRPC would otherwise dial 443). what: the option's name for messages.
    Raises ConfigError naming `what`, the value and the expected shape for an empty address, another scheme
    (https://, grpcs://: TLS is not supported), a path, a port that is not a number in 1-65535, a protocol
    other than grpc/http, or a scheme that contradicts `protocol`.
    """
    shape = ("HOST:PORT, e.g. 127.0.0.1:8000 (Triton's HTTP port)" if protocol == "http" else
             "HOST:PORT, e.g. 127.0.0.1:8001 (Triton's gRPC port; its HTTP port is 8000, as http://HOST:PORT)")
    rest, scheme_protocol = str(text or "").strip(), None
    scheme, sep, after = rest.partition("://")
    if sep:
        scheme_protocol = {"grpc": "grpc", "http": "http"}.get(scheme.lower())
        if scheme_protocol is None:
            raise ConfigError(f"{what}={text!r}: scheme {scheme}:// is not supported (no TLS); give {shape}")
        rest = after.rstrip("/")
    protocol = protocol or scheme_protocol or "grpc"
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={protocol!r} is not supported; choose one of: {', '.join(PROTOCOLS)} "
                          "(or give the url a grpc:// or http:// scheme)")
    if scheme_protocol and scheme_protocol != protocol:
        raise ConfigError(f"{what}={text!r} is a {scheme_protocol} address, but {what} takes Triton's "
                          f"{protocol} endpoint; give {shape}")
    if rest.count(":") > 1 and not rest.startswith("["):
        raise ConfigError(f"{what}={text!r}: write an IPv6 host in brackets, e.g. [::1]:8001")
    end = rest.find("]") + 1 if rest.startswith("[") else 0  # after an IPv6 host's closing bracket
    host, colon, port = rest[:end] + rest[end:].partition(":")[0], *rest[end:].partition(":")[1:]
    if (not host.strip("[]") or "/" in rest or (rest.startswith("[") and not end)
            or (end and rest[end:] and not colon)):
        raise ConfigError(f"{what}={text!r} is not a Triton address; give {shape}")
    if not colon:
        port = str(DEFAULT_PORTS[protocol])
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{what}={text!r}: port {port!r} is not a number in 1-65535; give {shape}")
    return f"{host}:{int(port)}", protocol


def grpc_address(text: str, what: str = "--triton") -> str:
    """Triton's gRPC address "host:port" from "HOST[:PORT]" or "grpc://HOST[:PORT]" (`parse_address`), for
    what talks gRPC to Triton: model control (`dyngate build --triton`, `reload`), the gateway, `dyngate load`.

    Raises ConfigError for an http:// URL, saying to give the gRPC address instead (an HTTP load stalls HTTP
    inference on other models for seconds in Triton 2.51; the HTTP port is not mapped to the gRPC one because
    a server may use any ports), and for what `parse_address` refuses."""
    if str(text or "").strip().lower().startswith(("http://", "https://")):
        raise ConfigError(f"{what} {text!r} is Triton's HTTP endpoint; dyngate talks to Triton over gRPC (model "
                          "control over HTTP stalls HTTP inference on other models for seconds): give Triton's "
                          "gRPC address, e.g. 127.0.0.1:8001 (`dyngate serve` prints it as grpc://...)")
    return parse_address(text, "grpc", what)[0]


def _make(url: str, protocol: str | None, timeout_s: float, aio: bool) -> tuple:
    """(address "host:port", protocol, tritonclient module, its InferenceServerClient) for a client url: the one
    place `TritonClient` (aio=False) and `AsyncTritonClient` (aio=True: tritonclient's asyncio twins) are built.
    gRPC gets `_grpc_channel_args`; HTTP gets timeout_s as its connection (sync: and network) timeout.
    ConfigError as `_endpoint`."""
    address, protocol = _endpoint(url, protocol, timeout_s)
    module = importlib.import_module(f"tritonclient.{protocol}" + (".aio" if aio else ""))
    if protocol == "grpc":
        client = module.InferenceServerClient(address, channel_args=_grpc_channel_args(module, address))
    elif aio:
        client = module.InferenceServerClient(address, conn_timeout=timeout_s)
    else:
        client = module.InferenceServerClient(address, connection_timeout=timeout_s, network_timeout=timeout_s)
    return address, protocol, module, client


def _endpoint(url: str, protocol: str | None, timeout_s: float) -> tuple[str, str]:
    """(address "host:port", protocol) of a client url (`parse_address`); ConfigError also for a timeout ≤ 0."""
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s={timeout_s!r} must be > 0")
    return parse_address(url, protocol)


def _signature_from(model: str, meta: dict, config: dict) -> _Signature:
    """A dyngate variant's tensor names and max_batch_size from Triton's model metadata and config (JSON);
    ServingError when the model is not shaped like a dyngate variant."""
    inputs, outputs = meta.get("inputs", []), meta.get("outputs", [])
    result = [o["name"] for o in outputs if o.get("datatype") == "BYTES"]
    logits = [o["name"] for o in outputs if o.get("datatype") != "BYTES"]
    if len(inputs) != 1 or inputs[0].get("datatype") != "BYTES" or not result or not logits:
        raise ServingError(f"model {model!r} is not a dyngate variant: it needs one BYTES input and a BYTES "
                           f"and an FP32 output; it has inputs {inputs} and outputs {outputs}")
    return _Signature(inputs[0]["name"], result[0], logits[0], int(config.get("max_batch_size", 0) or 0))


def _request(module, protocol: str, signature: _Signature, raws: list[bytes]) -> tuple:
    """(input tensor [n, 1] BYTES, requested outputs) of one request, for a tritonclient grpc/http module
    (`TritonClient`; `AsyncTritonClient` makes its requests with `_LeanInfer`)."""
    data = np.array([[r] for r in raws], dtype=np.object_)
    tensor = module.InferInput(signature.input_name, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    names = (signature.result_name, signature.logits_name)
    if protocol == "http":
        return tensor, [module.InferRequestedOutput(n, binary_data=True) for n in names]
    return tensor, [module.InferRequestedOutput(n) for n in names]


def _answers(result, signature: _Signature, model: str, latency_ms: float) -> list[Answer]:
    """One Answer per item of an infer result (RESULT JSON parsed, the item's LOGITS row)."""
    texts = result.as_numpy(signature.result_name).reshape(-1)
    logits = result.as_numpy(signature.logits_name)
    answers = []
    for i, text in enumerate(texts):
        text = text.decode() if isinstance(text, bytes) else str(text)
        answers.append(Answer(answer=json.loads(text), logits=np.asarray(logits[i], dtype=np.float32),
                              latency_ms=latency_ms, model=model))
    return answers


def model_control_client(address: str, timeout_s: float = 30) -> TritonClient:
    """The client that loads and unloads models: Triton's gRPC address "host[:port]" or "grpc://host[:port]"
    (`grpc_address`: ConfigError for an http:// URL or a malformed address)."""
    return TritonClient(grpc_address(address), protocol="grpc", timeout_s=timeout_s)


def short_reason(reason: str, limit: int = 400) -> str:
    """Triton's load-failure reason without the python traceback it appends ("\n\nAt:\n  ..."), one line."""
    text = str(reason or "").split("\n\nAt:")[0].strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _grpc_channel_args(module, address: str) -> list[tuple]:
    """tritonclient's default channel options, plus a reconnect back-off capped at RECONNECT_BACKOFF_MAX_MS (gRPC's
    default grows to 120 s: a channel that saw Triton down for minutes may wait that long after Triton is back;
    the gateway makes a new client after TritonUnreachable, but channels to a remote address share gRPC's global
    subchannel pool and its back-off). For a server on this machine also: no HTTP proxy (gRPC honours
    `http_proxy`, and a proxy cannot reach our 127.0.0.1), and a connection pool of the channel's own, so a client
    made after Triton restarted connects at once instead of inheriting the process-wide pool's back-off
    (measured: two more failed requests after the restart without it)."""
    keepalive = module.KeepAliveOptions()
    size = module.MAX_GRPC_MESSAGE_SIZE
    args = [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS // 4),
            ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS // 4),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS)]
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "::1") or host.startswith("127."):
        args += [("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1)]
    return args


def _message(e: Exception) -> str:
    message = getattr(e, "message", None)
    text = message() if callable(message) else None
    return text or str(e) or type(e).__name__


def _unreachable_error(url: str, e: Exception, hint: str | None) -> TritonUnreachable:
    """TritonUnreachable for a call to `url` that could not reach Triton; `hint` (`protocol_mismatch`: the port
    answers the other protocol, and the fix) ends the message."""
    text = f"Triton at {url} is not reachable: {_message(e)}"
    return TritonUnreachable(f"{text}; {hint}" if hint else text)


def _unreachable(e: Exception) -> bool:
    """Connection refused / DNS failure / timeout / an answer that is no HTTP/1.1 (an HTTP client on a gRPC
    port), whichever client library raised it."""
    import http.client

    import aiohttp

    # geventhttpclient's parser error is an http.client.HTTPException; aiohttp wraps a bad status line in
    # ClientResponseError (tritonclient reads Triton's own error statuses itself, so they never raise it)
    if isinstance(e, (ConnectionError, TimeoutError, OSError, http.client.HTTPException,
                      aiohttp.ClientResponseError)):
        return True
    status = str(getattr(e, "status", lambda: "")() or "")
    if status in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"):
        return True
    text = _message(e).lower()
    return any(s in text for s in ("failed to connect", "connection refused", "deadline exceeded",
                                    "name or service not known", "timed out"))
