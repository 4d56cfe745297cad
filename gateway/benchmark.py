"""Latency of every variant, in process and through Triton (HTTP and gRPC), side by side in one run.

    python -m gateway.benchmark --repository model_repository --model distilbert-tiny --requests 200

Requests are real dev inputs at natural length (SST-2 sentences, digits images, CoNLL sentences), batch 1,
sent one at a time. The run is interleaved: for each input, every (variant, path) pair is timed once in a
rotating order, so slow drift of the machine hits every column alike. In-process timing runs the variant's
own folder with the same runtime Triton loads (build/runtime.py); Triton timing is the client's round trip.
Starts an embedded Triton on free ports unless --url points at a running one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from build.evaluate import Latency, summarize_ms
from build.repository import list_models

PATHS = ("in-process", "http", "grpc")


@dataclass
class Row:
    """One variant's latency per path (ms)."""

    model: str
    latencies: dict[str, Latency]


def _predictor(entry):
    from build.runtime import Predictor

    versions = sorted((p for p in entry.folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    return Predictor(str(versions[-1]))


def measure(entries, raws: list[bytes], endpoints: dict[str, str], warmup: int = 5) -> list[Row]:
    """Time every entry on every path for every raw input, interleaved; returns one Row per entry."""
    from gateway.client import TritonClient

    clients = {"http": TritonClient(endpoints["http"], "http"), "grpc": TritonClient(endpoints["grpc"], "grpc")}
    predictors = {e.name: _predictor(e) for e in entries}

    def call(name: str, path: str, raw: bytes) -> None:
        if path == "in-process":
            predictors[name].predict([raw])
        else:
            clients[path].predict(name, raw)

    pairs = [(e.name, path) for e in entries for path in PATHS]
    for raw in raws[:warmup]:
        for name, path in pairs:
            call(name, path, raw)
    times: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    for i, raw in enumerate(raws):
        rotation = pairs[i % len(pairs):] + pairs[: i % len(pairs)]
        for name, path in rotation:
            start = time.perf_counter()
            call(name, path, raw)
            times[(name, path)].append((time.perf_counter() - start) * 1000)
    return [Row(e.name, {path: summarize_ms(times[(e.name, path)]) for path in PATHS}) for e in entries]


def markdown(rows: list[Row], title: str) -> str:
    """Table: variant | p50 (p99) per path, and each path's p50 over the first row's."""
    header = "| variant | " + " | ".join(f"{p} p50 ms (p99)" for p in PATHS) + " |"
    lines = [f"**{title}**", "", header, "|" + " --- |" * (len(PATHS) + 1)]
    for row in rows:
        cells = [f"{row.latencies[p].p50_ms:.2f} ({row.latencies[p].p99_ms:.2f})" for p in PATHS]
        lines.append(f"| {row.model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from build.data import DataSource, load_examples
    from gateway.triton_server import TritonServer, TritonServerConfig, free_ports

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--model", action="append", help="model name(s) in the repository (default: all)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per variant and path")
    parser.add_argument("--data", default=None)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    entries = [e for e in list_models(Path(args.repository)) if e.backend == "python"
               and (not args.model or e.model in args.model)]
    if not entries:
        print(f"error: no python-backend variants in {args.repository} for {args.model or 'any model'}",
              file=sys.stderr)
        return 2
    source = DataSource.from_setting(args.data)
    http, grpc, metrics = free_ports(3)
    config = TritonServerConfig(repository=Path(args.repository), http_port=http, grpc_port=grpc,
                                metrics_port=metrics, models=[e.name for e in entries])
    results = {}
    with TritonServer(config) as server:
        for model in sorted({e.model for e in entries}):
            group = [e for e in entries if e.model == model]
            task = group[0].metadata["source"]["task"]
            examples, _ = load_examples(task, "dev", source, limit=args.requests)
            rows = measure(group, [ex.raw for ex in examples], server.endpoints)
            print(markdown(rows, f"{model}: {len(examples)} dev inputs, batch 1, interleaved"), "\n")
            results[model] = {r.model: {p: lat.as_dict() for p, lat in r.latencies.items()} for r in rows}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
