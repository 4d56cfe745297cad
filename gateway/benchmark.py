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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from build.errors import ConfigError
from build.evaluate import Latency, summarize_ms
from build.repository import list_models

PATHS = ("in-process", "http", "grpc")


@dataclass
class Row:
    """One variant's latency per path (ms); `times` keeps every timed request's ms per path, and `answers` the
    parsed answers of every timed request per path when `measure(..., keep_answers=True)` (Triton paths)."""

    model: str
    latencies: dict[str, Latency]
    times: dict[str, list[float]] = field(default_factory=dict)
    answers: dict[str, list[dict]] = field(default_factory=dict)


def _predictor(entry):
    from build.runtime import Predictor

    versions = sorted((p for p in entry.folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    return Predictor(str(versions[-1]))


def measure(entries, raws: list[bytes], endpoints: dict[str, str], warmup: int = 5,
            paths: Sequence[str] = PATHS, batch_size: int = 1, keep_answers: bool = False,
            progress: Callable[[int], None] | None = None) -> list[Row]:
    """Time every entry on every path for every request, interleaved; returns one Row per entry.

    batch_size 1 sends each raw input as its own request; batch_size n > 1 sends consecutive groups of n raw
    inputs as ONE request of n items (`TritonClient.predict_batch`, `Predictor.predict` in process), so the
    number of timed requests is len(raws) // n. `paths` chooses among "in-process", "http" and "grpc".
    `progress(k)` is called after each timed request with the number of calls just timed."""
    from gateway.client import TritonClient

    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise ConfigError(f"paths={list(paths)!r}: choose one or more of {', '.join(PATHS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be >= 1")
    requests = [raws[i:i + batch_size] for i in range(0, len(raws) - batch_size + 1, batch_size)]
    if not requests:
        raise ConfigError(f"{len(raws)} inputs make no request of batch_size {batch_size}; give more inputs")
    clients = {p: TritonClient(endpoints[p], p) for p in paths if p != "in-process"}
    predictors = {e.name: _predictor(e) for e in entries} if "in-process" in paths else {}

    def call(name: str, path: str, batch: list[bytes]):
        if path == "in-process":
            return predictors[name].predict(batch)
        return clients[path].predict_batch(name, batch)

    pairs = [(e.name, path) for e in entries for path in paths]
    for batch in requests[:warmup]:
        for name, path in pairs:
            call(name, path, batch)
    times: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    answers: dict[tuple[str, str], list[dict]] = {pair: [] for pair in pairs}
    for i, batch in enumerate(requests):
        rotation = pairs[i % len(pairs):] + pairs[: i % len(pairs)]
        for name, path in rotation:
            start = time.perf_counter()
            out = call(name, path, batch)
            times[(name, path)].append((time.perf_counter() - start) * 1000)
            if keep_answers and path != "in-process":
                answers[(name, path)].extend(a.answer for a in out)
        if progress is not None:
            progress(len(rotation))
    for client in clients.values():
        client.close()
    return [Row(e.name, {path: summarize_ms(times[(e.name, path)]) for path in paths},
                times={path: times[(e.name, path)] for path in paths},
                answers={path: answers[(e.name, path)] for path in paths if keep_answers and path != "in-process"})
            for e in entries]


def markdown(rows: list[Row], title: str) -> str:
    """Table: variant | p50 (p99) per path, and each path's p50 over the first row's."""
    paths = [p for p in PATHS if p in rows[0].latencies]
    header = "| variant | " + " | ".join(f"{p} p50 ms (p99)" for p in paths) + " |"
    lines = [f"**{title}**", "", header, "|" + " --- |" * (len(paths) + 1)]
    for row in rows:
        cells = [f"{row.latencies[p].p50_ms:.2f} ({row.latencies[p].p99_ms:.2f})" for p in paths]
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
