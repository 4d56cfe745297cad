"""`dyngate report` end to end on the built presets through a real embedded Triton (small counts), and its
numbers checked against the variants' metadata, the files on disk and its own rows. Timings are never
asserted, only their consistency (counts, ordering of percentiles, changes recomputed from the rows)."""

from __future__ import annotations

import json

import pytest

from dyngate_cli import main as cli_main
from dyngate_build.repository import directory_size, list_models
from dyngate_measure.machine import NO_GPU
from dyngate_measure.report import BATCH_SIZES, add_changes, recommendation

PNG = b"\x89PNG\r\n\x1a\n"
MODELS = ("distilbert-tiny", "vit-tiny")
REQUESTS = 3


def _pct(value, base):
    return round((value / base - 1.0) * 100.0, 2)


@pytest.fixture(scope="module")
def report(built_repository, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    argv = ["report", "--repository", str(built_repository), "--requests", str(REQUESTS), "--warmup", "1",
            "--budget-pt", "1.0", "--data", str(data_dir), "--out", str(out), "--no-progress"]
    for model in MODELS:
        argv += ["--model", model]
    assert cli_main(argv) == 0
    return out, json.loads((out / "report.json").read_text())


def test_report_header_records_machine_versions_and_seeds(report):
    out, data = report
    machine = data["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and machine["threads"] >= machine["cores"]
    assert machine["gpu"] == NO_GPU or machine["gpus"]
    versions = data["versions"]
    for name in ("torch", "onnxruntime", "transformers", "tritonserver"):
        assert versions[name] and versions[name] != "not installed", name
    assert versions["tritonserver"].startswith("2.")
    assert data["settings"]["requests"] == REQUESTS and data["settings"]["batch_sizes"] == list(BATCH_SIZES)
    text = (out / "report.md").read_text()
    assert machine["cpu"] in text and "tritonserver" in text and "Seeds:" in text
    for model in MODELS:
        assert "checkpoint training_config.seed" in data["models"][model]["seeds"]


def test_report_rows_match_metadata_and_disk(report, built_repository):
    _, data = report
    assert sorted(data["models"]) == sorted(MODELS)
    entries = {e.name: e for e in list_models(built_repository) if e.backend == "python"}
    for model in MODELS:
        rows = data["models"][model]["rows"]
        assert [r["variant"] for r in rows] == ["fp32", "torchscript"]  # fp32 (the baseline) first
        for row in rows:
            entry = entries[row["triton_name"]]
            meta = entry.metadata
            assert row["accuracy"] == meta.accuracy.value
            assert row["reference_accuracy"] == meta.reference_accuracy.value
            assert row["num_parameters"] == meta.num_parameters
            version = max((p for p in entry.folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
            artifact = json.loads((version / "runtime.json").read_text())["artifact"]
            assert row["size_bytes"] == directory_size(version / artifact) == meta.size_bytes
            assert row["size_mb"] == round(row["size_bytes"] / 1e6, 3)
            for b in BATCH_SIZES:
                lat = row["latency"][f"batch{b}"]
                assert lat["batch_size"] == b and lat["requests"] == REQUESTS
                assert 0 < lat["p50_ms"] <= lat["p95_ms"]
                assert lat["throughput_items_s"] == pytest.approx(b * 1000.0 / lat["mean_ms"], rel=1e-3)
            res = row["resources"]
            assert res["cpu_percent"] >= 0 and res["peak_rss_mb"] > 0 and res["samples"] >= 2
            assert res["gpu"] == NO_GPU or isinstance(res["gpu"], dict)
            assert row["early_exit"] is None  # baseline variants compute every layer


def test_report_changes_and_recommendation_come_from_rows(report):
    _, data = report
    for model in MODELS:
        section = data["models"][model]
        rows = section["rows"]
        base = next(r for r in rows if r["variant"] == section["baseline"])
        assert section["baseline"] == "fp32"
        for row in rows:
            change = row["change"]
            assert change["accuracy_pt"] == round((row["accuracy"] - base["accuracy"]) * 100, 2)
            assert change["size_pct"] == _pct(row["size_bytes"], base["size_bytes"])
            for b in BATCH_SIZES:
                lat, blat = row["latency"][f"batch{b}"], base["latency"][f"batch{b}"]
                assert change[f"p50_batch{b}_pct"] == _pct(lat["p50_ms"], blat["p50_ms"])
                assert change[f"throughput_batch{b}_pct"] == _pct(lat["throughput_items_s"],
                                                                   blat["throughput_items_s"])
        eligible = [r for r in rows if r["change"]["accuracy_pt"] >= -1.0]
        fastest = min(eligible, key=lambda r: r["latency"]["batch1"]["p50_ms"])
        assert section["recommended"] == fastest["variant"]


def test_report_writes_markdown_and_png_charts(report):
    out, data = report
    text = (out / "report.md").read_text()
    for model in MODELS:
        section = data["models"][model]
        assert f"### {model}" in text
        assert section["charts"] == [f"{model}-pareto.png", f"{model}-changes.png"]
        for chart in section["charts"]:
            blob = (out / chart).read_bytes()
            assert blob.startswith(PNG) and len(blob) > 5000
            assert f"]({chart})" in text
        for row in section["rows"]:
            line = next(line for line in text.splitlines() if line.startswith("| ") and row["variant"] in line
                        and f"{row['accuracy']:.4f}" in line)
            assert f"{row['size_mb']:.2f}" in line and f"{row['latency']['batch1']['p50_ms']:.2f}" in line
        assert f"**{section['recommended']}** ★" in text


def _row(variant, accuracy, size, p50, n=872, sha256="sst2-dev-872"):
    lat = {"p50_ms": p50, "p95_ms": p50 * 1.5, "throughput_items_s": 1000.0 / p50}
    return {"variant": variant, "accuracy": accuracy, "accuracy_n": n, "accuracy_sha256": sha256,
            "metric": "accuracy", "size_bytes": size, "size_mb": size / 1e6, "latency": {f"batch{b}": dict(lat) for b in BATCH_SIZES}}


def test_recommendation_is_fastest_within_budget():
    rows = [_row("fp32", 0.90, 100, 10.0), _row("int8", 0.895, 25, 6.0), _row("ee", 0.85, 100, 3.0)]
    add_changes(rows, rows[0])
    assert rows[1]["change"]["accuracy_pt"] == -0.5 and rows[1]["change"]["size_pct"] == -75.0
    assert rows[1]["change"]["p50_batch1_pct"] == -40.0
    assert recommendation(rows, "fp32", 1.0).chosen == "int8"
    assert recommendation(rows, "fp32", 5.0).chosen == "ee"
    assert recommendation(rows, "fp32", 0.0).chosen == "fp32"
    assert recommendation(rows, "fp32", 1.0).rejected == [("ee", "accuracy 0.8500 is 5.00 pt below fp32 "
                                                                  "(budget 1 pt), p50 3.000 ms")]
    rows.append(_row("ee-200", 0.95, 100, 1.0, n=200))  # scored on another number of dev examples: never chosen
    assert recommendation(rows, "fp32", 100.0).chosen == "ee"
    assert dict(recommendation(rows, "fp32", 1.0).rejected)["ee-200"].startswith("accuracy measured on 200")
    rows.append(_row("ee-other", 0.96, 100, 0.5, sha256="another-dev-file"))  # as many examples, other ones
    assert recommendation(rows, "fp32", 100.0).chosen == "ee"
    assert "other dev examples than fp32's" in dict(recommendation(rows, "fp32", 1.0).rejected)["ee-other"]


def test_report_unknown_model_is_named(built_repository, tmp_path, capsys):
    code = cli_main(["report", "--repository", str(built_repository), "--model", "no-such-model",
                     "--out", str(tmp_path), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "distilbert-tiny" in err
