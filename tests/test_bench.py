"""`make bench` (dyngate_measure.benchmark) end to end on the built presets with tiny counts: the baselines (PyTorch eager,
ONNX Runtime FP32 and INT8 dynamic) and every variant in process and through a real embedded Triton, plus the
DistilBERT-base section on a small config. Timings are never asserted, only the table's structure and its
consistency: row set, counts, min ≤ median ≤ max, ratios recomputed from the rows, accuracy from metadata."""

from __future__ import annotations

import json

import pytest

from dyngate_build.repository import list_models
from dyngate_measure.benchmark import (BASE_TECHNIQUES, BASELINE_LABELS, BASELINES, BenchOptions, add_ratios, headlines,
                               interleave, latency_summary, run_bench, speedup)

MODELS = ("distilbert-tiny", "vit-tiny")
REQUESTS, REPEATS = 2, 2
BATCH_SIZES = (1, 8)
BASE_CONFIG = {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64}
BASELINE_NAMES = [BASELINE_LABELS[b] for b in BASELINES]


@pytest.fixture(scope="module")
def bench(built_repository, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    options = BenchOptions(repository=built_repository, out=out, models=list(MODELS), requests=REQUESTS,
                           repeats=REPEATS, warmup=1, batch_sizes=BATCH_SIZES, paths=("in-process", "grpc"),
                           data=str(data_dir), base=True, base_requests=REQUESTS, base_config=BASE_CONFIG,
                           progress=False)
    result = run_bench(options, log=lambda *a: None)
    return out, result


def _sections(result):
    return {s["model"]: s for s in result["sections"]}


def test_bench_writes_markdown_and_json_with_header(bench):
    out, result = bench
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(result))
    machine, versions, settings = result["machine"], result["versions"], result["settings"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["threads"] >= machine["cores"]
    for name in ("torch", "onnxruntime", "transformers", "tritonserver"):
        assert versions[name] and versions[name] != "not installed", name
    assert settings["requests"] == REQUESTS and settings["repeats"] == REPEATS
    assert settings["batch_sizes"] == list(BATCH_SIZES) and settings["threads"] >= 1
    text = (out / "bench.md").read_text()
    assert machine["cpu"] in text and "tritonserver" in text
    assert sorted(_sections(result)) == sorted([*MODELS, "distilbert-base"])


def test_preset_rows_cover_baselines_and_every_variant_on_every_path(bench, built_repository):
    _, result = bench
    sections = _sections(result)
    entries = [e for e in list_models(built_repository) if e.backend == "python"]
    for model in MODELS:
        rows = sections[model]["rows"]
        names = [r["name"] for r in rows]
        assert names[:3] == BASELINE_NAMES
        assert all(r["kind"] == "baseline" and r["path"] == "in-process" for r in rows[:3])
        expected = {(e.name, p) for e in entries if e.model == model for p in ("in-process", "grpc")}
        assert {(r["triton_name"], r["path"]) for r in rows[3:]} == expected
        assert len(names) == len(set(names)) == 3 + len(expected)


def test_accuracy_comes_from_metadata_and_baselines_are_measured(bench, built_repository):
    _, result = bench
    entries = {e.name: e for e in list_models(built_repository) if e.backend == "python"}
    for model in MODELS:
        section = _sections(result)[model]
        rows = {r["name"]: r for r in section["rows"]}
        n = section["metric_n"]
        for row in section["rows"][3:]:
            meta = entries[row["triton_name"]].metadata
            assert row["accuracy"] == meta.accuracy.value and row["accuracy_source"] == "metadata.json"
            assert n == meta.accuracy.n
        # The eager baseline is the build's PyTorch FP32 reference on the same dev examples; ORT FP32 runs the
        # fp32 variant's own graph. Thread counts may differ from the build's, so allow one borderline flip.
        eager, ort_fp32 = rows[BASELINE_NAMES[0]], rows[BASELINE_NAMES[1]]
        assert eager["accuracy"] == pytest.approx(section["reference_accuracy"], abs=1.01 / n)
        fp32 = next(r for r in section["rows"] if r["variant"] == "fp32")
        assert ort_fp32["accuracy"] == pytest.approx(fp32["accuracy"], abs=1.01 / n)
        assert 0.0 <= rows[BASELINE_NAMES[2]]["accuracy"] <= 1.0


def test_latency_summaries_are_consistent(bench):
    _, result = bench
    for section in result["sections"]:
        for row in section["rows"]:
            assert sorted(row["latency"]) == [f"batch{b}" for b in BATCH_SIZES]
            for key, lat in row["latency"].items():
                b = lat["batch_size"]
                assert key == f"batch{b}" and lat["repeats"] == REPEATS and lat["requests"] == REQUESTS * REPEATS
                assert len(lat["per_repeat_p50_ms"]) == REPEATS
                assert 0 < lat["p50_min_ms"] <= lat["p50_ms"] <= lat["p50_max_ms"]
                assert lat["throughput_items_s"] == pytest.approx(b * 1000.0 / lat["mean_ms"], rel=1e-3)


def test_ratios_are_computed_from_the_rows(bench):
    out, result = bench
    text = (out / "bench.md").read_text()
    for section in result["sections"]:
        assert section["baselines"] == BASELINE_NAMES
        rows = {r["name"]: r for r in section["rows"]}
        for row in section["rows"]:
            for key, ratios in row["ratios"].items():
                assert sorted(ratios) == sorted(BASELINE_NAMES)
                for name, ratio in ratios.items():
                    assert ratio == round(rows[name]["latency"][key]["p50_ms"] / row["latency"][key]["p50_ms"], 3)
            if row["kind"] == "baseline":
                assert all(row["ratios"][k][row["name"]] == 1.0 for k in row["ratios"])
            table = text.split(f"### {section['title']}\n", 1)[1].split("\n### ", 1)[0]
            line = next(line for line in table.splitlines()
                        if line.startswith(f"| {row['name']} |") or line.startswith(f"| **{row['name']}** |"))
            assert f"{row['latency']['batch1']['p50_ms']:.2f}" in line
            assert f"{row['ratios']['batch8'][BASELINE_NAMES[1]]:.2f}" in line


def test_base_section_runs_the_training_free_techniques(bench):
    _, result = bench
    section = _sections(result)["distilbert-base"]
    assert section["kind"] == "base" and section["metric"] is None
    assert section["architecture"]["dim"] == BASE_CONFIG["dim"] and section["architecture"]["n_layers"] == 2
    rows = section["rows"]
    assert [r["name"] for r in rows[:3]] == BASELINE_NAMES
    assert [(r["name"], r["variant"]) for r in rows[3:-2]] == [(label, name) for label, name, _ in BASE_TECHNIQUES]
    assert all(r["accuracy"] is None and r["path"] == "in-process" for r in rows)
    early, stacked = rows[-2:]
    assert early["variant"] == "early-exit" and early["name"] == "early-exit (layer 1 of 2)"
    assert early["exit_layers_seen"] == [1]  # every input took the fixed exit
    assert stacked["variant"] == "stacked" and stacked["name"] == "stacked (layer 1 of 2)"
    assert stacked["exit_layers_seen"] == [1]
    pruned = next(r for r in rows if r["variant"] == "pruned")
    assert "no recovery" in pruned["notes"]
    assert pruned["size_bytes"] < rows[1]["size_bytes"]  # smaller than the FP32 graph
    assert stacked["size_bytes"] < 0.5 * pruned["size_bytes"]  # the pruned model's segments, INT8


def test_headline_names_the_fastest_variant_within_one_point_in_process_and_served(bench):
    out, result = bench
    lines = {h["model"]: h for h in result["headline"]}
    assert set(lines) == set(MODELS)
    for model, h in lines.items():
        rows = _sections(result)[model]["rows"]
        assert h["accuracy"] >= h["reference_accuracy"] - 0.01
        row = next(r for r in rows if r["variant"] == h["variant"] and r["path"] == "in-process")
        assert h["in_process_speedup"] == row["ratios"]["batch1"][BASELINE_LABELS[BASELINES[2]]]
        # served: against dyngate's int8-dynamic through Triton, which this repository (fp32, torchscript) lacks
        assert h["served"] is None
    text = (out / "bench.md").read_text()
    assert text.count("**Headline, ") == len(MODELS) and "not measured through Triton" in text


def test_headline_skips_variants_outside_the_budget():
    def row(name, variant, path, acc, p50, kind="dyngate"):
        return {"name": name, "variant": variant, "path": path, "accuracy": acc, "kind": kind,
                "latency": {"batch1": {"p50_ms": p50}}}
    rows = [row(BASELINE_LABELS[BASELINES[2]], None, "in-process", 0.80, 2.0, kind="baseline"),
            row("fast (in-process)", "fast", "in-process", 0.789, 0.5),
            row("ok (in-process)", "ok", "in-process", 0.80, 1.0),
            row("ok (grpc)", "ok", "grpc", 0.80, 3.0), row("int8-dynamic (grpc)", "int8-dynamic", "grpc", 0.80, 4.5)]
    (h,) = headlines({"sections": [{"kind": "preset", "model": "m", "reference_accuracy": 0.80, "rows": rows}]})
    assert h["variant"] == "ok" and h["in_process_speedup"] == 2.0 and h["served"]["speedup"] == 1.5


def test_interleave_rotates_the_order():
    order = []
    calls = {name: (lambda n: (lambda request: order.append((request, n))))(name) for name in "abc"}
    times = interleave(calls, [0, 1, 2, 3], warmup=1)
    assert order[:3] == [(0, "a"), (0, "b"), (0, "c")]  # warm-up, untimed
    timed = order[3:]
    assert [n for r, n in timed if r == 0] == ["a", "b", "c"]
    assert [n for r, n in timed if r == 1] == ["b", "c", "a"]
    assert [n for r, n in timed if r == 2] == ["c", "a", "b"]
    assert all(len(t) == 4 for t in times.values())


def test_summary_and_ratios_arithmetic():
    lat = latency_summary([[1.0, 3.0, 5.0], [2.0, 2.0, 2.0], [10.0, 4.0, 4.0]], batch_size=8)
    assert lat["per_repeat_p50_ms"] == [3.0, 2.0, 4.0]
    assert (lat["p50_ms"], lat["p50_min_ms"], lat["p50_max_ms"]) == (3.0, 2.0, 4.0)
    assert lat["requests"] == 9 and lat["throughput_items_s"] == pytest.approx(8000 / (33 / 9), rel=1e-6)
    rows = [{"name": "base", "latency": {"batch1": {"p50_ms": 10.0}}},
            {"name": "fast", "latency": {"batch1": {"p50_ms": 4.0}}}]
    add_ratios(rows, ["base"])
    assert rows[1]["ratios"]["batch1"]["base"] == speedup(10.0, 4.0) == 2.5
    assert rows[0]["ratios"]["batch1"]["base"] == 1.0


def test_serving_overhead_section_has_the_floor_and_every_variant_on_every_path(bench, built_repository):
    out, result = bench
    entries = [e for e in list_models(built_repository) if e.backend == "python"]
    sections = {s["model"]: s for s in result["serving_overhead"]}
    assert sorted(sections) == sorted(MODELS)
    for model, section in sections.items():
        floor, *variants = section["rows"]
        assert floor["variant"] == "floor" and floor["triton_name"] == section["floor"]
        assert sorted(floor["paths"]) == ["grpc", "http"]
        assert sorted(r["triton_name"] for r in variants) == sorted(e.name for e in entries if e.model == model)
        for row in variants:
            paths = row["paths"]
            assert sorted(paths) == ["gateway", "grpc", "http", "in-process"]  # a gateway process in front
            for path in ("grpc", "http"):
                expected = paths[path]["p50_ms"] - paths["in-process"]["p50_ms"] - floor["paths"][path]["p50_ms"]
                assert paths[path]["overhead_ms"] == pytest.approx(expected, abs=1e-3)
            assert paths["gateway"]["over_grpc_ms"] == pytest.approx(
                paths["gateway"]["p50_ms"] - paths["grpc"]["p50_ms"], abs=1e-3)
            for cell in paths.values():
                c8 = cell["c8"]
                assert c8["clients"] == 8 and c8["requests"] == section["requests"] and c8["throughput_rps"] > 0
                assert cell["c8_vs_single"] == pytest.approx(c8["throughput_rps"] / cell["single_rps"], rel=1e-2)
    text = (out / "bench.md").read_text()
    assert "## Serving overhead" in text and "floor (empty model)" in text and "gateway − gRPC" in text
