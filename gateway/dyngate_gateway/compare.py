"""Live latency comparison of variants through Triton (the Compare tab). Plain Python, no Gradio.

    result = run_benchmark("127.0.0.1:8001", "grpc", ["distilbert-tiny__fp32", "distilbert-tiny__torchscript"],
                           raws, requests=100, concurrency=[1, 4], batch_size=1)
    result.rows            # per (variant, concurrency): p50/p90/p99/mean ms, throughput, errors
    result.server          # per variant: Triton's queue / compute split from its statistics API (deltas)

For each concurrency level, each variant is driven by that many threads, each with its own TritonClient
(tritonclient clients are not thread-safe), sending `requests` requests of `batch_size` dev inputs in total;
the order of the variants rotates from level to level so drift of the machine does not always hit the same
one. The clients are made once per run (as many as the highest level) and warmed on every variant before the
first timed request (connection open, model signature fetched), so no timed round trip pays for a connection
or a metadata lookup; thread i of every level uses client i. Round trips are timed around one `predict_batch`
call, summarized with dyngate_build.evaluate.summarize_ms (the same percentiles as
gateway/dyngate_measure/benchmark.py and the build's own measurement).
"""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from dyngate_build.errors import InputError
from dyngate_build.evaluate import summarize_ms
from dyngate_build.metadata import dev_sample_mismatch
from dyngate_measure.load_test import STAT_PHASES, settled_stats, triton_stats
from dyngate_measure.recommend import BASELINE_VARIANT, Candidate, Recommendation, recommend
from dyngate_serving.client import TritonClient

HEADERS = ["variant", "concurrency", "batch", "requests", "errors", "p50 ms", "p90 ms", "p99 ms", "mean ms",
           "throughput items/s"]
SERVER_HEADERS = ["variant", "requests", "queue ms", "compute input ms", "compute infer ms", "compute output ms",
                  "queue share"]


@dataclass
class BenchResult:
    rows: list[list] = field(default_factory=list)  # HEADERS
    latencies: dict[str, list[float]] = field(default_factory=dict)  # "variant@c" -> round trips (ms)
    server: list[list] = field(default_factory=list)  # SERVER_HEADERS (per variant, over the whole run)
    errors: dict[str, list[str]] = field(default_factory=dict)  # variant -> distinct error messages

    def as_dict(self) -> dict:
        return {"rows": [dict(zip(HEADERS, r)) for r in self.rows],
                "server": [dict(zip(SERVER_HEADERS, r)) for r in self.server],
                "latencies_ms": {k: [round(v, 4) for v in vs] for k, vs in self.latencies.items()},
                "errors": self.errors}

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(HEADERS)
        writer.writerows(self.rows)
        writer.writerow([])
        writer.writerow(SERVER_HEADERS)
        writer.writerows(self.server)
        return out.getvalue()


def check_settings(requests: int, concurrency: list[int], batch_size: int, limits) -> None:
    """InputError naming the field and the cap when a setting is out of range."""
    if not 1 <= int(requests) <= limits.max_bench_requests:
        raise InputError(f"requests={requests} is outside 1..{limits.max_bench_requests} (max_bench_requests)")
    if not concurrency:
        raise InputError("concurrency: give at least one level, e.g. 1 or 1,2,4")
    for c in concurrency:
        if not 1 <= int(c) <= limits.max_bench_concurrency:
            raise InputError(f"concurrency={c} is outside 1..{limits.max_bench_concurrency} (max_bench_concurrency)")
    if not 1 <= int(batch_size) <= limits.max_bench_batch:
        raise InputError(f"batch_size={batch_size} is outside 1..{limits.max_bench_batch} (max_bench_batch)")


def parse_levels(text) -> list[int]:
    """"1, 2,4" -> [1, 2, 4]; InputError when a part is not a whole number."""
    if isinstance(text, (int, float)):
        return [int(text)]
    levels = []
    for part in str(text or "").replace(";", ",").split(","):
        if part.strip():
            try:
                levels.append(int(part.strip()))
            except ValueError:
                raise InputError(f"concurrency {text!r}: {part.strip()!r} is not a whole number; write e.g. 1,2,4") from None
    return sorted(set(levels))


def split_row(variant: str, before: dict, after: dict) -> list:
    """One SERVER_HEADERS row from two statistics snapshots (dyngate_measure.load_test.triton_stats): mean ms per
    request of each phase."""
    n = after["success"] - before["success"]
    ms = {k: (after[f"{k}_ns"] - before[f"{k}_ns"]) / 1e6 / n if n else 0.0 for k in STAT_PHASES}
    total = ms["queue"] + ms["compute_input"] + ms["compute_infer"] + ms["compute_output"]
    share = ms["queue"] / total if total else 0.0
    return [variant, n, round(ms["queue"], 4), round(ms["compute_input"], 4), round(ms["compute_infer"], 4),
            round(ms["compute_output"], 4), round(share, 4)]


def _drive(clients: list[TritonClient], model: str, batches: list[list[bytes]],
           tick) -> tuple[list[float], list[str], float]:
    """Send `batches` with one thread per client of `clients` (warmed ones, each used by its thread only); (round
    trips ms, errors, wall seconds)."""
    times: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    cursor = iter(range(len(batches)))

    def worker(client: TritonClient):
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            start = time.perf_counter()
            try:
                client.predict_batch(model, batches[index])
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    times.append(elapsed)
            except Exception as e:  # counted per variant, the run goes on
                with lock:
                    errors.append(str(e))
            tick()

    threads = [threading.Thread(target=worker, args=(client,), daemon=True) for client in clients]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times, errors, time.perf_counter() - started


def run_benchmark(url: str, protocol: str, variants: dict[str, str], raws: list[bytes], requests: int,
                  concurrency: list[int], batch_size: int = 1, warmup: int = 3, timeout_s: float = 30,
                  progress=None) -> BenchResult:
    """Benchmark `variants` ({label: triton model}) on `raws` (cycled); see the module docstring.

    warmup: untimed requests per variant before the first timed one, at least one per client.
    progress(fraction, text) is called as requests complete (e.g. a gr.Progress)."""
    if not variants:
        raise InputError("no variant chosen: tick at least one variant to benchmark")
    if not raws:
        raise InputError("no inputs to send: the input set is empty")
    batches = [[raws[(i * batch_size + j) % len(raws)] for j in range(batch_size)] for i in range(requests)]
    total = len(variants) * len(concurrency) * requests
    done = [0]
    done_lock = threading.Lock()

    def tick():
        with done_lock:
            done[0] += 1
            n = done[0]
        if progress is not None and (n % max(1, total // 100) == 0 or n == total):
            progress(n / total, f"{n}/{total} requests")

    result = BenchResult()
    clients = [TritonClient(url, protocol, timeout_s=timeout_s) for _ in range(max(concurrency))]
    control = clients[0]  # also Triton's statistics, read between the timed runs
    try:
        labels = list(variants)
        for label in labels:  # warm-up: Triton's lazily-initialised state, and each client's connection and signature
            for i in range(max(warmup, len(clients))):
                try:
                    clients[i % len(clients)].predict_batch(variants[label], batches[i % len(batches)])
                except Exception:
                    break
        before = {label: triton_stats(control, variants[label]) for label in labels}
        for level_index, level in enumerate(concurrency):
            rotation = labels[level_index % len(labels):] + labels[: level_index % len(labels)]
            for label in rotation:
                times, errors, wall = _drive(clients[:level], variants[label], batches, tick)
                result.latencies[f"{label}@{level}"] = times
                if errors:
                    result.errors.setdefault(label, [])
                    result.errors[label] += [e for e in dict.fromkeys(errors) if e not in result.errors[label]]
                if times:
                    lat = summarize_ms(times)
                    cells = [round(lat.p50_ms, 3), round(lat.p90_ms, 3), round(lat.p99_ms, 3), round(lat.mean_ms, 3)]
                else:
                    cells = [None] * 4
                throughput = len(times) * batch_size / wall if wall > 0 else 0.0
                result.rows.append([label, level, batch_size, requests, len(errors), *cells, round(throughput, 2)])
        result.rows.sort(key=lambda r: (labels.index(r[0]), r[1]))
        for label in labels:
            answered = sum(len(result.latencies[f"{label}@{level}"]) for level in concurrency)
            after = settled_stats(control, variants[label], before[label], answered, counted="success")
            result.server.append(split_row(label, before[label], after))
    finally:
        for client in clients:
            client.close()
    return result


def distribution(result: BenchResult, points: int = 50) -> list[dict]:
    """Latency percentiles per run ("variant@c"), for a distribution plot: [{run, percentile, ms}]."""
    out = []
    for run, times in result.latencies.items():
        if not times:
            continue
        qs = np.linspace(0, 100, points)
        for q, v in zip(qs, np.percentile(np.asarray(times), qs)):
            out.append({"run": run, "percentile": float(q), "ms": float(v)})
    return out


def tradeoff(variants: dict, rows: list[list], budget_pt: float, metric_name: str = "accuracy",
             baseline: str = BASELINE_VARIANT, level: int | None = None) -> Recommendation:
    """The Compare tab's recommendation: `dyngate_measure.recommend.recommend` on the p50 just measured.

    variants: {variant: VariantMetadata or None} (dev metric, size); rows: a run's HEADERS rows, of which the
    rows of concurrency `level` (default: the run's lowest) give each variant's p50 (at the run's batch size).
    A variant without a successful request at that level has no p50 and is not recommended, nor one whose dev
    metric was measured on another dev sample than the baseline's (`dyngate_build.metadata.dev_sample_mismatch`)."""
    level = min((r[1] for r in rows), default=1) if level is None else level
    at_level = {r[0]: r for r in rows if r[1] == level}
    candidates = []
    reference = variants.get(baseline)
    for variant, row in at_level.items():
        meta = variants.get(variant)
        unusable = (dev_sample_mismatch(meta.accuracy.n, meta.accuracy.examples_sha256, reference.accuracy.n,
                                        reference.accuracy.examples_sha256, baseline, metric_name)
                    if meta and reference else None)
        candidates.append(Candidate(variant, meta.accuracy.value if meta else None, row[5],
                                    meta.size_mb if meta else None, unusable=unusable))
    batch = next((r[2] for r in at_level.values()), 1)
    return recommend(candidates, baseline, budget_pt, metric_name,
                     latency=f"Triton p50 just measured, concurrency {level}, batch {batch}")


def levels(rows: list[list]) -> list[int]:
    """The concurrency levels of a run's HEADERS rows, ascending."""
    return sorted({r[1] for r in rows})


def to_json(result: BenchResult, settings: dict) -> str:
    return json.dumps({"settings": settings, **result.as_dict()}, indent=2)
