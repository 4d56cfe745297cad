"""Gateway checks against plain tritonclient, same variant, same Triton, one run.

    .venv/bin/python scripts/bench_gateway.py --repository model_repository --variant distilbert-tiny__fp32 --requests 300
    # before/after: a second gateway from another checkout (git worktree add /tmp/before <commit>), same run
    .venv/bin/python scripts/bench_gateway.py --repository R --before-pythonpath /tmp/before/build:/tmp/before/gateway

Starts an embedded Triton and `dyngate gateway` (page + JSON routes, a process of its own, as deployed) on free
loopback ports and runs two checks on SST-2 dev sentences at natural length, batch 1:
1. Overhead: for each sentence, every path in rotating order:
   - direct gRPC: dyngate_serving.client.TritonClient.predict (tritonclient's gRPC client, as a user's would);
   - direct HTTP: the same over tritonclient's HTTP client (binary tensors);
   - gateway: POST /api/predict {"model", "text", "policy": "variant", "variant"} to the gateway over HTTP
     (one kept-alive connection, as a real client would hold), the gateway started as `make demo` starts it
     (inference to Triton's HTTP endpoint, `--triton-http`);
   - gateway, inference over gRPC: the same gateway code started without `--triton-http`;
   - gateway, no inference: the same body for a model the repository lacks (404 without Triton): the HTTP hop;
   - per --before-pythonpath, the same through another gateway run with that PYTHONPATH (started with `--triton`
     only: older checkouts lack `--triton-http`).
   Prints p50/p90/p99 of each and the p50 each gateway adds over direct gRPC, in ms.
2. Compare tab vs a plain loop: the Compare tab's driver (dyngate_gateway.compare.run_benchmark, concurrency 1) and a
   loop written directly on tritonclient.grpc (InferInput / infer, nothing of dyngate's), alternating in
   `--rounds` blocks of `--requests` requests. Prints both p50s per round, their median ratio, and whether
   they agree within 10%.
3. The gateway's Triton client in one process (no gateway, no HTTP hop in front): for each sentence in turn,
   dyngate_serving.client.AsyncTritonClient with inference over Triton's HTTP port (`infer_url`, what
   `--triton-http` gives the gateway) and over gRPC (grpc.aio), both on one event loop, and tritonclient's
   blocking gRPC client (TritonClient). Prints each one's p50: what the route to Triton costs by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from dyngate_build.data import DataSource, load_examples
    from dyngate_build.evaluate import summarize_ms
    from dyngate_build.repository import list_models
    from dyngate_serving.client import TritonClient
    from dyngate_measure.benchmark import gateway_call, gateway_process
    from dyngate_serving.launcher import TritonServer, TritonServerConfig
    from dyngate_serving.net import free_ports

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--variant", default="distilbert-tiny__fp32", help="Triton model name")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="alternating blocks of the Compare-vs-loop check")
    parser.add_argument("--data", default=None)
    parser.add_argument("--before-pythonpath", action="append", default=[],
                        help="PYTHONPATH of another gateway (another checkout's build:gateway), measured alongside; "
                             "repeat for more")
    args = parser.parse_args(argv)

    entry = next((e for e in list_models(args.repository) if e.name == args.variant), None)
    if entry is None or entry.metadata is None or entry.metadata.client_input != "TEXT":
        print(f"error: {args.variant} is not a text variant in {args.repository}", file=sys.stderr)
        return 2
    examples, _ = load_examples(entry.metadata.source.task, "dev", DataSource.from_setting(args.data),
                                limit=args.requests)
    http_port, grpc_port, metrics_port = free_ports(3)
    config = TritonServerConfig(repository=args.repository, http_port=http_port, grpc_port=grpc_port,
                                metrics_port=metrics_port,
                                models=[entry.name])
    with TritonServer(config) as server, contextlib.ExitStack() as stack:
        gateways = {"gateway": ({}, server.endpoints["http"]), "gateway, inference over gRPC": ({}, None)}
        for i, pythonpath in enumerate(args.before_pythonpath):
            gateways[f"gateway (before {i + 1})"] = ({"PYTHONPATH": pythonpath}, None)
        client = stack.enter_context(contextlib.closing(TritonClient(server.endpoints["grpc"])))
        http_client = stack.enter_context(contextlib.closing(TritonClient(server.endpoints["http"])))
        paths = {"direct gRPC": lambda text: client.predict(entry.name, text.encode()),
                 "direct HTTP": lambda text: http_client.predict(entry.name, text.encode())}
        for name, (env, http_url) in gateways.items():
            log = ROOT / "reports" / f"bench-{name.replace(' ', '-').replace(',', '')}.log"
            url = stack.enter_context(gateway_process(args.repository, server.endpoints["grpc"], log, env=env,
                                                      http_url=http_url))
            call, close = gateway_call(url, entry)
            stack.callback(close)
            paths[name] = lambda text, call=call: call([text.encode()])
            if name == "gateway":  # the same body for a model the repository lacks: 404 without Triton
                call, close = gateway_call(url, entry, model="no-such-model", expected_status=404)
                stack.callback(close)
                paths["gateway, no inference"] = lambda text, call=call: call([text.encode()])
        times = {name: [] for name in paths}
        texts = [ex.raw.decode() for ex in examples]
        for text in texts[:10]:
            for call in paths.values():
                call(text)
        names = list(paths)
        for i, text in enumerate(texts):
            for name in names[i % len(names):] + names[:i % len(names)]:  # each path first in turn
                start = time.perf_counter()
                paths[name](text)
                times[name].append((time.perf_counter() - start) * 1000)
        routes = client_routes_p50(server.endpoints, entry.name, [t.encode() for t in texts])
        agreement = compare_with_plain_loop(server.endpoints["grpc"], entry.name,
                                            [t.encode() for t in texts], args.rounds)
    stats = {name: summarize_ms(values) for name, values in times.items()}
    print(f"{entry.name}: {len(texts)} SST-2 dev sentences, batch 1, rotating order")
    print("| path | p50 ms | p90 ms | p99 ms |\n| --- | --- | --- | --- |")
    for name, s in stats.items():
        print(f"| {name} | {s.p50_ms:.2f} | {s.p90_ms:.2f} | {s.p99_ms:.2f} |")
    for name in gateways:
        print(f"{name} overhead at p50: {stats[name].p50_ms - stats['direct gRPC'].p50_ms:+.2f} ms over direct gRPC")
    print(f"gateway overhead at p50 over direct HTTP (the protocol it sends inference on): "
          f"{stats['gateway'].p50_ms - stats['direct HTTP'].p50_ms:+.2f} ms")
    print(f"the gateway's own HTTP round trip without inference (same body, an unknown model: 404): "
          f"{stats['gateway, no inference'].p50_ms:.2f} ms")
    print(f"\nCompare tab driver vs plain tritonclient.grpc loop, {len(texts)} requests per block, concurrency 1")
    print("| round | Compare p50 ms | plain loop p50 ms | ratio |\n| --- | --- | --- | --- |")
    for i, (ours, plain) in enumerate(agreement):
        print(f"| {i + 1} | {ours:.3f} | {plain:.3f} | {ours / plain:.3f} |")
    ratio = statistics.median(ours / plain for ours, plain in agreement)
    verdict = "agree" if abs(ratio - 1) <= 0.10 else "DISAGREE"
    print(f"median ratio {ratio:.3f}: the two {verdict} within 10%")
    print(f"\nThe gateway's Triton client in one process, {len(texts)} sentences, each route in turn")
    print("| route | p50 ms |\n| --- | --- |")
    for name, p50 in routes.items():
        print(f"| {name} | {p50:.3f} |")
    return 0


def plain_loop_p50_ms(url: str, model: str, raws: list[bytes]) -> float:
    """p50 round trip (ms) of `raws` sent one by one to `url` ("[grpc://]host:port") with tritonclient.grpc alone (no dyngate code on the path)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    from dyngate_build.evaluate import summarize_ms

    client = grpcclient.InferenceServerClient(url.removeprefix("grpc://"))
    try:
        times = []
        for raw in raws:
            tensor = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[raw]], dtype=np.object_))
            start = time.perf_counter()
            client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput("RESULT"),
                                                   grpcclient.InferRequestedOutput("LOGITS")])
            times.append((time.perf_counter() - start) * 1000)
    finally:
        client.close()
    return summarize_ms(times).p50_ms


def client_routes_p50(endpoints: dict[str, str], model: str, raws: list[bytes]) -> dict[str, float]:
    """p50 round trip (ms) of `raws` one by one on each route the gateway's client can take to Triton, in turn
    per input: AsyncTritonClient over HTTP (infer_url) and over gRPC on one event loop, TritonClient (blocking
    gRPC). Requests are never merged here (in_flight=0, one at a time)."""
    import asyncio

    from dyngate_build.evaluate import summarize_ms
    from dyngate_serving.client import AsyncTritonClient, TritonClient

    async def measure() -> dict[str, list[float]]:
        routes = {"AsyncTritonClient, HTTP (--triton-http)":
                  AsyncTritonClient(endpoints["grpc"], infer_url=endpoints["http"], in_flight=0),
                  "AsyncTritonClient, gRPC (grpc.aio)": AsyncTritonClient(endpoints["grpc"], in_flight=0)}
        blocking = TritonClient(endpoints["grpc"])
        times: dict[str, list[float]] = {name: [] for name in [*routes, "TritonClient, gRPC (blocking)"]}
        try:
            for client in routes.values():
                await client.predict(model, raws[0])
            blocking.predict(model, raws[0])
            for raw in raws:
                for name, client in routes.items():
                    start = time.perf_counter()
                    await client.predict(model, raw)
                    times[name].append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                blocking.predict(model, raw)
                times["TritonClient, gRPC (blocking)"].append((time.perf_counter() - start) * 1000)
        finally:
            for client in routes.values():
                await client.close()
            blocking.close()
        return times

    return {name: summarize_ms(values).p50_ms for name, values in asyncio.run(measure()).items()}


def compare_with_plain_loop(url: str, model: str, raws: list[bytes], rounds: int) -> list[tuple[float, float]]:
    """(Compare tab p50 ms, plain loop p50 ms) per round; the order of the two alternates between rounds."""
    from dyngate_gateway.compare import run_benchmark

    def ours() -> float:
        result = run_benchmark(url, "grpc", {"v": model}, raws, requests=len(raws), concurrency=[1])
        return result.rows[0][5]  # HEADERS: p50 ms

    out = []
    for i in range(rounds):
        if i % 2:
            plain = plain_loop_p50_ms(url, model, raws)
            mine = ours()
        else:
            mine = ours()
            plain = plain_loop_p50_ms(url, model, raws)
        out.append((mine, plain))
    return out


if __name__ == "__main__":
    sys.exit(main())
