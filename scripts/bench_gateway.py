"""Gateway overhead: the gateway's JSON predict route vs a direct tritonclient gRPC call, same variant.

    python scripts/bench_gateway.py --repository model_repository --variant distilbert-tiny__fp32 --requests 300

Starts an embedded Triton and the gateway (page + JSON routes) on free loopback ports, then for each SST-2
dev sentence at natural length, batch 1, times both paths in alternating order:
- direct: gateway.client.TritonClient.predict over gRPC (what the gateway itself calls);
- gateway: POST /api/predict {"model", "text", "policy": "variant", "variant"} to the gateway over HTTP
  (one kept-alive connection, as a real client would hold).
Prints p50/p90/p99 of each and the p50 overhead (gateway minus direct) in ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import http.client
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from build.data import DataSource, load_examples
    from build.evaluate import summarize_ms
    from build.repository import list_models
    from gateway.app import serve
    from gateway.client import TritonClient
    from gateway.config import GatewayConfig
    from gateway.triton_server import TritonServer, TritonServerConfig, free_port, free_ports

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--variant", default="distilbert-tiny__fp32", help="Triton model name")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--data", default=None)
    args = parser.parse_args(argv)

    entry = next((e for e in list_models(args.repository) if e.name == args.variant), None)
    if entry is None or entry.metadata.get("client_input") != "TEXT":
        print(f"error: {args.variant} is not a text variant in {args.repository}", file=sys.stderr)
        return 2
    examples, _ = load_examples(entry.metadata["source"]["task"], "dev", DataSource.from_setting(args.data),
                                limit=args.requests)
    http_port, grpc_port, metrics_port = free_ports(3)
    config = TritonServerConfig(repository=args.repository, http_port=http_port, grpc_port=grpc_port,
                                metrics_port=metrics_port,
                                models=[entry.name])
    with TritonServer(config) as server:
        gateway = serve(args.repository, server.endpoints["grpc"], port=free_port(),
                        config=GatewayConfig(metrics_url=server.endpoints["metrics"]))
        try:
            client = TritonClient(server.endpoints["grpc"])
            connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)  # kept alive

            def via_gateway(text: str) -> dict:
                body = json.dumps({"model": entry.model, "text": text, "policy": "variant",
                                   "variant": entry.variant})
                connection.request("POST", "/api/predict", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = json.loads(response.read())
                if response.status != 200:
                    raise RuntimeError(f"gateway answered {response.status}: {answer}")
                return answer

            paths = {"direct gRPC": lambda text: client.predict(entry.name, text.encode()),
                     "gateway JSON": via_gateway}
            times = {name: [] for name in paths}
            texts = [ex.raw.decode() for ex in examples]
            for text in texts[:10]:
                for call in paths.values():
                    call(text)
            for i, text in enumerate(texts):
                order = list(paths) if i % 2 else list(paths)[::-1]
                for name in order:
                    start = time.perf_counter()
                    paths[name](text)
                    times[name].append((time.perf_counter() - start) * 1000)
        finally:
            gateway.close()
    stats = {name: summarize_ms(values) for name, values in times.items()}
    print(f"{entry.name}: {len(texts)} SST-2 dev sentences, batch 1, alternating order")
    print("| path | p50 ms | p90 ms | p99 ms |\n| --- | --- | --- | --- |")
    for name, s in stats.items():
        print(f"| {name} | {s.p50_ms:.2f} | {s.p90_ms:.2f} | {s.p99_ms:.2f} |")
    overhead = stats["gateway JSON"].p50_ms - stats["direct gRPC"].p50_ms
    print(f"gateway overhead at p50: {overhead:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
