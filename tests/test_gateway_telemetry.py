"""The gateway's Prometheus metrics (GET /metrics): a real gateway in front of a real Triton; requests through the
JSON route and the page's endpoints (gradio_client); the scraped counters must move by exactly what was served.

Fixture from tests/conftest.py: `text_repository` (fp32 + torchscript of distilbert-tiny).
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dyngate_build.repository import python_backend_models
from dyngate_gateway.routing import RoutingConfig
from dyngate_gateway.telemetry import GatewayTelemetry
from tests.conftest import running_gateway, running_triton

MODEL = "distilbert-tiny"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def triton(text_repository, tmp_path_factory):
    with running_triton(text_repository, tmp_path_factory.mktemp("telemetry") / "triton.log",
                        models=python_backend_models(text_repository)) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(text_repository, triton):
    # cascade cheapest-first order fixed, so escalation goes fp32 -> torchscript
    with running_gateway(text_repository, triton,
                         routing=RoutingConfig(cascade_order={MODEL: ["fp32", "torchscript"]})) as running:
        yield running


def http(url: str, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json",
                                                                     **(headers or {})})
    try:
        with _DIRECT.open(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(url: str, headers: dict | None = None) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, from the gateway's /metrics."""
    status, body = http(url, "/metrics", headers=headers)
    assert status == 200, body[:300]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_json_route_moves_requests_latency_decisions_and_escalations(gateway):
    before = scrape(gateway.url)
    for _ in range(3):
        status, raw = http(gateway.url, "/api/predict", {"model": MODEL, "text": "a gripping, moving film",
                                                         "policy": "variant", "variant": "fp32"})
        assert status == 200, raw
    # threshold 1.0: no step's top-1 reaches it unless a probability rounds to 1, so cascades escalate
    answers = []
    for text in ("a film", "dull and far too long", "an utterly wonderful, warm film"):
        status, raw = http(gateway.url, "/api/predict", {"model": MODEL, "text": text, "policy": "cascade",
                                                         "threshold": 1.0})
        assert status == 200, raw
        answers.append(json.loads(raw))
    status, _ = http(gateway.url, "/api/predict", {"model": MODEL, "text": "   ", "policy": "fastest"})
    assert status == 400
    after = scrape(gateway.url)

    ok = dict(model=MODEL, outcome="ok")
    assert delta(before, after, "dyngate_gateway_requests_total", variant="fp32", policy="variant", **ok) == 3
    assert delta(before, after, "dyngate_gateway_routing_decisions_total", model=MODEL, policy="variant",
                 variant="fp32") == 3
    assert delta(before, after, "dyngate_gateway_request_seconds_count", model=MODEL, policy="variant") == 3
    assert delta(before, after, "dyngate_gateway_request_seconds_sum", model=MODEL, policy="variant") > 0
    served = {v: sum(a["served_by"] == v for a in answers) for v in ("fp32", "torchscript")}
    for variant, count in served.items():
        assert delta(before, after, "dyngate_gateway_requests_total", variant=variant, policy="cascade", **ok) == count
        assert delta(before, after, "dyngate_gateway_routing_decisions_total", model=MODEL, policy="cascade",
                     variant=variant) == count
    escalations = sum(len(a["route"]) - 1 for a in answers)
    assert escalations >= 1, answers  # the test would prove nothing without one
    assert delta(before, after, "dyngate_gateway_cascade_escalations_total", model=MODEL, from_variant="fp32",
                 to_variant="torchscript") == escalations
    calls = {v: 3 * (v == "fp32") + sum(s["variant"] == v for a in answers for s in a["route"])
             for v in ("fp32", "torchscript")}
    for variant, count in calls.items():  # one Triton round trip observed per variant call
        assert delta(before, after, "dyngate_gateway_triton_seconds_count", model=MODEL, variant=variant) == count
    assert delta(before, after, "dyngate_gateway_requests_total", model=MODEL, variant="", policy="fastest",
                 outcome="bad_input") == 1


def test_page_endpoints_are_counted(gateway):
    from gradio_client import Client

    api = Client(gateway.url, verbose=False)
    before = scrape(gateway.url)
    table, answers = api.predict(MODEL, "a fine film", None, ["fp32", "torchscript"], api_name="/predict")
    assert set(answers) == {"fp32", "torchscript"}
    answer = api.predict(MODEL, "a fine film", None, "variant", "torchscript", 0.01, 0.9, "", api_name="/route")
    assert answer["served_by"] == "torchscript"
    after = scrape(gateway.url)
    for variant in ("fp32", "torchscript"):
        assert delta(before, after, "dyngate_gateway_requests_total", model=MODEL, variant=variant, policy="compare",
                     outcome="ok") == 1
    assert delta(before, after, "dyngate_gateway_request_seconds_count", model=MODEL, policy="compare") == 1
    assert delta(before, after, "dyngate_gateway_requests_total", model=MODEL, variant="torchscript",
                 policy="variant", outcome="ok") == 1
    assert delta(before, after, "dyngate_gateway_triton_seconds_count", model=MODEL, variant="torchscript") == 2


def test_metrics_tab_shows_the_counters_metrics_serves(gateway):
    from gradio_client import Client

    http(gateway.url, "/api/predict", {"model": MODEL, "text": "a fine film", "policy": "variant", "variant": "fp32"})
    outputs = Client(gateway.url, verbose=False).predict(api_name="/metrics")  # the Metrics tab's refresh
    table = outputs[-1]
    rows = table["data"] if isinstance(table, dict) else table
    shown = {tuple(row[:4]): float(row[4]) for row in rows}
    served = {tuple(dict(labels)[k] for k in ("model", "variant", "policy", "outcome")): value
              for (name, labels), value in scrape(gateway.url).items() if name == "dyngate_gateway_requests_total"}
    assert shown and shown == served
    assert shown[(MODEL, "fp32", "variant", "ok")] >= 1


def test_each_app_has_its_own_registry():
    first, second = GatewayTelemetry(), GatewayTelemetry()  # the default registry would refuse the second
    first.requests.labels(MODEL, "fp32", "variant", "ok").inc()
    assert b'variant="fp32"' in first.exposition()[0] and b'variant="fp32"' not in second.exposition()[0]


def test_metrics_need_the_login_when_one_is_set(text_repository, triton):
    with running_gateway(text_repository, triton, auth=("ada", "pw-metrics")) as running:
        status, body = http(running.url, "/metrics")
        assert status == 401 and b"dyngate_gateway" not in body
        wrong = {"authorization": "Basic " + base64.b64encode(b"ada:nope").decode()}
        assert http(running.url, "/metrics", headers=wrong)[0] == 401
        good = {"authorization": "Basic " + base64.b64encode(b"ada:pw-metrics").decode()}
        status, _ = http(running.url, "/api/predict", {"model": MODEL, "text": "a fine film", "policy": "fp32"},
                         headers=good)
        assert status == 200
        samples = scrape(running.url, headers=good)
        assert samples[("dyngate_gateway_requests_total", (("model", MODEL), ("outcome", "ok"),
                                                           ("policy", "variant"), ("variant", "fp32")))] == 1
