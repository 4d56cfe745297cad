"""The gateway's settings: limits, routing defaults, login, where Triton's metrics are. JSON file and environment.

    {"limits": {"max_text_chars": 10000, "max_image_bytes": 5242880, "max_body_bytes": 8388608,
                "max_bench_requests": 2000, "max_bench_concurrency": 16},
     "routing": {"accuracy_budget": 1.0, "cascade_threshold": 0.9, "seed": 0, "ab_agreement_share": 0.1,
                 "ab_weights": {"distilbert-tiny": {"fp32": 3, "torchscript": 1}}},
     "auth": {"user": "me", "password": "..."},
     "metrics_url": "http://127.0.0.1:8002/metrics", "triton_http_url": "127.0.0.1:8000", "data": "../shared/data"}

triton_http_url: Triton's HTTP endpoint; when set, the gateway sends inference there (kept-alive HTTP/1.1 with
binary tensors: less time per request than gRPC, dyngate_serving.client.AsyncTritonClient) and keeps model
control and metadata on gRPC (`--triton`); unset, everything goes over gRPC. `dyngate gateway --triton-http`.

routing.accuracy_budget is in points (1.0 = one point of accuracy below the best), the unit of
`dyngate recommend --budget` and of the JSON API's "accuracy_budget".
Environment (wins over the file): DYNGATE_GATEWAY_USER and DYNGATE_GATEWAY_PASSWORD (login, both or neither),
DYNGATE_GATEWAY_CONFIG (the file), DYNGATE_TRITON_METRICS (metrics url).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from dyngate_build.errors import ConfigError
from dyngate_gateway.handlers import Limits
from dyngate_gateway.routing import RoutingConfig

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860  # the gateway listens on this machine only unless told

USER_ENV, PASSWORD_ENV, CONFIG_ENV, METRICS_ENV = ("DYNGATE_GATEWAY_USER", "DYNGATE_GATEWAY_PASSWORD",
                                                    "DYNGATE_GATEWAY_CONFIG", "DYNGATE_TRITON_METRICS")


@dataclass
class GatewayConfig:
    limits: Limits = field(default_factory=Limits)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    auth: tuple[str, str] | None = None
    metrics_url: str | None = None  # None: the Triton host, gRPC port + 1 (Triton's default layout)
    triton_http_url: str | None = None  # Triton's HTTP endpoint for inference; None: inference over gRPC
    server_pid: int | None = None  # None: the process that listens on the metrics port
    data: str | None = None  # data setting for the Compare tab's dev inputs (dyngate_build.data.DataSource)
    status_interval_s: float = 2.0
    metrics_interval_s: float = 2.0

    @classmethod
    def load(cls, path: str | Path | None = None, env: dict | None = None) -> "GatewayConfig":
        """Defaults, then the JSON file (`path` or $DYNGATE_GATEWAY_CONFIG), then the environment."""
        env = os.environ if env is None else env
        path = path or env.get(CONFIG_ENV)
        raw: dict = {}
        if path:
            try:
                raw = json.loads(Path(path).read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"gateway config {path}: cannot read it as JSON ({e}); fix or remove the file") from e
        config = cls.from_dict(raw)
        user, password = env.get(USER_ENV), env.get(PASSWORD_ENV)
        if bool(user) != bool(password):
            raise ConfigError(f"set both {USER_ENV} and {PASSWORD_ENV} for a login, or neither")
        if user:
            config.auth = (user, password)
        if env.get(METRICS_ENV):
            config.metrics_url = env[METRICS_ENV]
        return config

    @classmethod
    def from_dict(cls, raw: dict) -> "GatewayConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"gateway config: unknown key(s) {unknown}; known: {sorted(known)}")
        config = cls()
        config.limits = _dataclass(Limits, raw.get("limits") or {}, "limits")
        config.routing = _dataclass(RoutingConfig, raw.get("routing") or {}, "routing")
        auth = raw.get("auth")
        if auth:
            if not isinstance(auth, dict) or not auth.get("user") or not auth.get("password"):
                raise ConfigError('gateway config: auth must be {"user": ..., "password": ...}')
            config.auth = (str(auth["user"]), str(auth["password"]))
        for key in ("metrics_url", "triton_http_url", "server_pid", "data", "status_interval_s", "metrics_interval_s"):
            if raw.get(key) is not None:
                setattr(config, key, raw[key])
        return config


def _dataclass(kind, values: dict, name: str):
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"gateway config: unknown key(s) {unknown} in {name}; known: {sorted(known)}")
    item = kind(**values)
    for f in fields(kind):
        value = getattr(item, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and f.name.startswith("max_") and value <= 0:
            raise ConfigError(f"gateway config: {name}.{f.name}={value} must be > 0")
    return item
