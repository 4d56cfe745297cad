"""`stacked`: pruning + early exit + INT8 dynamic per ONNX segment, built on the distilbert-tiny preset.

The variant is built with the real build code (KD recovery and ramp training through DeepSpeed, ONNX
export, ONNX Runtime quantize_dynamic) and loaded with the runtime Triton uses; the Triton path itself is
the `early-exit-onnx` engine already served in tests/test_early_exit.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dyngate_build.errors import ConfigError

OPTIONS = {"recovery_epochs": 1.0, "recovery_examples": 256, "ramp_epochs": 3.0, "tuning_examples": 128,
           "latency_samples": 8, "grid": (0.6, 0.8, 0.9, 1.0)}


@pytest.fixture(scope="module")
def stacked_build(preset_checkpoint, cache_dir, data_source, tmp_path_factory):
    from dyngate_build.pipeline import BuildOptions, build

    preset_checkpoint("distilbert-tiny")
    repository = tmp_path_factory.mktemp("stacked-repo")
    options = BuildOptions(model="distilbert-tiny", techniques=("stacked",), repository=repository,
                           cache_dir=cache_dir, data=data_source.location, eval_limit=200, check_limit=32,
                           latency_samples=10, native=False, technique_options={"stacked": dict(OPTIONS)})
    reports = build(options, log=lambda *_: None)
    return repository, reports[0]


def test_segments_are_pruned_and_int8(stacked_build):
    import onnx

    repository, report = stacked_build
    version = repository / report.triton_name / "1"
    meta = json.loads((repository / report.triton_name / "metadata.json").read_text())
    stages = meta["technique_report"]["stacked"]
    assert stages["pruning"]["heads_per_layer"] == [1, 1] and stages["pruning"]["ffn_per_layer"] == [307, 307]
    assert stages["pruning"]["parameters_after"] < stages["pruning"]["parameters_before"]
    manifest = json.loads((version / "early_exit" / "early_exit.json").read_text())
    for name in ("layer_1", "layer_2"):
        graph = onnx.load(str(version / "early_exit" / manifest["segments"][name])).graph
        ops = [node.op_type for node in graph.node]
        assert ops.count("MatMulInteger") >= 6, ops  # q, k, v, out, ffn in, ffn out
        # the pruned shapes: 1 head of 64 left of 2, 307 of 512 FFN neurons
        weights = {tuple(init.dims) for init in graph.initializer}
        assert (128, 64) in weights and (128, 307) in weights and (307, 128) in weights
    assert stages["int8"]["matmul_integer_per_segment"]["layer_1"] >= 6


def test_agreement_checked_at_never_exit_and_accuracy_recorded(stacked_build):
    repository, report = stacked_build
    meta = json.loads((repository / report.triton_name / "metadata.json").read_text())
    assert meta["agreement"]["top1"] >= 0.8  # the tolerance of build/dyngate_build/techniques/stacked.py
    tr = meta["technique_report"]
    full = tr["curve"][-1]
    assert full["threshold"] == 1.0 and full["mean_layers"] == 2
    # one budget for pruning, INT8 and exits: the default keeps accuracy within 1 pt of the source FP32 model,
    # or is 1.0 (never exit) when no lower threshold does
    assert "source (FP32)" in tr["rule"]
    baseline = tr["baseline_accuracy"]
    if tr["default_threshold"] < 1.0:
        assert tr["at_default"]["accuracy"] >= baseline - 0.01 - 1e-9
    else:
        assert all(row["accuracy"] < baseline - 0.01 for row in tr["curve"] if row["threshold"] < 1.0)
    assert report.metric.value > 0.6  # SST-2 accuracy well above chance after pruning + INT8


def test_really_exits_per_request(stacked_build, data_source):
    from dyngate_build.data import load_examples
    from dyngate_build.runtime import Predictor

    repository, report = stacked_build
    predictor = Predictor(str(repository / report.triton_name / "1"))
    examples, _ = load_examples("text-classification", "dev", data_source, limit=16)
    raws = [ex.raw for ex in examples]
    never = predictor.predict(raws, {"exit_threshold": 1.0})
    always = predictor.predict(raws, {"exit_threshold": 0.0})
    assert [p.answer["exit_layer"] for p in never] == [2] * len(raws)
    assert [p.answer["exit_layer"] for p in always] == [1] * len(raws)
    engine = predictor.engine
    engine.calls.clear()
    predictor.predict(raws, {"exit_threshold": 0.0})
    assert "layer_2" not in engine.calls and "head" not in engine.calls  # layer 2 never computed
    # alone or in a batch, the same answer (INT8 activation scales are per run, over the whole batch and its
    # padding, so logits move by a few thousandths)
    batch_alone = predictor.predict(raws[:1], {"exit_threshold": 1.0})[0]
    np.testing.assert_allclose(batch_alone.logits, never[0].logits, atol=0.05)
    assert batch_alone.answer["label"] == never[0].answer["label"]


@pytest.mark.parametrize("options, message", [
    ({"ratio": 1.0}, "ratio"), ({"exit_layers": (5,)}, "lacks"), ({"weight_type": "int4"}, "weight_type"),
    ({"threshold": 2.0}, "threshold"), ({"zero_stage": 7}, "zero_stage")])
def test_bad_settings_raise_before_work(preset_checkpoint, options, message):
    from transformers import AutoModelForSequenceClassification

    from dyngate_build.techniques import get_technique, make_config

    with pytest.raises(ConfigError, match=message):
        config = make_config("stacked", options)
        model = AutoModelForSequenceClassification.from_pretrained(preset_checkpoint("distilbert-tiny"))
        source = type("S", (), {"model": model, "family": type("F", (), {"model_type": "distilbert"})})
        get_technique("stacked").check(source, config)
