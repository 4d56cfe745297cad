"""`dyngate report`: one table per model with a row per variant, measured through Triton, as Markdown, JSON and PNG.

    dyngate report --repository model_repository --model distilbert-tiny --requests 200 --out reports/

For each model of the repository (python-backend variants) and each of its variants, the report gives:
- task accuracy (the build's metric on the dev split, from metadata.json) and its change against FP32 in points;
- size on disk of the variant's artifact (MB, read from the files now) and its change (%); parameters;
- p50/p95 latency and throughput at batch 1 (one input per request) and batch 8 (one request of 8 inputs,
  `TritonClient.predict_batch`) over gRPC, timed by `dyngate_measure.benchmark.measure`, and their change (%);
- average CPU utilisation and peak RSS of the Triton server process tree (server + python-backend stubs)
  while that variant alone is loaded and timed (psutil, sampled in a thread); GPU utilisation and memory
  through pynvml when a GPU exists, else "no GPU";
- mean layers computed for early-exit variants: the build's value at the default threshold (metadata) and
  the value measured on this run's answers (`exit_layer`).

Changes are against the model's `fp32` variant (else its first variant). The recommended variant is the
fastest at batch 1 (p50) whose accuracy is within `--budget-pt` points of FP32. The embedded Triton is
started on free ports with no model loaded; each variant is loaded, warmed up, timed and unloaded in turn,
so the resource columns belong to that variant. Inputs are the first dev examples of the model's task in
file order (no sampling); batch-8 requests take consecutive groups of 8, cycling through the inputs.
Throughput is items per second of one client sending requests back to back.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dyngate_build.errors import ConfigError, ServingError
from dyngate_build.metadata import dev_sample_mismatch
from dyngate_build.repository import RepositoryEntry, directory_size, python_variants_by_model
from dyngate_measure.machine import ResourceSampler, library_versions, machine_info, server_version
from dyngate_measure.recommend import BASELINE_VARIANT, Candidate, Recommendation, recommend

BATCH_SIZES = (1, 8)
PATH = "grpc"


def _find_seeds(value, prefix: str = "") -> dict:
    """Every key named like `seed` in a nested dict/list, by dotted path."""
    found = {}
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if "seed" in str(key).lower() and isinstance(item, (int, float, str)):
                found[path] = item
            else:
                found.update(_find_seeds(item, path))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found.update(_find_seeds(item, f"{prefix}[{i}]"))
    return found


def seeds(entries: list[RepositoryEntry]) -> dict:
    """Seeds behind the model's numbers: the preset's training seed (its preset.json, when the checkpoint has
    one) and any seed a technique recorded; the report itself draws nothing at random."""
    out = {}
    checkpoint = entries[0].metadata.source.checkpoint if entries[0].metadata else None
    preset = Path(checkpoint) / "preset.json" if checkpoint else None
    if preset is not None and preset.is_file():
        for key, value in _find_seeds(json.loads(preset.read_text())).items():
            out[f"checkpoint {key}"] = value
    for entry in entries:
        for key, value in _find_seeds(entry.metadata.technique_report if entry.metadata else {}).items():
            out[f"{entry.variant} {key}"] = value
    out["report inputs"] = "first dev examples in file order (no sampling)"
    return out


# ------------------------------------------------------------------------------------------------- numbers

def latency_stats(times_ms: list[float], batch_size: int) -> dict:
    """p50/p95/mean ms of the requests and throughput (items/s) of back-to-back requests of `batch_size`."""
    values = np.asarray(times_ms, dtype=np.float64)
    return {"batch_size": batch_size, "requests": int(values.size),
            "p50_ms": round(float(np.percentile(values, 50)), 4), "p95_ms": round(float(np.percentile(values, 95)), 4),
            "mean_ms": round(float(values.mean()), 4),
            "throughput_items_s": round(batch_size * values.size * 1000.0 / float(values.sum()), 3)}


def artifact_size(entry: RepositoryEntry) -> int:
    """Bytes on disk of the variant's artifact (graph file or folder named in the newest version's runtime.json)."""
    versions = sorted((p for p in entry.folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise ConfigError(f"{entry.folder} has no numbered version folder; rebuild the variant with dyngate build")
    spec = json.loads((versions[-1] / "runtime.json").read_text())
    return directory_size(versions[-1] / spec["artifact"])


def _change_pct(value, base):
    if value is None or base in (None, 0):
        return None
    return round((value / base - 1.0) * 100.0, 2)


def early_exit_build(entry: RepositoryEntry) -> dict | None:
    """{"mean_layers", "layers", "threshold"} at the default threshold, from the technique report, or None."""
    report = entry.metadata.technique_report if entry.metadata else {}
    at = report.get("at_default")
    if not isinstance(at, dict) or "mean_layers" not in at:
        return None
    return {"mean_layers": at["mean_layers"], "layers": report.get("layers"),
            "threshold": report.get("default_threshold")}


def add_changes(rows: list[dict], baseline: dict) -> None:
    """Fill each row's `change` from the rows themselves: accuracy in points, everything else in %."""
    for row in rows:
        change = {"accuracy_pt": round((row["accuracy"] - baseline["accuracy"]) * 100.0, 2),
                  "size_pct": _change_pct(row["size_bytes"], baseline["size_bytes"])}
        for b in BATCH_SIZES:
            lat, base = row["latency"][f"batch{b}"], baseline["latency"][f"batch{b}"]
            change[f"p50_batch{b}_pct"] = _change_pct(lat["p50_ms"], base["p50_ms"])
            change[f"p95_batch{b}_pct"] = _change_pct(lat["p95_ms"], base["p95_ms"])
            change[f"throughput_batch{b}_pct"] = _change_pct(lat["throughput_items_s"], base["throughput_items_s"])
        row["change"] = change


def recommendation(rows: list[dict], baseline: str, budget_pt: float) -> Recommendation:
    """`dyngate_measure.recommend.recommend` over the report's rows: the fastest variant at batch 1 (Triton gRPC
    p50) whose dev metric is within `budget_pt` points of `baseline`'s, measured on the same dev sample
    (`accuracy_n`, `accuracy_sha256`; `dyngate_build.metadata.dev_sample_mismatch`)."""
    base = next((r for r in rows if r["variant"] == baseline), None)
    base_n, base_sha256 = (base["accuracy_n"], base["accuracy_sha256"]) if base else (None, None)
    candidates = [Candidate(r["variant"], r["accuracy"], r["latency"]["batch1"]["p50_ms"], r["size_mb"],
                            unusable=dev_sample_mismatch(r["accuracy_n"], r["accuracy_sha256"], base_n, base_sha256,
                                                         baseline, r["metric"]))
                  for r in rows]
    return recommend(candidates, baseline, budget_pt, rows[0]["metric"], latency=f"Triton {PATH} p50 at batch 1")


# ------------------------------------------------------------------------------------------------- running

@dataclass
class ReportOptions:
    """repository: the Triton model repository; models: model names (None = all); requests: timed requests
    per variant and batch size; budget_pt: accuracy budget in points for the recommendation; out: folder."""

    repository: Path
    out: Path = Path("reports")
    models: list[str] | None = None
    requests: int = 100
    warmup: int = 3  # untimed requests per variant and batch size (the first ones, sent again when timed)
    budget_pt: float = 1.0
    data: str | None = None
    progress: bool = True

    def __post_init__(self):
        self.repository, self.out = Path(self.repository), Path(self.out)
        if self.requests < 1:
            raise ConfigError(f"requests={self.requests!r} must be ≥ 1 (timed requests per variant and batch size)")
        if self.warmup < 0:
            raise ConfigError(f"warmup={self.warmup!r} must be ≥ 0")
        if self.budget_pt < 0:
            raise ConfigError(f"budget_pt={self.budget_pt!r} must be ≥ 0 (accuracy points the recommendation may lose)")


def _entries(options: ReportOptions) -> dict[str, list[RepositoryEntry]]:
    """Variants per model, the FP32 baseline first."""
    groups = python_variants_by_model(options.repository, options.models)
    return {model: sorted(group, key=lambda e: (e.variant != BASELINE_VARIANT, e.name))
            for model, group in groups.items()}


def _inputs(task: str, source, count: int) -> list[bytes]:
    from dyngate_build.data import load_examples

    examples, _ = load_examples(task, "dev", source, limit=count)
    if not examples:
        raise ConfigError(f"no dev examples for task {task!r} in {source}")
    raws = [ex.raw for ex in examples]
    return [raws[i % len(raws)] for i in range(count)]


def _measure_variant(server, entry: RepositoryEntry, raws: list[bytes], options: ReportOptions, bar) -> dict:
    from dyngate_measure.benchmark import measure

    server.load_model(entry.name)
    try:
        latency, answers = {}, []
        with ResourceSampler(server.pid) as sampler:
            for b in BATCH_SIZES:
                [row] = measure([entry], raws[: options.requests * b], server.endpoints, warmup=options.warmup,
                                paths=(PATH,), batch_size=b,
                                keep_answers=(b == 1), progress=bar.update if bar is not None else None)
                latency[f"batch{b}"] = latency_stats(row.times[PATH], b)
                if b == 1:
                    answers = row.answers[PATH]
        resources = sampler.result()
    finally:
        _unload(server, entry.name)
    layers = [a["exit_layer"] for a in answers if "exit_layer" in a]
    meta = entry.metadata
    size = artifact_size(entry)
    build_exit = early_exit_build(entry)
    early_exit = None
    if build_exit is not None or layers:
        early_exit = {"mean_layers_build": build_exit["mean_layers"] if build_exit else None,
                      "mean_layers_run": round(float(np.mean(layers)), 4) if layers else None,
                      "layers": (build_exit or {}).get("layers"), "threshold": (build_exit or {}).get("threshold")}
    return {"variant": entry.variant, "triton_name": entry.name, "technique": meta.technique,
            "engine": meta.engine, "metric": meta.accuracy.name, "accuracy": meta.accuracy.value,
            "accuracy_n": meta.accuracy.n, "accuracy_sha256": meta.accuracy.examples_sha256,
            "reference_accuracy": meta.reference_accuracy.value,
            "size_bytes": size, "size_mb": round(size / 1e6, 3), "metadata_size_bytes": meta.size_bytes,
            "num_parameters": meta.num_parameters, "latency": latency, "resources": resources,
            "early_exit": early_exit}


def _unload(server, name: str, timeout_s: float = 30) -> None:
    """Unload and wait until Triton no longer lists the model READY and its stub process has left."""
    import psutil

    before = {p.pid for p in psutil.Process(server.pid).children(recursive=True)}
    server.unload_model(name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ready = name in server.ready_models()
            alive = {p.pid for p in psutil.Process(server.pid).children(recursive=True)}
        except (ServingError, psutil.Error):
            return
        if not ready and (len(alive) < len(before) or not before):
            return
        time.sleep(0.1)


def run_report(options: ReportOptions, log=print) -> dict:
    """Measure every chosen model's variants through an embedded Triton; returns the report as a dict and
    writes report.md, report.json and the PNG charts into options.out."""
    from dyngate_build.data import DataSource
    from dyngate_serving.launcher import TritonServer, TritonServerConfig
    from dyngate_serving.net import free_ports

    groups = _entries(options)
    source = DataSource.from_setting(options.data)
    options.out.mkdir(parents=True, exist_ok=True)
    http, grpc, metrics = free_ports(3)
    config = TritonServerConfig(repository=options.repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                                models=[], log_file=options.out / "triton.log")
    total = sum(len(g) for g in groups.values()) * options.requests * len(BATCH_SIZES)
    bar = None
    if options.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="report", unit="req", file=sys.stderr, dynamic_ncols=True)
    report = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "repository": str(options.repository), "machine": machine_info(),
              "settings": {"requests": options.requests, "warmup": options.warmup, "budget_pt": options.budget_pt,
                           "batch_sizes": list(BATCH_SIZES), "path": PATH, "data": source.location},
              "models": {}}
    try:
        with TritonServer(config) as server:
            report["versions"] = library_versions(server_version(server.endpoints["http"]))
            for model, group in groups.items():
                task = group[0].metadata.source.task
                raws = _inputs(task, source, options.requests * max(BATCH_SIZES))
                rows = []
                for entry in group:
                    if bar is not None:
                        bar.set_description(f"report {entry.name}")
                    rows.append(_measure_variant(server, entry, raws, options, bar))
                baseline = next((r for r in rows if r["variant"] == BASELINE_VARIANT), rows[0])
                add_changes(rows, baseline)
                chosen = recommendation(rows, baseline["variant"], options.budget_pt)
                report["models"][model] = {"task": task, "baseline": baseline["variant"], "rows": rows,
                                           "recommended": chosen.chosen, "recommendation": chosen.explain(),
                                           "seeds": seeds(group)}
    finally:
        if bar is not None:
            bar.close()
    write_report(report, options.out)
    return report


# ------------------------------------------------------------------------------------------------- writing

def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:{spec}}{suffix}"


def _signed(value, suffix: str = "", digits: int = 1) -> str:
    return "–" if value is None else f"{value:+.{digits}f}{suffix}"


def model_markdown(model: str, section: dict, budget_pt: float) -> str:
    rows, rec = section["rows"], section["recommended"]
    metric = rows[0]["metric"]
    header = ["variant", f"{metric}", "Δ pt", "size MB", "Δ size", "params",
              "b1 p50 ms", "b1 p95 ms", "b1 items/s", "Δ b1 p50", "Δ b1 items/s",
              "b8 p50 ms", "b8 p95 ms", "b8 items/s", "Δ b8 p50", "Δ b8 items/s",
              "server CPU %", "peak RSS MB", "GPU", "mean layers (build / run)"]
    lines = [f"### {model} ({section['task']})", "",
             f"Changes against `{section['baseline']}`. Recommended (fastest batch-1 p50 within {budget_pt:g} pt of "
             f"FP32): **{rec or 'none'}**.", "",
             *(["```", section["recommendation"], "```", ""] if section.get("recommendation") else []),
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        b1, b8, c, res = r["latency"]["batch1"], r["latency"]["batch8"], r["change"], r["resources"]
        gpu = res["gpu"] if isinstance(res["gpu"], str) else (
            f"{_fmt(res['gpu']['util_percent'], '.0f')}% / {_fmt(res['gpu']['memory_peak_mb'], '.0f')} MB")
        ee = r["early_exit"]
        layers = "–" if ee is None else (f"{_fmt(ee['mean_layers_build'])} / {_fmt(ee['mean_layers_run'])}"
                                         + (f" of {ee['layers']}" if ee.get("layers") else ""))
        name = f"**{r['variant']}** ★" if r["variant"] == rec else r["variant"]
        cells = [name, f"{r['accuracy']:.4f}", _signed(c["accuracy_pt"], digits=2), f"{r['size_mb']:.2f}",
                 _signed(c["size_pct"], "%"), f"{r['num_parameters']:,}" if r["num_parameters"] else "–",
                 f"{b1['p50_ms']:.2f}", f"{b1['p95_ms']:.2f}", f"{b1['throughput_items_s']:.1f}",
                 _signed(c["p50_batch1_pct"], "%"), _signed(c["throughput_batch1_pct"], "%"),
                 f"{b8['p50_ms']:.2f}", f"{b8['p95_ms']:.2f}", f"{b8['throughput_items_s']:.1f}",
                 _signed(c["p50_batch8_pct"], "%"), _signed(c["throughput_batch8_pct"], "%"),
                 f"{res['cpu_percent']:.0f}", f"{res['peak_rss_mb']:.0f}", gpu, layers]
        lines.append("| " + " | ".join(cells) + " |")
    seeds_text = "; ".join(f"{k}: {v}" for k, v in section["seeds"].items())
    lines += ["", f"Seeds: {seeds_text}.", "",
              f"![accuracy vs latency]({model}-pareto.png)", "", f"![changes]({model}-changes.png)"]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items())
    lines = ["# dyngate report", "",
             f"- Created: {report['created']}; repository: `{report['repository']}`",
             f"- Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, {m['memory_gb']} GB RAM; "
             f"GPU: {m['gpu']}",
             f"- Libraries: {versions}",
             f"- Run: {s['requests']} timed requests per variant and batch size ({s['warmup']} warm-up) through "
             f"Triton {s['path']}, batch {' and '.join(map(str, s['batch_sizes']))} (one request of 8 items); "
             f"data {s['data']}; accuracy budget {s['budget_pt']:g} pt",
             "- Accuracy: the build's dev metric (metadata.json). Size: the artifact on disk. Server CPU %: CPU "
             "seconds per wall second of the Triton process tree × 100 (100 = one core), while only that variant "
             "was loaded. Throughput: items/s of one client sending back to back.", ""]
    for model, section in report["models"].items():
        lines += [model_markdown(model, section, s["budget_pt"]), ""]
    return "\n".join(lines)


def pareto_figure(recommendation: Recommendation, title: str, xlabel: str, more: list[tuple] = ()):
    """A matplotlib Figure: dev metric (%) against p50 (ms) for the recommendation's candidates, the Pareto
    front (no other variant is both faster and more accurate), marker area ∝ size on disk, the budget line
    (baseline − budget) and the recommended variant as a star. Used by `dyngate report` (PNG) and the gateway's
    Compare tab (drawn live). Candidates without a metric or p50 are left out.

    more: further panels to the right, each (Recommendation, title, xlabel), e.g. the same variants' p50 at a
    higher concurrency; every panel stars `recommendation.chosen`, the variant recommended on the first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(recommendation, title, xlabel), *more]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, (panel, panel_title, panel_xlabel) in zip(axes[0], panels):
        _pareto_panel(ax, panel, panel_title, panel_xlabel, recommendation.chosen)
    fig.tight_layout()
    return fig


def _pareto_panel(ax, recommendation: Recommendation, title: str, xlabel: str, chosen: str | None) -> None:
    """One panel of `pareto_figure` on `ax`, starring `chosen`."""
    points = [c for c in recommendation.candidates if c.metric is not None and c.p50_ms is not None]
    names = [c.variant for c in points]
    lat = np.array([c.p50_ms for c in points], dtype=float)
    acc = np.array([c.metric for c in points], dtype=float) * 100
    sizes = np.array([c.size_mb if c.size_mb is not None else 0.0 for c in points], dtype=float)
    area = 30 + 400 * (sizes / sizes.max() if sizes.size and sizes.max() > 0 else np.zeros_like(sizes))

    ax.scatter(lat, acc, s=area, color="tab:blue", alpha=0.6, edgecolor="tab:blue", zorder=3,
               label="variant (area ∝ size MB)")
    for i, (x, y, n) in enumerate(zip(lat, acc, names)):  # alternate above/below so close points stay legible
        ax.annotate(f"{n} ({sizes[i]:.1f} MB)" if sizes[i] else n, (x, y), textcoords="offset points",
                    xytext=(6, 6 if i % 2 == 0 else -12), fontsize=8)
    order = np.argsort(lat, kind="stable")
    front, best = [], -np.inf
    for i in order:
        if acc[i] > best:
            front.append(i)
            best = acc[i]
    ax.plot(lat[front], acc[front], "--", color="tab:gray", label="Pareto front", zorder=2)
    ax.axhline(recommendation.baseline_metric * 100 - recommendation.budget_pt, color="tab:red", lw=0.8, ls=":",
               label=f"budget: {recommendation.baseline} − {recommendation.budget_pt:g} pt")
    if chosen in names:
        i = names.index(chosen)
        ax.scatter([lat[i]], [acc[i]], s=260, marker="*", color="gold", edgecolor="black", zorder=4,
                   label=f"recommended: {chosen}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{recommendation.metric_name} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def write_charts(model: str, section: dict, out: Path, budget_pt: float) -> list[Path]:
    """`<model>-pareto.png` (accuracy vs batch-1 p50, Pareto front, recommended marked) and
    `<model>-changes.png` (bar charts of the changes against the baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = section["rows"]
    names = [r["variant"] for r in rows]
    fig = pareto_figure(recommendation(rows, section["baseline"], budget_pt), f"{model}: accuracy vs latency",
                        "Triton gRPC latency p50, batch 1 (ms)")
    pareto = out / f"{model}-pareto.png"
    fig.savefig(pareto, dpi=110)
    plt.close(fig)

    panels = [("accuracy_pt", "accuracy (pt)"), ("size_pct", "size (%)"), ("p50_batch1_pct", "p50 batch 1 (%)"),
              ("p50_batch8_pct", "p50 batch 8 (%)"), ("throughput_batch1_pct", "throughput batch 1 (%)"),
              ("throughput_batch8_pct", "throughput batch 8 (%)")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.ravel(), panels):
        values = [r["change"][key] if r["change"][key] is not None else 0.0 for r in rows]
        colors = ["tab:green" if (v >= 0) == key.startswith(("accuracy", "throughput")) else "tab:red"
                  for v in values]
        ax.bar(range(len(rows)), values, color=colors)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{model}: change against {section['baseline']} (green = better)")
    fig.tight_layout()
    changes = out / f"{model}-changes.png"
    fig.savefig(changes, dpi=110)
    plt.close(fig)
    return [pareto, changes]


def write_report(report: dict, out: Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md", "json": out / "report.json"}
    for model, section in report["models"].items():
        charts = write_charts(model, section, out, report["settings"]["budget_pt"])
        section["charts"] = [p.name for p in charts]
    files["markdown"].write_text(markdown(report) + "\n")
    files["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", default=os.environ.get("DYNGATE_REPOSITORY", "model_repository"))
    parser.add_argument("--model", action="append", help="model name in the repository (repeatable; default: all)")
    parser.add_argument("--requests", type=int, default=100, help="timed requests per variant and batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests per variant and batch size")
    parser.add_argument("--budget-pt", type=float, default=1.0,
                        help="accuracy points the recommended variant may lose against FP32")
    parser.add_argument("--data", default=None, help="data folder or hf:<datasets id> (default: $DYNGATE_DATA, "
                                                     "else ../shared/data)")
    parser.add_argument("--out", default="reports", help="folder for report.md, report.json and the PNG charts")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args) -> ReportOptions:
    return ReportOptions(repository=Path(args.repository), out=Path(args.out), models=args.model,
                         requests=args.requests, warmup=args.warmup, budget_pt=args.budget_pt, data=args.data,
                         progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    report = run_report(options_from_args(parser.parse_args(argv)))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
