"""Routing policies with real variants on the embedded Triton, through the Router, the JSON route
(POST /api/predict) and gradio_client (api_name "route"). No mocks; no timing assertions.

Fixtures from tests/conftest.py: `built_repository` and `triton` (fp32 + torchscript of each preset).
"""

from __future__ import annotations

import base64
import copy
import random
import time
from pathlib import Path

import pytest

from dyngate_build.errors import InputError
from dyngate_gateway import app as gateway_app
from dyngate_serving.client import TritonClient
from dyngate_gateway.config import GatewayConfig
from dyngate_gateway.handlers import ClientPool, Limits, load_catalog
from dyngate_gateway.routing import Router, RoutingConfig, confidence
from dyngate_serving.net import free_port
from tests.conftest import post_predict as post, running_gateway

TEXT_MODEL, IMAGE_MODEL = "distilbert-tiny", "vit-tiny"


@pytest.fixture(scope="module")
def catalog(built_repository):
    catalog = load_catalog(Path(built_repository))
    if TEXT_MODEL not in catalog or len(catalog[TEXT_MODEL].variants) < 2:
        pytest.skip(f"the repository needs two variants of {TEXT_MODEL}")
    return catalog


@pytest.fixture(scope="module")
def clients(triton):
    return ClientPool(triton.endpoints["grpc"])


@pytest.fixture(scope="module")
def sentences(data_source):
    from dyngate_build.data import load_examples

    examples, _ = load_examples("text-classification", "dev", data_source, limit=24)
    return [ex.raw.decode() for ex in examples]


@pytest.fixture(scope="module")
def gateway(built_repository, triton):
    with running_gateway(built_repository, triton, server_pid=triton.pid,
                         limits=Limits(max_text_chars=2000)) as running:
        yield running




# ------------------------------------------------------------------------------------------- policies

def test_named_variant_and_most_accurate(catalog, clients):
    router = Router(catalog, clients)
    view = catalog[TEXT_MODEL]
    for variant in view.variant_names:
        answer = router.route(TEXT_MODEL, "a gripping film", variant)  # a variant name as the policy
        assert answer["served_by"] == variant and answer["policy"] == "variant"
        assert [s["variant"] for s in answer["route"]] == [variant]
    candidates = router.candidates(view)
    best = max(c["accuracy"] for c in candidates.values())
    answer = router.route(TEXT_MODEL, "a gripping film", "most-accurate")
    assert candidates[answer["served_by"]]["accuracy"] == best
    assert "highest accuracy" in answer["reason"]


def test_fastest_uses_live_p50_within_the_accuracy_budget(catalog, clients):
    view = copy.deepcopy(catalog[TEXT_MODEL])
    fast, slow = view.variant_names[:2]
    best = max(float(e.metadata.accuracy.value) for e in view.variants.values())
    view.variants[fast].metadata.accuracy.value = best - 0.05  # fast but 5 points worse
    view.variants[slow].metadata.accuracy.value = best
    router = Router({TEXT_MODEL: view}, clients)
    for _ in range(5):
        router.live.record(view.variants[fast].name, 1.0)
        router.live.record(view.variants[slow].name, 50.0)

    answer = router.route(TEXT_MODEL, "a gripping film", "fastest", accuracy_budget=1.0)  # points
    assert answer["served_by"] == slow, answer["reason"]
    assert fast in answer["reason"] and "within 1 pt" in answer["reason"]  # named as outside the budget
    answer = router.route(TEXT_MODEL, "a gripping film", "fastest", accuracy_budget=10.0)
    assert answer["served_by"] == fast and "live p50" in answer["reason"]


def test_fastest_compares_p50s_from_one_source(catalog, clients):
    """Live round trips (Triton's included) are never set against the build's in-process p50: with live samples
    for one variant only, every candidate is judged by the build's numbers; once all have them, by live ones."""
    view = copy.deepcopy(catalog[TEXT_MODEL])
    a, b = view.variant_names[:2]
    view.variants = {a: view.variants[a], b: view.variants[b]}
    for variant in (a, b):
        view.variants[variant].metadata.accuracy.value = 0.9  # both within any budget
    view.variants[a].metadata.latency_in_process.p50_ms = 1.0  # a is the faster in process
    view.variants[b].metadata.latency_in_process.p50_ms = 2.0
    router = Router({TEXT_MODEL: view}, clients)
    for _ in range(5):
        router.live.record(view.variants[a].name, 50.0)  # a's live round trips: only a has live samples

    answer = router.route(TEXT_MODEL, "a gripping film", "fastest", accuracy_budget=100.0)
    assert answer["served_by"] == a, answer["reason"]
    assert "build p50 (in process) for all" in answer["reason"] and "live p50" not in answer["reason"]
    for _ in range(5):
        router.live.record(view.variants[b].name, 10.0)
    answer = router.route(TEXT_MODEL, "a gripping film", "fastest", accuracy_budget=100.0)
    assert answer["served_by"] == b and "live p50" in answer["reason"], answer["reason"]
    candidates = router.candidates(view)
    assert candidates[a]["p50_source"] == candidates[b]["p50_source"]


def test_policies_leave_out_an_accuracy_measured_on_other_dev_examples(catalog, clients):
    """The rule of `dyngate recommend` (dyngate_build.metadata.dev_sample_mismatch): a variant whose accuracy
    was measured on half of fp32's dev examples is not the most accurate, however high it reads."""
    view = copy.deepcopy(catalog[TEXT_MODEL])
    other = next(v for v in view.variant_names if v != "fp32")
    n = view.variants["fp32"].metadata.accuracy.n
    view.variants[other].metadata.accuracy.value = 1.0
    view.variants[other].metadata.accuracy.n = n // 2
    router = Router({TEXT_MODEL: view}, clients)
    for _ in range(5):
        router.live.record(view.variants[other].name, 1.0)
        router.live.record(view.variants["fp32"].name, 50.0)
    answer = router.route(TEXT_MODEL, "a gripping film", "most-accurate")
    assert answer["served_by"] == "fp32", answer["reason"]
    assert f"not comparable: {other} (accuracy measured on {n // 2} dev examples, fp32's on {n}" in answer["reason"]
    answer = router.route(TEXT_MODEL, "a gripping film", "fastest", accuracy_budget=100.0)
    assert answer["served_by"] == "fp32", answer["reason"]


def test_fastest_skips_variants_that_are_not_ready(catalog, clients, triton):
    view = catalog[TEXT_MODEL]
    fast, slow = view.variant_names[:2]
    router = Router(catalog, clients)
    for _ in range(5):
        router.live.record(view.variants[fast].name, 1.0)
        router.live.record(view.variants[slow].name, 50.0)
    assert router.route(TEXT_MODEL, "fine", "fastest", accuracy_budget=100.0)["served_by"] == fast
    triton.unload_model(view.variants[fast].name)
    try:
        for _ in range(150):  # Triton answers an unload before the model has stopped
            if view.variants[fast].name not in triton.ready_models():
                break
            time.sleep(0.2)
        router.ready_models(fresh=True)
        answer = router.route(TEXT_MODEL, "fine", "fastest", accuracy_budget=100.0)
        assert answer["served_by"] == slow
    finally:
        triton.load_model(view.variants[fast].name)
        router.ready_models(fresh=True)


def test_ab_split_follows_the_seeded_weights(catalog, clients):
    view = catalog[TEXT_MODEL]
    a, b = view.variant_names[:2]
    weights = {a: 3.0, b: 1.0}
    router = Router(catalog, clients, RoutingConfig(ab_weights={TEXT_MODEL: weights}, seed=7))
    served = [router.route(TEXT_MODEL, "a fine film", "ab")["served_by"] for _ in range(24)]
    rng = random.Random(7)
    expected = [rng.choices([a, b], weights=[3.0, 1.0])[0] for _ in range(24)]
    assert served == expected
    assert set(served) == {a, b}

    only_b = Router(catalog, clients, RoutingConfig(ab_weights={TEXT_MODEL: {a: 0, b: 1}}, seed=1))
    assert {only_b.route(TEXT_MODEL, "fine", "ab")["served_by"] for _ in range(5)} == {b}


def test_cascade_escalates_exactly_the_low_confidence_inputs(catalog, clients, triton, sentences):
    router = Router(catalog, clients)
    view = catalog[TEXT_MODEL]
    order = router.cascade_order(view, router.ready_models())
    assert len(order) >= 2
    with TritonClient(triton.endpoints["grpc"]) as client:
        first = [confidence(client.predict(view.variants[order[0]].name, s.encode()).answer) for s in sentences]
    # a threshold half-way between two neighbouring confidences near the median: no input sits on it
    values = sorted(first)
    middle = len(values) // 2
    threshold = (values[middle - 1] + values[middle]) / 2
    expected = {i for i, c in enumerate(first) if c < threshold}
    assert 0 < len(expected) < len(sentences)

    escalated = set()
    for i, sentence in enumerate(sentences):
        answer = router.route(TEXT_MODEL, sentence, "cascade", threshold=threshold)
        steps = [s["variant"] for s in answer["route"]]
        assert steps == order[:len(steps)]
        assert answer["route"][0]["confidence"] == pytest.approx(first[i], abs=1e-5)
        if len(steps) > 1:
            escalated.add(i)
            assert answer["served_by"] == order[1] and f"escalated from {order[0]}" in answer["reason"]
        else:
            assert answer["served_by"] == order[0]
    assert escalated == expected


def test_exit_threshold_is_checked_and_refused_where_no_variant_reads_it(catalog, clients):
    """This repository has no early-exit variant: a valid exit_threshold would do nothing, with any policy (found in a
    new user's trial: it was accepted and echoed). Passed to the early-exit variants that read it:
    tests/test_cascade_threshold.py."""
    router = Router(catalog, clients)
    assert catalog[TEXT_MODEL].readers("exit_threshold") == []
    for policy in ("most-accurate", "fastest", "cascade", "ab", catalog[TEXT_MODEL].variant_names[0]):
        with pytest.raises(InputError, match=f"exit_threshold=0.5 does nothing .*no variant of {TEXT_MODEL} reads it"):
            router.route(TEXT_MODEL, "a fine film", policy, exit_threshold=0.5)
    for bad in (True, -0.1, "high", "nan"):  # the value's own rule comes first
        with pytest.raises(InputError, match="exit_threshold=.* (boolean|not a number|finite number)"):
            router.route(TEXT_MODEL, "a fine film", "most-accurate", exit_threshold=bad)
    answer = router.route(TEXT_MODEL, "a fine film", "most-accurate", exit_threshold=" ")  # blank (the page): default
    assert answer["parameters"] == {}


def test_bad_policy_and_limits_are_input_errors(catalog, clients):
    router = Router(catalog, clients, limits=Limits(max_text_chars=50))
    with pytest.raises(InputError, match="policy='fastestest'.*fastest"):
        router.route(TEXT_MODEL, "fine", "fastestest")
    with pytest.raises(InputError, match="60 characters.*limit is 50"):
        router.route(TEXT_MODEL, "x" * 60, "fastest")
    with pytest.raises(InputError, match="unknown model"):
        router.route("gpt-17", "fine", "fastest")


def test_variant_beside_a_choosing_policy_is_an_input_error(catalog, clients):
    """Found in a new user's trial: policy "fastest" with a variant answered from the fastest variant and ignored
    the one asked for. `variant` belongs to policy 'variant'; beside another policy it is refused, naming both."""
    router = Router(catalog, clients)
    first, second = catalog[TEXT_MODEL].variant_names[:2]
    for policy in ("fastest", "most-accurate", "ab", "cascade"):
        with pytest.raises(InputError, match=f"variant='{first}' conflicts with policy='{policy}'"):
            router.route(TEXT_MODEL, "fine", policy, variant=first)
    with pytest.raises(InputError, match=f"policy='{first}' and variant='{second}' name two variants"):
        router.route(TEXT_MODEL, "fine", first, variant=second)
    assert router.route(TEXT_MODEL, "fine", variant=second)["served_by"] == second  # no policy: that variant


# ------------------------------------------------------------------------------------- JSON and gradio

def test_json_route_answers_and_says_why(gateway, catalog, triton):
    view = catalog[TEXT_MODEL]
    variant = view.variant_names[0]
    status, answer = post(gateway.url, {"model": TEXT_MODEL, "text": "a gripping film", "policy": "variant",
                                        "variant": variant})
    assert status == 200, answer
    with TritonClient(triton.endpoints["grpc"]) as client:
        direct = client.predict(view.variants[variant].name, b"a gripping film").answer
    assert answer["served_by"] == variant and answer["answer"]["label"] == direct["label"]
    assert answer["reason"] and answer["route"][0]["triton_model"] == view.variants[variant].name
    for named in view.variant_names:  # a variant without a policy is that variant (not `fastest`)
        status, answer = post(gateway.url, {"model": TEXT_MODEL, "text": "a gripping film", "variant": named})
        assert status == 200 and answer["served_by"] == named and answer["policy"] == "variant", answer

    status, answer = post(gateway.url, {"model": TEXT_MODEL, "text": "dull", "policy": "cascade", "threshold": 1.0})
    assert status == 200 and len(answer["route"]) == len(view.variants)  # nobody reaches 1.0: all tried

    if IMAGE_MODEL in catalog:
        from dyngate_build.data import encode_png, load_digit_images

        images, _ = load_digit_images("dev", limit=1)
        png = encode_png(images[0])
        status, answer = post(gateway.url, {"model": IMAGE_MODEL, "image_base64": base64.b64encode(png).decode(),
                                            "policy": "most-accurate"})
        assert status == 200, answer
        with TritonClient(triton.endpoints["grpc"]) as client:
            direct = client.predict(catalog[IMAGE_MODEL].variants[answer["served_by"]].name, png).answer
        assert answer["answer"]["label"] == direct["label"]
        # a data URI, as a browser's FileReader.readAsDataURL gives it (found in a new user's trial: "not valid base64")
        status, from_uri = post(gateway.url, {"model": IMAGE_MODEL, "policy": "variant", "variant": answer["served_by"],
                                              "image_base64": "data:image/png;base64," + base64.b64encode(png).decode()})
        assert status == 200 and from_uri["answer"] == answer["answer"], from_uri
        # base64 wrapped at 76 characters, as the `base64` command prints it (found in a new user's trial: a 400)
        encoded = base64.b64encode(png).decode()
        wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
        status, from_wrapped = post(gateway.url, {"model": IMAGE_MODEL, "policy": "variant",
                                                  "variant": answer["served_by"], "image_base64": wrapped})
        assert status == 200 and from_wrapped["answer"] == answer["answer"], from_wrapped


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not JSON"),
    ([1, 2], 400, "JSON object"),
    ({"model": "gpt-17", "text": "x"}, 404, "unknown model"),
    ({"model": TEXT_MODEL, "text": ""}, 400, "text is empty"),
    ({"model": TEXT_MODEL, "text": "x" * 3000}, 400, "limit is 2000"),
    ({"model": TEXT_MODEL, "text": "x", "policy": "cheapest"}, 400, "policy='cheapest'"),
    ({"model": TEXT_MODEL, "text": "x", "policy": "variant", "variant": "int3"}, 400, "unknown variant 'int3'"),
    ({"model": TEXT_MODEL, "text": "x", "policy": "fastest", "variant": "fp32"}, 400,
     "variant='fp32' conflicts with policy='fastest'"),
    ({"model": TEXT_MODEL, "text": "x", "exit_threshold": True}, 400, "exit_threshold=True is a boolean"),
    ({"model": TEXT_MODEL, "text": "x", "colour": "red"}, 400, "unknown field"),
    ({"model": IMAGE_MODEL, "image_base64": "***"}, 400, "base64"),
    # found in a new user's trial: an API client was told to "upload" a file, and WEBP was left out
    ({"model": IMAGE_MODEL}, 400, 'image_base64 is missing: vit-tiny is an image model; send the image file\'s bytes '
                                  'in base64 as "image_base64" (PNG, JPEG, BMP, GIF, WEBP'),
    ({"model": IMAGE_MODEL, "text": "a cat"}, 400, '(PNG, JPEG, BMP, GIF, WEBP), not "text"'),
    ({"model": IMAGE_MODEL, "image_base64": ""}, 400, 'as "image_base64" (PNG, JPEG, BMP, GIF, WEBP)'),
    ({"model": IMAGE_MODEL, "image_base64": "data:text/plain;base64,aGk="}, 400,
     "data URI of media type 'text/plain', not an image"),
    ({"model": IMAGE_MODEL, "image_base64": "data:image/png,rawbytes"}, 400, "data URI without ';base64,'"),
    # found in a new user's trial: an empty data URI was told to "upload" a file
    ({"model": IMAGE_MODEL, "image_base64": "data:image/png;base64,"}, 400,
     "image_base64 is empty: send the base64 of a PNG, JPEG, BMP, GIF, WEBP"),
])
def test_json_route_bad_input_is_a_4xx_with_the_message(gateway, body, status, message):
    code, answer = post(gateway.url, body)
    assert code == status and message in answer["error"], answer


def test_gradio_route_endpoint(gateway, catalog):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    api = Client(gateway.url, verbose=False)
    view = catalog[TEXT_MODEL]
    answer = api.predict(TEXT_MODEL, "a gripping film", None, "cascade", None, 0.01, 0.0, None, api_name="/route")
    assert answer["served_by"] == view.variant_names[0] or answer["served_by"] in view.variants
    assert len(answer["route"]) == 1  # threshold 0: the cheapest answers
    with pytest.raises(AppError, match="policy 'variant' needs a variant"):
        api.predict(TEXT_MODEL, "fine", None, "variant", None, 0.01, 0.9, None, api_name="/route")


def test_login_guards_page_and_json_route(built_repository, triton):
    from gradio_client import Client

    config = GatewayConfig.load(env={"DYNGATE_GATEWAY_USER": "ada", "DYNGATE_GATEWAY_PASSWORD": "s3cret"})
    config.metrics_url = triton.endpoints["metrics"]
    running = gateway_app.serve(Path(built_repository), triton.endpoints["grpc"], port=free_port(), config=config)
    try:
        body = {"model": TEXT_MODEL, "text": "fine", "policy": "most-accurate"}
        assert post(running.url, body)[0] == 401
        token = base64.b64encode(b"ada:wrong").decode()
        assert post(running.url, body, {"authorization": f"Basic {token}"})[0] == 401
        token = base64.b64encode(b"ada:s3cret").decode()
        status, answer = post(running.url, body, {"authorization": f"Basic {token}"})
        assert status == 200 and answer["served_by"]
        api = Client(running.url, auth=("ada", "s3cret"), verbose=False)
        assert "is ready" in api.predict(api_name="/triton_status")
    finally:
        running.close()
    assert running.host == "127.0.0.1"
