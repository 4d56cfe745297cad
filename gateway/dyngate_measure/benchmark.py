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
from dyngate_build.evaluate import Latency, summarize_ms
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
                   ("int8-static", "int8-static", {}), ("smoothquant", "smoothquant", {}),
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
    latencies: dict[str, Latency]
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


def _preset_exit_layer(repository: Path | None, layers: int) -> tuple[int, str]:
    """Exit layer for the base section: the trained preset's mean layers at its default threshold, scaled to
    `layers` layers (rounded, within 1..layers-1); half the depth when no early-exit variant is built."""
    if repository is not None and repository.is_dir():
        for entry in list_models(repository):
            report = entry.metadata.technique_report if entry.metadata else {}
            at = report.get("at_default")
            if entry.variant == "early-exit" and isinstance(at, dict) and report.get("layers"):
                fraction = at["mean_layers"] / report["layers"]
                layer = min(max(int(round(fraction * layers)), 1), layers - 1)
                return layer, (f"{entry.name} computes {at['mean_layers']:g} of {report['layers']} layers on average "
                               f"at its default threshold {report.get('default_threshold')}: "
                               f"{fraction:.2f} × {layers} ≈ layer {layer}")
    layer = max(layers // 2, 1)
    return layer, f"no trained early-exit variant in the repository: half the depth, layer {layer}"


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
    exits: list[int] = []
    predictor = variant_predictor(folder, options.threads)
    candidates.append(Candidate(f"early-exit (layer {exit_layer} of {layers})", "dyngate", "in-process",
                                predictor.predict, variant="early-exit",
                                size_bytes=directory_size(folder / "early_exit"),
                                notes=f"untrained ramp after layer {exit_layer}, threshold 0 (every input exits "
                                      f"there); layer chosen from: {why}"))
    requests_n = options.base_requests or options.requests
    raws = [ex.raw for ex in load_examples(task, "dev", source_data, limit=requests_n * max(options.batch_sizes))[0]]
    requests = {b: request_groups(raws, requests_n, b) for b in options.batch_sizes}
    ee_name = candidates[-1].name

    def on_result(key, batch_size, out):
        if key == ee_name:
            exits.extend(p.answer["exit_layer"] for p in out)

    made_s = time.perf_counter() - started
    total = options.repeats * len(candidates) * len(options.batch_sizes) * requests_n
    bar = _bar(options, total, "bench distilbert-base")
    try:
        rows = run_rows(candidates, requests, options.repeats, options.warmup,
                        [BASELINE_LABELS[b] for b in BASELINES], bar.update if bar else None, on_result)
    finally:
        if bar is not None:
            bar.close()
    ee_row = next(r for r in rows if r["name"] == ee_name)
    ee_row["exit_layers_seen"] = sorted(set(exits))
    return {"title": "DistilBERT-base architecture, latency only", "model": "distilbert-base", "kind": "base",
            "task": task, "metric": None, "how": how, "architecture": _architecture(source.model),
            "baselines": [BASELINE_LABELS[b] for b in BASELINES], "prepare_s": round(made_s, 1),
            "inputs": {"dev_inputs": len(raws), "token_lengths": _token_lengths(context.reference, raws[:400])},
            "rows": rows}


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
              "sections": []}
    with tempfile.TemporaryDirectory(prefix="dyngate-bench-") as tmp:
        tmp = Path(tmp)
        if options.repository is not None:
            groups = python_variants_by_model(options.repository, options.models)
            triton_paths = [p for p in options.paths if p != "in-process"]
            if triton_paths:
                from dyngate_serving.launcher import TritonServer, TritonServerConfig
                from dyngate_serving.net import free_ports

                http, grpc, metrics = free_ports(3)
                config = TritonServerConfig(repository=options.repository, http_port=http, grpc_port=grpc,
                                            metrics_port=metrics, models=[e.name for g in groups.values() for e in g],
                                            log_file=options.out / "bench-triton.log")
                with TritonServer(config) as server:
                    result["versions"] = library_versions(server_version(server.endpoints["http"]))
                    for model, group in groups.items():
                        (tmp / model).mkdir()
                        result["sections"].append(preset_section(model, group, source_data, options,
                                                                 server.endpoints, tmp / model))
            else:
                for model, group in groups.items():
                    (tmp / model).mkdir()
                    result["sections"].append(preset_section(model, group, source_data, options, None, tmp / model))
        if options.base:
            (tmp / "base").mkdir()
            result["sections"].append(base_section(options, source_data, tmp / "base", log))
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


def markdown(result: dict, title: str = "dyngate bench") -> str:
    lines = header_markdown(result, title)
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


def options_from_args(args) -> BenchOptions:
    """BenchOptions from parsed `add_arguments` options; ConfigError for a bad value."""
    return BenchOptions(repository=None if args.no_repository else Path(args.repository), out=Path(args.out),
                        models=args.model, requests=args.requests, repeats=args.repeats, warmup=args.warmup,
                        batch_sizes=tuple(args.batch_sizes), threads=args.threads,
                        paths=tuple(p.strip() for p in args.paths.split(",") if p.strip()), data=args.data,
                        base=args.base, base_requests=args.base_requests, base_exit_layer=args.base_exit_layer,
                        base_checkpoint=args.base_checkpoint, cache_dir=Path(args.cache_dir),
                        progress=not args.no_progress)


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
