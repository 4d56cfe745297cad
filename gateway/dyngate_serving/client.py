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

import json
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dyngate_build.errors import ConfigError, InputError, ServingError, TritonUnreachable

PROTOCOLS = ("grpc", "http")
_SCHEMES = {"grpc://": "grpc", "http://": "http"}
CONTROL_TIMEOUT_S = 600.0  # a load answers once the model is READY or failed: a torch variant takes a while


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
        address, scheme_protocol = url, None
        for scheme, name in _SCHEMES.items():
            if url.startswith(scheme):
                address, scheme_protocol = url[len(scheme):].rstrip("/"), name
        protocol = protocol or scheme_protocol
        if protocol not in PROTOCOLS:
            raise ConfigError(f"protocol={protocol!r} is not supported; choose one of: {', '.join(PROTOCOLS)} "
                              "(or give the url a grpc:// or http:// scheme)")
        if scheme_protocol and scheme_protocol != protocol:
            raise ConfigError(f"url={url!r} says {scheme_protocol} but protocol={protocol!r}; make them agree")
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s={timeout_s!r} must be > 0")
        self.url, self.protocol, self.timeout_s = address, protocol, timeout_s
        if protocol == "grpc":
            import tritonclient.grpc as module
            self._client = module.InferenceServerClient(address, channel_args=_grpc_channel_args(module, address))
        else:
            import tritonclient.http as module
            self._client = module.InferenceServerClient(address, connection_timeout=timeout_s,
                                                        network_timeout=timeout_s)
        self._module = module
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
        data = np.array([[r] for r in raws], dtype=np.object_)
        tensor = self._module.InferInput(signature.input_name, list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        if self.protocol == "http":
            outputs = [self._module.InferRequestedOutput(n, binary_data=True)
                       for n in (signature.result_name, signature.logits_name)]
        else:
            outputs = [self._module.InferRequestedOutput(n) for n in (signature.result_name, signature.logits_name)]
        started = time.perf_counter()
        try:
            if self.protocol == "grpc":
                result = self._client.infer(model, [tensor], outputs=outputs, parameters=params or None,
                                            client_timeout=self.timeout_s)
            else:
                result = self._client.infer(model, [tensor], outputs=outputs, parameters=params or None)
        except Exception as e:
            raise self._infer_error(model, e) from e
        latency_ms = (time.perf_counter() - started) * 1000
        texts = result.as_numpy(signature.result_name).reshape(-1)
        logits = result.as_numpy(signature.logits_name)
        answers = []
        for i, text in enumerate(texts):
            text = text.decode() if isinstance(text, bytes) else str(text)
            answers.append(Answer(answer=json.loads(text), logits=np.asarray(logits[i], dtype=np.float32),
                                  latency_ms=latency_ms, model=model))
        return answers

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
        return TritonUnreachable(f"Triton at {self.url} is not reachable: {_message(e)}")

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
        inputs, outputs = meta.get("inputs", []), meta.get("outputs", [])
        result = [o["name"] for o in outputs if o.get("datatype") == "BYTES"]
        logits = [o["name"] for o in outputs if o.get("datatype") != "BYTES"]
        if len(inputs) != 1 or inputs[0].get("datatype") != "BYTES" or not result or not logits:
            raise ServingError(f"model {model!r} is not a dyngate variant: it needs one BYTES input and a BYTES "
                               f"and an FP32 output; it has inputs {inputs} and outputs {outputs}")
        signature = _Signature(inputs[0]["name"], result[0], logits[0], int(config.get("max_batch_size", 0) or 0))
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


def model_control_client(address: str, timeout_s: float = 30) -> TritonClient:
    """The client that loads and unloads models: Triton's gRPC address "host:port" or "grpc://host:port".

    Raises ConfigError for an http:// URL, saying to give the gRPC address instead (an HTTP load stalls HTTP
    inference on other models for seconds in Triton 2.51; the HTTP port is not mapped to the gRPC one because
    a server may use any ports)."""
    if address.startswith("http://") or address.startswith("https://"):
        raise ConfigError(f"--triton {address!r} is Triton's HTTP endpoint; model control goes over gRPC (an HTTP "
                          "load stalls HTTP inference on other models for seconds): give Triton's gRPC address, "
                          "e.g. --triton 127.0.0.1:8001 (`dyngate serve` prints it as grpc://...)")
    return TritonClient(address, protocol="grpc", timeout_s=timeout_s)


def short_reason(reason: str, limit: int = 400) -> str:
    """Triton's load-failure reason without the python traceback it appends ("\n\nAt:\n  ..."), one line."""
    text = str(reason or "").split("\n\nAt:")[0].strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _grpc_channel_args(module, address: str) -> list[tuple] | None:
    """tritonclient's default channel options, plus: no HTTP proxy for a server on this machine (gRPC honours
    `http_proxy`, and a proxy cannot reach our 127.0.0.1)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host not in ("localhost", "::1") and not host.startswith("127."):
        return None
    keepalive = module.KeepAliveOptions()
    size = module.MAX_GRPC_MESSAGE_SIZE
    return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.enable_http_proxy", 0)]


def _message(e: Exception) -> str:
    message = getattr(e, "message", None)
    text = message() if callable(message) else None
    return text or str(e) or type(e).__name__


def _unreachable(e: Exception) -> bool:
    """Connection refused / DNS failure / timeout, whichever client library raised it."""
    if isinstance(e, (ConnectionError, TimeoutError, OSError)):
        return True
    status = str(getattr(e, "status", lambda: "")() or "")
    if status in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"):
        return True
    text = _message(e).lower()
    return any(s in text for s in ("failed to connect", "connection refused", "deadline exceeded",
                                    "name or service not known", "timed out"))
