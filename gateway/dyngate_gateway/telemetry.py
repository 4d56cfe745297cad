"""The gateway's own Prometheus metrics, served at GET /metrics (behind the login when one is set).

Several gateway replicas each count what they served; Prometheus sums them, so no replica needs the others'
view. One `GatewayTelemetry` per app, with a `CollectorRegistry` of its own (two gateways in one process, as in
the tests, never share counters). Labels take only names the repository defines (model, variant, policy) and a
fixed outcome set, never raw request text, so the series stay bounded.

    telemetry = GatewayTelemetry()
    answer = await telemetry.routed(view, "cascade", lambda: router.aroute(view.name, text, "cascade"))
    telemetry.compared(view, comparison, seconds)           # the page's side-by-side Predict
    body, content_type = telemetry.exposition()

Metrics (prometheus_client appends `_total` to counters, `_bucket/_sum/_count` to histograms):
- dyngate_gateway_requests_total{model, variant, policy, outcome}: one per routed request (variant = the one
  that answered, "" when none did) and one per variant of a side-by-side comparison (policy "compare");
  outcome is one of OUTCOMES.
- dyngate_gateway_request_seconds{model, policy}: the gateway's time for one request, all cascade steps included.
- dyngate_gateway_triton_seconds{model, variant}: Triton round trip of each variant call (gRPC/HTTP client side).
- dyngate_gateway_routing_decisions_total{model, policy, variant}: which variant a policy chose to answer.
- dyngate_gateway_cascade_escalations_total{model, from_variant, to_variant}: a cascade step below the threshold
  that sent the input on to the next variant.
"""

from __future__ import annotations

import time
from typing import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from dyngate_build.errors import InputError, ServingError
from dyngate_gateway.handlers import Comparison, ModelView
from dyngate_gateway.routing import POLICIES

OUTCOMES = ("ok", "bad_input", "server_error", "error")
COMPARE = "compare"
# seconds: a python-backend round trip here is 1-10 ms; cascades and cold stubs reach seconds
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def outcome_of(error: BaseException) -> str:
    """OUTCOMES label of a failed request: bad_input (the client's), server_error (Triton's), error (a bug)."""
    if isinstance(error, (InputError, ValueError, TypeError, OverflowError)):
        return "bad_input"
    if isinstance(error, ServingError):
        return "server_error"
    return "error"


REQUEST_HEADERS = ["model", "variant", "policy", "outcome", "requests"]


class GatewayTelemetry:
    """The metrics of one gateway app (see the module docstring), in `self.registry`."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("dyngate_gateway_requests", "Requests the gateway answered or refused",
                                ["model", "variant", "policy", "outcome"], registry=self.registry)
        self.request_seconds = Histogram("dyngate_gateway_request_seconds", "Gateway time per request (s)",
                                         ["model", "policy"], buckets=BUCKETS, registry=self.registry)
        self.triton_seconds = Histogram("dyngate_gateway_triton_seconds", "Triton round trip per variant call (s)",
                                        ["model", "variant"], buckets=BUCKETS, registry=self.registry)
        self.decisions = Counter("dyngate_gateway_routing_decisions", "Variant a routing policy chose to answer",
                                 ["model", "policy", "variant"], registry=self.registry)
        self.escalations = Counter("dyngate_gateway_cascade_escalations",
                                   "Cascade steps below the threshold, passed on to the next variant",
                                   ["model", "from_variant", "to_variant"], registry=self.registry)

    @staticmethod
    def policy_label(view: ModelView, policy: str | None) -> str:
        """The policy as a bounded label: a known policy, "variant" for a variant name, else "unknown"."""
        policy = (policy or "fastest").strip()
        if policy in POLICIES:
            return policy
        return "variant" if policy in view.variants else "unknown"

    async def routed(self, view: ModelView, policy: str | None, call: Callable[[], Awaitable[dict]]) -> dict:
        """Await `call()` (one Router.aroute for `view`'s model) and record it; its answer or error passes through."""
        label = self.policy_label(view, policy)
        start = time.perf_counter()
        try:
            answer = await call()
        except Exception as e:
            self.requests.labels(view.name, "", label, outcome_of(e)).inc()
            self.request_seconds.labels(view.name, label).observe(time.perf_counter() - start)
            raise
        seconds = time.perf_counter() - start
        policy = answer.get("policy", label)
        self.requests.labels(view.name, answer["served_by"], policy, "ok").inc()
        self.request_seconds.labels(view.name, policy).observe(seconds)
        self.decisions.labels(view.name, policy, answer["served_by"]).inc()
        steps = answer.get("route") or []
        for step in steps:
            self.triton_seconds.labels(view.name, step["variant"]).observe(step["latency_ms"] / 1000)
        for low, high in zip(steps, steps[1:]):
            self.escalations.labels(view.name, low["variant"], high["variant"]).inc()
        return answer

    def compared(self, view: ModelView, comparison: Comparison, seconds: float) -> None:
        """Record the page's side-by-side Predict: one request per variant (policy "compare")."""
        for variant, answer in comparison.answers.items():
            failed = isinstance(answer, dict) and "error" in answer
            self.requests.labels(view.name, variant, COMPARE, "server_error" if failed else "ok").inc()
        for row in comparison.rows:  # RESULT_HEADERS: variant, triton model, prediction, score, round trip ms
            if row[4] is not None:
                self.triton_seconds.labels(view.name, row[0]).observe(row[4] / 1000)
        self.request_seconds.labels(view.name, COMPARE).observe(seconds)

    def failed(self, view: ModelView, policy: str, error: BaseException, seconds: float) -> None:
        """Record a request refused before any variant was called (e.g. the page's bad input)."""
        label = policy if policy == COMPARE else self.policy_label(view, policy)
        self.requests.labels(view.name, "", label, outcome_of(error)).inc()
        self.request_seconds.labels(view.name, label).observe(seconds)

    def watch_shadow(self, shadow) -> None:
        """Serve `shadow`'s (a dyngate_gateway.shadow.Shadow) counts too, read at scrape time:
        dyngate_gateway_shadow_mirrored_total and dyngate_gateway_shadow_agreed_total{model, served, candidate}
        (copies answered by the candidate, and of them those whose top-1 label, or entity set for NER, matched the
        served answer), cumulative since that model's shadow was started."""
        self.registry.register(_ShadowCollector(shadow))

    def request_rows(self) -> list[list]:
        """The requests counter as rows of REQUEST_HEADERS, sorted: the very numbers GET /metrics serves as
        dyngate_gateway_requests_total, for the Metrics tab."""
        return sorted([sample.labels["model"], sample.labels["variant"], sample.labels["policy"],
                       sample.labels["outcome"], int(sample.value)]
                      for metric in self.requests.collect() for sample in metric.samples
                      if sample.name.endswith("_total"))

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text format of this registry."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ShadowCollector:
    """A prometheus_client collector over Shadow.stats(): the counts live in the shadow, not copied here."""

    def __init__(self, shadow):
        self.shadow = shadow

    def collect(self):
        labels = ["model", "served", "candidate"]
        mirrored = CounterMetricFamily("dyngate_gateway_shadow_mirrored",
                                       "Requests mirrored to a shadow candidate and answered by it", labels=labels)
        agreed = CounterMetricFamily("dyngate_gateway_shadow_agreed",
                                     "Mirrored requests whose candidate answer agreed with the served one (top-1; "
                                     "entity set for NER)", labels=labels)
        for model, stats in self.shadow.stats()["models"].items():
            for pair in stats["pairs"]:
                values = [model, pair["served"], pair["compared_with"]]
                mirrored.add_metric(values, pair["mirrored"])
                agreed.add_metric(values, pair["agreed"])
        yield mirrored
        yield agreed
