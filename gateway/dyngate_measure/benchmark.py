"""`make bench`: every dyngate variant against the baselines a user would otherwise ship, in one interleaved run.

    dyngate bench --repository model_repository --requests 200 --repeats 3 --base --out reports

Rows of one table, all timed in the same loop (for each request, every row once, in a rotating order, so slow
drift of the machine hits every row alike), on real dev inputs at natural length (SST-2 sentences for text):
- baselines, in process: PyTorch eager FP32 (the HF model's forward, `torch.inference_mode`; how the
  predecessor served), ONNX Runtime FP32 (the fp32 variant's `model.onnx` in a plain `InferenceSession`, no
  dyngate runtime) and ONNX Runtime INT8 dynamic (`onnxruntime.quantization.quantize_dynamic` of that graph
  with its default settings, what a user of Optimum would ship);
- every dyngate variant of the repository in process (its own runtime engine, build/dyngate_build/runtime.py) and through
  Triton (gRPC by default; `--paths in-process,grpc,http`), on an embedded Triton started on free ports.
Every row goes from the same raw request bytes to logits: the baselines tokenize with the variant's own
tokenizer.json exactly as the variants do, so preprocessing is inside every number. Batch 1 sends one input
per request; batch 8 sends 8 consecutive dev inputs as one request, padded to the longest of them.
In-process rows run with the same intra-op thread count (`--threads`, default: all cores).

`--repeats` repeats the whole interleaved run; each row reports the median of its per-repeat p50, the min and
max of those p50s, p90 and throughput over all repeats, and its speed-up against each baseline
(baseline p50 / row p50; above 1 = faster than the baseline). Accuracy is the build's dev metric
(metadata.json) for variants and measured here, on the same dev examples, for the baselines.

`--base` adds a section on the DistilBERT-base architecture (DistilBertConfig defaults: 6 layers, dim 768,
12 heads, FFN 3072; the hub checkpoint when `--base-checkpoint` names one that loads, else randomly
initialised, as here without a hub), in process only, latency only: the three baselines and the techniques
whose latency does not depend on training, made with the techniques' own functions (pruning without
recovery fine-tuning, early exit with untrained ramps forced to exit after a fixed layer).

Writes `<out>/bench.md` and `<out>/bench.json` (machine, library versions, settings, one section per model).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Sequence

import numpy as np

from dyngate_build.errors import ConfigError
from dyngate_build.evaluate import summarize_ms, torch_threads_kept
from dyngate_build.metadata import LatencyRecord
from dyngate_build.repository import directory_size, list_models, newest_version_dir, python_variants_by_model

PATHS = ("in-process", "http", "grpc")
BATCH_SIZES = (1, 8)
EAGER, ORT_FP32, ORT_INT8 = "pytorch-eager-fp32", "onnxruntime-fp32", "onnxruntime-int8-dynamic"
BASELINES = (EAGER, ORT_FP32, ORT_INT8)
BASELINE_LABELS = {EAGER: "PyTorch eager FP32", ORT_FP32: "ONNX Runtime FP32", ORT_INT8: "ONNX Runtime INT8 dynamic"}
# Techniques on the DistilBERT-base architecture whose latency does not depend on training, with the settings
# that keep them free of fine-tuning (pruned: structure only, no KD recovery; zeroquant: kd off by default).
# (row name, technique, options); the MatMulNBits 8-bit kernel row is there because it measured slower than FP32.
BASE_TECHNIQUES = (("fp16", "fp16", {}), ("torchscript", "torchscript", {}), ("int8-dynamic", "int8-dynamic", {}),
                   ("int8-static", "int8-static", {}), ("smoothquant", "smoothquant", {"alpha": 0.5}),
                   ("zeroquant-w8a8", "zeroquant-w8a8", {}),
                   ("zeroquant-w8a8 (MatMulNBits)", "zeroquant-w8a8", {"kernel": "matmulnbits"}),
                   ("zeroquant-w4a8", "zeroquant-w4a8", {}),
                   ("pruned", "pruned", {"ratio": 0.4, "recovery_epochs": 0.0}))
BASE_CALIBRATION = 128
SPAN = ("every row from the same raw request bytes: tokenization → graph → logits (Triton rows: the client's "
        "round trip)")


# ------------------------------------------------------------------------------------------------ timing core

def interleave(calls: dict[Hashable, Callable], requests: Sequence, warmup: int = 5,
               progress: Callable[[int], None] | None = None,
               on_result: Callable[[Hashable, object], None] | None = None) -> dict[Hashable, list[float]]:
    """Time every call on every request, interleaved; returns ms per request for each call's key.

    For request i, every call runs once, starting at position i (mod the number of calls) of `calls`, so each
    call is first, second, ... equally often. The first `warmup` requests go through every call untimed first.
    `progress(k)` after each request (k = calls just timed); `on_result(key, output)` gets every timed output."""
    keys = list(calls)
    for request in list(requests)[:warmup]:
        for key in keys:
            calls[key](request)
    times: dict[Hashable, list[float]] = {key: [] for key in keys}
    for i, request in enumerate(requests):
        shift = i % len(keys)
        for key in keys[shift:] + keys[:shift]:
            start = time.perf_counter()
            out = calls[key](request)
            times[key].append((time.perf_counter() - start) * 1000)
            if on_result is not None:
                on_result(key, out)
        if progress is not None:
            progress(len(keys))
    return times


@dataclass
class Row:
    """One variant's latency per path (ms); `times` keeps every timed request's ms per path, and `answers` the
    parsed answers of every timed request per path when `measure(..., keep_answers=True)` (Triton paths)."""

    model: str
    latencies: dict[str, LatencyRecord]
    times: dict[str, list[float]] = field(default_factory=dict)
    answers: dict[str, list[dict]] = field(default_factory=dict)


def variant_predictor(folder: str | Path, threads: int = 0):
    """A Predictor over a variant's version folder with its own engine, its intra-op threads set to `threads`
    (0 = as its runtime.json says)."""
    from dyngate_build.runtime import ENGINES, Predictor, RuntimeSpec

    spec = RuntimeSpec.load(str(folder))
    if threads:
        spec.threads = threads
    return Predictor(str(folder), engine=ENGINES[spec.engine](str(folder), spec))


def _triton_call(client, name: str) -> Callable:
    """A call sending one request (a list of raw inputs) to Triton model `name` through `client`."""
    return lambda batch: client.predict_batch(name, batch)


def _batches(raws: list[bytes], batch_size: int) -> list[list[bytes]]:
    return [raws[i:i + batch_size] for i in range(0, len(raws) - batch_size + 1, batch_size)]


def measure(entries, raws: list[bytes], endpoints: dict[str, str], warmup: int = 5,
            paths: Sequence[str] = PATHS, batch_size: int = 1, keep_answers: bool = False,
            progress: Callable[[int], None] | None = None) -> list[Row]:
    """Time every entry on every path for every request, interleaved; returns one Row per entry.

    batch_size 1 sends each raw input as its own request; batch_size n > 1 sends consecutive groups of n raw
    inputs as ONE request of n items (`TritonClient.predict_batch`, `Predictor.predict` in process), so the
    number of timed requests is len(raws) // n. `paths` chooses among "in-process", "http" and "grpc".
    `progress(k)` is called after each timed request with the number of calls just timed."""
    from dyngate_serving.client import TritonClient

    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise ConfigError(f"paths={list(paths)!r}: choose one or more of {', '.join(PATHS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be >= 1")
    requests = _batches(raws, batch_size)
    if not requests:
        raise ConfigError(f"{len(raws)} inputs make no request of batch_size {batch_size}; give more inputs")
    clients = {p: TritonClient(endpoints[p], p) for p in paths if p != "in-process"}
    try:
        calls = {}
        for e in entries:
            for path in paths:
                if path == "in-process":
                    calls[(e.name, path)] = variant_predictor(newest_version_dir(e.folder)).predict
                else:
                    calls[(e.name, path)] = _triton_call(clients[path], e.name)
        answers: dict[tuple[str, str], list[dict]] = {key: [] for key in calls}

        def keep(key, out):
            if keep_answers and key[1] != "in-process":
                answers[key].extend(a.answer for a in out)

        times = interleave(calls, requests, warmup, progress, keep)
    finally:
        for client in clients.values():
            client.close()
    return [Row(e.name, {path: summarize_ms(times[(e.name, path)]) for path in paths},
                times={path: times[(e.name, path)] for path in paths},
                answers={path: answers[(e.name, path)] for path in paths if keep_answers and path != "in-process"})
            for e in entries]


# ------------------------------------------------------------------------------------------------ rows and stats

@dataclass
class Candidate:
    """One row of a bench table: `call(request)` runs one request (a list of raw inputs, or whatever the
    section's requests are) end to end. kind: "baseline" or "dyngate"; path: "in-process", "grpc" or "http"."""

    name: str
    kind: str
    path: str
    call: Callable
    variant: str | None = None
    triton_name: str | None = None
    accuracy: float | None = None
    accuracy_source: str | None = None
    size_bytes: int | None = None
    notes: str = ""


def latency_summary(per_repeat_ms: list[list[float]], batch_size: int) -> dict:
    """Median/min/max over repeats of each repeat's p50, p90 and mean over all requests, throughput (items/s of
    one client sending back to back). Rounded to 4 decimals; ratios are computed from these rounded values."""
    p50s = [float(np.percentile(t, 50)) for t in per_repeat_ms]
    pooled = np.concatenate([np.asarray(t, dtype=np.float64) for t in per_repeat_ms])
    return {"batch_size": batch_size, "requests": int(pooled.size), "repeats": len(per_repeat_ms),
            "p50_ms": round(statistics.median(p50s), 4), "p50_min_ms": round(min(p50s), 4),
            "p50_max_ms": round(max(p50s), 4), "per_repeat_p50_ms": [round(p, 4) for p in p50s],
            "p90_ms": round(float(np.percentile(pooled, 90)), 4), "mean_ms": round(float(pooled.mean()), 4),
            "throughput_items_s": round(batch_size * 1000.0 / float(pooled.mean()), 3)}


def speedup(baseline_p50: float, row_p50: float) -> float:
    """Baseline p50 / row p50 (above 1 = the row is faster), rounded to 3 decimals."""
    return round(baseline_p50 / row_p50, 3)


def add_ratios(rows: list[dict], baselines: Sequence[str]) -> None:
    """Fill each row's `ratios[batchB][baseline]` from the rows' own p50s."""
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        row["ratios"] = {}
        for key, lat in row["latency"].items():
            row["ratios"][key] = {b: speedup(by_name[b]["latency"][key]["p50_ms"], lat["p50_ms"])
                                  for b in baselines if b in by_name}


def run_rows(candidates: list[Candidate], requests_by_batch: dict[int, list], repeats: int, warmup: int,
             baselines: Sequence[str], progress: Callable[[int], None] | None = None,
             on_result: Callable | None = None) -> list[dict]:
    """Time `candidates` interleaved, `repeats` times per batch size; one dict per candidate with latency per
    batch size (`latency_summary`) and ratios against `baselines` (names of candidates)."""
    if repeats < 1:
        raise ConfigError(f"repeats={repeats!r} must be >= 1")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ConfigError(f"row names repeat: {names}")
    per_repeat: dict[int, dict[str, list[list[float]]]] = {b: {n: [] for n in names} for b in requests_by_batch}
    calls = {c.name: c.call for c in candidates}
    for _ in range(repeats):
        for b, requests in requests_by_batch.items():
            times = interleave(calls, requests, warmup, progress,
                               (lambda key, out, b=b: on_result(key, b, out)) if on_result else None)
            for n in names:
                per_repeat[b][n].append(times[n])
    rows = []
    for c in candidates:
        rows.append({"name": c.name, "kind": c.kind, "path": c.path, "variant": c.variant,
                     "triton_name": c.triton_name, "accuracy": c.accuracy, "accuracy_source": c.accuracy_source,
                     "size_bytes": c.size_bytes,
                     "size_mb": None if c.size_bytes is None else round(c.size_bytes / 1e6, 3),
                     "notes": c.notes,
                     "latency": {f"batch{b}": latency_summary(per_repeat[b][c.name], b) for b in requests_by_batch}})
    add_ratios(rows, baselines)
    return rows


def request_groups(raws: list[bytes], requests: int, batch_size: int) -> list[list[bytes]]:
    """`requests` requests of `batch_size` consecutive inputs (cycling through `raws` when they run out)."""
    if not raws:
        raise ConfigError("no inputs to send; check --data")
    return [[raws[(i * batch_size + j) % len(raws)] for j in range(batch_size)] for i in range(requests)]


# ------------------------------------------------------------------------------------------------ serving overhead

OVERHEAD_PATHS = ("in-process", "grpc", "http")
CONCURRENCY = 8


def concurrent_run(make_call: Callable[[], tuple[Callable, Callable]], requests: Sequence, clients: int) -> dict:
    """`clients` threads send `requests` (each once, shared in order) back to back; each thread first gets its own
    (call, close) from `make_call()` (tritonclient clients are not thread-safe). Returns {"clients", "requests",
    "wall_s", "throughput_rps" (requests/s), "p50_ms", "p90_ms"}; a failed call raises after all threads stop."""
    import itertools
    import threading

    if clients < 1 or not requests:
        raise ConfigError(f"clients={clients!r} must be >= 1 and requests non-empty")
    counter, times, failures = itertools.count(), [], []
    ready = threading.Barrier(clients + 1)

    def worker():
        call, close = make_call()
        try:
            ready.wait()
            while (i := next(counter)) < len(requests) and not failures:
                start = time.perf_counter()
                call(requests[i])
                times.append((time.perf_counter() - start) * 1000)
        except BaseException as e:  # re-raised below, in the caller's thread
            failures.append(e)
        finally:
            close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if failures:
        raise failures[0]
    return {"clients": clients, "requests": len(times), "wall_s": round(wall, 3),
            "throughput_rps": round(len(times) / wall, 2), "p50_ms": round(float(np.percentile(times, 50)), 4),
            "p90_ms": round(float(np.percentile(times, 90)), 4)}


@contextlib.contextmanager
def gateway_process(repository: Path, grpc_url: str, log_file: Path, timeout_s: float = 180,
                    env: dict[str, str] | None = None, http_url: str | None = None):
    """`dyngate gateway` for `repository` in front of the Triton at `grpc_url` (and `http_url`, its HTTP endpoint
    for inference: `--triton-http`, as `make demo` runs it), on a free loopback port, in a process of its own
    (its event loop shares no GIL with the bench's clients); yields its url. env: variables set for that process
    on top of this one's (e.g. PYTHONPATH of another checkout, for a before/after run).
    ServingError with the log's tail when it does not answer within `timeout_s`."""
    import os
    import subprocess
    import urllib.error
    import urllib.request

    from dyngate_build.errors import ServingError
    from dyngate_serving.net import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "dyngate_cli", "gateway", "--repository", str(repository),
                                    "--triton", grpc_url.split("://")[-1], "--port", str(port)]
                                   + (["--triton-http", http_url.split("://")[-1]] if http_url else []),
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **(env or {})})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                opener.open(f"{url}/api/status", timeout=5).close()
                break
            except urllib.error.HTTPError:  # it answers (503 while Triton loads): up
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = log_file.read_text(errors="replace")[-2000:]
                    raise ServingError(f"the gateway did not start on {url}; its log ends:\n{tail}") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def gateway_call(url: str, entry, model: str | None = None, expected_status: int = 200) -> tuple[Callable, Callable]:
    """(call, close): POST /api/predict {"model", "text" | "image_base64", "policy": "variant", "variant"} of
    one request (a list with one raw input) over one kept-alive connection, as a client of the gateway would.
    model: the body's "model" instead of the entry's (a name the repository lacks measures the gateway's HTTP
    hop without inference: answered 404); ServingError when the answer's status is not `expected_status`."""
    import base64
    import http.client

    from dyngate_build.errors import ServingError

    host, port = url.split("://")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    text = entry.metadata.client_input == "TEXT"

    def call(batch: list[bytes]) -> bytes:
        raw = batch[0]
        field = {"text": raw.decode()} if text else {"image_base64": base64.b64encode(raw).decode()}
        body = json.dumps({"model": model or entry.model, **field, "policy": "variant", "variant": entry.variant})
        connection.request("POST", "/api/predict", body, {"content-type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        if response.status != expected_status:
            raise ServingError(f"gateway answered HTTP {response.status} (expected {expected_status}): "
                               f"{data[:200]!r}")
        return data

    return call, connection.close


def serving_repository(repository: Path, groups: dict[str, list], target: Path) -> dict[str, str]:
    """A repository at `target` that Triton serves for the bench: a symlink to every model folder of `groups`
    and, per model, the empty model (`write_floor_model`) with that model's input and output shapes. Returns
    model -> its floor model's name."""
    from dyngate_build.repository import write_floor_model

    target.mkdir(parents=True, exist_ok=True)
    floors = {}
    for model, group in groups.items():
        for entry in group:
            (target / entry.name).symlink_to(entry.folder.resolve(), target_is_directory=True)
        meta = group[0].metadata
        shape = (1, len(meta.labels)) if meta.task == "token-classification" else (len(meta.labels),)
        floors[model] = f"{model}.floor"
        write_floor_model(target, meta.client_input, shape, name=floors[model])
    return floors


def overhead_section(model: str, group: list, floor: str, raws: list[bytes], endpoints: dict,
                     options: "BenchOptions", progress: Callable[[int], None] | None = None) -> dict:
    """Where a served request's time goes, per variant of `model`: batch-1 p50 in process (the variant's own
    runtime.json threads, as served), over gRPC and over HTTP, the empty model's (`floor`) p50 on each protocol,
    and overhead = round trip - in process - floor; then requests/s of CONCURRENCY threads against one client
    sending back to back (single stream: 1000 / mean batch-1 ms). All batch-1 rows are interleaved. With
    endpoints["gateway"] (a gateway in front of the same Triton) each variant also goes through the gateway's
    POST /api/predict (policy "variant"), reported with what it adds over direct gRPC."""
    from dyngate_serving.client import TritonClient

    requests = [[raw] for raw in raws[:options.requests]]
    protocols = [p for p in OVERHEAD_PATHS if p != "in-process"]
    variant_paths = list(OVERHEAD_PATHS) + (["gateway"] if "gateway" in endpoints else [])
    entries = {e.name: e for e in group}
    clients = {p: TritonClient(endpoints[p], p) for p in protocols}
    gateway = {e.name: gateway_call(endpoints["gateway"], e) for e in group} if "gateway" in endpoints else {}
    predictors = {e.name: variant_predictor(newest_version_dir(e.folder)) for e in group}
    calls: dict[tuple[str, str], Callable] = {}
    for p in protocols:
        calls[(floor, p)] = _triton_call(clients[p], floor)
    for e in group:
        calls[(e.name, "in-process")] = predictors[e.name].predict
        for p in protocols:
            calls[(e.name, p)] = _triton_call(clients[p], e.name)
        if gateway:
            calls[(e.name, "gateway")] = gateway[e.name][0]
    try:
        per_repeat: dict[tuple[str, str], list[list[float]]] = {k: [] for k in calls}
        for _ in range(options.repeats):
            times = interleave(calls, requests, options.warmup, progress)
            for key, t in times.items():
                per_repeat[key].append(t)
    finally:
        for client in clients.values():
            client.close()
        for _, close in gateway.values():
            close()
    latency = {key: latency_summary(t, 1) for key, t in per_repeat.items()}

    def make(name: str, path: str):
        if path == "in-process":
            return lambda: (predictors[name].predict, lambda: None)
        if path == "gateway":
            return lambda: gateway_call(endpoints["gateway"], entries[name])

        def factory():
            client = TritonClient(endpoints[path], path)
            return _triton_call(client, name), client.close
        return factory

    rows = []
    for name, variant in [(floor, "floor")] + [(e.name, e.variant) for e in group]:
        paths = protocols if name == floor else variant_paths
        row = {"triton_name": name, "variant": variant, "paths": {}}
        for path in paths:
            lat = latency[(name, path)]
            conc = concurrent_run(make(name, path), requests, CONCURRENCY)
            cell = {"p50_ms": lat["p50_ms"], "p50_min_ms": lat["p50_min_ms"], "p50_max_ms": lat["p50_max_ms"],
                    "single_rps": lat["throughput_items_s"], f"c{CONCURRENCY}": conc,
                    f"c{CONCURRENCY}_vs_single": round(conc["throughput_rps"] / lat["throughput_items_s"], 3)}
            if path == "gateway":  # what the gateway adds to the direct gRPC round trip it makes
                cell["over_grpc_ms"] = round(lat["p50_ms"] - latency[(name, "grpc")]["p50_ms"], 4)
            elif name != floor and path != "in-process":
                cell["overhead_ms"] = round(lat["p50_ms"] - latency[(name, "in-process")]["p50_ms"]
                                            - latency[(floor, path)]["p50_ms"], 4)
            if name != floor and path != "in-process":
                cell[f"c{CONCURRENCY}_vs_in_process"] = round(
                    conc["throughput_rps"] / row["paths"]["in-process"][f"c{CONCURRENCY}"]["throughput_rps"], 3)
            row["paths"][path] = cell
            if progress is not None:
                progress(len(requests))
        rows.append(row)
    return {"model": model, "floor": floor, "concurrency": CONCURRENCY, "requests": len(requests),
            "repeats": options.repeats, "rows": rows}


def overhead_markdown(sections: list[dict]) -> str:
    """The serving overhead tables: one per model, a row per variant (the floor first)."""
    lines = ["## Serving overhead", "",
             "Batch 1, one client: p50 ms (min–max over repeats) in process (the variant's runtime.json threads, as "
             "served), over gRPC and HTTP; **overhead** = round trip − in process − the empty model's round trip on "
             f"the same protocol (the floor: a python-backend model with the same inputs and outputs that answers a "
             f"constant). c{CONCURRENCY}: requests/s of {CONCURRENCY} concurrent clients (each request one input), "
             f"× single: against one client back to back, × in process: against {CONCURRENCY} threads calling the "
             "variant in process. Gateway: POST /api/predict (policy variant) to a `dyngate gateway` in front of "
             "the same Triton; gateway − gRPC: what it adds to the direct gRPC round trip.", ""]
    for section in sections:
        c = f"c{section['concurrency']}"
        gateway = any("gateway" in r["paths"] for r in section["rows"])
        header = ["variant", "in process p50", "gRPC p50", "gRPC overhead", "HTTP p50", "HTTP overhead"]
        header += ["gateway p50", "gateway − gRPC"] if gateway else []
        header += [f"in process {c} req/s", f"gRPC {c} req/s (× single, × in process)",
                   f"HTTP {c} req/s (× single, × in process)"]
        header += [f"gateway {c} req/s (× single, × in process)"] if gateway else []
        lines += [f"### {section['model']} ({section['requests']} requests × {section['repeats']} repeats)", "",
                  "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for row in section["rows"]:
            p = row["paths"]

            def ms(path):
                return _ms(p[path]) if path in p else "–"

            def over(path):
                return f"{p[path]['overhead_ms']:+.2f}" if "overhead_ms" in p.get(path, {}) else "–"

            def conc(path):
                if path not in p:
                    return "–"
                cell = p[path]
                text = f"{cell[c]['throughput_rps']:.0f} (×{cell[c + '_vs_single']:.2f}"
                if c + "_vs_in_process" in cell:
                    text += f", ×{cell[c + '_vs_in_process']:.2f}"
                return text + ")"

            name = "floor (empty model)" if row["variant"] == "floor" else row["variant"]
            inproc = f"{p['in-process'][c]['throughput_rps']:.0f}" if "in-process" in p else "–"
            cells = [name, ms("in-process"), ms("grpc"), over("grpc"), ms("http"), over("http")]
            if gateway:
                cells += [ms("gateway"),
                          f"{p['gateway']['over_grpc_ms']:+.2f}" if "gateway" in p else "–"]
            cells += [inproc, conc("grpc"), conc("http")] + ([conc("gateway")] if gateway else [])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ baselines

class OrtSessionEngine:
    """A plain onnxruntime.InferenceSession over one graph (CPU, `threads` intra-op threads): no dyngate runtime."""

    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict, options: dict) -> dict:
        return {"logits": self.session.run(None, {n: feeds[n] for n in self.input_names})[0]}


def quantize_dynamic_default(fp32: Path, out: Path) -> Path:
    """`onnxruntime.quantization.quantize_dynamic` with its default settings (what Optimum users ship)."""
    from onnxruntime.quantization import quantize_dynamic

    from dyngate_build.techniques.quantization.core import quiet_ort_quantization

    with quiet_ort_quantization():
        quantize_dynamic(str(fp32), str(out))
    return out


def baseline_predictors(model, input_names, fp32_onnx: Path, folder: Path, work_dir: Path,
                        threads: int) -> dict[str, tuple]:
    """name -> (Predictor, size_bytes, notes) for the three baselines, sharing `folder`'s preprocessing
    (runtime.json + tokenizer.json) so every row starts from the same raw bytes."""
    from dyngate_build.evaluate import TorchReferenceEngine
    from dyngate_build.runtime import Predictor

    int8 = quantize_dynamic_default(fp32_onnx, work_dir / "ort-int8-dynamic.onnx")
    eager_size = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        EAGER: (Predictor(str(folder), engine=TorchReferenceEngine(model, tuple(input_names))), eager_size,
                "HF forward, torch.inference_mode (size: parameters in memory)"),
        ORT_FP32: (Predictor(str(folder), engine=OrtSessionEngine(fp32_onnx, threads)), fp32_onnx.stat().st_size,
                   "plain InferenceSession on the FP32 ONNX graph"),
        ORT_INT8: (Predictor(str(folder), engine=OrtSessionEngine(int8, threads)), int8.stat().st_size,
                   "quantize_dynamic(model.onnx) with default settings"),
    }


def evaluate(predictor, examples: list, task: str, labels: list[str]) -> float:
    from dyngate_build.evaluate import run_predictor, task_metric

    predictions = run_predictor(predictor, [ex.raw for ex in examples])
    return task_metric(task, predictions, examples, labels).value


# ------------------------------------------------------------------------------------------------ sections

@dataclass
class BenchOptions:
    """repository: Triton model repository (None: no preset sections). models: model names (None = all).
    requests: timed requests per row, batch size and repeat; repeats: interleaved runs; warmup: untimed requests
    per row, batch size and repeat. threads: intra-op threads of in-process rows (0 = all cores).
    overhead: add the serving overhead section (`overhead_section`); gateway: with a `dyngate gateway` process
    in front of the bench's Triton in that section.
    paths: Triton paths besides in-process. base: add the DistilBERT-base section; base_requests: its
    requests (default: `requests`); base_exit_layer: its early exit layer (None = from the trained preset)."""

    repository: Path | None = Path("model_repository")
    out: Path = Path("reports")
    models: list[str] | None = None
    requests: int = 200
    repeats: int = 3
    warmup: int = 3
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    threads: int = 0
    paths: tuple[str, ...] = ("in-process", "grpc")
    data: str | None = None
    base: bool = False
    base_requests: int | None = None
    base_exit_layer: int | None = None
    base_checkpoint: str | None = None
    base_config: dict | None = None  # DistilBertConfig overrides (tests use a small one)
    tokenizer: str | None = None  # checkpoint folder whose tokenizer the base section uses
    cache_dir: Path = Path(os.environ.get("DYNGATE_CACHE", ".cache"))
    progress: bool = True
    overhead: bool = True
    gateway: bool = True

    def __post_init__(self):
        self.out = Path(self.out)
        self.repository = Path(self.repository) if self.repository is not None else None
        for name in ("requests", "repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be an integer >= 1")
        if self.warmup < 0:
            raise ConfigError(f"warmup={self.warmup!r} must be >= 0")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"batch_sizes={self.batch_sizes!r} must be one or more integers >= 1")
        unknown = [p for p in self.paths if p not in PATHS]
        if unknown or "in-process" not in self.paths:
            raise ConfigError(f"paths={list(self.paths)!r}: in-process and any of http, grpc")
        if self.threads < 0:
            raise ConfigError(f"threads={self.threads!r} must be >= 0 (0 = every core)")
        if self.threads == 0:
            self.threads = os.cpu_count() or 1
        if self.repository is None and not self.base:
            raise ConfigError("nothing to measure: give a repository or base=True (--base)")


def _bar(options: BenchOptions, total: int, desc: str):
    if not options.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="call", file=sys.stderr, dynamic_ncols=True)


def _token_lengths(predictor, raws: list[bytes]) -> dict | None:
    if predictor.spec.client_input != "TEXT":
        return None
    lengths = [int(predictor.features([raw])[0]["attention_mask"].sum()) for raw in raws]
    return {"median": statistics.median(lengths), "min": min(lengths), "max": max(lengths), "n": len(lengths)}


def preset_section(model: str, group: list, source_data, options: BenchOptions, endpoints: dict | None,
                   work_dir: Path) -> dict:
    """The three baselines and every variant of `model` (in process and through Triton) in one interleaved run."""
    from dyngate_build.data import load_examples
    from dyngate_build.export import export_onnx
    from dyngate_build.sources import load_source
    from dyngate_serving.client import TritonClient

    group = sorted(group, key=lambda e: (e.variant != "fp32", e.variant))
    meta = group[0].metadata
    task = meta.source.task
    source = load_source(meta.source.checkpoint, options.cache_dir)
    fp32_entry = next((e for e in group if e.variant == "fp32"), None)
    folder = newest_version_dir((fp32_entry or group[0]).folder)
    if fp32_entry is not None:
        fp32_onnx = folder / "model.onnx"
    else:
        fp32_onnx = export_onnx(source.model, source.family, work_dir / "fp32.onnx")
    baselines = baseline_predictors(source.model, source.family.onnx_inputs, fp32_onnx, folder, work_dir,
                                    options.threads)
    n_eval = meta.accuracy.n
    examples, _ = load_examples(task, "dev", source_data, limit=n_eval)
    metric = meta.accuracy.name
    candidates = []
    for name, (predictor, size, notes) in baselines.items():
        candidates.append(Candidate(BASELINE_LABELS[name], "baseline", "in-process", predictor.predict,
                                    accuracy=round(evaluate(predictor, examples, task, source.labels), 6),
                                    accuracy_source=f"measured here on {len(examples)} dev examples",
                                    size_bytes=size, notes=notes))
    clients = {p: TritonClient(endpoints[p], p) for p in options.paths if p != "in-process"}
    try:
        for entry in group:
            version = newest_version_dir(entry.folder)
            spec = json.loads((version / "runtime.json").read_text())
            size = directory_size(version / spec["artifact"])
            acc = entry.metadata.accuracy.value
            for path in options.paths:
                if path == "in-process":
                    call = variant_predictor(version, options.threads).predict
                else:
                    call = _triton_call(clients[path], entry.name)
                candidates.append(Candidate(f"{entry.variant} ({path})", "dyngate", path, call, variant=entry.variant,
                                            triton_name=entry.name, accuracy=acc, accuracy_source="metadata.json",
                                            size_bytes=size))
        dev, _ = load_examples(task, "dev", source_data, limit=options.requests * max(options.batch_sizes))
        raws = [ex.raw for ex in dev]
        requests = {b: request_groups(raws, options.requests, b) for b in options.batch_sizes}
        total = options.repeats * len(candidates) * len(options.batch_sizes) * options.requests
        bar = _bar(options, total, f"bench {model}")
        try:
            rows = run_rows(candidates, requests, options.repeats, options.warmup,
                            [BASELINE_LABELS[b] for b in BASELINES], bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
    finally:
        for client in clients.values():
            client.close()
    reference = meta.reference_accuracy.value
    return {"title": f"{model} (trained preset, {task}, dev inputs at natural length)",
            "model": model, "kind": "preset", "task": task, "metric": metric, "metric_n": n_eval,
            "reference_accuracy": reference, "architecture": _architecture(source.model),
            "baselines": [BASELINE_LABELS[b] for b in BASELINES],
            "inputs": {"dev_inputs": len(raws), "token_lengths": _token_lengths(baselines[EAGER][0], raws[:400])},
            "triton_threads": "as built (runtime.json threads; 0 = library default)", "rows": rows}


def _architecture(model) -> dict:
    config = model.config
    keys = ("model_type", "dim", "n_layers", "n_heads", "hidden_dim", "vocab_size", "hidden_size",
            "num_hidden_layers", "num_attention_heads", "intermediate_size")
    return {**{k: getattr(config, k) for k in keys if hasattr(config, k)},
            "parameters": int(sum(p.numel() for p in model.parameters()))}


def _preset_exit_layer(repository: Path | None, layers: int, variant: str = "early-exit") -> tuple[int, str]:
    """Exit layer for the base section: the trained preset's `variant` (early-exit or stacked) mean layers at its
    default threshold, scaled to `layers` layers (rounded, within 1..layers-1); half the depth when no such
    variant is built."""
    if repository is not None and repository.is_dir():
        for entry in list_models(repository):
            report = entry.metadata.technique_report if entry.metadata else {}
            at = report.get("at_default")
            if entry.variant == variant and isinstance(at, dict) and report.get("layers"):
                fraction = at["mean_layers"] / report["layers"]
                layer = min(max(int(round(fraction * layers)), 1), layers - 1)
                return layer, (f"{entry.name} computes {at['mean_layers']:g} of {report['layers']} layers on average "
                               f"at its default threshold {report.get('default_threshold')}: "
                               f"{fraction:.2f} × {layers} ≈ layer {layer}")
    layer = max(layers // 2, 1)
    return layer, f"no trained {variant} variant in the repository: half the depth, layer {layer}"


def _tokenizer_checkpoint(options: BenchOptions) -> str:
    if options.tokenizer:
        return options.tokenizer
    if options.repository is not None and options.repository.is_dir():
        for entry in list_models(options.repository):
            if entry.metadata and entry.metadata.source.model_type == "distilbert":
                return entry.metadata.source.checkpoint
    from dyngate_build.presets import ensure_preset

    return str(ensure_preset("distilbert-tiny", options.cache_dir))


def base_source(options: BenchOptions):
    """(Source, how it was made): the hub checkpoint when `base_checkpoint` loads, else DistilBertConfig()
    (with `base_config` overrides) randomly initialised, two labels, with the preset's tokenizer."""
    import torch
    import transformers

    from dyngate_build.families import family_for
    from dyngate_build.sources import Source, load_source

    if options.base_checkpoint:
        try:
            return load_source(options.base_checkpoint, options.cache_dir), f"checkpoint {options.base_checkpoint}"
        except Exception as e:  # no hub here: fall back to the same architecture, randomly initialised
            fallback = f"{options.base_checkpoint} did not load ({type(e).__name__}); "
    else:
        fallback = ""
    tokenizer_folder = _tokenizer_checkpoint(options)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder, use_fast=True)
    config = transformers.DistilBertConfig(num_labels=2, **(options.base_config or {}))
    if len(tokenizer) > config.vocab_size:
        config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = transformers.DistilBertForSequenceClassification(config).eval()
    labels = [str(config.id2label[i]) for i in range(config.num_labels)]
    how = (f"{fallback}DistilBertConfig({', '.join(f'{k}={v}' for k, v in (options.base_config or {}).items())}) "
           f"randomly initialised (seed 0), vocab {config.vocab_size}, tokenizer of {tokenizer_folder}")
    return Source(name="distilbert-base", location="DistilBertConfig()", checkpoint="", model=model,
                  family=family_for("distilbert"), tokenizer=tokenizer, image_spec=None, labels=labels), how


def _row_folder(context, name: str, engine: str, artifact: Path, artifact_name: str | None, overrides: dict,
                threads: int) -> tuple[Path, str]:
    """A servable folder (runtime.json, tokenizer.json, graph) for one base-section row, and its graph's name."""
    from dyngate_build.variant_folder import artifact_name_for, write_variant_folder

    artifact_name = artifact_name_for(engine, artifact_name)
    folder = write_variant_folder(context.work_dir / "rows" / name, context.source, engine, artifact,
                                  artifact_name=artifact_name, runtime=overrides, threads=threads)
    return folder, artifact_name


def stacked_base_candidate(context, options: BenchOptions, pruning: dict, layers: int) -> Candidate:
    """The `stacked` row of the base section: the `pruned` row's model (structure only, `pruning` options, no
    recovery), cut into segments with an untrained ramp after the layer the trained preset's `stacked` variant
    reaches on average (threshold 0: every input exits there), each segment through int8-dynamic's
    `quantize_dynamic_int8` as the stacked technique does (techniques/stacked.py). Latency only."""
    from dyngate_build.techniques import make_config
    from dyngate_build.techniques.early_exit.onnx_export import export_onnx_segments
    from dyngate_build.techniques.early_exit.segments import segment_model
    from dyngate_build.techniques.pruning.pruned import pruned_model
    from dyngate_build.techniques.stacked import quantize_segments

    source = context.source
    exit_layer, why = ((options.base_exit_layer, "--base-exit-layer") if options.base_exit_layer
                       else _preset_exit_layer(options.repository, layers, "stacked"))
    student, report = pruned_model(context, make_config("pruned", pruning))  # cached: the pruned row's model
    segments = segment_model(student, source.family.model_type, [min(max(exit_layer, 1), layers - 1)])
    fp32 = export_onnx_segments(segments, context.work_dir / "stacked-segments", "max_prob", 0.0, source.family.task)
    int8 = quantize_segments(fp32, context.work_dir / "stacked-int8-segments", True, "int8")
    folder, _ = _row_folder(context, "stacked", "early-exit-onnx", int8, "early_exit",
                            {"extra": {"exit_threshold": 0.0}}, options.threads)
    return Candidate(f"stacked (layer {exit_layer} of {layers})", "dyngate", "in-process",
                     variant_predictor(folder, options.threads).predict, variant="stacked",
                     size_bytes=directory_size(folder / "early_exit"),
                     notes=f"the pruned row's model ({report['parameters_after']:,} parameters) + untrained ramp "
                           f"after layer {exit_layer}, threshold 0, INT8 dynamic per segment; layer chosen from: "
                           f"{why}")


def base_section(options: BenchOptions, source_data, work_dir: Path, log=print) -> dict:
    """DistilBERT-base architecture, in process: baselines, the training-free techniques and early exit at a
    fixed layer, interleaved; latency only (random weights make accuracy meaningless)."""
    from dyngate_build.data import load_examples
    from dyngate_build.techniques.early_exit.onnx_export import export_onnx_segments
    from dyngate_build.techniques.early_exit.segments import segment_model
    from dyngate_build.variant_folder import reference_predictor
    from dyngate_build.techniques import BuildContext, get_technique, make_config

    started = time.perf_counter()
    source, how = base_source(options)
    task = source.family.task
    calibration, _ = load_examples(task, "train", source_data, limit=BASE_CALIBRATION)
    context = BuildContext(source=source, work_dir=work_dir, calibration=calibration,
                           reference=reference_predictor(source, work_dir, options.threads))
    log(f"base: {how}; exporting and quantizing (a few minutes on 2 cores)")
    fp32 = context.fp32_onnx()
    baselines = baseline_predictors(source.model, source.family.onnx_inputs, fp32, Path(context.reference.folder),
                                    work_dir, options.threads)
    baselines[EAGER] = (context.reference, baselines[EAGER][1], baselines[EAGER][2])
    candidates = [Candidate(BASELINE_LABELS[n], "baseline", "in-process", p.predict, size_bytes=s, notes=t)
                  for n, (p, s, t) in baselines.items()]
    for label, name, opts in BASE_TECHNIQUES:
        t0 = time.perf_counter()
        variant = get_technique(name).apply(context, make_config(name, opts))
        folder, artifact_name = _row_folder(context, label, variant.engine, variant.artifact, variant.artifact_name,
                                            variant.runtime, options.threads)
        notes = "; ".join(f"{k}={v}" for k, v in opts.items())
        if name == "pruned":
            report = variant.report
            notes = (f"40% heads and FFN neurons removed, no recovery: heads {report['heads_per_layer']}, "
                     f"FFN {report['ffn_per_layer']}, {report['parameters_after']:,} of "
                     f"{report['parameters_before']:,} parameters")
        elif name.startswith("fp16"):
            notes = "FP16 graph on the CPU provider (meant for GPUs)"
        candidates.append(Candidate(label, "dyngate", "in-process", variant_predictor(folder, options.threads).predict,
                                    variant=name, size_bytes=directory_size(folder / artifact_name), notes=notes))
        log(f"base: {label} made in {time.perf_counter() - t0:.0f} s")
    layers = int(source.model.config.n_layers)
    exit_layer, why = ((options.base_exit_layer, "--base-exit-layer") if options.base_exit_layer
                       else _preset_exit_layer(options.repository, layers))
    if not 1 <= exit_layer < layers:
        raise ConfigError(f"base_exit_layer={exit_layer!r} must be in [1, {layers - 1}] (a layer before the last)")
    segments = segment_model(source.model, source.family.model_type, [exit_layer])
    artifact = export_onnx_segments(segments, work_dir / "early-exit-segments", "max_prob", 0.0, task)
    folder, _ = _row_folder(context, "early-exit", "early-exit-onnx", artifact, "early_exit",
                            {"extra": {"exit_threshold": 0.0}}, options.threads)
    predictor = variant_predictor(folder, options.threads)
    candidates.append(Candidate(f"early-exit (layer {exit_layer} of {layers})", "dyngate", "in-process",
                                predictor.predict, variant="early-exit",
                                size_bytes=directory_size(folder / "early_exit"),
                                notes=f"untrained ramp after layer {exit_layer}, threshold 0 (every input exits "
                                      f"there); layer chosen from: {why}"))
    pruning = next(opts for _, name, opts in BASE_TECHNIQUES if name == "pruned")
    candidates.append(stacked_base_candidate(context, options, pruning, layers))
    requests_n = options.base_requests or options.requests
    raws = [ex.raw for ex in load_examples(task, "dev", source_data, limit=requests_n * max(options.batch_sizes))[0]]
    requests = {b: request_groups(raws, requests_n, b) for b in options.batch_sizes}
    exits: dict[str, set] = {c.name: set() for c in candidates[-2:]}  # early-exit and stacked: layers seen

    def on_result(key, batch_size, out):
        if key in exits:
            exits[key].update(p.answer["exit_layer"] for p in out)

    made_s = time.perf_counter() - started
    total = options.repeats * len(candidates) * len(options.batch_sizes) * requests_n
    bar = _bar(options, total, "bench distilbert-base")
    try:
        rows = run_rows(candidates, requests, options.repeats, options.warmup,
                        [BASELINE_LABELS[b] for b in BASELINES], bar.update if bar else None, on_result)
    finally:
        if bar is not None:
            bar.close()
    for row in rows:
        if row["name"] in exits:
            row["exit_layers_seen"] = sorted(exits[row["name"]])
    return {"title": "DistilBERT-base architecture, latency only", "model": "distilbert-base", "kind": "base",
            "task": task, "metric": None, "how": how, "architecture": _architecture(source.model),
            "baselines": [BASELINE_LABELS[b] for b in BASELINES], "prepare_s": round(made_s, 1),
            "inputs": {"dev_inputs": len(raws), "token_lengths": _token_lengths(context.reference, raws[:400])},
            "rows": rows}


def _overhead(model: str, group: list, floor: str, source_data, options: BenchOptions, endpoints: dict) -> dict:
    from dyngate_build.data import load_examples

    group = sorted(group, key=lambda e: (e.variant != "fp32", e.variant))
    task = group[0].metadata.task
    raws = [ex.raw for ex in load_examples(task, "dev", source_data, limit=options.requests)[0]]
    paths = len(OVERHEAD_PATHS) + ("gateway" in endpoints)
    per_row = options.requests * (options.repeats + 2 * paths)  # interleaved, then concurrent
    bar = _bar(options, per_row * (len(group) + 1), f"serving overhead {model}")
    try:
        with torch_threads_kept():
            return overhead_section(model, group, floor, raws, endpoints, options, bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()


def run_bench(options: BenchOptions, log=print) -> dict:
    """Every preset section (through an embedded Triton) and, with `options.base`, the base section; writes
    bench.md and bench.json into `options.out` and returns the result."""
    import torch

    from dyngate_build.data import DataSource
    from dyngate_measure.machine import library_versions, machine_info, server_version

    torch.set_num_threads(options.threads)
    source_data = DataSource.from_setting(options.data)
    options.out.mkdir(parents=True, exist_ok=True)
    result = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
              "versions": library_versions(),
              "settings": {"requests": options.requests, "repeats": options.repeats, "warmup": options.warmup,
                           "batch_sizes": list(options.batch_sizes), "threads": options.threads,
                           "paths": list(options.paths), "data": source_data.location, "span": SPAN,
                           "base_requests": (options.base_requests or options.requests) if options.base else None},
              "sections": [], "serving_overhead": []}
    with tempfile.TemporaryDirectory(prefix="dyngate-bench-") as tmp:
        tmp = Path(tmp)
        if options.repository is not None:
            groups = python_variants_by_model(options.repository, options.models)
            triton_paths = [p for p in options.paths if p != "in-process"]
            if triton_paths or options.overhead:
                from dyngate_serving.launcher import TritonServer, TritonServerConfig
                from dyngate_serving.net import free_ports

                served = tmp / "served-repository"
                floors = serving_repository(options.repository, groups, served)
                http, grpc, metrics = free_ports(3)
                config = TritonServerConfig(repository=served, http_port=http, grpc_port=grpc, metrics_port=metrics,
                                            models=[e.name for g in groups.values() for e in g] + list(floors.values()),
                                            log_file=options.out / "bench-triton.log")
                with TritonServer(config) as server, contextlib.ExitStack() as stack:
                    result["versions"] = library_versions(server_version(server.endpoints["http"]))
                    endpoints = dict(server.endpoints)
                    if options.overhead and options.gateway:
                        endpoints["gateway"] = stack.enter_context(gateway_process(
                            served, server.endpoints["grpc"], options.out / "bench-gateway.log",
                            http_url=server.endpoints["http"]))
                    for model, group in groups.items():
                        (tmp / model).mkdir()
                        result["sections"].append(preset_section(model, group, source_data, options,
                                                                 server.endpoints, tmp / model))
                        if options.overhead:
                            result["serving_overhead"].append(_overhead(model, group, floors[model], source_data,
                                                                        options, endpoints))
            else:
                for model, group in groups.items():
                    (tmp / model).mkdir()
                    result["sections"].append(preset_section(model, group, source_data, options, None, tmp / model))
        if options.base:
            (tmp / "base").mkdir()
            result["sections"].append(base_section(options, source_data, tmp / "base", log))
    result["headline"] = headlines(result)
    write_bench(result, options.out)
    return result


# ------------------------------------------------------------------------------------------------ writing

def _ms(lat: dict) -> str:
    return f"{lat['p50_ms']:.2f} ({lat['p50_min_ms']:.2f}–{lat['p50_max_ms']:.2f})"


def section_markdown(section: dict, absolute_only: bool = False) -> str:
    """One table: a row per candidate; per batch size p50 ms (min–max over repeats), items/s and the speed-up
    against each baseline (baseline p50 / row p50)."""
    rows, baselines = section["rows"], section["baselines"]
    batches = list(rows[0]["latency"])
    short = {BASELINE_LABELS[EAGER]: "eager", BASELINE_LABELS[ORT_FP32]: "ORT FP32",
             BASELINE_LABELS[ORT_INT8]: "ORT INT8"}
    header = ["row", "path"]
    if section.get("metric"):
        header.append(section["metric"])
    header.append("MB")
    for key in batches:
        b = rows[0]["latency"][key]["batch_size"]
        header += [f"b{b} p50 ms (min–max)", f"b{b} items/s"]
        if not absolute_only:
            header += [f"b{b} × {short.get(name, name)}" for name in baselines]
    lines = [f"### {section['title']}", ""]
    if section.get("how"):
        lines += [f"Model: {section['how']}.", ""]
    arch = section.get("architecture") or {}
    tokens = (section.get("inputs") or {}).get("token_lengths")
    if arch or tokens:
        parts = []
        if arch:
            parts.append(", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in arch.items()))
        if tokens:
            parts.append(f"tokens per input median {tokens['median']:g} (min {tokens['min']}, max {tokens['max']})")
        lines += ["; ".join(parts) + ".", ""]
    if section.get("metric"):
        lines += [f"{section['metric']}: dev, {section['metric_n']} examples (variants: metadata.json; baselines: "
                  f"measured here; PyTorch FP32 reference in metadata {section.get('reference_accuracy')}).", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        name = f"**{r['name']}**" if r["kind"] == "baseline" else r["name"]
        cells = [name, r["path"]]
        if section.get("metric"):
            cells.append("–" if r["accuracy"] is None else f"{r['accuracy']:.4f}")
        cells.append("–" if r["size_mb"] is None else f"{r['size_mb']:.2f}")
        for key in batches:
            lat = r["latency"][key]
            cells += [_ms(lat), f"{lat['throughput_items_s']:.1f}"]
            if not absolute_only:
                cells += [f"{r['ratios'][key][name]:.2f}" for name in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['name']}: {r['notes']}" for r in rows if r.get("notes")]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def header_markdown(result: dict, title: str = "dyngate bench") -> list[str]:
    m, s = result["machine"], result["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items())
    paths = " and ".join(s.get("paths", []))
    lines = [f"# {title}", "",
             f"- Created: {result['created']}",
             f"- Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, {m.get('memory_gb', '?')} GB RAM; "
             f"GPU: {m.get('gpu', 'none')}",
             f"- Libraries: {versions}",
             f"- Run: {s['repeats']} repeats × {s['requests']} requests per row and batch size "
             f"({s['warmup']} warm-up), batch {' and '.join(map(str, s['batch_sizes']))}, all rows interleaved "
             f"(rotating order); {paths}; {s['threads']} intra-op thread{'s' if s['threads'] != 1 else ''} in process; "
             f"data {s['data']}"]
    if s.get("base_requests"):
        lines[-1] += f"; base section {s['base_requests']} requests"
    lines += [f"- Timed span: {s.get('span', SPAN)}. p50: median over repeats of each repeat's p50 (min–max over "
              "repeats). ×: baseline p50 / row p50 (above 1 = faster than that baseline). items/s: one client "
              "sending back to back. Baselines in bold.", ""]
    return lines


HEADLINE_BUDGET = 0.01  # "within 1 pt of FP32": accuracy (a fraction) at least FP32's minus this


def headlines(result: dict, budget: float = HEADLINE_BUDGET) -> list[dict]:
    """Per preset section: the fastest variant at batch 1 in process whose dev accuracy is within `budget` of the
    FP32 reference (the section's `reference_accuracy`), its speed-up over the in-process ONNX Runtime INT8
    dynamic baseline, and the same variant through Triton against dyngate's `int8-dynamic` variant served the
    same way (the baseline has no served form). Ratios: baseline p50 / variant p50 (above 1 = faster)."""
    out = []
    for section in result["sections"]:
        reference = section.get("reference_accuracy")
        rows = [r for r in section["rows"] if "batch1" in r["latency"]]
        inside = [r for r in rows if r["kind"] == "dyngate" and r["path"] == "in-process" and
                  r["accuracy"] is not None and reference is not None and r["accuracy"] >= reference - budget - 1e-9]
        baseline = next((r for r in rows if r["name"] == BASELINE_LABELS[ORT_INT8]), None)
        if section.get("kind") != "preset" or not inside or baseline is None:
            continue
        best = min(inside, key=lambda r: r["latency"]["batch1"]["p50_ms"])
        line = {"model": section["model"], "variant": best["variant"], "accuracy": best["accuracy"],
                "reference_accuracy": reference, "delta_pt": round(100 * (best["accuracy"] - reference), 2),
                "in_process_ms": best["latency"]["batch1"]["p50_ms"],
                "baseline_ms": baseline["latency"]["batch1"]["p50_ms"],
                "in_process_speedup": speedup(baseline["latency"]["batch1"]["p50_ms"],
                                              best["latency"]["batch1"]["p50_ms"]), "served": None}
        for path in [p for p in PATHS if p != "in-process"]:
            row = next((r for r in rows if r["variant"] == best["variant"] and r["path"] == path), None)
            dyn = next((r for r in rows if r["variant"] == "int8-dynamic" and r["path"] == path), None)
            if row and dyn:
                line["served"] = {"path": path, "ms": row["latency"]["batch1"]["p50_ms"],
                                  "int8_dynamic_ms": dyn["latency"]["batch1"]["p50_ms"],
                                  "speedup": speedup(dyn["latency"]["batch1"]["p50_ms"],
                                                     row["latency"]["batch1"]["p50_ms"])}
                break
        out.append(line)
    return out


def headline_markdown(lines: list[dict]) -> list[str]:
    """One line per preset: the best variant within 1 pt of FP32 against ONNX Runtime INT8 dynamic, in process
    and through Triton (batch 1)."""
    text = []
    for h in lines:
        served = h["served"]
        text.append(
            f"**Headline, {h['model']}**: best variant within 1 pt of FP32 ({h['reference_accuracy']:.4f}) is "
            f"**{h['variant']}** ({h['accuracy']:.4f}, {h['delta_pt']:+.2f} pt); batch 1 p50 in process "
            f"{h['in_process_ms']:.2f} ms = **{h['in_process_speedup']:.2f}x** ONNX Runtime INT8 dynamic "
            f"({h['baseline_ms']:.2f} ms)"
            + (f"; through Triton ({served['path']}) {served['ms']:.2f} ms = **{served['speedup']:.2f}x** dyngate "
               f"int8-dynamic served the same way ({served['int8_dynamic_ms']:.2f} ms)." if served else
               "; not measured through Triton (no served path in this run)."))
    return text + ([""] if text else [])


def markdown(result: dict, title: str = "dyngate bench") -> str:
    lines = header_markdown(result, title) + headline_markdown(result.get("headline") or headlines(result))
    if result.get("serving_overhead"):
        lines += [overhead_markdown(result["serving_overhead"]), ""]
    for section in result["sections"]:
        lines += [section_markdown(section), ""]
    return "\n".join(lines)


def write_bench(result: dict, out: Path, stem: str = "bench", title: str = "dyngate bench") -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / f"{stem}.md", "json": out / f"{stem}.json"}
    files["markdown"].write_text(markdown(result, title) + "\n")
    files["json"].write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dyngate bench` (and `python -m dyngate_measure.benchmark`)."""
    parser.add_argument("--repository", default=os.environ.get("DYNGATE_REPOSITORY", "model_repository"))
    parser.add_argument("--no-repository", action="store_true", help="only the --base section")
    parser.add_argument("--model", action="append", help="model name(s) in the repository (default: all)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per row, batch size and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs (min/median/max over them)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests per row, batch size and repeat")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads in process (0 = every core)")
    parser.add_argument("--paths", default="in-process,grpc", help="in-process plus any of grpc, http")
    parser.add_argument("--data", default=None, help="data folder or hf:<datasets id>")
    parser.add_argument("--base", action="store_true", help="add the DistilBERT-base architecture section")
    parser.add_argument("--base-requests", type=int, default=None, help="requests of the base section")
    parser.add_argument("--base-exit-layer", type=int, default=None,
                        help="early exit layer of the base section (default: from the trained preset)")
    parser.add_argument("--base-checkpoint", default=None,
                        help="hub id or folder of DistilBERT-base (e.g. distilbert-base-uncased); random init "
                             "of the same config when it does not load")
    parser.add_argument("--cache-dir", default=os.environ.get("DYNGATE_CACHE", ".cache"))
    parser.add_argument("--out", default="reports", help="folder for bench.md and bench.json")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-overhead", action="store_true", help="skip the serving overhead section")
    parser.add_argument("--no-gateway", action="store_true", help="no gateway path in the serving overhead section")


def options_from_args(args) -> BenchOptions:
    """BenchOptions from parsed `add_arguments` options; ConfigError for a bad value."""
    return BenchOptions(repository=None if args.no_repository else Path(args.repository), out=Path(args.out),
                        models=args.model, requests=args.requests, repeats=args.repeats, warmup=args.warmup,
                        batch_sizes=tuple(args.batch_sizes), threads=args.threads,
                        paths=tuple(p.strip() for p in args.paths.split(",") if p.strip()), data=args.data,
                        base=args.base, base_requests=args.base_requests, base_exit_layer=args.base_exit_layer,
                        base_checkpoint=args.base_checkpoint, cache_dir=Path(args.cache_dir),
                        progress=not args.no_progress, overhead=not args.no_overhead, gateway=not args.no_gateway)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        result = run_bench(options_from_args(args))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
