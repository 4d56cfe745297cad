"""Early exit: exact at "never exit", real layer skipping, per-sample exit, bad settings, Triton over gRPC.

Unit tests run a random 3-layer DistilBERT (two off-ramps) through the real exports (ONNX segments chained by
runtime.EarlyExitOnnxEngine, scripted TorchScript); the end-to-end test builds the distilbert-tiny preset's
early-exit variants with `dyngate build` code, serves them with the embedded Triton and asks over gRPC with a
per-request `exit_threshold`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from build.early_exit import (confidence, export_onnx_segments, export_torchscript, predict_with_exit,
                              segment_model)
from build import errors
from build.errors import ConfigError
from build.runtime import EarlyExitOnnxEngine, InputError, RuntimeSpec, TorchScriptEngine
from tests.conftest import running_triton

LAYERS = 3


@pytest.fixture(scope="module")
def model():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=200, dim=32, n_layers=LAYERS, n_heads=2, hidden_dim=64,
                              max_position_embeddings=64, num_labels=2)
    return DistilBertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def segments(model):
    seg = segment_model(model, "distilbert")
    torch.manual_seed(1)
    for ramp in seg.ramps.values():  # spread the ramps' confidences so a mid threshold splits a batch
        for p in ramp.parameters():
            p.data.normal_(0, 1.0)
    return seg


@pytest.fixture(scope="module")
def feeds():
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 200, size=(8, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[5, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _spec(artifact: str, engine: str, extra: dict | None = None) -> RuntimeSpec:
    return RuntimeSpec(task="text-classification", client_input="TEXT", engine=engine, artifact=artifact,
                       graph_inputs=["input_ids", "attention_mask"], labels=["negative", "positive"],
                       extra=extra or {})


@pytest.fixture(scope="module")
def onnx_engine(segments, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ee-onnx")
    export_onnx_segments(segments, folder / "early_exit", "max_prob", 0.9, "text-classification")
    return EarlyExitOnnxEngine(str(folder), _spec("early_exit", "early-exit-onnx"))


@pytest.fixture(scope="module")
def ts_engine(segments, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ee-ts")
    export_torchscript(segments, folder / "model.pt", "max_prob")
    return TorchScriptEngine(str(folder), _spec("model.pt", "torchscript", {"threshold_input": True,
                                                                          "exit_threshold": 0.9}))


def _full_logits(model, feeds) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()


def _mid_threshold(segments, feeds) -> float:
    """A threshold between the ramp-1 confidences of the batch: some rows exit at layer 1, the rest not."""
    with torch.no_grad():
        hidden = segments.hidden_states({k: torch.from_numpy(v) for k, v in feeds.items()})[0]
        conf = confidence(segments.ramps[1](hidden), "max_prob").numpy()
    return float(np.sort(conf)[len(conf) // 2] - 1e-6)


def test_never_exit_equals_full_model_onnx_and_torchscript(model, onnx_engine, ts_engine, feeds):
    expected = _full_logits(model, feeds)
    onnx_engine.calls.clear()
    for engine in (onnx_engine, ts_engine):
        out = engine.run(feeds, {"exit_threshold": 1.0})
        np.testing.assert_allclose(out["logits"], expected, atol=1e-5)
        assert out["exit_layer"].tolist() == [LAYERS] * len(expected)
    # ramps are not even run at "never exit"
    assert onnx_engine.calls == {"embeddings": 1, "layer_1": 1, "layer_2": 1, "layer_3": 1, "head": 1}
    # thresholds above 1 mean never exit as well
    np.testing.assert_allclose(onnx_engine.run(feeds, {"exit_threshold": 7})["logits"], expected, atol=1e-5)


def test_low_threshold_really_skips_layers(segments, onnx_engine, ts_engine, feeds):
    onnx_engine.calls.clear()
    onnx_engine.rows.clear()
    out = onnx_engine.run(feeds, {"exit_threshold": 0.0})
    assert out["exit_layer"].tolist() == [1] * 8
    assert onnx_engine.calls == {"embeddings": 1, "layer_1": 1, "ramp_1": 1}  # layers 2, 3 and head never run
    reference, _ = predict_with_exit(segments, {k: torch.from_numpy(v) for k, v in feeds.items()}, 0.0)
    np.testing.assert_allclose(out["logits"], reference.numpy(), atol=1e-5)
    ts = ts_engine.run(feeds, {"exit_threshold": 0.0})
    assert ts["exit_layer"].tolist() == [1] * 8
    np.testing.assert_allclose(ts["logits"], reference.numpy(), atol=1e-5)
    # the PyTorch reference counts layer calls the same way
    calls: dict = {}
    predict_with_exit(segments, {k: torch.from_numpy(v) for k, v in feeds.items()}, 0.0, calls=calls)
    assert calls == {"layer_1": 1}


def test_per_sample_exit_in_a_mixed_batch(model, segments, onnx_engine, ts_engine, feeds):
    threshold = _mid_threshold(segments, feeds)
    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    ref_logits, ref_exit = predict_with_exit(segments, inputs, threshold)
    assert 0 < int((ref_exit == 1).sum()) < 8, ref_exit  # the batch really splits
    onnx_engine.rows.clear()
    out = onnx_engine.run(feeds, {"exit_threshold": threshold})
    assert out["exit_layer"].tolist() == ref_exit.tolist()
    np.testing.assert_allclose(out["logits"], ref_logits.numpy(), atol=1e-5)
    stayed = int((ref_exit > 1).sum())
    assert onnx_engine.rows["layer_1"] == 8 and onnx_engine.rows["layer_2"] == stayed  # exited rows left
    ts = ts_engine.run(feeds, {"exit_threshold": threshold})
    assert ts["exit_layer"].tolist() == ref_exit.tolist()
    np.testing.assert_allclose(ts["logits"], ref_logits.numpy(), atol=1e-5)
    # rows that went the whole way equal the full model on them, even though their neighbours left
    full = _full_logits(model, feeds)
    rows = (ref_exit == LAYERS).numpy()
    np.testing.assert_allclose(out["logits"][rows], full[rows], atol=1e-5)


def test_default_threshold_and_bad_request_thresholds(onnx_engine, ts_engine, feeds):
    assert onnx_engine.default == 0.9 and ts_engine.default_threshold == 0.9
    for engine in (onnx_engine, ts_engine):
        for bad in (-0.1, "abc", float("nan")):
            with pytest.raises(InputError, match="exit_threshold"):
                engine.run(feeds, {"exit_threshold": bad})


@pytest.mark.parametrize("options,message", [
    ({"exit_layers": (7,)}, "lacks"),
    ({"exit_layers": (3,)}, "lacks"),  # the last layer exits through the model's own head
    ({"threshold": 1.5}, "threshold"),
    ({"grid": (0.5, -1.0)}, "grid"),
    ({"zero_stage": 4}, "zero_stage"),
    ({"criterion": "margin"}, "criterion"),
])
def test_bad_settings_raise_before_training(model, options, message):
    from build.techniques import get_technique, make_config

    with pytest.raises(ConfigError, match=message):
        config = make_config("early-exit", options)
        source = type("S", (), {"model": model, "family": type("F", (), {"model_type": "distilbert"})})
        get_technique("early-exit").check(source, config)


def test_unsupported_family_is_named():
    from build.early_exit import check_family

    with pytest.raises(ConfigError, match="deberta-v2"):
        check_family("deberta-v2")


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def early_exit_repository(preset_checkpoint, cache_dir, data_source, tmp_path_factory):
    from build.pipeline import BuildOptions, build

    preset_checkpoint("distilbert-tiny")
    repository = tmp_path_factory.mktemp("ee-repo")
    options = BuildOptions(model="distilbert-tiny", techniques=("early-exit", "early-exit-torchscript"),
                           repository=repository, cache_dir=cache_dir, data=data_source.location,
                           eval_limit=200, check_limit=32, latency_samples=20, native=False,
                           technique_options={"early-exit": {"epochs": 5.0, "latency_samples": 16},
                                              "early-exit-torchscript": {"epochs": 5.0, "latency_samples": 16}})
    reports = build(options, log=lambda *_: None)
    return repository, reports


def test_build_records_curve_and_default(early_exit_repository):
    repository, reports = early_exit_repository
    for report in reports:
        meta = json.loads((repository / report.triton_name / "metadata.json").read_text())
        tr = meta["technique_report"]
        assert [row["threshold"] for row in tr["curve"]] == sorted(row["threshold"] for row in tr["curve"])
        full = tr["curve"][-1]
        assert full["threshold"] == 1.0 and full["mean_layers"] == tr["layers"]
        assert tr["at_default"]["accuracy"] >= full["accuracy"] - 0.01 - 1e-9
        assert all(set(row) >= {"accuracy", "mean_layers", "p50_ms"} for row in tr["curve"])
        assert meta["agreement"]["max_abs_logit"] < 1e-3  # checked at never-exit


@pytest.mark.parametrize("variant", ["early-exit", "early-exit-torchscript"])
def test_triton_serves_early_exit_with_per_request_threshold(early_exit_repository, data_source, variant,
                                                             tmp_path):
    from build.data import load_examples
    from build.repository import triton_name
    from gateway.client import TritonClient
    repository, _ = early_exit_repository
    name = triton_name("distilbert-tiny", variant)
    examples, _ = load_examples("text-classification", "dev", data_source, limit=6)
    from build.runtime import Predictor

    local = Predictor(str(repository / name / "1"))
    with running_triton(repository, tmp_path / "triton.log", models=[name]) as server:
        client = TritonClient(server.endpoints["grpc"], protocol="grpc")
        for example in examples:
            never = client.predict(name, example.raw, params={"exit_threshold": 1.0})
            expected = local.predict([example.raw], {"exit_threshold": 1.0})[0]
            assert never.answer["exit_layer"] == 2
            np.testing.assert_allclose(never.logits.reshape(-1), expected.logits, atol=1e-5)
            always = client.predict(name, example.raw, params={"exit_threshold": 0.0})
            assert always.answer["exit_layer"] == 1
            default = client.predict(name, example.raw)
            assert default.answer["exit_layer"] in (1, 2)
        with pytest.raises(errors.InputError, match="exit_threshold"):
            client.predict(name, examples[0].raw, params={"exit_threshold": -1.0})
        assert client.predict(name, examples[0].raw).answer["label"]
